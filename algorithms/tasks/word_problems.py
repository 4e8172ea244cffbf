"""Verifiable task for real models: generated multi-step arithmetic word problems.

    "Ava has 14 marbles. She buys 3 bags of 6 marbles each. Then she gives away 9 marbles.
     How many marbles does Ava have now? Give the final answer as a number."  →  "23"

A problem is a start quantity followed by ``steps`` operations drawn from: gains ``k``, loses ``k``
(never below zero), buys ``g`` groups of ``k``, doubles or triples, and gives away half (only when
even), so every intermediate value is a non-negative integer below 1000. Problem ``i`` of the pool
is a function of ``(steps, i)`` alone; the pool is ``_POOL`` generated problems, de-duplicated by
text. Every problem belongs to one split, fixed by a CRC32 of its text (``in_test_split``, 10%
held out, as the arithmetic task), so train and test are disjoint for every seed; the seed only
chooses which problems of a split are drawn, and in which order.

The score is math-verify's (:class:`hotloop.algorithms.rewards.verifiers.MathVerifyReward`): the
completion's value (``\\boxed{}`` first, else the last number it parses) equal to the answer, so a
model that explains its working before the number is scored right.
"""

from __future__ import annotations

import functools
import random

from hotloop.algorithms.tasks.arithmetic import Problem, check_split, in_test_split

_POOL = 20_000
_MAX_STEPS = 5
_NAMES = (
    "Ava",
    "Ben",
    "Chloe",
    "Dev",
    "Ella",
    "Finn",
    "Grace",
    "Hugo",
    "Iris",
    "Jack",
    "Kira",
    "Liam",
    "Maya",
    "Noah",
    "Olive",
    "Priya",
    "Quinn",
    "Rosa",
    "Sam",
    "Tara",
)
_ITEMS = ("apples", "marbles", "stickers", "books", "coins", "pencils", "cards", "shells", "stamps", "cookies")
_INSTRUCTION = "Give the final answer as a number."


def _operation(rng: random.Random, value: int, item: str) -> tuple[str, int]:
    """One step: (sentence after "She"/"He" has been decided by the caller, new value)."""
    kinds = ["gain", "lose", "groups", "scale"] + (["half"] if value % 2 == 0 and value > 0 else [])
    kind = rng.choice(kinds)
    if kind == "lose" and value > 0:
        k = rng.randint(1, min(value, 20))
        return f"gives away {k} {item}", value - k
    if kind == "groups" or (kind == "scale" and value > 300):
        g, k = rng.randint(2, 5), rng.randint(2, 9)
        return f"buys {g} bags of {k} {item} each", value + g * k
    if kind == "scale":
        factor = rng.choice((2, 3))
        return f"{'doubles' if factor == 2 else 'triples'} the number of {item}", value * factor
    if kind == "half":
        return f"gives half of the {item} to a friend", value // 2
    k = rng.randint(2, 25)
    return f"finds {k} more {item}", value + k


def _generate(steps: int, index: int) -> Problem:
    """Problem ``index`` of the pool with ``steps`` operations."""
    rng = random.Random(f"word-problems:{steps}:{index}")
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    value = rng.randint(3, 30)
    sentences = [f"{name} has {value} {item}."]
    for i in range(steps):
        text, value = _operation(rng, value, item)
        sentences.append(f"{'Then ' if i else ''}{name} {text}.")
    sentences.append(f"How many {item} does {name} have now? {_INSTRUCTION}")
    return Problem(prompt=" ".join(sentences), answer=str(value))


@functools.lru_cache(maxsize=8)
def _split_pool(steps: int) -> dict[str, tuple[Problem, ...]]:
    """Every distinct problem of the pool, by split, in pool order."""
    seen, out = set(), {"train": [], "test": []}
    for index in range(_POOL):
        problem = _generate(steps, index)
        if problem.prompt not in seen:
            seen.add(problem.prompt)
            out["test" if in_test_split(problem.prompt) else "train"].append(problem)
    return {k: tuple(v) for k, v in out.items()}


class WordProblemsTask:
    """Multi-step word problems with ``steps`` operations, a disjoint train/test split and a math-verify score."""

    def __init__(self, steps: int = 2, seed: int = 0) -> None:
        if not isinstance(steps, int) or not 1 <= steps <= _MAX_STEPS:
            raise ValueError(f"steps: expected an int in [1, {_MAX_STEPS}], got {steps!r}")
        self.steps, self.seed = steps, seed

    def split_size(self, split: str) -> int:
        """Number of distinct problems in ``split``."""
        return len(_split_pool(self.steps)[check_split(split)])

    def problems(self, n: int, split: str = "train") -> list[Problem]:
        """``n`` distinct problems of ``split``, the same ones for the same (task, n, split)."""
        pool = _split_pool(self.steps)[check_split(split)]
        if not isinstance(n, int) or not 0 <= n <= len(pool):
            raise ValueError(f"n: expected an int in [0, {len(pool)}] for split {split!r}, got {n!r}")
        return random.Random(f"word-problems:{self.steps}:{self.seed}:{split}").sample(pool, n)

    def score(self, problem: Problem, completion_text: str) -> float:
        """1.0 when math-verify finds the completion's value equal to the answer; else 0.0."""
        from hotloop.algorithms.rewards.verifiers import MathVerifyReward

        return MathVerifyReward()([problem], [completion_text]).item()

    def __repr__(self) -> str:
        return f"WordProblemsTask(steps={self.steps}, seed={self.seed})"
