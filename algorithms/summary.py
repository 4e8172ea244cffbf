"""What a run reports: ``summary.json``, the accuracy/KL plot and the table ``hotloop`` prints.

The per-step metrics live in ``metrics.jsonl`` (written by the loop); the summary adds accuracy
before → after, the KL to the reference, and where the time went (loop phases, warm start, eval).
"""

from __future__ import annotations

import json
from pathlib import Path

from hotloop.algorithms.config import RunConfig
from hotloop.algorithms.loader import run_config_json
from hotloop.runtime.loop import PHASES, LoopResult

SUMMARY_PHASES = ("sampling", "scoring", "training", "sync")


def write_summary(
    config: RunConfig, result: LoopResult, before: dict, after: dict, warm_seconds: float, wall_seconds: float
) -> dict:
    """summary.json (+ accuracy_kl.png) in ``config.loop.out_dir``; every step's metrics come from metrics.jsonl."""
    out = Path(config.loop.out_dir)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    phases = {p: round(sum(r.get(f"time/{p}", 0.0) for r in records), 3) for p in PHASES}
    summary = {
        "accuracy_before": before["accuracy"],
        "accuracy_after": after["accuracy"],
        "kl_after": after.get("kl"),
        "kl_label": kl_label(config),
        "wall_seconds": round(wall_seconds, 2),
        "phase_seconds": {p: phases[p] for p in SUMMARY_PHASES} | {"batching": phases["batching"]},
        "warm_start_seconds": round(warm_seconds, 2),
        "eval_seconds": round(sum(r.get("time/eval", 0.0) for r in records), 3),
        "steps": result.next_step,
        "interrupted": result.interrupted,
        "algorithm": config.algorithm,
        "sync_every": config.loop.sync_every,
        "seed": config.loop.seed,
        "config": run_config_json(config),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    _plot(records, before, out / "accuracy_kl.png", summary["kl_label"])
    return summary


def kl_label(config: RunConfig) -> str:
    """What the reported KL is measured against: the SFT warm start (tiny model) or the initial policy."""
    return "KL to reference (SFT policy)" if config.model.path is None else "KL to reference (initial policy)"


def _plot(records: list[dict], before: dict, path: Path, label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [(0, before["accuracy"], before.get("kl", float("nan")))] + [
        (r["step"] + 1, r["eval/accuracy"], r.get("eval/kl", float("nan"))) for r in records if "eval/accuracy" in r
    ]
    steps, acc, kl = zip(*evals)
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.plot(steps, [100 * x for x in acc], marker="o")
    a.set(xlabel="step", ylabel="held-out accuracy (%)", title="greedy exact match")
    b.plot(steps, kl, marker="o", color="tab:red")
    b.set(xlabel="step", ylabel="KL(π ‖ π_ref) per sequence", title=label)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(summary: dict) -> None:
    """A rich table: accuracy before → after and the split of the time."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"hotloop {summary['algorithm']} (sync_every={summary['sync_every']}, seed={summary['seed']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row(
        "held-out accuracy", f"{100 * summary['accuracy_before']:.1f}% → {100 * summary['accuracy_after']:.1f}%"
    )
    kl = summary["kl_after"]
    table.add_row(summary.get("kl_label", "KL to reference"), "n/a (no reference model)" if kl is None else f"{kl:.3f}")
    loop_total = sum(summary["phase_seconds"].values()) or 1.0
    for phase, seconds in summary["phase_seconds"].items():
        table.add_row(f"time: {phase}", f"{seconds:.1f}s ({100 * seconds / loop_total:.1f}% of loop)")
    table.add_row("time: warm start / eval", f"{summary['warm_start_seconds']:.1f}s / {summary['eval_seconds']:.1f}s")
    table.add_row("wall time", f"{summary['wall_seconds']:.1f}s")
    Console().print(table)
