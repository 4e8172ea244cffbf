"""Verifiable rewards: 1.0 when a completion's answer is right, else 0.0.

:class:`ExactMatchReward` asks the task (``task.score``, exact string match for arithmetic).
:class:`MathVerifyReward` compares *mathematical values* with Hugging Face's math-verify
(``parse`` extracts the last LaTeX or plain expression, ``\\boxed{}`` first; ``verify`` checks
symbolic or numeric equality), so ``\\frac{1}{2}``, ``0.5`` and ``\\boxed{\\dfrac12}`` all match
a gold ``1/2``. math-verify's timeouts use ``SIGALRM``, which only the main thread may set, so
they apply in the main thread only.
"""

from __future__ import annotations

import threading

import torch
from math_verify import parse, verify

from hotloop.algorithms.rewards.base import check_batch
from hotloop.algorithms.rewards.reward_model import RuleBasedReward


class ExactMatchReward(RuleBasedReward):
    """Reward = ``task.score(problem, completion)`` (1.0 for an exact answer, else 0.0)."""

    reward_range = (0.0, 1.0)

    def __init__(self, task) -> None:
        if not callable(getattr(task, "score", None)):
            raise TypeError(f"task: expected an object with a score(problem, completion) method, got {task!r}")
        super().__init__(task.score)
        self.task = task


class MathVerifyReward:
    """Reward = 1.0 when math-verify finds the completion's answer equal to ``problem.answer``."""

    reward_range = (0.0, 1.0)

    def __init__(self, *, timeout_seconds: int = 5) -> None:
        if not isinstance(timeout_seconds, int) or timeout_seconds < 1:
            raise ValueError(f"timeout_seconds: expected a positive int, got {timeout_seconds!r}")
        self.timeout_seconds = timeout_seconds

    def __call__(self, problems: list, completions: list[str]) -> torch.Tensor:
        check_batch(problems, completions)
        timeout = self.timeout_seconds if threading.current_thread() is threading.main_thread() else None
        return torch.tensor(
            [self._score(p.answer, c, timeout) for p, c in zip(problems, completions)], dtype=torch.float32
        )

    @staticmethod
    def _score(gold_text: str, completion: str, timeout: int | None) -> float:
        # A bare gold such as "\frac12" has no math delimiters, which LaTeX extraction needs.
        gold = parse(gold_text, parsing_timeout=timeout) or parse(f"${gold_text}$", parsing_timeout=timeout)
        answer = parse(completion, parsing_timeout=timeout)
        if not gold or not answer:
            return 0.0
        return float(verify(gold, answer, timeout_seconds=timeout))
