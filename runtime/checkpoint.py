"""Atomic, resumable, self-checking checkpoints of the online loop.

Layout of a run directory::

    run_dir/
      latest                 # one line: the name of the newest complete checkpoint ("step-000042")
      step-000040/  step-000042/
        model.safetensors        # policy weights (safetensors; tied weights stored once, every name restored)
        reference.safetensors    # frozen reference model, when there is one
        <name>.safetensors       # each of extra_models (the online loop's "engine": the sampler's weights)
        trainer.json, trainer.pt # optimizer, scheduler and the trainer's own state: JSON + a list of tensors
        rng.json, rng.pt         # python, numpy, torch CPU, CUDA (all devices) and named torch.Generators
        loop_state.json          # whatever the loop needs to continue (step, data cursor, metrics, ...)
        manifest.json            # size and SHA-256 of every file above; written last

Safety: nothing is unpickled. ``.pt`` files hold only tensors and load with ``weights_only=True``;
the rest is JSON (:mod:`hotloop.runtime.checkpoint_files`).

Atomicity: everything is written into ``.tmp-step-XXXXXX-<pid>`` in the same directory, each file
fsynced, then the directory is ``os.replace``d onto ``step-XXXXXX`` and ``latest`` is rewritten
through a temp file and ``os.replace``. A crash at any point leaves the previous checkpoint and a
valid ``latest``; leftover temp directories are removed by the next save. Only the newest ``keep``
checkpoints are kept.

Self-checking: a load checks every file against the manifest before it changes anything. A run
directory's newest checkpoint that fails the check (a disk error, a hand edit, a copy cut short) is
reported by path and the newest good one is used instead, with a :class:`CheckpointFallbackWarning`;
never silently.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hotloop.runtime import checkpoint_files as files
from hotloop.runtime.checkpoint_files import CheckpointError

STEP_PATTERN = re.compile(r"^step-(\d{6,})$")
LATEST = "latest"
REQUIRED = ("trainer.json", "trainer.pt", "rng.json", "rng.pt", "loop_state.json")
"""Files every checkpoint holds besides its weights."""

__all__ = ["CheckpointError", "CheckpointFallbackWarning", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]


def save_checkpoint(
    run_dir: str | Path,
    *,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    loop_state: dict,
    reference: nn.Module | None = None,
    generators: dict[str, torch.Generator] | None = None,
    extra_models: dict[str, nn.Module | dict[str, torch.Tensor]] | None = None,
    rng: bool = True,
    keep: int = 3,
    extra_state: dict | None = None,
) -> Path:
    """Write ``run_dir/step-<step>`` atomically, point ``latest`` at it and prune to ``keep`` checkpoints.

    Args:
        run_dir: directory of the run (created if missing).
        step: number naming the checkpoint (usually the trainer version).
        model, optimizer, scheduler: training state; scheduler may be None.
        loop_state: JSON-serialisable dict the loop restores from.
        reference: frozen reference model to save alongside, if any.
        generators: named ``torch.Generator`` s to save (e.g. the engine's sampler stream).
        extra_models: more modules, or state dicts of tensors that share no memory, to save as
            ``<name>.safetensors`` (names: letters, digits, _ and -).
        rng: also save the global python / numpy / torch / CUDA RNG states.
        keep: number of newest checkpoints to keep (>= 1).
        extra_state: JSON values and tensors of the caller's own (the trainer's guard counters), returned by
            ``load_checkpoint(extra_state=...)``.

    Returns:
        The checkpoint directory.
    """
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step: expected an int >= 0, got {step!r}")
    if not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep: expected an int >= 1, got {keep!r}")
    if not isinstance(loop_state, dict):
        raise TypeError(f"loop_state: expected a dict, got {type(loop_state).__name__}")
    extra_models = extra_models or {}
    bad = [n for n in extra_models if not re.fullmatch(r"[A-Za-z0-9_-]+", n) or n in ("model", "reference")]
    if bad:
        raise ValueError(
            f"extra_models: expected names of letters, digits, _ and - other than model/reference, got {bad}"
        )
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(run_dir)
    name = f"step-{step:06d}"
    tmp = run_dir / f".tmp-{name}-{os.getpid()}"
    tmp.mkdir()
    try:
        _write_state(
            tmp,
            step=step,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            loop_state=loop_state,
            reference=reference,
            generators=generators,
            extra_models=extra_models,
            rng=rng,
            extra_state=extra_state,
        )
        _fsync_dir(tmp)
        final = run_dir / name
        if final.exists():  # re-saving the same step: move the old one aside first (os.replace needs an empty target)
            final.rename(run_dir / f".tmp-old-{name}-{os.getpid()}")
        os.replace(tmp, final)
        _write_latest(run_dir, name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _remove_stale_temps(run_dir)
    _prune(run_dir, keep)
    return final


def load_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    reference: nn.Module | None = None,
    generators: dict[str, torch.Generator] | None = None,
    extra_models: dict[str, nn.Module | dict[str, torch.Tensor]] | None = None,
    rng: bool = True,
    extra_state: dict | None = None,
) -> dict:
    """Restore what ``save_checkpoint`` wrote into the given objects; returns ``loop_state``.

    Every file is checked against the manifest and decoded before anything is changed, so a corrupt
    checkpoint raises ``CheckpointError`` (naming the file) and leaves the objects as they were.

    Args:
        path: a checkpoint directory (``step-XXXXXX``), or a run directory: its newest good checkpoint
            (see :func:`latest_checkpoint`) is used.
        model, optimizer, scheduler, reference: objects to load into, in place (None: skipped).
        generators: named generators to restore; every name must be in the checkpoint.
        extra_models: modules or state dicts saved with ``extra_models`` to load into, in place, by name.
        rng: also restore the global python / numpy / torch / CUDA RNG states.
        extra_state: a dict updated in place with the ``extra_state`` that was saved.
    """
    path = Path(path)
    if not STEP_PATTERN.match(path.name) or not path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"path: expected a checkpoint or a run directory holding one, got {path}")
        path = found
    modules = {"model": model, **({"reference": reference} if reference is not None else {}), **(extra_models or {})}
    files.verify(path, required=(*(f"{n}.safetensors" for n in modules), *REQUIRED))
    try:
        weights = {
            name: files.load_weights(path / f"{name}.safetensors", _device(target)) for name, target in modules.items()
        }
        trainer_state = files.read_state(path, "trainer")
        rng_state = files.read_state(path, "rng")
        loop_state = json.loads((path / "loop_state.json").read_text())
    except Exception as err:  # the manifest matched, so the writer itself was wrong: still name the checkpoint
        raise files.CheckpointError(
            f"{path}: unreadable despite a matching manifest ({type(err).__name__}: {err})"
        ) from err
    missing = sorted(set(generators or {}) - set(rng_state["generators"]))
    if missing:
        raise KeyError(f"generators: {missing} not in the checkpoint, which holds {sorted(rng_state['generators'])}")
    for name, target in modules.items():
        _load_tensors(target, weights[name], path / f"{name}.safetensors")
    if optimizer is not None:
        optimizer.load_state_dict(trainer_state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(trainer_state["scheduler"])
    if extra_state is not None:
        extra_state.update(trainer_state.get("extra", {}))
    _restore_rng(rng_state, generators or {}, rng)
    return loop_state


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest good checkpoint of ``run_dir``, or None when it holds none.

    ``latest`` names the newest complete one; when that checkpoint fails its manifest check (or
    ``latest`` is missing), every other ``step-*`` is tried, newest first, with a
    :class:`CheckpointFallbackWarning` naming each bad path and the one used. When checkpoints exist
    but none is good, ``CheckpointError`` lists them all.
    """
    run_dir = Path(run_dir)
    pointed = _pointed(run_dir)
    candidates = ([pointed] if pointed else []) + [p for p in reversed(_checkpoints(run_dir)) if p != pointed]
    bad = []
    for candidate in candidates:
        try:
            files.verify(candidate, required=("model.safetensors", *REQUIRED))
        except files.CheckpointError as err:
            bad.append(str(err))
            continue
        if bad:
            warnings.warn(
                f"skipping corrupt or incomplete checkpoint(s): {'; '.join(bad)}; falling back to {candidate}",
                CheckpointFallbackWarning,
                stacklevel=2,
            )
        return candidate
    if bad:
        raise files.CheckpointError(f"{run_dir}: no good checkpoint; " + "; ".join(bad))
    return None


