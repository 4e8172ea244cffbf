"""A rule-based reward model for any task's completions: concise, clean, well-formed answers.

No single answer is checked; the score grades how well a completion ``c`` follows house-style
rules, each worth the same share of the score (``lead`` counts only when enabled):

    format = fraction of the characters of c that lie in ``charset``       (no junk: spaces, stray symbols)
    length = max(0, 1 − |len(c) − L| / L)                                   (L = ``target_length``)
    lead   = 1[c starts with the prompt's first character]                  (optional)
    score  = mean of the rules above  ∈ [0, 1];  an empty completion scores 0

This is the non-verifiable half of a "verifiable + non-verifiable" reward mixture: on arithmetic,
``"51"`` and ``" 51 "`` are both exact matches but only the first is clean, and ``"5100"`` is
too long. :class:`hotloop.algorithms.tasks.preference.PreferenceTask` is scored by this model
with ``lead=True``. The rules are ones a two-layer character model learns in a minute, so
preference learning on them shows up quickly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hotloop.algorithms.rewards.base import check_batch

DIGITS = "0123456789"


@dataclass(frozen=True, kw_only=True)
class StyleConfig:
    """Settings of the style reward model (``reward.style`` in a run config)."""

    target_length: int = 6
    """Preferred completion length L in characters; the length rule falls to 0 at 0 and at 2L."""
    charset: str = DIGITS
    """Characters a well-formed completion consists of (everything else counts as junk)."""
    lead: bool = False
    """Add the rule "starts with the prompt's first character" (the preference task's third rule)."""

    def __post_init__(self) -> None:
        if (
            isinstance(self.target_length, bool)
            or not isinstance(self.target_length, int)
            or not 1 <= self.target_length <= 1024
        ):
            raise ValueError(f"target_length: expected an int in [1, 1024], got {self.target_length!r}")
        if not isinstance(self.charset, str) or not self.charset:
            raise ValueError(f"charset: expected a non-empty str, got {self.charset!r}")
        if not isinstance(self.lead, bool):
            raise ValueError(f"lead: expected a bool, got {self.lead!r}")


class StyleReward:
    """Reward = the style score of the module docstring, in [0, 1]."""

    def __init__(self, config: StyleConfig | None = None) -> None:
        if config is not None and not isinstance(config, StyleConfig):
            raise TypeError(f"config: expected a StyleConfig or None, got {type(config).__name__}")
        self.config = config if config is not None else StyleConfig()
        self._charset = frozenset(self.config.charset)

    def __call__(self, problems: list, completions: list[str]) -> torch.Tensor:
        """[n] float32 style scores."""
        check_batch(problems, completions)
        return torch.tensor([self.score(p, c) for p, c in zip(problems, completions)], dtype=torch.float32)

    def score(self, problem, completion: str) -> float:
        """The mean of the enabled rules for one completion of ``problem`` (an object with ``.prompt``)."""
        c, length = completion, self.config.target_length
        if not c:
            return 0.0
        rules = [sum(ch in self._charset for ch in c) / len(c), max(0.0, 1.0 - abs(len(c) - length) / length)]
        if self.config.lead:
            rules.append(float(c[0] == problem.prompt[:1]))
        return sum(rules) / len(rules)
