"""The reward interface every reward source implements, and its argument check.

A reward function scores a batch of completions at once, ``r = R(problems, completions)``,
returning float32 ``[n]`` on the CPU: batching lets model-based rewards run one forward pass per
batch, and one shape for every source lets :class:`WeightedMixture` add them.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class RewardFn(Protocol):
    """Scores completions: ``rewards = fn(problems, completions)``.

    Args:
        problems: n task problems (objects with ``.prompt`` and ``.answer``).
        completions: n completion texts, ``completions[i]`` answering ``problems[i]``.
    Returns:
        [n] float32 on the CPU; larger is better.

    A reward function may declare ``reward_range = (low, high)``; the online loop reports every reward
    outside it, or non-finite, with its completion (``hotloop.runtime.guards.check_rewards``).
    """

    def __call__(self, problems: list, completions: list[str]) -> torch.Tensor: ...


def check_batch(problems: list, completions: list[str]) -> None:
    """Raise ``ValueError``/``TypeError`` unless ``problems`` and ``completions`` pair up one to one."""
    if len(problems) != len(completions):
        raise ValueError(f"completions: expected one per problem ({len(problems)}), got {len(completions)}")
    for i, text in enumerate(completions):
        if not isinstance(text, str):
            raise TypeError(f"completions[{i}]: expected str, got {type(text).__name__}")