class CheckpointFallbackWarning(UserWarning):
    """The newest checkpoint was bad and an older one is used instead (the message names both)."""


def _pointed(run_dir: Path) -> Path | None:
    """The checkpoint ``latest`` names, if it exists (not verified)."""
    pointer = run_dir / LATEST
    try:
        candidate = run_dir / pointer.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return candidate if STEP_PATTERN.match(candidate.name) and candidate.is_dir() else None


def _write_state(
    out: Path, *, step, model, optimizer, scheduler, loop_state, reference, generators, extra_models, rng, extra_state
) -> None:
    """Write every file of one checkpoint into ``out``, each fsynced; loop_state.json and the manifest last."""
    modules = {"model": model, **({"reference": reference} if reference is not None else {}), **extra_models}
    for name, module in modules.items():
        state = module.state_dict() if isinstance(module, nn.Module) else module
        files.save_weights(state, out / f"{name}.safetensors")
    trainer_state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "extra": extra_state or {},
    }
    files.write_state(out, "trainer", trainer_state)
    files.write_state(out, "rng", _capture_rng(generators or {}, rng))
    (out / "loop_state.json").write_text(json.dumps(loop_state, indent=1, sort_keys=True))
    files.write_manifest(out, step)
    for file in out.iterdir():
        _fsync_file(file)


