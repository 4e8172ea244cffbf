"""``LoopConfig``: how long the online loop runs, and how often it re-syncs the sampler, evaluates and checkpoints.

``sync_every = s`` places a run on the offline → online spectrum (``s = 1`` online, ``1 < s < ∞``
semi-online, ``None`` or ``math.inf`` offline); :mod:`hotloop.runtime.loop` explains the schedule
and :mod:`hotloop.runtime.sync_policy` how a sync happens. Every field is checked when the config is built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hotloop.runtime.sync_policy import SyncConfig, sync_period


@dataclass(frozen=True, kw_only=True)
class LoopConfig:
    """How long the loop runs, how often the sampler is re-synced, evaluated and checkpointed."""

    steps: int = 60
    """Loop steps (each at most one optimizer step)."""
    sync_every: int | float | None = 4
    """s: optimizer steps between sampler weight syncs; 1 = online, None or math.inf = offline."""
    prompts_per_step: int = 16
    """Prompts drawn (without replacement within a step) per loop step."""
    eval_every: int = 10
    """Run the evaluation callback every this many steps (and after the last); 0 = only after the last."""
    checkpoint_every: int = 10
    """Checkpoint every this many steps (besides the end and SIGINT/SIGTERM); 0 = no periodic checkpoint."""
    final_checkpoint: bool | None = True
    """Checkpoint after the last step; None = only when ``checkpoint_every > 0`` (the run config's default, so
    that ``checkpoint_every: 0`` there writes no weights unless asked). SIGINT/SIGTERM always checkpoint."""
    out_dir: str = "runs/demo"
    """Directory for metrics.jsonl and checkpoints."""
    seed: int = 0
    """Seeds the prompt draw and the sampler of every step."""
    sleep_between_phases: bool = False
    """Call engine.sleep()/wake() around training (frees sampler memory; useful on GPU only)."""
    sync: SyncConfig = field(default_factory=SyncConfig)
    """Buckets, timeout and the proof on every sync (``hotloop.runtime.sync_policy``)."""

    def __post_init__(self) -> None:
        if (
            self.sync_every is not None
            and self.sync_every != math.inf
            and not (
                isinstance(self.sync_every, int) and not isinstance(self.sync_every, bool) and self.sync_every >= 1
            )
        ):
            raise ValueError(f"sync_every: expected an int >= 1, None or math.inf (offline), got {self.sync_every!r}")
        for name in ("steps", "prompts_per_step"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {getattr(self, name)!r}")
        for name in ("eval_every", "checkpoint_every", "seed"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name}: expected an int >= 0, got {getattr(self, name)!r}")
        if not isinstance(self.sync, SyncConfig):
            raise ValueError(f"sync: expected a SyncConfig, got {type(self.sync).__name__}")

    @property
    def writes_final_checkpoint(self) -> bool:
        """Whether the end of the run writes a checkpoint."""
        return self.checkpoint_every > 0 if self.final_checkpoint is None else bool(self.final_checkpoint)

    @property
    def sync_period(self) -> int | None:
        """``sync_every`` as an int, or None when the sampler is never re-synced."""
        return sync_period(self.sync_every)
