"""Weighted sum of reward sources, e.g. a verifier plus a reward model: ``r = Σ_k w_k · r_k``.

Weights must be finite, non-negative and not all zero; they are not normalised, so the scale
of the mix is the caller's choice. Each source is called once per batch and must return ``[n]``;
the unweighted rewards of the last call stay in ``last_components`` (name → ``[n]``), which the loop
logs as ``reward/<name>``.
"""

from __future__ import annotations

import math

import torch

from hotloop.algorithms.rewards.base import check_batch


class WeightedMixture:
    """``r = Σ_k w_k · fn_k(problems, completions)`` over ``[(fn_k, w_k), ...]``; ``names`` label the sources
    (default: their class names; repeated names get ``_<k>``)."""

    def __init__(self, components: list[tuple[object, float]], names: list[str] | None = None) -> None:
        if not components:
            raise ValueError("components: expected at least one (reward_fn, weight) pair, got none")
        for i, item in enumerate(components):
            if not (isinstance(item, tuple) and len(item) == 2):
                raise TypeError(f"components[{i}]: expected a (reward_fn, weight) tuple, got {item!r}")
            fn, weight = item
            if not callable(fn):
                raise TypeError(f"components[{i}]: expected a callable reward_fn, got {type(fn).__name__}")
            if (
                isinstance(weight, bool)
                or not isinstance(weight, (int, float))
                or not math.isfinite(weight)
                or weight < 0
            ):
                raise ValueError(f"components[{i}]: expected a finite weight >= 0, got {weight!r}")
        if sum(w for _, w in components) == 0:
            raise ValueError(f"components: expected at least one positive weight, got {[w for _, w in components]}")
        if names is not None and len(names) != len(components):
            raise ValueError(f"names: expected {len(components)} names, one per component, got {len(names)}")
        self.components = [(fn, float(w)) for fn, w in components]
        names = list(names) if names is not None else [type(fn).__name__ for fn, _ in components]
        self.names = [n if names.count(n) == 1 else f"{n}_{k}" for k, n in enumerate(names)]
        self.last_components: dict[str, torch.Tensor] = {}

    @property
    def reward_range(self) -> tuple[float, float] | None:
        """``(Σ w_k low_k, Σ w_k high_k)`` when every source declares a range, else None."""
        ranges = [getattr(fn, "reward_range", None) for fn, _ in self.components]
        if any(r is None for r in ranges):
            return None
        return (
            sum(w * r[0] for (_, w), r in zip(self.components, ranges)),
            sum(w * r[1] for (_, w), r in zip(self.components, ranges)),
        )

    def __call__(self, problems: list, completions: list[str]) -> torch.Tensor:
        check_batch(problems, completions)
        total = torch.zeros(len(problems), dtype=torch.float32)
        self.last_components = {}
        for i, (fn, weight) in enumerate(self.components):
            reward = fn(problems, completions)
            if reward.shape != total.shape:
                raise ValueError(
                    f"components[{i}]: expected rewards of shape {tuple(total.shape)}, got {tuple(reward.shape)}"
                )
            self.last_components[self.names[i]] = reward.float().cpu()
            total += weight * reward.float().cpu()
        return total
