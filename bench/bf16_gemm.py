"""The CPU logits GEMM of a bf16 head: hotloop's bf16 → fp32 GEMM against the two ways PyTorch offers.

    python -m bench.bf16_gemm [--sizes R,V,D ...] [--reps k] [--quick]

Modes, timed in the same rounds on the same ``hidden [R, D]``, ``weight [V, D]`` bf16, logits ``[R, V]`` fp32:

- ``torch bf16``: ``torch.mm`` of the bf16 operands into a held bf16 buffer, then upcast into the fp32 logits
  (what Liger's chunked losses do): fast, but every logit is rounded to bf16;
- ``torch fp32``: both operands upcast, then the fp32 ``torch.mm`` (hotloop's CPU path before
  ``csrc/bf16_gemm.cpp``): fp32-exact, ~6x slower;
- ``hotloop``: ``_bf16_gemm_ext``: the VNNI pack of the weight and the tiled brgemm, both per call, as the fused
  kernels do (one pack serves every row chunk of a call);
- ``hotloop GEMM``: the tiled brgemm alone, on a weight packed once before the rounds.

``max abs err``: largest |logit − float64 product of the bf16 operands|. Writes
``bench/results/bf16_gemm-cpu.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import torch

from bench._harness import Contender, Row, time_section
from bench._results import RESULTS_DIR, collect_meta, device_slug, write_results
from hotloop.kernels import _bf16_gemm_ext as gemm

SIZES = [(256, 32000, 512), (1024, 32000, 512), (2048, 32000, 512), (1024, 49152, 576), (1024, 151936, 896)]
QUICK = [(64, 4096, 128)]


def bench_size(rows: int, vocab: int, dim: int, reps: int) -> list[Row]:
    """The three modes on one [R, V, D]."""
    size = f"R={rows}, V={vocab}, D={dim}"
    hidden = torch.randn(rows, dim).bfloat16()
    weight = (torch.randn(vocab, dim) * 4 * dim**-0.5).bfloat16()
    exact = hidden.double() @ weight.double().T
    logits, low = torch.empty(rows, vocab), torch.empty(rows, vocab, dtype=torch.bfloat16)

    def torch_bf16() -> None:
        logits.copy_(torch.mm(hidden, weight.T, out=low))

    def torch_fp32() -> None:
        torch.mm(hidden.float(), weight.float().T, out=logits)

    def hotloop() -> None:
        with gemm.packed_head(weight) as head:
            gemm.logits_into(logits, hidden, head, 0)

    def err(fn) -> float:
        fn()
        return (logits.double() - exact).abs().max().item()

    modes = [("torch bf16", torch_bf16, "bf16 output, upcast"), ("torch fp32", torch_fp32, "upcast operands")]
    held = contextlib.ExitStack()
    if gemm.usable(weight):
        head = held.enter_context(gemm.packed_head(weight))
        modes.append(("hotloop", hotloop, "VNNI pack + brgemm per call"))
        modes.append(("hotloop GEMM", lambda: gemm.logits_into(logits, hidden, head, 0), "brgemm, packed once"))
    entries = [
        (Row(impl=name, mode="logits", size=size, per_token_logp="", max_abs_err=err(fn), note=note), Contender(fn))
        for name, fn, note in modes
    ]
    with held:
        out = time_section(entries, warmup=1, reps=reps, device="cpu")
    if not gemm.usable(weight):
        out.append(Row(impl="hotloop", mode="logits", size=size, status="unavailable: no bf16 brgemm here"))
    return out


def main(argv: list[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="*", help="R,V,D triples (default: five LM-head shapes)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one small size, 2 reps (smoke test)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    sizes = [tuple(map(int, s.split(","))) for s in args.sizes] if args.sizes else (QUICK if args.quick else SIZES)
    reps = 2 if args.quick else args.reps
    rows = [r for size in sizes for r in bench_size(*size, reps)]
    meta = collect_meta(
        "cpu",
        slug=device_slug("cpu"),
        threads=torch.get_num_threads(),
        notes=["Modes of one size are timed in shared, rotated rounds (bench/_harness.py)."],
    )
    paths = write_results("bf16_gemm", rows, meta, ratios_to=("torch bf16", "torch fp32"), out_dir=args.out_dir)
    print(paths["md"].read_text())
    return paths


if __name__ == "__main__":
    main()
