"""Fused linear loss benchmark: a grid of forward + backward calls from hidden states and the LM head.

    python -m bench.losses [--losses dpo,kto,...] [--seqs 1,4,16] [--tokens 128,512,2048] [--refs none,head,cached]
                           [--dtypes fp32,bf16] [--dim 512] [--vocab 32000] [--max-rows 16384] [--impls ...]
                           [--reps k] [--quick] [--no-compile]

Grid: every loss of ``bench/_loss_cases.SPECS`` (DPO sigmoid and IPO, KTO, ORPO, SimPO, CPO, GRPO and DAPO with
and without a k3 KL term) × ``S`` sequences (pairs for the preference losses: ``2S`` sequences) × ``T`` tokens
each (every token counted) × the reference variants the loss takes (``none`` / ``head`` / ``cached``) × dtype.
Cells of more than ``--max-rows`` rows are skipped. Each cell is one table section whose implementations are
timed in the same interleaved rounds (``bench/_harness.py``): ``floor`` (the matmuls no exact method avoids,
real ``torch.mm`` calls: logits, ``G @ W``, ``G.T @ h``, plus the reference logits with a head — gradients
computed in the forward, so nothing is recomputed), ``naive``, ``hotloop`` (the direct API), ``compat`` (the
drop-in class called as Liger's), ``liger`` and ``liger eager`` (Liger-Kernel compiled and not). Each row: median
time over the floor and over each peer, peak extra memory, first-call time (timed alone; Liger's includes
``torch.compile``), |loss − float64 reference|. The summary table gives the worst cell per loss.

Cost: reps fall with the cell's size (``--reps`` fixes them); the default grid (fp32, S ∈ {1, 4},
T ∈ {128, 512}) is ~15–20 min on an idle 2-core CPU. ``--quick``: a tiny size, one rep, no ``torch.compile``
(Liger's compiled rows recompile per cell), to check that it all runs.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import time
from pathlib import Path

import torch

from bench._harness import MB, Contender, Row, time_section, unavailable_row
from bench._loss_cases import IMPLEMENTATIONS, SPECS, Case, Impl, make_case
from bench._results import RESULTS_DIR, add_ratios, collect_meta, device_slug, write_results

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
REFS = ("none", "head", "cached")
IMPLS = ("floor", "naive", "hotloop", "compat", "liger", "liger-eager")
PEERS = ("floor", "naive", "liger", "liger eager")
DEFAULTS = dict(seqs="1,4", tokens="128,512", dtypes="fp32", dim=512, vocab=32000, max_rows=16384)
QUICK = dict(seqs="1", tokens="16", dtypes="fp32", dim=16, vocab=97)


def _reps(rows: int) -> int:
    """Timed rounds by cell size: a 16k-row cell gets 2, a 256-row one 5."""
    return 5 if rows <= 1024 else 3 if rows <= 4096 else 2


def impl_entry(impl: Impl, case: Case) -> tuple[Row, Contender, float]:
    """One implementation on one cell; its first call (compilation, if any) is timed alone and gives the error."""
    forward = impl.build(case)

    def free_grads() -> None:
        case.hidden.grad = case.weight.grad = None

    start = time.perf_counter()
    loss = forward()
    loss.backward()
    first_s = time.perf_counter() - start
    err = abs(loss.item() - case.reference)
    free_grads()
    row = Row(
        impl.name,
        case.spec.name,
        case.size,
        per_token_logp="—",
        max_abs_err=err,
        note=f"{impl.note}; first call {first_s:.2f} s",
    )
    return row, Contender(lambda: forward().backward(), free_grads), first_s


def floor_entry(case: Case) -> tuple[Row, Contender]:
    """The cell's matmuls as real torch.mm (logits into a held buffer, gradients into new tensors); memory = the
    gradients only."""
    h, w = case.hidden.detach().reshape(-1, case.hidden.shape[-1]), case.weight.detach()
    logits = torch.empty(h.shape[0], w.shape[0], dtype=h.dtype, device=h.device)
    ref = (case.ref_hidden.reshape(-1, h.shape[1]), case.ref_weight) if case.ref == "head" else None

    def matmuls() -> tuple[torch.Tensor, torch.Tensor]:
        torch.mm(h, w.T, out=logits)
        if ref is not None:
            torch.mm(ref[0], ref[1].T, out=logits)
        return torch.mm(logits, w), torch.mm(logits.T, h)  # the gradients: new tensors, as every loss returns

    grads = (h.numel() + w.numel()) * h.element_size() / MB
    return Row(
        "floor",
        case.spec.name,
        case.size,
        peak_extra_mb=grads,
        per_token_logp="—",
        note=f"{case.matmuls} torch.mm, gradients into new tensors; memory = the gradients (computed, not measured)",
    ), Contender(matmuls)


def cells(args) -> list[tuple[str, str, int, int, torch.dtype]]:
    """(loss, ref, S, T, dtype) of the grid, skipping cells above ``--max-rows`` rows."""
    out = []
    for dtype in args.dtypes.split(","):
        for s in map(int, args.seqs.split(",")):
            for t in map(int, args.tokens.split(",")):
                for name in args.losses.split(","):
                    rows = (2 * s if SPECS[name].family == "pair" else s) * t
                    out += [
                        (name, ref, s, t, DTYPES[dtype])
                        for ref in SPECS[name].refs
                        if ref in args.refs.split(",") and rows <= args.max_rows
                    ]
    return out


CPU = torch.device("cpu")
"""The default device of :func:`run`."""


def run(args, impls: list[str], device: torch.device = CPU) -> tuple[list[Row], dict]:
    """Every requested implementation on every cell; returns the rows and (impl, size, loss) -> first-call s."""
    rows, first = [], {}
    for k, (name, ref, s, t, dtype) in enumerate(cells(args)):
        case = make_case(SPECS[name], ref, s, t, args.dim, args.vocab, dtype, device)
        entries = [floor_entry(case)] if "floor" in impls else []
        unavailable = []
        for impl in (i for i in IMPLEMENTATIONS if i.family in impls):
            try:
                row, contender, first[impl.name, case.size, name] = impl_entry(impl, case)
                entries.append((row, contender))
            except Exception as exc:  # noqa: BLE001 - an implementation that cannot run here becomes a row
                unavailable.append(
                    unavailable_row(impl.name, exc, mode=name, size=case.size, per_token_logp="—", note=impl.note)
                )
        reps = args.reps or _reps(case.hidden.shape[0] * t)
        section = time_section(entries, warmup=args.warmup, reps=reps, device=device.type) + unavailable
        for row in section:
            print(
                f"[{k + 1}] {case.size} {name:<13} {row.impl:<12} {row.status} {row.median_ms or 0:.1f} ms", flush=True
            )
        rows += section
    return rows, first


def summary(rows: list[Row], first: dict) -> str:
    """Markdown: per loss and fused implementation, the worst cell against the floor, Liger, memory, first call."""
    rows = add_ratios(rows, PEERS)
    by = {(r.impl, r.size, r.mode): r for r in rows if r.median_ms is not None}
    lines = [
        "## Summary: worst cell per loss",
        "",
        "| loss | impl | worst × floor (cell) | worst × liger (cell) | worst memory / liger's | "
        "worst first call − median, s | cells |",
        "|---|---|---|---|---|---|---|",
    ]
    for loss in dict.fromkeys(r.mode for r in rows):
        for impl in ("hotloop", "compat"):
            mine = [r for r in rows if r.mode == loss and r.impl == impl and r.median_ms is not None]
            if not mine:
                continue
            worst_floor = max(mine, key=lambda r: r.ratios.get("floor") or 0)
            vs_liger = [r for r in mine if r.ratios.get("liger")]
            worst = max(vs_liger, key=lambda r: r.ratios["liger"]) if vs_liger else None
            mem = [r.peak_extra_mb / by["liger", r.size, loss].peak_extra_mb for r in vs_liger]
            late = [first[impl, r.size, loss] - r.median_ms / 1e3 for r in mine if (impl, r.size, loss) in first]
            cols = [
                loss,
                impl,
                f"{worst_floor.ratios.get('floor') or 0:.2f} ({worst_floor.size})",
                f"{worst.ratios['liger']:.2f} ({worst.size})" if worst else "—",
                f"{max(mem):.2f}" if mem else "—",
                f"{max(late):.2f}" if late else "—",
                str(len(mine)),
            ]
            lines.append("| " + " | ".join(cols) + " |")
    return "\n".join(lines) + "\n"


NOTES = [
    "× floor / × naive / × liger / × liger eager: median time over that of the row at the same cell and loss "
    "(below 1: faster). floor = real torch.mm of the cell's shapes and dtype: 3 (logits, G @ W, G.T @ h) or 4 with "
    "a reference head; the fused losses compute the gradient in the forward, so the floor has no recompute. The "
    "logits go to a buffer held across calls; the two gradients go to new tensors each call (as every loss returns "
    "them: .grad is None after zero_grad), so the floor pays their first-touch page faults as every implementation "
    "does (before 2026-12-02 they were preallocated too: 2-7% lower floors).",
    "Every token counts (no prompt or padding): the fused losses would skip inactive rows, Liger's would not.",
    "first call: timed alone before the rounds (Liger's includes torch.compile) and gives the error column.",
    "max abs err: |loss − float64 reference| (log-probs materialized in float64 by row chunks, hotloop's functional "
    "loss in float64).",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.losses", description=__doc__.splitlines()[0])
    parser.add_argument("--losses", default=",".join(SPECS), help=f"comma-separated subset of {','.join(SPECS)}")
    parser.add_argument("--seqs", help=f"S values: sequences, pairs for DPO-style losses (default {DEFAULTS['seqs']})")
    parser.add_argument("--tokens", help=f"T values: tokens per sequence (default {DEFAULTS['tokens']})")
    parser.add_argument("--refs", default=",".join(REFS), help="reference variants: none, head, cached")
    parser.add_argument("--dtypes", help="fp32, bf16 (default fp32)")
    parser.add_argument("--dim", type=int, help="hidden size D (default 512)")
    parser.add_argument("--vocab", type=int, help="vocabulary V (default 32000)")
    parser.add_argument("--max-rows", type=int, default=DEFAULTS["max_rows"], help="skip larger cells")
    parser.add_argument("--reps", type=int, help="timed rounds (default: 5 / 3 / 2 by cell size)")
    parser.add_argument("--warmup", type=int, default=0, help="untimed rounds after the first call (default 0)")
    parser.add_argument("--quick", action="store_true", help="one tiny size, one rep: checks that it all runs")
    parser.add_argument("--no-compile", action="store_true", help="drop the compiled Liger rows (smoke tests)")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {','.join(IMPLS)}")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    for key, value in {**DEFAULTS, **(QUICK if args.quick else {})}.items():
        if getattr(args, key) is None or (args.quick and key in QUICK):
            setattr(args, key, value)
    args.reps = 1 if args.quick else args.reps
    for option, given, known in (
        ("--impls", args.impls, IMPLS),
        ("--losses", args.losses, tuple(SPECS)),
        ("--refs", args.refs, REFS),
        ("--dtypes", args.dtypes, tuple(DTYPES)),
    ):
        unknown = set(given.split(",")) - set(known)
        if unknown:
            parser.error(f"{option}: unknown {sorted(unknown)}; expected a subset of {list(known)}")
    for option, given in (("--seqs", args.seqs), ("--tokens", args.tokens)):
        if not all(x.isdigit() and int(x) > 0 for x in given.split(",")):
            parser.error(f"{option}: expected comma-separated positive integers, got {given!r}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Path]:
    """Run the grid and write ``<out-dir>/losses-cpu.{md,json,png}`` with the summary table; returns the paths."""
    args = parse_args(argv)
    impls = [i for i in args.impls.split(",") if not ((args.no_compile or args.quick) and i == "liger")]
    torch.manual_seed(0)
    rows, first = run(args, impls)
    meta = collect_meta(
        "cpu",
        slug=device_slug("cpu"),
        grid=f"S={args.seqs} T={args.tokens} refs={args.refs} "
        f"dtypes={args.dtypes} D={args.dim} V={args.vocab} max_rows={args.max_rows}",
        threads=torch.get_num_threads(),
        peers=_peer_versions(),
        notes=NOTES,
    )
    paths = write_results("losses", rows, meta, ratios_to=PEERS, out_dir=args.out_dir)
    text = paths["md"].read_text()
    head, _, body = text.partition("\n## ")
    paths["md"].write_text(f"{head}\n{summary(rows, first)}\n## {body}")
    print(summary(rows, first))
    return paths


def _peer_versions() -> str:
    try:
        return f"liger_kernel {importlib.metadata.version('liger_kernel')}"
    except importlib.metadata.PackageNotFoundError:
        return "liger_kernel not installed"


if __name__ == "__main__":
    main()
