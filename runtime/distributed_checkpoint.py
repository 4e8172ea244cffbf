"""Distributed checkpoints of the online loop: ``torch.distributed.checkpoint`` (DCP), resumable on any world size.

Layout of a run directory trained on several ranks::

    run_dir/
      latest-dist              # one line: the newest complete checkpoint ("dist-step-000042")
      dist-step-000042/
        dcp/                   # DCP: policy, reference, optimizer (each rank writes its shards) and the
                               # sampler's buckets (plain tensors, written once)
        state.json             # scheduler, the trainer's own state and loop_state (rank 0)

State dicts come from ``get_model_state_dict`` / ``get_optimizer_state_dict`` (FQN keys, DTensor
shards under FSDP2, plain tensors on one rank), so DCP reshards on load: a checkpoint written on N
ranks loads on M ranks, or into a plain single-process model (``ctx=None``), with the same values.
Atomicity as for :mod:`hotloop.runtime.checkpoint`: every rank writes into ``.tmp-dist-step-...``;
after a barrier rank 0 writes ``state.json``, renames the directory and then rewrites ``latest-dist``
through a temporary file, so a crash leaves the previous checkpoint current. Not saved: the global
RNG states (every step's sampler is seeded from the loop's seed and step; the single-process format
saves them).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from hotloop.runtime.distributed import DistContext

LATEST = "latest-dist"
PATTERN = re.compile(r"^dist-step-(\d{6,})$")


def save(
    run_dir: str | Path,
    trainer,
    loop_state: dict,
    ctx: DistContext | None,
    *,
    extra: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write ``run_dir/dist-step-<version>`` from every rank (collective) and point ``latest-dist`` at it.

    Args:
        trainer: ``hotloop.runtime.trainer.Trainer`` (model, reference, optimizer, scheduler, own state).
        loop_state: JSON values the loop continues from.
        ctx: the process group, or None on one process.
        extra: more tensors by group name (the sampler's bucket buffers), identical on every rank.
    """
    run_dir = Path(run_dir)
    name = f"dist-step-{trainer.version:06d}"
    tmp, out = run_dir / f".tmp-{name}", run_dir / name
    main = ctx is None or ctx.is_main
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier(ctx)
    dcp.save(_state(trainer, extra), checkpoint_id=str(tmp / "dcp"))
    _barrier(ctx)
    if main:
        small = {"scheduler": trainer.scheduler.state_dict(), "trainer": trainer._state(), "loop_state": loop_state}
        (tmp / "state.json").write_text(json.dumps(small, default=float))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        pointer = run_dir / f".{LATEST}.tmp"
        pointer.write_text(name + "\n")
        os.replace(pointer, run_dir / LATEST)
    _barrier(ctx)
    return out


def latest(run_dir: str | Path) -> Path | None:
    """The checkpoint ``latest-dist`` names, or None when there is none."""
    pointer = Path(run_dir) / LATEST
    if not pointer.is_file():
        return None
    path = Path(run_dir) / pointer.read_text().strip()
    if not PATTERN.match(path.name) or not (path / "state.json").is_file():
        raise FileNotFoundError(f"{pointer}: names {path.name!r}, expected a complete dist-step-* checkpoint")
    return path


def newest(run_dir: str | Path, single: Path | None, ctx: DistContext | None) -> tuple[str, Path | None]:
    """The newer of the run's newest single-process checkpoint (``single``, ``step-*``) and its newest distributed
    one, as ``("single" | "dist", path)``; ``path`` None when there is neither. Several ranks cannot load a
    single-process checkpoint: when it is the newer one they refuse (ValueError) instead of resuming from older."""
    dist_path = latest(run_dir)
    step = lambda p: -1 if p is None else int(p.name.rsplit("-", 1)[1])  # noqa: E731
    if single is None or (dist_path is not None and step(dist_path) >= step(single)):
        return "dist", dist_path
    if ctx is not None:
        raise ValueError(
            f"{run_dir}: the newest checkpoint {single.name} was written by one process; resume it on one "
            f"process (several ranks load only dist-step-* checkpoints, the newest here: "
            f"{dist_path.name if dist_path else 'none'})"
        )
    return "single", single


def load(path: str | Path, trainer, *, extra: dict[str, dict[str, torch.Tensor]] | None = None) -> dict:
    """Load a checkpoint written by :func:`save` (on any world size) into ``trainer`` and ``extra`` in place;
    returns its ``loop_state``. Collective when the trainer's model is sharded."""
    path = Path(path)
    state = _state(trainer, extra)
    dcp.load(state, checkpoint_id=str(path / "dcp"))
    set_model_state_dict(trainer.model, state["model"])
    set_optimizer_state_dict(trainer.model, trainer.optimizer, state["optimizer"])
    if trainer.reference is not None:
        set_model_state_dict(trainer.reference, state["reference"])
    small = json.loads((path / "state.json").read_text())
    trainer.scheduler.load_state_dict(small["scheduler"])
    trainer.skipped_nonfinite = int(small["trainer"].get("skipped_nonfinite", 0))
    trainer.run_config = small["trainer"].get("run_config", trainer.run_config)
    return small["loop_state"]


def _state(trainer, extra: dict | None) -> dict:
    """The DCP state dict: policy, optimizer, reference and ``extra``; loading fills these tensors in place."""
    state = {
        "model": get_model_state_dict(trainer.model),
        "optimizer": get_optimizer_state_dict(trainer.model, trainer.optimizer),
    }
    if trainer.reference is not None:
        state["reference"] = get_model_state_dict(trainer.reference)
    return {**state, **(extra or {})}


def _barrier(ctx: DistContext | None) -> None:
    if ctx is not None:
        dist.barrier()
