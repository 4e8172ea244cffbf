"""The offline → semi-online → online spectrum at toy scale, written as bench results (docs/spectrum.md).

    python -m bench.spectrum [EXPERIMENT] [--seeds 0,1,2] [--out DIR] [--no-progress]

Runs :func:`hotloop.algorithms.experiments.compare.run_compare`, the code behind
``hotloop compare EXPERIMENT`` (default ``all``: bandit, kl-budget, replay, arithmetic), and writes

- ``<stem>-cpu.md``: every experiment's tables and target checks, stamped with the command, git SHA,
  torch version, cores, intra-op threads, load average and wall time;
- ``<stem>-cpu.json``: the ``summary.json`` (one entry per algorithm × setting × seed, metric and KL);
- ``<stem>-cpu.png``: one headline panel per experiment; ``<stem>-<experiment>-<plot>-cpu.png``: the rest,

with ``<stem>`` = ``spectrum`` for ``all`` and ``spectrum-<experiment>`` otherwise, into
``bench/results/`` (or ``--out``). The runs are CPU-only and small; on a shared machine the wall
times move with the load, which the stamp records.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

from bench._results import RESULTS_DIR, device_slug
from hotloop.algorithms.experiments import compare, report


def write_bench_results(summary: dict, reports: list[report.Report], run_dir: Path, out: Path, stem: str) -> list[Path]:
    """Copy ``run_compare``'s outputs in ``run_dir`` to ``out/<stem>-<device>.*``; the files written."""
    slug = device_slug("cpu")
    out.mkdir(parents=True, exist_ok=True)
    written = [out / f"{stem}-{slug}.md", out / f"{stem}-{slug}.json", out / f"{stem}-{slug}.png"]
    shutil.copyfile(run_dir / "table.md", written[0])
    written[1].write_text(json.dumps(summary, indent=1) + "\n")
    report.save_figure(report.overview(reports), written[2])
    for r in reports:
        for plot in r.plots:
            written.append(out / f"{stem}-{r.experiment}-{plot}-{slug}.png")
            shutil.copyfile(run_dir / f"{r.experiment}-{plot}.png", written[-1])
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.spectrum", description=__doc__.split("\n")[0])
    parser.add_argument(
        "experiment",
        nargs="?",
        default=compare.ALL,
        type=compare.experiment_arg,
        help=f"one of {', '.join(compare.EXPERIMENTS)} or {compare.ALL} (default)",
    )
    parser.add_argument(
        "--seeds",
        type=compare.seeds_arg,
        default=list(compare.DEFAULT_SEEDS),
        help="comma-separated seeds (default 0,1,2)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory (default bench/results)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    command = "python -m bench.spectrum " + shlex.join(sys.argv[1:] if argv is None else argv)
    stem = "spectrum" if args.experiment == compare.ALL else f"spectrum-{args.experiment}"
    with tempfile.TemporaryDirectory(prefix="hotloop-spectrum-") as tmp:
        summary, reports = compare.run_compare(
            args.experiment, args.seeds, tmp, progress=not args.no_progress, command=command
        )
        written = write_bench_results(summary, reports, Path(tmp), args.out, stem)
    missed = [t for t in summary["targets"] if not t["passed"]]
    print(
        f"wrote {', '.join(str(p) for p in written)} in {summary['wall_seconds']:.0f} s; targets met: "
        f"{len(summary['targets']) - len(missed)}/{len(summary['targets'])}"
    )
    for target in missed:
        print(f"  not met [{target['experiment']}]: {target['claim']} — {target['detail']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
