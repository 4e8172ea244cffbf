"""Fused linear log-prob benchmark: per-token ``log p(target)`` of ``hidden @ weight.T``.

    python -m bench.logprob [--sizes N,D,V ... | --seqs 1,4,16 --tokens 128,512,2048 [--dim D --vocab V]]
                            [--dtype fp32|bf16] [--reps k] [--quick]

Each implementation is timed in two modes, in the same process on the same inputs:
``fwd+bwd`` (forward, then ``logp.backward(g)`` with ``g ~ randn[N]`` float32) and
``fwd (no grad)``. Peak extra memory and the max |logp − float64 reference| on the first rows
are recorded too (see ``bench/_harness.py`` for the methods).

Implementations: ``naive`` (full logits, fp32 log_softmax, gather), ``hotloop``
(``hotloop.kernels.fused_linear_logprob``), ``torch`` (``F.linear_cross_entropy`` with chunking
options, torch ≥ 2.13), ``trl`` (``trl.kernels.ChunkedLogProbFunction``), ``liger``
(``LigerFusedLinearCrossEntropyLoss``, Triton, CUDA only), ``liger-cute`` (Liger's fused scaled
cross entropy, CuTe-DSL kernel on Hopper only), ``cce`` (Cut Cross-Entropy; ``impl="cce"`` on CUDA,
``impl="torch_compile"`` elsewhere). Cross-entropy peers run with ``reduction="none"`` and are
negated, so every implementation returns the same per-token log-probs and gets the same upstream
gradient.

The floor is the matmul work no exact method avoids, timed as real ``torch.mm`` calls of the same
shapes and dtype into preallocated buffers: one ``[N, D] @ [D, V]`` without grad; four
matmul-equivalents with grad (logits, logits recomputed in backward, ``grad_hidden = G @ W``,
``grad_weight = G.T @ hidden``).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from bench._harness import MB, Contender, Row, Unavailable, time_section, unavailable_row
from bench._results import RESULTS_DIR, collect_meta, device_slug, write_results

LogpFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
MODES = ("fwd+bwd", "fwd (no grad)")
RATIOS_TO = ("floor", "naive", "torch", "cce")  # the × columns: the floor, materializing baselines, chunked peers
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CPU_SIZES, CPU_QUICK = [(2048, 512, 32000)], [(256, 128, 4096)]
CUDA_SIZES = [
    (2048, 2048, 32000),
    (8192, 2048, 32000),
    (2048, 4096, 128256),
    (8192, 4096, 128256),
    (8192, 4096, 151936),
]
CUDA_QUICK = [(1024, 1024, 32000)]
# Elements of the float64 reference logits for the error column; rows beyond this are not checked.
REF_ELEMENTS = 2**24
# TRL's GRPO/DPO trainers call ChunkedLogProbFunction with this vocabulary chunk width.
TRL_CHUNK_SIZE = 32768


@dataclass(frozen=True)
class Peer:
    """An implementation under test: ``build(device)`` returns ``logp_fn`` or raises Unavailable."""

    name: str
    per_token: str
    note: str
    build: Callable[[torch.device], LogpFn]


def _naive(device: torch.device) -> LogpFn:
    return lambda h, w, t: torch.log_softmax((h @ w.T).float(), dim=-1).gather(1, t[:, None]).squeeze(1)


def _hotloop_module():
    # importlib: `hotloop.kernels.fused_linear_logprob` as an attribute is the function, not the module.
    return importlib.import_module("hotloop.kernels.fused_linear_logprob")


def _hotloop(device: torch.device) -> LogpFn:
    fn = _hotloop_module().fused_linear_logprob
    return lambda h, w, t: fn(h, w, t)


def _torch(device: torch.device) -> LogpFn:
    import torch.nn.functional as F

    if not hasattr(F, "linear_cross_entropy"):
        raise Unavailable(f"torch {torch.__version__} has no F.linear_cross_entropy (added in 2.13)")
    options = torch.nn.LinearCrossEntropyOptions()
    return lambda h, w, t: -F.linear_cross_entropy(h, w, t, reduction="none", options=options)


def _trl(device: torch.device) -> LogpFn:
    from trl.kernels import ChunkedLogProbFunction

    # Positional: hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale, outputs.
    return lambda h, w, t: ChunkedLogProbFunction.apply(h, w, None, t, 1.0, TRL_CHUNK_SIZE, None, 1.0, ())[0]


def _liger(device: torch.device) -> LogpFn:
    if device.type != "cuda":
        raise Unavailable("Triton kernel, CUDA only")
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss(reduction="none")
    return lambda h, w, t: -loss(w, h, t)


def _liger_cute(device: torch.device) -> LogpFn:
    if device.type != "cuda" or torch.cuda.get_device_capability(device) != (9, 0):
        raise Unavailable("CuTe-DSL kernel, Hopper (sm90) only")
    from liger_kernel.ops import LigerFusedLinearScaledCrossEntropyFunction as Fn

    return lambda h, w, t: -Fn.apply(h, w, t)


def _cce(device: torch.device) -> LogpFn:
    from cut_cross_entropy import linear_cross_entropy

    impl = "cce" if device.type == "cuda" else "torch_compile"
    return lambda h, w, t: -linear_cross_entropy(h, w, t, reduction="none", impl=impl)


PEERS = (
    Peer("naive", "yes", "full [N, V] logits + fp32 copy", _naive),
    Peer("hotloop", "yes", "", _hotloop),
    Peer(
        "torch", "yes (−CE)", "F.linear_cross_entropy: a CE loss; reduction='none' gives −logp; no temperature", _torch
    ),
    Peer("trl", "yes", f"ChunkedLogProbFunction, chunk_size={TRL_CHUNK_SIZE}", _trl),
    Peer("liger", "yes (−CE)", "LigerFusedLinearCrossEntropyLoss: a CE loss, reduction='none'", _liger),
    Peer("liger-cute", "yes (−NLL)", "LigerFusedLinearScaledCrossEntropyFunction (CuTe-DSL on sm90)", _liger_cute),
    Peer(
        "cce",
        "yes (−CE)",
        "cut_cross_entropy.linear_cross_entropy, reduction='none'; impl='cce' "
        "(default filter_eps='high') on CUDA, 'torch_compile' on CPU",
        _cce,
    ),
)


@dataclass(frozen=True)
class Case:
    """One problem size: inputs, upstream gradient and float64 reference on the first rows."""

    size: str
    hidden: torch.Tensor  # [N, D], requires grad
    weight: torch.Tensor  # [V, D], requires grad
    targets: torch.Tensor  # [N] int64
    grad_logp: torch.Tensor  # [N] float32
    reference: torch.Tensor | None  # [n] float64, n = min(N, REF_ELEMENTS // V); None without hotloop


def make_case(n: int, d: int, v: int, dtype: torch.dtype, device: torch.device) -> Case:
    """Random inputs of one size (logits of order 1, as in a trained LM head)."""
    hidden = torch.randn(n, d, device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, d, device=device) / d**0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), device=device)
    grad_logp = torch.randn(n, device=device)
    rows = max(1, min(n, REF_ELEMENTS // v))
    try:
        ref_fn = _hotloop_module().reference_fused_linear_logprob
        reference = ref_fn(hidden.detach()[:rows], weight.detach(), targets[:rows]).double()
    except ImportError:
        reference = None
    size = f"N={n} D={d} V={v} {str(dtype).removeprefix('torch.')}"
    return Case(size, hidden, weight, targets, grad_logp, reference)


def _max_abs_err(fn: LogpFn, case: Case) -> float | None:
    if case.reference is None:
        return None
    with torch.no_grad():
        logp = fn(case.hidden, case.weight, case.targets)[: case.reference.shape[0]]
    return (logp.double() - case.reference).abs().max().item()


def peer_entries(peer: Peer, case: Case) -> list[tuple[Row, Contender]]:
    """Both modes of one peer on one case, untimed; raises if the peer cannot run here."""
    device = case.hidden.device
    fn = peer.build(device)
    h, w, t = case.hidden, case.weight, case.targets

    def fwd_bwd() -> None:
        fn(h, w, t).backward(case.grad_logp)

    def fwd() -> None:
        with torch.no_grad():
            fn(h, w, t)

    def free_grads() -> None:
        h.grad = w.grad = None

    err = _max_abs_err(fn, case)
    return [
        (
            Row(peer.name, mode, case.size, per_token_logp=peer.per_token, max_abs_err=err, note=peer.note),
            Contender(step, free_grads),
        )
        for mode, step in zip(MODES, (fwd_bwd, fwd))
    ]


def floor_entries(case: Case) -> list[tuple[Row, Contender]]:
    """The matmul floor in both modes; its memory column is the size of the outputs (computed)."""
    h, w = case.hidden.detach(), case.weight.detach()
    logits = torch.empty(h.shape[0], w.shape[0], device=h.device, dtype=h.dtype)

    def four_mm() -> tuple[torch.Tensor, torch.Tensor]:
        torch.mm(h, w.T, out=logits)
        torch.mm(h, w.T, out=logits)
        return torch.mm(logits, w), torch.mm(logits.T, h)  # the gradients: new tensors, as every peer returns

    def one_mm() -> None:
        torch.mm(h, w.T, out=logits)

    logp_bytes = h.shape[0] * 4
    grad_bytes = (h.numel() + w.numel()) * h.element_size()
    note = "torch.mm, logits into a held buffer, gradients into new tensors; memory = outputs only (computed)"
    return [
        (Row("floor", mode, case.size, peak_extra_mb=out_bytes / MB, per_token_logp="—", note=note), Contender(step))
        for mode, step, out_bytes in zip(MODES, (four_mm, one_mm), (grad_bytes + logp_bytes, logp_bytes))
    ]


def run(sizes, *, dtype: torch.dtype, device: torch.device, warmup: int, reps: int, impls: list[str]) -> list[Row]:
    """All requested implementations (and the floor, if requested) on every size, timed in shared rounds."""
    rows = []
    for n, d, v in sizes:
        case = make_case(n, d, v, dtype, device)
        entries = floor_entries(case) if "floor" in impls else []
        unavailable = []
        for peer in (p for p in PEERS if p.name in impls):
            try:
                entries += peer_entries(peer, case)
            except Exception as exc:  # noqa: BLE001 - a peer that cannot run here becomes a row saying why
                unavailable.append(
                    unavailable_row(
                        peer.name, exc, mode="both", size=case.size, per_token_logp=peer.per_token, note=peer.note
                    )
                )
        section = time_section(entries, warmup=warmup, reps=reps, device=device) + unavailable
        for row in section:
            print(f"{case.size}  {row.impl:<11} {row.mode:<14} {row.status}", flush=True)
        rows += section
    return rows


NOTES = [
    "× floor / × naive / × torch / × cce: median time over that of `floor` / `naive` / `torch` / `cce` at the same "
    "size and mode. "
    "floor = real torch.mm timings of the same shapes and dtype: one h @ W.T without grad; four "
    "matmul-equivalents with grad (logits, logits recomputed, G @ W, G.T @ h).",
    "fwd+bwd: logp.backward(g), g ~ randn[N] float32; its peak memory includes grad_hidden and grad_weight, "
    "which every implementation must produce.",
    "per-token logp? 'yes (−CE)' / 'yes (−NLL)': the peer computes a cross-entropy loss; with reduction='none' "
    "it is −logp per token, which the bench negates (no temperature, no entropy).",
    f"max abs err: max |logp − float64 reference| over the first min(N, {REF_ELEMENTS} // V) rows "
    "(hotloop's reference_fused_linear_logprob); — where the reference is unavailable.",
]


def _parse_size(text: str) -> tuple[int, int, int]:
    try:
        n, d, v = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes takes N,D,V (three integers), got {text!r}") from None
    return n, d, v


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    names = ["floor"] + [p.name for p in PEERS]
    parser = argparse.ArgumentParser(prog="python -m bench.logprob", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=_parse_size, help="N,D,V triples (default: by device)")
    parser.add_argument("--seqs", help="grid: comma-separated sequence counts S (with --tokens: N = S·T rows)")
    parser.add_argument("--tokens", help="grid: comma-separated tokens per sequence T")
    parser.add_argument("--dim", type=int, default=512, help="grid: hidden size D (default 512)")
    parser.add_argument("--vocab", type=int, default=32000, help="grid: vocabulary V (default 32000)")
    parser.add_argument("--max-rows", type=int, default=16384, help="grid: skip cells of more rows (default 16384)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--reps", type=int, help="timed calls (default: 5 CPU, 20 CUDA, 3 with --quick)")
    parser.add_argument("--warmup", type=int, help="untimed calls first (default: 2 CPU, 5 CUDA, 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="one small size, few reps: checks that it all runs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--impls", default=",".join(names), help=f"comma-separated subset of {','.join(names)}")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    unknown = set(args.impls.split(",")) - set(names)
    if unknown:
        parser.error(f"--impls: unknown {sorted(unknown)}; expected a subset of {names}")
    if (args.seqs is None) != (args.tokens is None):
        parser.error("--seqs and --tokens go together (the grid is S × T)")
    if args.seqs is not None:
        try:
            grid = [(int(s), int(t)) for s in args.seqs.split(",") for t in args.tokens.split(",")]
        except ValueError:
            parser.error(f"--seqs / --tokens: expected comma-separated integers, got {args.seqs!r}, {args.tokens!r}")
        args.sizes = [(s * t, args.dim, args.vocab) for s, t in grid if s * t <= args.max_rows]
    return args


def main(argv: list[str] | None = None) -> dict[str, Path]:
    """Run the benchmark and write ``<out-dir>/logprob-<device>.{md,json,png}``; returns the paths."""
    args = parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sizes = (
        args.sizes
        or {(True, True): CUDA_QUICK, (True, False): CUDA_SIZES, (False, True): CPU_QUICK, (False, False): CPU_SIZES}[
            (cuda, args.quick)
        ]
    )
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    reps = args.reps or (3 if args.quick else 20 if cuda else 5)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5 if cuda else 2)
    torch.manual_seed(0)
    rows = run(sizes, dtype=dtype, device=device, warmup=warmup, reps=reps, impls=args.impls.split(","))
    meta = collect_meta(
        device,
        slug=device_slug(device),
        dtype=str(dtype).removeprefix("torch."),
        warmup=warmup,
        reps=reps,
        threads=torch.get_num_threads(),
        peers=_peer_versions(),
        notes=NOTES,
    )
    ratios_to = tuple(impl for impl in RATIOS_TO if impl in args.impls.split(","))
    paths = write_results("logprob", rows, meta, ratios_to=ratios_to, out_dir=args.out_dir)
    print(paths["md"].read_text())
    return paths


def _peer_versions() -> str:
    versions = []
    for dist in ("trl", "liger_kernel", "cut_cross_entropy"):
        try:
            versions.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{dist} not installed")
    return ", ".join(versions)


if __name__ == "__main__":
    main()
