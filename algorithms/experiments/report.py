"""What every ``hotloop compare`` experiment hands back, and how it is written: JSON, markdown, PNG.

An experiment returns a :class:`Report`: ``entries`` (one per algorithm × setting × seed, each with
its final ``metric`` value and its ``kl`` from the reference), markdown tables that summarise them
over seeds as ``mean [min – max]``, the target checks of issue 6 (:class:`Target`, pass or fail
with the numbers), and plots (functions drawing a matplotlib figure, plus one ``headline`` panel
for the combined overview). :func:`write_reports` writes ``summary.json``, ``table.md`` and the
PNGs into one directory, stamped with the git SHA, torch version, device, threads and load.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch


@dataclass(frozen=True)
class Target:
    """A target of issue 6 or a paper's claim: what, whether every seed met it, and the numbers behind it."""

    claim: str
    passed: bool
    detail: str


@dataclass
class Report:
    """An experiment's results."""

    experiment: str
    entries: list[dict]
    """One dict per algorithm × setting × seed: ``algorithm``, ``setting``, ``seed``, ``metric``, ``value``, ``kl``."""
    markdown: str
    """Tables and notes (GitHub markdown, no top-level title)."""
    targets: list[Target] = field(default_factory=list)
    plots: dict[str, Callable[[], object]] = field(default_factory=dict)
    """PNG file stem → function returning a matplotlib figure."""
    headline: Callable[[object], None] | None = None
    """Draws the experiment's main result on one matplotlib Axes (for the overview figure)."""
    seconds: float = 0.0
    intra_op_threads: int = 1
    """torch intra-op threads the experiment ran on."""


def entry(
    experiment: str, algorithm: str, setting: str, seed: int, metric: str, value: float, kl: float, **extra
) -> dict:
    """A summary.json entry (floats rounded to 6 significant digits)."""
    row = {
        "experiment": experiment,
        "algorithm": algorithm,
        "setting": setting,
        "seed": seed,
        "metric": metric,
        "value": value,
        "kl": kl,
        **extra,
    }
    return {k: float(f"{v:.6g}") if isinstance(v, float) else v for k, v in row.items()}


def stats(values: Iterable[float]) -> tuple[float, float, float]:
    """(mean, min, max)."""
    values = list(values)
    return statistics.fmean(values), min(values), max(values)


def fmt(values: Iterable[float], digits: int = 3, scale: float = 1.0) -> str:
    """``mean [min – max]`` of ``values × scale`` (just the value when there is one)."""
    values = [v * scale for v in values]
    mean, lo, hi = stats(values)
    if len(values) == 1 or lo == hi:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{lo:.{digits}f} – {hi:.{digits}f}]"


def select(entries: list[dict], **match) -> list[dict]:
    """Entries whose fields equal every ``match`` item."""
    return [e for e in entries if all(e.get(k) == v for k, v in match.items())]


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]) + "\n"


def targets_markdown(targets: list[Target]) -> str:
    """The target checks as a markdown list."""
    if not targets:
        return ""
    lines = [f"- **{'met' if t.passed else 'NOT met'}**: {t.claim} — {t.detail}" for t in targets]
    return "Targets and claim checks (every seed):\n\n" + "\n".join(lines) + "\n"


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run on one intra-op thread (tiny tensors: a second thread only adds contention on a shared CPU)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def environment(command: str, threads: int = 1) -> dict:
    """Where and how the numbers were measured (``threads``: torch intra-op threads of the runs)."""
    root = Path(__file__).resolve().parents[2]
    try:
        sha = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        sha = "unknown"
    return {
        "command": command,
        "git_sha": sha,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": "cpu",
        "cpu_count": os.cpu_count(),
        "intra_op_threads": threads,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def write_reports(
    reports: list[Report], out: str | Path, *, seeds: list[int], command: str = "", wall_seconds: float | None = None
) -> dict:
    """Write ``summary.json``, ``table.md`` and every plot (``<experiment>-<plot>.png``) into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment(command, max((r.intra_op_threads for r in reports), default=1))
    summary = {
        "experiments": [r.experiment for r in reports],
        "seeds": seeds,
        "environment": env,
        "wall_seconds": round(wall_seconds if wall_seconds is not None else sum(r.seconds for r in reports), 1),
        "seconds": {r.experiment: round(r.seconds, 1) for r in reports},
        "targets": [{"experiment": r.experiment, **asdict(t)} for r in reports for t in r.targets],
        "entries": [e for r in reports for e in r.entries],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "table.md").write_text(markdown(reports, summary))
    for report in reports:
        for stem, draw in report.plots.items():
            save_figure(draw(), out / f"{report.experiment}-{stem}.png")
    return summary


def markdown(reports: list[Report], summary: dict) -> str:
    """``table.md``: a stamp, then each experiment's tables and targets."""
    env = summary["environment"]
    head = (
        f"Command: `{env['command']}` — seeds {summary['seeds']}, git {env['git_sha']}, torch {env['torch']}, "
        f"{env['device']} ({env['cpu_count']} cores, {env['intra_op_threads']} intra-op "
        f"thread{'s' if env['intra_op_threads'] > 1 else ''}, load average "
        f"{env['load_average']} at the end), {env['date']}; wall time {summary['wall_seconds']:.0f} s "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in summary['seconds'].items())}).\n"
    )
    parts = [head] + [f"## {r.experiment}\n\n{r.markdown}\n{targets_markdown(r.targets)}" for r in reports]
    return "\n".join(parts)


def save_figure(figure, path: Path) -> None:
    """Save a matplotlib figure as PNG and close it."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def overview(reports: list[Report]):
    """One figure with every report's headline panel."""
    plt = pyplot()
    drawn = [r for r in reports if r.headline is not None]
    figure, axes = plt.subplots(1, max(1, len(drawn)), figsize=(4.6 * max(1, len(drawn)), 3.6), squeeze=False)
    for report, ax in zip(drawn, axes[0]):
        report.headline(ax)
    return figure
