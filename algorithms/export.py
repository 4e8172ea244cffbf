"""``hotloop export RUN_DIR OUT``: a run's final policy as a plain Hugging Face model directory.

A checkpoint (:mod:`hotloop.runtime.checkpoint`) is built for resuming: safetensors of the policy
with shared tensors de-duplicated, the reference, the optimizer, RNG states. What people load
elsewhere is a model directory, so :func:`export_run` rebuilds the run's initial model from the
config the run wrote (``run_config.json``: the pretrained ``model.path`` or the tiny model's cached
warm start), loads the latest checkpoint's ``model.safetensors`` into it (strict: every key of the
module, tied weights through their one stored copy) and writes ``save_pretrained`` output
(``model.safetensors``, ``config.json``), ``generation_config.json`` (bos/eos/pad and the run's
``max_new_tokens``) and the tokenizer: the Hugging Face one with its chat template, or the tiny
model's ``char_tokenizer.json`` (read by :func:`hotloop.algorithms.tasks.tokenizer.load_tokenizer`).
``AutoModelForCausalLM.from_pretrained(OUT)`` then generates greedily exactly as the run's policy.

A run with ``loop.checkpoint_every: 0`` and no ``loop.final_checkpoint: true`` keeps no weights, so
it cannot be exported; the error says so.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hotloop.algorithms.loader import config_from_json
from hotloop.algorithms.run import RUN_CONFIG, builtin_task, load_policy
from hotloop.runtime.checkpoint import latest_checkpoint

MODEL_FILE = "model.safetensors"


def _run_config(run_dir: Path):
    """The ``RunConfig`` a run wrote into ``run_dir``."""
    path = run_dir / RUN_CONFIG
    if not path.exists():
        raise ValueError(
            f"run_dir: expected a run directory with {RUN_CONFIG} (written by hotloop train/demo), "
            f"got {str(run_dir)!r} without one"
        )
    return config_from_json(json.loads(path.read_text()))


def export_run(run_dir: str | Path, out_dir: str | Path, *, progress: bool = False) -> Path:
    """Write the latest checkpoint's policy of ``run_dir`` as a HF model directory ``out_dir``; returns it."""
    from transformers import GenerationConfig

    from hotloop.algorithms.tasks.tokenizer import CharTokenizer
    from hotloop.runtime.checkpoint_files import load_weights

    run_dir, out = Path(run_dir), Path(out_dir)
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise ValueError(
            f"run_dir: expected a checkpoint in {str(run_dir)!r}, got none (a run with "
            f"loop.checkpoint_every=0 writes one only with loop.final_checkpoint=true)"
        )
    config = _run_config(run_dir)
    task = None if config.model.path is not None else builtin_task(config)
    model, tokenizer = load_policy(config, task, progress=progress)
    model.load_state_dict(load_weights(checkpoint / MODEL_FILE), strict=True)  # the checkpoint's reader: aliases too
    bos = getattr(tokenizer, "bos_id", None)
    if bos is None:
        bos = tokenizer.inner.bos_token_id
    model.generation_config = GenerationConfig(
        bos_token_id=bos,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
        max_new_tokens=config.sampling.max_new_tokens,
    )
    model.save_pretrained(out)
    if isinstance(tokenizer, CharTokenizer):
        tokenizer.save(out)
    else:
        tokenizer.inner.save_pretrained(out)
    return out


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``hotloop export``."""
    parser.add_argument("run_dir", help="output directory of a hotloop train/demo run")
    parser.add_argument("out", help="directory to write the Hugging Face model into")


def add_fetch_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``hotloop fetch-model``."""
    from hotloop.algorithms.models import FETCHABLE

    parser.add_argument("name", choices=sorted(FETCHABLE), help="model to fetch")
    parser.add_argument("--out", default=None, help="directory to write (default ~/.cache/hotloop/models/NAME)")


def main_export(args: argparse.Namespace) -> int:
    """``hotloop export``: 0 on success, 2 on a bad run directory."""
    try:
        out = export_run(args.run_dir, args.out, progress=True)
    except ValueError as err:
        print(f"hotloop export: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out} (AutoModelForCausalLM.from_pretrained({str(out)!r}))")
    return 0


def main_fetch(args: argparse.Namespace) -> int:
    """``hotloop fetch-model``: 0 on success, 2 when gguf is missing, 1 when the download fails."""
    from hotloop.algorithms.models import fetch_model

    out = Path(args.out or Path("~/.cache/hotloop/models").expanduser() / args.name)
    try:
        fetch_model(args.name, out)
    except ValueError as err:
        print(f"hotloop fetch-model: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        print(f"hotloop fetch-model: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out}; use it with --set model.path={out}")
    return 0
