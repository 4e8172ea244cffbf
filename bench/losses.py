"""Fused linear loss benchmark: forward + backward of DPO and GRPO from hidden states and the LM head.

    python -m bench.losses [--sizes S,T,D,V ...] [--dtype fp32|bf16] [--reps k] [--quick] [--impls ...]

Two losses on ``S`` sequences of ``T`` tokens (``N = S·T``, every token counted), hidden size ``D``, vocabulary
``V``, each timed as ``loss.backward()`` after the forward, in the same process on the same inputs:

- ``dpo``: sigmoid DPO (β = 0.1) of ``S/2`` pairs (chosen sequences first) against a frozen reference head
  (``ref_hidden [S, T, D]``, ``ref_weight [V, D]``), the configuration Liger supports;
- ``grpo``: DAPO (ε = 0.2) with a k3 KL term (β = 0.04) to cached per-token reference log-probs, off-policy
  (``old_logp`` = policy log-probs + noise, so that some ratios clip).

Implementations: ``floor`` (the matmuls no exact method avoids, as real ``torch.mm`` calls: DPO four —
policy logits, reference logits, ``G @ W``, ``G.T @ h``; GRPO three), ``naive`` (materialized logits, TRL-style
``log_softmax`` + ``gather``, then hotloop's functional loss), ``hotloop`` (the fused modules; DPO once per
strategy and once with cached reference log-probs), ``liger`` (Liger-Kernel's chunked classes, ``torch.compile``
warm-up included in the first, untimed call, whose time is recorded) and ``compat``
(``hotloop.kernels.compat.liger``, the drop-in classes, called exactly as Liger's). The error column is
``|loss − float64 reference|`` (log-probs in float64 by row chunks, then the functional loss in float64); each
implementation's first call is timed alone (Liger's includes its compilation) and noted in its row.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from bench._harness import (MB, RESULTS_DIR, Contender, Row, collect_meta, device_slug, time_section, unavailable_row,
                            write_results)
from hotloop.kernels.fused_linear_logprob import fused_linear_logprob, reference_fused_linear_logprob
from hotloop.kernels.losses import dpo_loss, grpo_loss

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LOSSES = ("dpo", "grpo")
MODES = {"dpo": "dpo sigmoid fwd+bwd", "grpo": "grpo dapo+k3 fwd+bwd"}
CPU_SIZES, CPU_QUICK = [(4, 512, 512, 32000)], [(4, 64, 128, 4096)]
CUDA_SIZES = [(8, 1024, 2048, 32000), (8, 2048, 4096, 128256), (8, 2048, 4096, 151936)]
CUDA_QUICK = [(8, 512, 1024, 32000)]
DPO_BETA, GRPO_BETA = 0.1, 0.04
# Elements of one float64 logits chunk of the reference.
REF_ELEMENTS = 2**24
IMPLS = ("floor", "naive", "hotloop", "liger", "compat")


@dataclass(frozen=True)
class Case:
    """One loss at one size: inputs (policy head needs grad), cached log-probs, and the float64 reference loss."""

    loss: str  # "dpo" | "grpo"
    size: str
    hidden: torch.Tensor  # [S, T, D]
    weight: torch.Tensor  # [V, D]
    targets: torch.Tensor  # [S, T] int64
    extra: dict  # dpo: ref_hidden, ref_weight, ref_logps [S]; grpo: mask, advantages, old_logp, ref_logp
    reference: float


def _logp64(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[S, T]`` float64 log-probs, materialized ``REF_ELEMENTS`` logits at a time."""
    h, t, w = hidden.detach().reshape(-1, hidden.shape[-1]), targets.reshape(-1), weight.detach().double()
    rows = max(1, REF_ELEMENTS // weight.shape[0])
    parts = [reference_fused_linear_logprob(h[i:i + rows].double(), w, t[i:i + rows]) for i in range(0, len(t), rows)]
    return torch.cat(parts).reshape(targets.shape)


def make_case(loss: str, s: int, t: int, d: int, v: int, dtype: torch.dtype, device: torch.device) -> Case:
    """Random inputs (logits of order 1), cached log-probs, float64 reference loss."""
    def head():
        return torch.randn(s, t, d, device=device).to(dtype), (torch.randn(v, d, device=device) / d**0.5).to(dtype)

    (hidden, weight), targets = head(), torch.randint(0, v, (s, t), device=device)
    hidden.requires_grad_(True), weight.requires_grad_(True)
    logp64 = _logp64(hidden, weight, targets)
    if loss == "dpo":
        ref_hidden, ref_weight = head()
        ref64 = _logp64(ref_hidden, ref_weight, targets).sum(-1)
        seq, half = logp64.sum(-1), s // 2
        reference = dpo_loss(seq[:half], seq[half:], ref64[:half], ref64[half:], beta=DPO_BETA).loss
        extra = dict(ref_hidden=ref_hidden, ref_weight=ref_weight, ref_logps=ref64.float())
    else:
        with torch.no_grad():
            logp = fused_linear_logprob(hidden, weight, targets)
        extra = dict(mask=torch.ones(s, t, dtype=torch.bool, device=device), advantages=torch.randn(s, device=device),
                     old_logp=logp + 0.1 * torch.randn_like(logp), ref_logp=logp + 0.1 * torch.randn_like(logp))
        reference = grpo_loss(logp64, extra["old_logp"].double(), extra["advantages"].double(), extra["mask"],
                              ref_logp=extra["ref_logp"].double(), beta=GRPO_BETA, loss_type="dapo").loss
    size = f"N={s * t} ({s}×{t}) D={d} V={v} {str(dtype).removeprefix('torch.')}"
    return Case(loss, size, hidden, weight, targets, extra, reference.item())


def _naive_logp(hidden, weight, targets):
    logits = (hidden @ weight.T).float()
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _naive(case: Case, compiled: bool) -> Callable[[], torch.Tensor]:
    h, w, t, x = case.hidden, case.weight, case.targets, case.extra
    if case.loss == "grpo":
        return lambda: grpo_loss(_naive_logp(h, w, t), x["old_logp"], x["advantages"], x["mask"],
                                 ref_logp=x["ref_logp"], beta=GRPO_BETA, loss_type="dapo").loss  # fmt: skip

    def dpo():
        seq, half = _naive_logp(h, w, t).sum(-1), h.shape[0] // 2
        with torch.no_grad():
            ref = _naive_logp(x["ref_hidden"], x["ref_weight"], t).sum(-1)
        return dpo_loss(seq[:half], seq[half:], ref[:half], ref[half:], beta=DPO_BETA).loss

    return dpo


def _hotloop(case: Case, strategy: str | None) -> Callable[[], torch.Tensor]:
    from hotloop.kernels import fused_linear_dpo_loss, fused_linear_grpo_loss

    h, w, t, x = case.hidden, case.weight, case.targets, case.extra
    if case.loss == "grpo":
        return lambda: fused_linear_grpo_loss(h, w, t, x["advantages"], mask=x["mask"], old_logp=x["old_logp"],
                                              ref_logp=x["ref_logp"], beta=GRPO_BETA, loss_type="dapo").loss
    if strategy is None:  # cached reference log-probs, strategy "auto"
        return lambda: fused_linear_dpo_loss(h, w, t, ref_logps=x["ref_logps"], beta=DPO_BETA).loss
    return lambda: fused_linear_dpo_loss(h, w, t, ref_hidden=x["ref_hidden"], ref_weight=x["ref_weight"],
                                         beta=DPO_BETA, strategy=strategy).loss  # fmt: skip


def _liger_style(module) -> Callable[[Case, bool], Callable[[], torch.Tensor]]:
    """Liger's classes (``module`` = ``liger_kernel.chunked_loss`` or hotloop's compat layer), called as Liger's."""
    def build(case: Case, compiled: bool) -> Callable[[], torch.Tensor]:
        h, w, t, x = case.hidden, case.weight, case.targets, case.extra
        if case.loss == "dpo":
            fn = module().LigerFusedLinearDPOLoss(beta=DPO_BETA, use_ref_model=True, compiled=compiled)
            return lambda: fn(w, h, t, None, x["ref_hidden"], x["ref_weight"])[0]
        fn = module().LigerFusedLinearGRPOLoss(beta=GRPO_BETA, loss_type="dapo", compiled=compiled)
        return lambda: fn(h, w, t, x["mask"], x["advantages"], ref_per_token_logps=x["ref_logp"],
                          old_per_token_logps=x["old_logp"])[0]  # fmt: skip

    return build


def _import(name: str):
    return lambda: importlib.import_module(name)


@dataclass(frozen=True)
class Impl:
    """A row of the table: ``build(case, compiled)`` returns a zero-argument forward giving the scalar loss."""

    name: str
    family: str  # the --impls name that selects it
    losses: tuple[str, ...]
    note: str
    build: Callable[[Case, bool], Callable[[], torch.Tensor]]


IMPLEMENTATIONS = (
    Impl("naive", "naive", LOSSES, "full [N, V] logits + fp32 log_softmax/gather, hotloop's functional loss", _naive),
    Impl("hotloop grouped", "hotloop", ("dpo",), "reference head; strategy='grouped' (pairs per chunk, 3 + 1 matmuls)",
         lambda c, _: _hotloop(c, "grouped")),
    Impl("hotloop two_pass", "hotloop", ("dpo",), "reference head; strategy='two_pass' (4 + 1 matmuls)",
         lambda c, _: _hotloop(c, "two_pass")),
    Impl("hotloop cached-ref", "hotloop", ("dpo",), "ref_logps precomputed once (not timed); strategy='auto'",
         lambda c, _: _hotloop(c, None)),
    Impl("hotloop", "hotloop", ("grpo",), "fused_linear_grpo_loss (3 matmuls on CPU, 4 on CUDA)",
         lambda c, _: _hotloop(c, None)),
    Impl("liger", "liger", LOSSES, "liger_kernel.chunked_loss, chunk_size=1",
         _liger_style(_import("liger_kernel.chunked_loss"))),
    Impl("compat", "compat", LOSSES, "hotloop.kernels.compat.liger, called as Liger's",
         _liger_style(_import("hotloop.kernels.compat.liger"))),
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def impl_entry(impl: Impl, case: Case, *, compiled: bool) -> tuple[Row, Contender]:
    """One implementation on one case, untimed; its first call (compilation, if any) is timed alone and gives the
    error. Raises if the implementation cannot run here."""
    device, forward = case.hidden.device, impl.build(case, compiled)

    def step() -> None:
        forward().backward()

    def free_grads() -> None:
        case.hidden.grad = case.weight.grad = None

    _sync(device)
    start = time.perf_counter()
    loss = forward()
    loss.backward()
    _sync(device)
    first_s = time.perf_counter() - start
    err = abs(loss.item() - case.reference)
    free_grads()
    note = f"{impl.note}{f'; compiled={compiled}' if impl.family == 'liger' else ''}; first call {first_s:.2f} s"
    return Row(impl.name, MODES[case.loss], case.size, per_token_logp="—", max_abs_err=err, note=note), \
        Contender(step, free_grads)


def floor_entry(case: Case) -> tuple[Row, Contender]:
    """The matmuls every exact method does, as real torch.mm into preallocated buffers; memory = gradients only."""
    h, w = case.hidden.detach().reshape(-1, case.hidden.shape[-1]), case.weight.detach()
    logits = torch.empty(h.shape[0], w.shape[0], device=h.device, dtype=h.dtype)
    grad_h, grad_w = torch.empty_like(h), torch.empty_like(w)
    ref = None
    if case.loss == "dpo":
        ref = (case.extra["ref_hidden"].reshape(-1, h.shape[1]), case.extra["ref_weight"], torch.empty_like(logits))

    def matmuls() -> None:
        torch.mm(h, w.T, out=logits)
        if ref is not None:
            torch.mm(ref[0], ref[1].T, out=ref[2])
        torch.mm(logits, w, out=grad_h)
        torch.mm(logits.T, h, out=grad_w)

    count = "4: h @ W.T, h_ref @ W_ref.T, G @ W, G.T @ h" if ref is not None else "3: h @ W.T, G @ W, G.T @ h"
    grads = (h.numel() + w.numel()) * h.element_size() / MB
    return Row("floor", MODES[case.loss], case.size, peak_extra_mb=grads, per_token_logp="—",
               note=f"{count} (torch.mm); memory = the gradients (computed, not measured)"), Contender(matmuls)


def run(sizes, *, losses, dtype, device, warmup, reps, impls, compiled) -> list[Row]:
    """Every requested implementation of every loss on every size; one loss at one size is timed in shared rounds."""
    rows = []
    for s, t, d, v in sizes:
        for loss in losses:
            case = make_case(loss, s, t, d, v, dtype, device)
            entries = [floor_entry(case)] if "floor" in impls else []
            unavailable = []
            for impl in (i for i in IMPLEMENTATIONS if i.family in impls and loss in i.losses):
                try:
                    entries.append(impl_entry(impl, case, compiled=compiled))
                except Exception as exc:  # noqa: BLE001 - an implementation that cannot run here becomes a row
                    unavailable.append(unavailable_row(impl.name, exc, mode=MODES[loss], size=case.size,
                                                       per_token_logp="—", note=impl.note))  # fmt: skip
            # the first call was the first warm-up round of every timed implementation
            section = time_section(entries, warmup=max(warmup - 1, 0), reps=reps, device=device) + unavailable
            for row in section:
                print(f"{case.size}  {loss:<5} {row.impl:<19} {row.status}", flush=True)
            rows += section
    return rows


NOTES = [
    "× floor / × naive / × liger: median time over that of `floor` / `naive` / `liger` at the same size and loss "
    "(below 1: faster). floor = real torch.mm "
    "timings of the same shapes and dtype: DPO four (policy logits, reference logits, G @ W, G.T @ h), GRPO three "
    "(logits, G @ W, G.T @ h). `hotloop cached-ref` takes the reference log-probs precomputed, so it skips the "
    "reference matmul the DPO floor includes.",
    "fwd+bwd: forward, then loss.backward(); peak memory includes grad_hidden and grad_weight. Every token counts "
    "(no prompt or padding): the fused losses would skip inactive rows, Liger's would not.",
    "first call: every implementation's first call is timed alone (for liger it includes the torch.compile "
    "warm-up) and gives the error column; the median covers the later calls.",
    "max abs err: |loss − float64 reference| (log-probs materialized in float64 by row chunks, hotloop's functional "
    "loss in float64).",
]


def _parse_size(text: str) -> tuple[int, int, int, int]:
    try:
        s, t, d, v = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes takes S,T,D,V (four integers), got {text!r}") from None
    if s < 2 or s % 2:
        raise argparse.ArgumentTypeError(f"--sizes: S must be even and >= 2 (DPO pairs), got {s}")
    return s, t, d, v


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.losses", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=_parse_size, help="S,T,D,V: sequences, tokens each, hidden, vocab")
    parser.add_argument("--losses", default=",".join(LOSSES), help=f"comma-separated subset of {','.join(LOSSES)}")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--reps", type=int, help="timed calls (default: 5 CPU, 20 CUDA, 3 with --quick)")
    parser.add_argument("--warmup", type=int, help="untimed calls first, the timed first call included "
                                                   "(default: 2 CPU, 5 CUDA, 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="one small size, few reps: checks that it all runs")
    parser.add_argument("--no-compile", action="store_true", help="Liger's classes with compiled=False (smoke tests)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {','.join(IMPLS)}")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    for option, given, known in (("--impls", args.impls, IMPLS), ("--losses", args.losses, LOSSES)):
        unknown = set(given.split(",")) - set(known)
        if unknown:
            parser.error(f"{option}: unknown {sorted(unknown)}; expected a subset of {list(known)}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Path]:
    """Run the benchmark and write ``<out-dir>/losses-<device>.{md,json,png}``; returns the paths."""
    args = parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sizes = args.sizes or {(True, True): CUDA_QUICK, (True, False): CUDA_SIZES,
                           (False, True): CPU_QUICK, (False, False): CPU_SIZES}[(cuda, args.quick)]
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    reps = args.reps or (3 if args.quick else 20 if cuda else 5)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5 if cuda else 2)
    torch.manual_seed(0)
    rows = run(sizes, losses=args.losses.split(","), dtype=dtype, device=device, warmup=warmup, reps=reps,
               impls=args.impls.split(","), compiled=not args.no_compile)  # fmt: skip
    meta = collect_meta(device, slug=device_slug(device), dtype=str(dtype).removeprefix("torch."), warmup=warmup,
                        reps=reps, threads=torch.get_num_threads(), liger_compiled=not args.no_compile,
                        peers=_peer_versions(), notes=NOTES)  # fmt: skip
    paths = write_results("losses", rows, meta, ratios_to=("floor", "naive", "liger"), out_dir=args.out_dir)
    print(paths["md"].read_text())
    return paths


def _peer_versions() -> str:
    try:
        return f"liger_kernel {importlib.metadata.version('liger_kernel')}"
    except importlib.metadata.PackageNotFoundError:
        return "liger_kernel not installed"


if __name__ == "__main__":
    main()
