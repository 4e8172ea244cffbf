"""Guards of a run: non-finite steps, rewards out of range, torn metrics lines, resumes that mix runs.

Non-finite steps. One NaN reward, loss or gradient turns every weight into NaN at the next
optimizer step, and the poisoned model would then be checkpointed over the good ones. The trainer
asks :func:`first_nonfinite` (one host sync for all the quantities) before it steps; a step with a
non-finite reward, loss or gradient norm is skipped — gradients zeroed, no optimizer or scheduler
step, so the version does not advance — and counted (``skipped/nonfinite`` in the metrics). More
than ``TrainerConfig.max_skipped_steps`` skips raise :class:`NonFiniteError` naming the step and
the first non-finite quantity; no checkpoint is written after it.

Reward ranges. A reward function may declare ``reward_range = (low, high)`` (the verifiers: (0, 1));
:func:`check_rewards` reports every reward outside it, or non-finite, with the offending completion.

Metrics. :func:`repair_metrics` keeps the ``metrics.jsonl`` lines of the steps before a resume
point and drops (and reports) a line that a kill cut short or that is not JSON at all.

Resume. :func:`config_diff` lists every leaf of two nested config dicts that differs, and
:func:`check_resume` refuses a resume whose config differs from the checkpoint's in anything but
:data:`SAFE_ON_RESUME` (or the keys the caller explicitly allows), unless forced.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from hotloop.runtime.checkpoint_files import read_json_state

SAFE_ON_RESUME = (
    "loop.steps",
    "loop.eval_every",
    "loop.checkpoint_every",
    "loop.out_dir",
    "task.eval_problems",
    "model.cache_dir",
)
"""Config keys that leave the trajectory of the steps already taken unchanged: length of the run,
evaluation and checkpoint cadence, output locations."""


class NonFiniteError(RuntimeError):
    """Too many steps were skipped for non-finite values; the message names the step and the quantity."""


class ResumeMismatchError(ValueError):
    """``--resume`` with a config that would continue a different run; the message lists each key."""


class RewardRangeWarning(UserWarning):
    """A reward outside its function's declared range, or non-finite; the message shows the completion."""


def first_nonfinite(quantities: Mapping[str, torch.Tensor | float | None]) -> tuple[str, str] | None:
    """``(name, description)`` of the first quantity holding a NaN or ±inf, or None (one host sync)."""
    names, flags = [], []
    for name, value in quantities.items():
        if value is None:
            continue
        value = torch.as_tensor(value).detach()
        if value.numel() and value.is_floating_point():
            names.append(name)
            flags.append(torch.isfinite(value).all())
    if not flags:
        return None
    # gathered on one device, then read once: a non_blocking copy to the host could be read before it lands
    finite = torch.stack([f.to(flags[0].device) for f in flags]).tolist()
    for name, ok in zip(names, finite):
        if not ok:
            return name, _describe(torch.as_tensor(quantities[name]).detach())
    return None


def _describe(value: torch.Tensor) -> str:
    flat = value.float().flatten().cpu()
    bad = (~torch.isfinite(flat)).nonzero().flatten()
    if flat.numel() == 1:
        return f"{flat.item()}"
    shown = ", ".join(f"[{i}]={flat[i].item()}" for i in bad[:3].tolist())
    return f"{bad.numel()} of {flat.numel()} non-finite ({shown})"


def reward_range(reward_fn) -> tuple[float, float] | None:
    """The ``(low, high)`` a reward function declares as ``reward_range``, or None."""
    declared = getattr(reward_fn, "reward_range", None)
    if declared is None:
        return None
    low, high = declared
    return float(low), float(high)