def _load_tensors(target: nn.Module | dict[str, torch.Tensor], loaded: dict[str, torch.Tensor], file: Path) -> None:
    """Copy ``loaded`` into a module (strictly: every key of its state dict) or a state dict with the same keys."""
    keys = set(target.state_dict()) if isinstance(target, nn.Module) else set(target)
    if set(loaded) != keys:
        missing, unexpected = sorted(keys - set(loaded)), sorted(set(loaded) - keys)
        raise KeyError(
            f"{file}: lacks {missing[:5]} and has unexpected {unexpected[:5]}; "
            f"expected the keys of the {'module' if isinstance(target, nn.Module) else 'state dict'} "
            f"to load into"
        )
    if isinstance(target, nn.Module):
        target.load_state_dict(loaded, strict=True)
        return
    with torch.no_grad():
        for name, tensor in target.items():
            tensor.copy_(loaded[name])


def _capture_rng(generators: dict[str, torch.Generator], rng: bool) -> dict:
    state: dict = {"generators": {name: g.get_state() for name, g in generators.items()}}
    if rng:
        state["python"] = random.getstate()
        state["numpy"] = np.random.get_state()
        state["torch"] = torch.get_rng_state()
        state["cuda"] = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return state


def _restore_rng(state: dict, generators: dict[str, torch.Generator], rng: bool) -> None:
    for name, generator in generators.items():
        generator.set_state(state["generators"][name])
    if rng and "python" in state:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if state["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


def _write_latest(run_dir: Path, name: str) -> None:
    tmp = run_dir / f".tmp-{LATEST}-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, run_dir / LATEST)
    _fsync_dir(run_dir)


def _checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    found = [p for p in run_dir.iterdir() if p.is_dir() and STEP_PATTERN.match(p.name)] if run_dir.exists() else []
    return sorted(found, key=lambda p: int(STEP_PATTERN.match(p.name).group(1)))


def _prune(run_dir: Path, keep: int) -> None:
    latest = _pointed(run_dir)
    for old in _checkpoints(run_dir)[:-keep]:
        if old != latest:
            shutil.rmtree(old, ignore_errors=True)


def _remove_stale_temps(run_dir: Path) -> None:
    for p in run_dir.iterdir():
        if p.name.startswith(".tmp-") and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(".tmp-"):
            p.unlink(missing_ok=True)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _device(target: nn.Module | dict[str, torch.Tensor]) -> torch.device:
    tensors = target.values() if isinstance(target, dict) else target.state_dict().values()
    return next(iter(tensors), torch.empty(0)).device
