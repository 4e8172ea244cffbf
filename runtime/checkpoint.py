"""Atomic, resumable checkpoints of the online loop.

Layout of a run directory::

    run_dir/
      latest                 # one line: the name of the newest complete checkpoint ("step-000042")
      step-000040/  step-000042/
        model.safetensors        # policy weights (safetensors, shared tensors handled)
        reference.safetensors    # frozen reference model, when there is one
        <name>.safetensors       # each of extra_models (the online loop's "engine": the sampler's weights)
        trainer.pt               # optimizer and scheduler state dicts
        rng.pt                   # python, numpy, torch CPU, CUDA (all devices) and named torch.Generators
        loop_state.json          # whatever the loop needs to continue (step, data cursor, metrics, ...)

Atomicity: everything is written into ``.tmp-step-XXXXXX-<pid>`` in the same directory, each file
fsynced, then the directory is ``os.replace``d onto ``step-XXXXXX`` and ``latest`` is rewritten
through a temp file and ``os.replace``. A crash at any point leaves the previous checkpoint and a
valid ``latest``; leftover temp directories are removed by the next save. Only the newest ``keep``
checkpoints are kept.

``rng.pt`` and ``trainer.pt`` are loaded with ``weights_only=False``: they are this module's own
files (numpy's RNG state holds an ndarray), never untrusted input.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

STEP_PATTERN = re.compile(r"^step-(\d{6,})$")
LATEST = "latest"


def save_checkpoint(run_dir: str | Path, *, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None, loop_state: dict,
                    reference: nn.Module | None = None, generators: dict[str, torch.Generator] | None = None,
                    extra_models: dict[str, nn.Module | dict[str, torch.Tensor]] | None = None, rng: bool = True,
                    keep: int = 3) -> Path:
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
        raise ValueError(f"extra_models: expected names of letters, digits, _ and - other than "
                         f"model/reference, got {bad}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(run_dir)
    name = f"step-{step:06d}"
    tmp = run_dir / f".tmp-{name}-{os.getpid()}"
    tmp.mkdir()
    try:
        _write_state(tmp, model=model, optimizer=optimizer, scheduler=scheduler, loop_state=loop_state,
                     reference=reference, generators=generators, extra_models=extra_models, rng=rng)
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


def load_checkpoint(path: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                    reference: nn.Module | None = None, generators: dict[str, torch.Generator] | None = None,
                    extra_models: dict[str, nn.Module | dict[str, torch.Tensor]] | None = None,
                    rng: bool = True) -> dict:
    """Restore what ``save_checkpoint`` wrote into the given objects; returns ``loop_state``.

    Args:
        path: a checkpoint directory (``step-XXXXXX``) or a run directory (its ``latest`` is used).
        model, optimizer, scheduler, reference: objects to load into, in place (None: skipped).
        generators: named generators to restore; every name must be in the checkpoint.
        extra_models: modules or state dicts saved with ``extra_models`` to load into, in place, by name.
        rng: also restore the global python / numpy / torch / CUDA RNG states.
    """
    path = Path(path)
    if not (path / "model.safetensors").exists():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"path: expected a checkpoint or a run directory holding one, got {path}")
        path = found
    load_model(model, path / "model.safetensors", strict=True, device=str(_device(model)))
    if reference is not None:
        load_model(reference, path / "reference.safetensors", strict=True, device=str(_device(reference)))
    for name, target in (extra_models or {}).items():
        _load_tensors(target, path / f"{name}.safetensors")
    trainer_state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
    if optimizer is not None:
        optimizer.load_state_dict(trainer_state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(trainer_state["scheduler"])
    _restore_rng(torch.load(path / "rng.pt", map_location="cpu", weights_only=False), generators or {}, rng)
    return json.loads((path / "loop_state.json").read_text())


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of ``run_dir`` (from ``latest``, else the highest step), or None."""
    run_dir = Path(run_dir)
    pointer = run_dir / LATEST
    if pointer.exists():
        candidate = run_dir / pointer.read_text().strip()
        if STEP_PATTERN.match(candidate.name) and (candidate / "loop_state.json").exists():
            return candidate
    steps = _checkpoints(run_dir)
    return steps[-1] if steps else None


def _write_state(out: Path, *, model, optimizer, scheduler, loop_state, reference, generators, extra_models,
                 rng) -> None:
    """Write every file of one checkpoint into ``out``, each fsynced; loop_state.json last."""
    modules = {"model": model, **({"reference": reference} if reference is not None else {}), **extra_models}
    for name, module in modules.items():
        if isinstance(module, nn.Module):
            save_model(module, str(out / f"{name}.safetensors"))
        else:
            save_file({k: v.detach().contiguous() for k, v in module.items()}, str(out / f"{name}.safetensors"))
    trainer_state = {"optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict() if scheduler is not None else None}
    torch.save(trainer_state, out / "trainer.pt")
    torch.save(_capture_rng(generators or {}, rng), out / "rng.pt")
    (out / "loop_state.json").write_text(json.dumps(loop_state, indent=1, sort_keys=True))
    for file in out.iterdir():
        _fsync_file(file)


def _load_tensors(target: nn.Module | dict[str, torch.Tensor], file: Path) -> None:
    """Copy ``file``'s tensors into a module (shared tensors handled) or a state dict with the same keys."""
    if isinstance(target, nn.Module):
        load_model(target, file, strict=True, device=str(_device(target)))
        return
    loaded = load_file(str(file))
    if set(loaded) != set(target):
        missing, unexpected = sorted(set(target) - set(loaded)), sorted(set(loaded) - set(target))
        raise KeyError(f"extra_models: {file.name} lacks {missing[:5]} and has unexpected {unexpected[:5]}; "
                       f"expected the keys of the state dict to load into")
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
    missing = sorted(set(generators) - set(state["generators"]))
    if missing:
        raise KeyError(f"generators: {missing} not in the checkpoint, which holds {sorted(state['generators'])}")
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
    latest = latest_checkpoint(run_dir)
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


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