def check_rewards(rewards: torch.Tensor, completions: list[str], reward_fn, *, step: int, shown: int = 3) -> int:
    """Warn about rewards outside ``reward_fn``'s declared range or non-finite; returns how many there were.

    Args:
        rewards: [n] rewards of one step.
        completions: the n completion texts they score.
        reward_fn: the reward function (its ``reward_range``, if any, is the allowed range).
        step: loop step, for the message.
        shown: completions quoted in the warning.
    """
    values = rewards.detach().float().cpu()
    bad = ~torch.isfinite(values)
    declared = reward_range(reward_fn)
    if declared is not None:
        bad |= (values < declared[0]) | (values > declared[1])
    index = bad.nonzero().flatten().tolist()
    if index:
        where = f"outside the declared range {list(declared)} or non-finite" if declared else "non-finite"
        quoted = "; ".join(
            f"[{i}] reward {values[i].item()} for completion {completions[i]!r:.200}" for i in index[:shown]
        )
        warnings.warn(
            f"step {step}: {len(index)} of {len(values)} rewards of {type(reward_fn).__name__} are {where}: {quoted}",
            RewardRangeWarning,
            stacklevel=2,
        )
    return len(index)


def repair_metrics(path: str | Path, start: int) -> list[int]:
    """Keep only ``path``'s JSON lines of steps before ``start``; returns the numbers of the lines dropped as
    torn or garbage (each reported in one warning)."""
    path = Path(path)
    if not path.exists():
        return []
    keep, dropped = [], []
    for number, line in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = record["step"]
        except (ValueError, KeyError, TypeError):
            dropped.append(number)
            continue
        if isinstance(step, int) and step < start:
            keep.append(line.decode())
    if dropped:
        warnings.warn(f"{path}: dropped {len(dropped)} torn or non-JSON line(s) (line {dropped[:5]})", stacklevel=2)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)
    return dropped


def config_diff(old: Mapping, new: Mapping, prefix: str = "") -> list[tuple[str, object, object]]:
    """``(dotted key, old value, new value)`` of every leaf that differs between two nested dicts."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, _MISSING), new.get(key, _MISSING)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += config_diff(a, b, f"{prefix}{key}.")
        elif _normal(a) != _normal(b):
            out.append((f"{prefix}{key}", a, b))
    return out


def check_resume(old: Mapping, new: Mapping, *, allow: Iterable[str] = (), force: bool = False) -> list[str]:
    """Refuse to resume a run whose saved config ``old`` differs from ``new`` in a key that changes the trajectory.

    Args:
        old: the config stored with the checkpoint (nested dicts of JSON values).
        new: the config of this invocation.
        allow: further dotted keys the caller explicitly allows to change (prefixes match sections).
        force: resume whatever differs.

    Returns:
        One line per changed key, ``key: old → new``, for the caller to print.

    Raises:
        ResumeMismatchError: listing each refused key, old → new, and how to override.
    """
    allowed = (*SAFE_ON_RESUME, *allow)
    diff = config_diff(old, new)
    changes = [f"{key}: {a!r} → {b!r}" for key, a, b in diff]
    refused = [
        line
        for line, (key, _, _) in zip(changes, diff)
        if not any(key == k or key.startswith(k + ".") for k in allowed)
    ]
    if refused and not force:
        raise ResumeMismatchError(
            f"resume: the checkpoint was written by a different run config; refusing to mix runs "
            f"({'; '.join(refused)}). Keys safe to change: {', '.join(SAFE_ON_RESUME)}; allow another key with "
            f"--allow-change KEY, or resume anyway with --force-resume"
        )
    return changes


def saved_run_config(path: str | Path) -> dict | None:
    """The run config a checkpoint directory stores (``Trainer(run_config=...)``), or None."""
    return read_json_state(Path(path), "trainer").get("extra", {}).get("run_config")


class _Missing:
    def __repr__(self) -> str:
        return "(absent)"


_MISSING = _Missing()


def _normal(value):
    """Lists and tuples compare equal (YAML gives lists, dataclasses tuples); so do 1 and 1.0."""
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    if isinstance(value, float) and math.isinf(value):
        return str(value)
    return value
