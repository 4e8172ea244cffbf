"""Non-verifiable task: write a digit string in a house style, graded by a rule-based reward.

Prompts are 1 to 4 random digits and ``=`` (``"4719="``). No single answer exists; the
rule-based reward model :class:`hotloop.algorithms.rewards.style.StyleReward` (digits only,
``lead=True``) grades how well a completion ``c`` follows three style rules, each worth a third:

    score = ( fraction of characters of c that are digits
            + max(0, 1 − |len(c) − L| / L)                      (L = target_length)
            + 1[c starts with the prompt's first digit] ) / 3     ∈ [0, 1]

so many completions score 1 ("4" followed by L − 1 digits) and near misses score in between:
the kind of graded, many-optimum signal a learned reward model gives. Each rule is one a
two-layer character model can learn, so preference learning on this reward shows up in a minute.
The split into train and test follows :func:`in_test_split`, as for arithmetic.
"""

from __future__ import annotations

import functools
import itertools
import random

from hotloop.algorithms.rewards.style import DIGITS as _DIGITS
from hotloop.algorithms.rewards.style import StyleConfig, StyleReward
from hotloop.algorithms.tasks.arithmetic import Problem, check_split, in_test_split

_MAX_PROMPT_DIGITS = 4
_NOISE_CHARS = "+-= "


@functools.lru_cache(maxsize=2)
def _split_prompts() -> dict[str, tuple[str, ...]]:
    out = {"train": [], "test": []}
    for k in range(1, _MAX_PROMPT_DIGITS + 1):
        for digits in itertools.product(_DIGITS, repeat=k):
            prompt = "".join(digits) + "="
            out["test" if in_test_split(prompt) else "train"].append(prompt)
    return {k: tuple(v) for k, v in out.items()}


class PreferenceTask:
    """Digit strings graded by length, format and a first-digit rule; see the module docstring."""

    def __init__(self, target_length: int = 6, seed: int = 0) -> None:
        if not isinstance(target_length, int) or not 1 <= target_length <= 32:
            raise ValueError(f"target_length: expected an int in [1, 32], got {target_length!r}")
        self.target_length, self.seed = target_length, seed
        self.reward_model = StyleReward(StyleConfig(target_length=target_length, charset=_DIGITS, lead=True))

    @property
    def alphabet(self) -> str:
        """Characters that prompts and teacher completions use."""
        return _DIGITS + _NOISE_CHARS

    @property
    def max_answer_chars(self) -> int:
        """Longest completion worth generating, in characters."""
        return 2 * self.target_length

    def split_size(self, split: str) -> int:
        """Number of distinct prompts in ``split``."""
        return len(_split_prompts()[check_split(split)])

    def problems(self, n: int, split: str = "train") -> list[Problem]:
        """``n`` distinct prompts of ``split`` (``answer`` is empty), the same for the same arguments."""
        prompts = _split_prompts()[check_split(split)]
        if not isinstance(n, int) or not 0 <= n <= len(prompts):
            raise ValueError(f"n: expected an int in [0, {len(prompts)}] for split {split!r}, got {n!r}")
        rng = random.Random(f"preference:{self.target_length}:{self.seed}:{split}")
        return [Problem(prompt=p, answer="") for p in rng.sample(prompts, n)]

    def score(self, problem: Problem, completion_text: str) -> float:
        """The style score in [0, 1] of the module docstring, from :attr:`reward_model`."""
        return self.reward_model.score(problem, completion_text)

    def teacher(self, problem: Problem, rng: random.Random, error_rate: float) -> str:
        """A sloppy writer: each rule is broken independently with probability ``error_rate``.

        Breaking the length rule shifts the length by 1 to 3; the format rule puts one noise
        character in; the first-digit rule starts with a different digit.
        """
        if not 0.0 <= error_rate <= 1.0:
            raise ValueError(f"error_rate: expected a float in [0, 1], got {error_rate!r}")
        length = self.target_length
        if rng.random() < error_rate:
            length = max(1, length + rng.choice((-3, -2, -1, 1, 2, 3)))
        chars = [rng.choice(_DIGITS) for _ in range(length)]
        first = problem.prompt[0]
        chars[0] = rng.choice(_DIGITS.replace(first, "")) if rng.random() < error_rate else first
        if rng.random() < error_rate:
            chars[rng.randrange(length)] = rng.choice(_NOISE_CHARS)
        return "".join(chars)

    def __repr__(self) -> str:
        return f"PreferenceTask(target_length={self.target_length}, seed={self.seed})"
