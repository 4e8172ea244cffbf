"""``hotloop compare EXPERIMENT``: run toy reproductions of the offline → online spectrum (docs/spectrum.md).

Experiments (each a module of this package with ``run(seeds, *, progress) -> Report``):

- ``bandit``: Tajwar et al.'s bandit, DPO / IPO / rejection sampling at s ∈ {1, 10, 100, ∞}, rewards R1, R2;
- ``kl-budget``: online vs offline DPO and IPO on the bandit at matched KL(π ‖ π_ref) (a β sweep);
- ``replay``: an online run's recorded samples replayed offline give bit-identical parameters;
- ``arithmetic``: offline / semi-online / online DPO and GRPO from the demo's SFT policy;
- ``real-arithmetic``: the same four on SmolLM2-135M-Instruct and the word-problem task (needs
  ``hotloop fetch-model smollm2-135m-instruct`` first; not part of ``all``);
- ``all``: the four toy ones, in that order.

Each writes ``summary.json``, ``table.md`` and PNG plots to ``--out``; ``all`` adds ``overview.png``.
``--set FIELD=VALUE`` (repeatable; the value parsed as YAML) sets a field of one experiment's config
dataclass, e.g. ``hotloop compare real-arithmetic --set steps=8 --set eval_problems=40``.
Every run is a function of its seed; the bandit runs on one intra-op thread.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import shlex
import sys
import time
from pathlib import Path

import yaml

from hotloop.algorithms.experiments import report

EXPERIMENTS = {
    "bandit": "hotloop.algorithms.experiments.bandit",
    "kl-budget": "hotloop.algorithms.experiments.kl_budget",
    "replay": "hotloop.algorithms.experiments.replay",
    "arithmetic": "hotloop.algorithms.experiments.arithmetic",
    "real-arithmetic": "hotloop.algorithms.experiments.real_arithmetic",
}
"""Experiment name → module with ``run(seeds, *, progress, config) -> report.Report`` (and, when it takes
``--set FIELD=VALUE``, ``CONFIG``: its frozen config dataclass)."""
ALL = "all"
IN_ALL = ("bandit", "kl-budget", "replay", "arithmetic")
"""What ``all`` runs: the toy experiments (real-arithmetic needs a fetched model and tens of minutes)."""
DEFAULT_SEEDS = (0, 1, 2)


def experiment_names(name: str) -> list[str]:
    """``[name]``, or every experiment for ``"all"``; ValueError naming the choices otherwise."""
    if name == ALL:
        return list(IN_ALL)
    if name not in EXPERIMENTS:
        raise ValueError(f"EXPERIMENT: expected one of {sorted(EXPERIMENTS) + [ALL]}, got {name!r}")
    return [name]


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` → ``[0, 1, 2]``: distinct ints >= 0, at least one; ValueError otherwise."""
    parts = [p.strip() for p in str(text).split(",")]
    if not all(p.isdigit() for p in parts):
        raise ValueError(f"--seeds: expected comma-separated ints >= 0 such as 0,1,2, got {text!r}")
    seeds = [int(p) for p in parts]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds: expected distinct seeds, got {text!r}")
    return seeds


def experiment_config(name: str, sets: list[str]):
    """The config of experiment ``name`` with ``FIELD=VALUE`` items applied over its defaults (YAML values, lists
    become tuples); None without items. ValueError naming ``--set`` for an unknown field or experiment."""
    if not sets:
        return None
    module = EXPERIMENTS.get(name) if name != ALL else None
    cls = getattr(importlib.import_module(module), "CONFIG", None) if module else None
    if cls is None:
        takes = [n for n, m in EXPERIMENTS.items() if hasattr(importlib.import_module(m), "CONFIG")]
        raise ValueError(f"--set: expected an experiment with settings ({', '.join(takes)}), got {name!r}")
    fields = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for item in sets:
        key, sep, text = item.partition("=")
        if not sep or key.strip() not in fields:
            raise ValueError(f"--set: expected FIELD=VALUE with FIELD one of {fields}, got {item!r}")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ValueError(f"--set: expected a YAML value after {key.strip()}=, got {text!r}") from None
        values[key.strip()] = tuple(value) if isinstance(value, list) else value
    try:
        return cls(**values)
    except TypeError as err:
        raise ValueError(f"--set: {err}") from None


def run_compare(
    name: str,
    seeds: list[int],
    out: str | Path,
    *,
    progress: bool = True,
    command: str = "",
    configs: dict[str, object] | None = None,
) -> tuple[dict, list[report.Report]]:
    """Run experiment ``name`` (or ``"all"``) for ``seeds``; write its outputs to ``out``; the summary and reports.

    ``command`` is recorded in the outputs; ``configs`` maps an experiment name to the config object its
    ``run`` takes (default: its defaults).
    """
    names = experiment_names(name)
    if not seeds or any(not isinstance(s, int) or s < 0 for s in seeds):
        raise ValueError(f"seeds: expected a non-empty list of ints >= 0, got {seeds!r}")
    t0, reports = time.perf_counter(), []
    for experiment in names:
        config = (configs or {}).get(experiment)
        reports.append(importlib.import_module(EXPERIMENTS[experiment]).run(seeds, progress=progress, config=config))
    summary = report.write_reports(reports, out, seeds=seeds, command=command, wall_seconds=time.perf_counter() - t0)
    if len(reports) > 1:
        report.save_figure(report.overview(reports), Path(out) / "overview.png")
    return summary, reports


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``compare`` subcommand's arguments (shared by ``hotloop compare`` and ``bench/spectrum.py``)."""
    parser.add_argument(
        "experiment", type=experiment_arg, metavar="EXPERIMENT", help=f"one of {', '.join(EXPERIMENTS)} or {ALL}"
    )
    parser.add_argument(
        "--seeds", type=seeds_arg, default=list(DEFAULT_SEEDS), help="comma-separated seeds (default 0,1,2)"
    )
    parser.add_argument("--out", default=None, help="output directory (default runs/compare/EXPERIMENT)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a field of the experiment's config (repeatable), e.g. steps=8",
    )


def main(args: argparse.Namespace) -> int:
    """Run the parsed ``compare`` command; print where the results went and which targets were missed."""
    out = Path(args.out or f"runs/compare/{args.experiment}")
    sets = [f"--set={item}" for item in args.sets]
    command = "hotloop compare " + shlex.join(
        [args.experiment, "--seeds", ",".join(map(str, args.seeds)), "--out", str(out), *sets]
    )
    try:
        config = experiment_config(args.experiment, args.sets)
        configs = None if config is None else {args.experiment: config}
        summary, _ = run_compare(
            args.experiment, args.seeds, out, progress=not args.no_progress, command=command, configs=configs
        )
    except ValueError as err:
        print(f"hotloop compare: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    missed = [t for t in summary["targets"] if not t["passed"]]
    print(
        f"wrote {out / 'table.md'}, {out / 'summary.json'} and plots in {summary['wall_seconds']:.0f} s; "
        f"targets met: {len(summary['targets']) - len(missed)}/{len(summary['targets'])}"
    )
    for target in missed:
        print(f"  not met [{target['experiment']}]: {target['claim']} — {target['detail']}")
    return 0


def experiment_arg(text: str) -> str:
    """argparse type of EXPERIMENT (an ``ArgumentTypeError`` naming the choices)."""
    try:
        experiment_names(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def seeds_arg(text: str) -> list[int]:
    """argparse type of ``--seeds``."""
    try:
        return parse_seeds(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
