"""Verifiable task: integer addition or subtraction written as characters, e.g. ``"12+39="`` → ``"51"``.

Operands are uniform in ``[0, 10**digits)`` (for ``-`` the larger comes first, so answers are
never negative). Every operand pair belongs to exactly one split, fixed by a CRC32 of the
problem text (``_TEST_FRACTION`` of the pairs are held out), so train and test are disjoint
for every seed; the seed only chooses which problems of a split are drawn, and in which order.

:meth:`ArithmeticTask.teacher` writes the answer by column arithmetic but *drops each carry*
(borrow, for ``-``) *independently with probability* ``error_rate``: the plausible slip a
hurried student makes. An SFT model fitted to a teacher with ``error_rate > 0.5`` learns the
slip as its most likely answer, so greedy decoding is right only on carry-free problems while
sampling still finds the right answer at a rate of ``(1 - error_rate) ** carries``: the gap
that online preference learning with a verifier closes.
"""

from __future__ import annotations

import functools
import random
import zlib
from dataclasses import dataclass

_OPS = ("+", "-")
_MAX_DIGITS = 3
_TEST_FRACTION = 0.1
_SPLITS = ("train", "test")


@dataclass(frozen=True)
class Problem:
    """One prompt and its reference answer (empty where the task has no single answer)."""

    prompt: str
    answer: str


def in_test_split(text: str) -> bool:
    """Whether the problem written ``text`` is held out (a fixed ``_TEST_FRACTION`` of all problems)."""
    return zlib.crc32(text.encode()) % 1000 < _TEST_FRACTION * 1000


@functools.lru_cache(maxsize=16)
def _split_pairs(digits: int, op: str) -> dict[str, tuple[tuple[int, int], ...]]:
    """All operand pairs of each split, in a fixed order."""
    top = 10**digits
    out = {"train": [], "test": []}
    for a in range(top):
        for b in range(a + 1 if op == "-" else top):
            out["test" if in_test_split(f"{a}{op}{b}=") else "train"].append((a, b))
    return {k: tuple(v) for k, v in out.items()}


def _column_op(a: int, b: int, op: str, rng: random.Random | None, error_rate: float) -> tuple[str, int]:
    """Column-by-column ``a op b``; each carry/borrow is dropped with probability ``error_rate``.

    Returns the answer text and the number of carries (or borrows) the exact computation has.
    """
    da, db = str(a)[::-1], str(b)[::-1]
    digits, carry, carries = [], 0, 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry if op == "+" else x - y - carry
        carry = int(s >= 10) if op == "+" else int(s < 0)
        digits.append(s % 10)
        carries += carry
        if carry and rng is not None and rng.random() < error_rate:
            carry = 0
    if carry:  # only "+" can end with a carry: it becomes the leading digit
        digits.append(carry)
    text = "".join(str(d) for d in reversed(digits)).lstrip("0")
    return text or "0", carries


class ArithmeticTask:
    """``digits``-digit addition or subtraction with a disjoint train/test split and an exact-match score."""

    def __init__(self, digits: int = 2, op: str = "+", seed: int = 0) -> None:
        if not isinstance(digits, int) or not 1 <= digits <= _MAX_DIGITS:
            raise ValueError(f"digits: expected an int in [1, {_MAX_DIGITS}], got {digits!r}")
        if op not in _OPS:
            raise ValueError(f"op: expected one of {_OPS}, got {op!r}")
        self.digits, self.op, self.seed = digits, op, seed

    @property
    def alphabet(self) -> str:
        """Characters that prompts and answers use."""
        return "0123456789" + self.op + "="

    @property
    def max_answer_chars(self) -> int:
        """Longest possible answer, in characters."""
        return self.digits + (1 if self.op == "+" else 0)

    def split_size(self, split: str) -> int:
        """Number of distinct problems in ``split``."""
        return len(_split_pairs(self.digits, self.op)[check_split(split)])

    def problems(self, n: int, split: str = "train") -> list[Problem]:
        """``n`` distinct problems of ``split``, the same ones for the same (task, n, split)."""
        pairs = _split_pairs(self.digits, self.op)[check_split(split)]
        if not isinstance(n, int) or not 0 <= n <= len(pairs):
            raise ValueError(f"n: expected an int in [0, {len(pairs)}] for split {split!r}, got {n!r}")
        rng = random.Random(f"arithmetic:{self.digits}:{self.op}:{self.seed}:{split}")
        return [self._problem(a, b) for a, b in rng.sample(pairs, n)]

    def score(self, problem: Problem, completion_text: str) -> float:
        """1.0 when the completion, stripped of surrounding whitespace, equals the answer; else 0.0."""
        return float(completion_text.strip() == problem.answer)

    def teacher(self, problem: Problem, rng: random.Random, error_rate: float) -> str:
        """The answer by column arithmetic, dropping each carry with probability ``error_rate``."""
        if not 0.0 <= error_rate <= 1.0:
            raise ValueError(f"error_rate: expected a float in [0, 1], got {error_rate!r}")
        a, b = self._operands(problem)
        return _column_op(a, b, self.op, rng, error_rate)[0]

    def carries(self, problem: Problem) -> int:
        """Number of carries (borrows, for ``-``) in the exact computation."""
        a, b = self._operands(problem)
        return _column_op(a, b, self.op, None, 0.0)[1]

    def _problem(self, a: int, b: int) -> Problem:
        return Problem(prompt=f"{a}{self.op}{b}=", answer=_column_op(a, b, self.op, None, 0.0)[0])

    def _operands(self, problem: Problem) -> tuple[int, int]:
        a, b = problem.prompt.rstrip("=").split(self.op)
        return int(a), int(b)

    def __repr__(self) -> str:
        return f"ArithmeticTask(digits={self.digits}, op={self.op!r}, seed={self.seed})"


def check_split(split: str) -> str:
    """``split`` itself when it names a split of the built-in tasks ("train" or "test"); else a ValueError."""
    if split not in _SPLITS:
        raise ValueError(f"split: expected one of {_SPLITS}, got {split!r}")
    return split
