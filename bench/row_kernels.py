"""Native CPU row kernels (csrc/) against the eager PyTorch sequence they replace.

    python -m bench.row_kernels [--sizes R,V ...] [--dtype fp32|bf16] [--reps k] [--quick]

Modes, timed in the same process on the same logits [R, V] (s = inv_temperature = 0.7):

- ``row_stats``: ``native`` = ``_cpu_ext.row_stats``; ``eager`` = ``z = s·x``, ``logsumexp``,
  ``gather`` (logp), ``softmax(z)·z`` summed (entropy).
- ``row_grad``: ``native`` = ``_cpu_ext.row_grad_`` over the whole row (in place, on a scratch copy
  refilled untimed before each call); ``eager`` = ``softmax(z)``, the entropy term
  ``p (log p + H)``, scale by ``g``, subtract the one-hot, times s.
- ``floor``: the memory traffic no implementation avoids, as a real PyTorch op of the same size:
  one read (``x.sum(-1)``) for ``row_stats``, one read + one write (``x.mul_(1)``) for ``row_grad``.

``max abs err`` compares the first rows with the float64 reference (``reference_row_*``).
Writes ``bench/results/row_kernels-cpu.{md,json,png}``; on a shared machine timings are noisy.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench._harness import Contender, Row, time_section
from bench._results import RESULTS_DIR, collect_meta, device_slug, write_results
from hotloop.kernels import _cpu_ext

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SIZES, QUICK = [(2048, 32000), (2048, 151936)], [(256, 4096)]
S, IGNORE, CHECK_ROWS = 0.7, -100, 16


def eager_stats(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """lse, logp, entropy [R] with the usual eager ops (fp32 math)."""
    z = x.float() * S
    lse = torch.logsumexp(z, dim=-1)
    ignored = t == IGNORE
    logp = z.gather(-1, t.clamp_min(0)[:, None]).squeeze(-1) - lse
    entropy = lse - (torch.softmax(z, dim=-1) * z).sum(-1)
    return lse, logp.masked_fill(ignored, 0.0), entropy.masked_fill(ignored, 0.0)


def eager_grad(x, t, lse, entropy, g_lp, g_ent) -> torch.Tensor:
    """d(g_lp·logp + g_ent·H)/dx [R, V] with the usual eager ops (lse recomputed by softmax)."""
    z = x.float() * S
    p = torch.softmax(z, dim=-1)
    log_p = z - lse[:, None]
    g = -p * (g_lp[:, None] + g_ent[:, None] * (log_p + entropy[:, None]))
    keep = (t != IGNORE).float()
    g.scatter_add_(1, t.clamp_min(0)[:, None], (g_lp * keep)[:, None])
    return (g * keep[:, None]).mul_(S).to(x.dtype)


def _entry(impl, mode, size, fn, between=None, err=None, note="") -> tuple[Row, Contender]:
    return Row(
        impl=impl, mode=mode, size=size, per_token_logp="yes" if impl != "floor" else "", max_abs_err=err, note=note
    ), Contender(fn, between)


def _stats_err(x, t) -> float:
    ref = _cpu_ext.reference_row_stats(x[:CHECK_ROWS], t[:CHECK_ROWS], inv_temperature=S, ignore_index=IGNORE)
    out = _cpu_ext.row_stats(x[:CHECK_ROWS], t[:CHECK_ROWS], inv_temperature=S, ignore_index=IGNORE)
    return max((o.double() - r).abs().max().item() for o, r in zip(out, ref))


def _grad_err(x, t, g_lp, g_ent) -> float:
    xs, ts = x[:CHECK_ROWS], t[:CHECK_ROWS]
    lse, _, ent = _cpu_ext.reference_row_stats(xs, ts, inv_temperature=S, ignore_index=IGNORE)
    ref = _cpu_ext.reference_row_grad(
        xs, ts, grad_logp=g_lp[:CHECK_ROWS], grad_entropy=g_ent[:CHECK_ROWS], inv_temperature=S, ignore_index=IGNORE
    )
    out = xs.clone()
    _cpu_ext.row_grad_(
        out,
        ts,
        vocab_start=0,
        lse=lse.float(),
        entropy=ent.float(),
        grad_logp=g_lp[:CHECK_ROWS],
        grad_entropy=g_ent[:CHECK_ROWS],
        inv_temperature=S,
        ignore_index=IGNORE,
    )
    return (out.double() - ref).abs().max().item()


def bench_size(rows: int, vocab: int, dtype: torch.dtype, reps: int) -> list[Row]:
    """All rows (floor, eager, native) x (row_stats, row_grad) for one [R, V], timed in shared rounds."""
    size = f"R={rows}, V={vocab}, {str(dtype).removeprefix('torch.')}"
    x = (torch.randn(rows, vocab) * 3).to(dtype)
    t = torch.randint(0, vocab, (rows,))
    t[::17] = IGNORE
    g_lp, g_ent = torch.randn(rows), torch.randn(rows)
    lse, _, entropy = eager_stats(x, t)
    floor_scratch, native_scratch = x.clone(), x.clone()
    entries = [
        _entry("floor", "row_stats", size, lambda: x.sum(-1), note="one read of the logits"),
        _entry("eager", "row_stats", size, lambda: eager_stats(x, t)),
        _entry("floor", "row_grad", size, lambda: floor_scratch.mul_(1), note="one read + one write"),
        _entry("eager", "row_grad", size, lambda: eager_grad(x, t, lse, entropy, g_lp, g_ent)),
    ]
    if not _cpu_ext.available():
        missing = [
            Row(impl="native", mode=m, size=size, status="unavailable: extension not built")
            for m in ("row_stats", "row_grad")
        ]
        return time_section(entries, warmup=1, reps=reps, device="cpu") + missing
    entries.append(
        _entry(
            "native",
            "row_stats",
            size,
            lambda: _cpu_ext.row_stats(x, t, inv_temperature=S, ignore_index=IGNORE),
            err=_stats_err(x, t),
        )
    )
    entries.append(
        _entry(
            "native",
            "row_grad",
            size,
            lambda: _cpu_ext.row_grad_(
                native_scratch,
                t,
                vocab_start=0,
                lse=lse,
                entropy=entropy,
                grad_logp=g_lp,
                grad_entropy=g_ent,
                inv_temperature=S,
                ignore_index=IGNORE,
            ),
            between=lambda: native_scratch.copy_(x),
            err=_grad_err(x, t, g_lp, g_ent),
            note="in place",
        )
    )
    return time_section(entries, warmup=1, reps=reps, device="cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="*", help="R,V pairs (default 2048,32000 2048,151936)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one small size, 3 reps (smoke test)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()
    sizes = (
        [tuple(int(v) for v in s.split(",")) for s in args.sizes] if args.sizes else (QUICK if args.quick else SIZES)
    )
    reps = 3 if args.quick else args.reps
    rows = [r for rv in sizes for r in bench_size(*rv, DTYPES[args.dtype], reps)]
    meta = collect_meta(
        "cpu",
        slug=device_slug("cpu"),
        threads=torch.get_num_threads(),
        native=_cpu_ext.available(),
        notes=["Rows of one size are timed in shared, rotated rounds (bench/_harness.py)."],
    )
    paths = write_results("row_kernels", rows, meta, ratios_to=("floor", "eager"), out_dir=args.out_dir)
    print(paths["md"].read_text())


if __name__ == "__main__":
    main()
