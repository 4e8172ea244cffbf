"""Timings: the Triton log-prob kernels' forward, backward and fwd+bwd against the cuBLAS GEMM floor of the
same run, then the peers of ``bench.logprob`` and ``bench.losses`` (each only if importable here).

Floor: real ``torch.mm`` calls of the same shapes and dtype into preallocated buffers — forward one GEMM
(logits), backward three (logits recomputed, G @ W, G.T @ H), fwd+bwd four. Timed in shared interleaved rounds
(``bench._harness``): medians, peak extra memory from one untimed call.
"""

from __future__ import annotations

import torch

import bench.logprob as logprob_bench
import bench.losses as losses_bench
from bench._harness import Contender, Row, time_section
from hotloop.kernels._fused_linear_logprob_triton import triton_logprob_bwd, triton_logprob_fwd

LOGPROB_PEERS = ("floor", "hotloop", "liger", "cce", "trl", "torch")


def _floor(h, w, size) -> list[tuple[Row, Contender]]:
    logits = torch.empty(h.shape[0], w.shape[0], device=h.device, dtype=h.dtype)
    grad_h, grad_w = torch.empty_like(h), torch.empty_like(w)

    def mm_logits():
        torch.mm(h, w.T, out=logits)

    def backward():  # logits recomputed, grad_H = G @ W, grad_W = G.T @ H
        mm_logits()
        torch.mm(logits, w, out=grad_h)
        torch.mm(logits.T, h, out=grad_w)

    modes = {"fwd": (1, mm_logits), "bwd": (3, backward), "fwd+bwd": (4, lambda: (mm_logits(), backward()))}
    note = "GEMMs: torch.mm into preallocated buffers (memory: outputs only, not measured)"
    return [
        (Row("floor", mode, size, peak_extra_mb=0.0, per_token_logp="—", note=f"{k} {note}"), Contender(fn))
        for mode, (k, fn) in modes.items()
    ]


def kernel_entries(n, d, v, device) -> list[tuple[Row, Contender]]:
    """hotloop's launchers (no autograd) and the floor at one bf16 size; entropy on in the forward and backward."""
    h = torch.randn(n, d, device=device, dtype=torch.bfloat16)
    w = (torch.randn(v, d, device=device) / d**0.5).to(torch.bfloat16)
    t = torch.randint(0, v, (n,), device=device)
    g_lp, g_ent = torch.randn(n, device=device), torch.randn(n, device=device)
    size = f"triton kernels N={n} D={d} V={v} bf16"
    kw = dict(temperature=1.0, ignore_index=-100)
    stats = triton_logprob_fwd(h, w, t, None, with_entropy=True, **kw)

    def fwd():
        return triton_logprob_fwd(h, w, t, None, with_entropy=True, **kw)

    def bwd(s=stats):
        return triton_logprob_bwd(h, w, t, None, s, g_lp, g_ent, needs_grad=(True, True, False), **kw)

    entries = [
        (Row("hotloop", mode, size, per_token_logp="yes", note="logp + entropy, both gradients"), Contender(fn))
        for mode, fn in (("fwd", fwd), ("bwd", bwd), ("fwd+bwd", lambda: bwd(fwd())))
    ]
    return _floor(h, w, size) + entries


def time_kernels(sizes, device, *, warmup, reps) -> list[Row]:
    rows = []
    for n, d, v in sizes:
        rows += time_section(kernel_entries(n, d, v, device), warmup=warmup, reps=reps, device=device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def time_peers(sizes, device, *, warmup, reps, dry: bool) -> list[Row]:
    impls = [p for p in LOGPROB_PEERS if not (dry and p in ("cce", "liger"))]  # CPU: CCE's torch.compile is minutes
    return logprob_bench.run(sizes, dtype=torch.bfloat16, device=device, warmup=warmup, reps=reps, impls=impls)


def time_losses(sizes, device, *, warmup, reps, dry: bool) -> list[Row]:
    """bench.losses' cells (bf16, reference head) at each (S, T, D, V); dry: one loss, Liger not compiled."""
    losses = "grpo-dapo-kl" if dry else "grpo-dapo-kl,dpo"  # dry: one loss is enough to run the code path
    impls = ["floor", "hotloop", "liger-eager" if dry else "liger"]
    rows = []
    for s, t, d, v in sizes:
        args = losses_bench.parse_args(
            [
                "--losses",
                losses,
                "--seqs",
                str(s),
                "--tokens",
                str(t),
                "--refs",
                "head",
                "--dtypes",
                "bf16",
                "--dim",
                str(d),
                "--vocab",
                str(v),
                "--reps",
                str(reps),
                "--warmup",
                str(warmup),
                "--max-rows",
                str(2 * s * t),
            ]
        )
        rows += losses_bench.run(args, impls, device=torch.device(device))[0]
    return rows


def targets(rows: list[Row]) -> list[dict]:
    """Issue 15's targets from the rows: log-prob fwd+bwd ≤ 1.15× floor; fused losses ≥ 1.5× Liger at ≤ its memory."""
    by = {(r.impl, r.mode, r.size): r for r in rows if r.median_ms is not None}
    out = []
    for (impl, mode, size), r in by.items():
        floor = by.get(("floor", mode, size))
        if impl == "hotloop" and mode == "fwd+bwd" and size.startswith("triton") and floor:
            ratio = r.median_ms / floor.median_ms
            out.append(
                dict(name=f"log-prob fwd+bwd / floor, {size}", value=f"{ratio:.2f}×", goal="≤ 1.15×", met=ratio <= 1.15)
            )
        liger = by.get(("liger", mode, size))
        if impl.startswith("hotloop") and not size.startswith("triton") and liger and "×" in size:
            speed = liger.median_ms / r.median_ms
            mem_ok = (r.peak_extra_mb or 0) <= (liger.peak_extra_mb or 0) * 1.0001
            out.append(
                dict(
                    name=f"{impl} vs Liger {mode}, {size}",
                    value=f"{speed:.2f}× faster, {r.peak_extra_mb:.0f} vs {liger.peak_extra_mb:.0f} MB",
                    goal="≥ 1.5× at ≤ memory",
                    met=speed >= 1.5 and mem_ok,
                )
            )
    return out
