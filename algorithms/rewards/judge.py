"""LLM-as-a-judge rewards from answer log-probs: the policy can grade itself (self-rewarding).

Pairwise: the judge reads ``template`` filled with the prompt and two completions and is asked
which is better; with ``ℓ_X = log p(choice X | judging prompt)`` (summed over the choice's tokens),

    P(A better) = σ(ℓ_A − ℓ_B),

averaged with ``1 − P`` of the swapped order to cancel position bias (Zheng et al. 2023,
https://arxiv.org/abs/2306.05685). Pointwise (the :class:`RewardFn` form): the reward is
``σ(ℓ_yes − ℓ_no)`` after ``pointwise_template``. Self-rewarding LMs (Yuan et al. 2024,
https://arxiv.org/abs/2401.10020) pass the policy itself as ``model``.

Each choice is tokenised on its own and appended to the judging prompt, so a template should
end where a choice starts a new token (``"... Answer:"`` with choices ``" A"``, ``" B"`` for BPE).
Cost: one forward pass of ``len(judging prompt) + len(choice)`` tokens per choice.
:class:`JudgeConfig` is the run config's view of the pointwise judge (``reward.kind: llm_judge``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hotloop.algorithms.rewards.base import check_batch
from hotloop.algorithms.rewards.reward_model import encode, pad_id, right_pad

PAIRWISE_TEMPLATE = "Question: {prompt}\nAnswer A: {a}\nAnswer B: {b}\nWhich answer is better? Answer:"
POINTWISE_TEMPLATE = "Question: {prompt}\nAnswer: {completion}\nIs the answer good? Answer:"
POLICY = "policy"
"""``JudgeConfig.model`` value that makes the policy judge its own samples (self-rewarding)."""


@dataclass(frozen=True, kw_only=True)
class JudgeConfig:
    """Settings of the pointwise LLM-judge reward (``reward.judge`` in a run config)."""

    model: str | None = None
    """Local transformers causal-LM directory, or "policy" for the run's own policy; None = unset."""
    template: str = POINTWISE_TEMPLATE
    """Judging prompt with ``{prompt}`` and ``{completion}``; must be encodable by the judge's tokenizer."""
    verdicts: tuple[str, str] = (" yes", " no")
    """(good, bad) answer strings; the reward is σ(ℓ_good − ℓ_bad)."""
    batch_size: int = 32
    """Judging prompts per forward pass."""

    def __post_init__(self) -> None:
        if self.model is not None and (not isinstance(self.model, str) or not self.model):
            raise ValueError(f"model: expected None, {POLICY!r} or a model directory, got {self.model!r}")
        _check_template("template", self.template, ("{prompt}", "{completion}"))
        _check_pair("verdicts", self.verdicts)
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {self.batch_size!r}")


def _check_template(name: str, value: str, fields: tuple[str, ...]) -> None:
    missing = [f for f in fields if f not in value] if isinstance(value, str) else list(fields)
    if missing:
        raise ValueError(f"{name}: expected the fields {fields}, missing {missing} in {value!r}")


def _check_pair(name: str, pair: tuple[str, str]) -> None:
    if (
        not isinstance(pair, tuple)
        or len(pair) != 2
        or len(set(pair)) != 2
        or not all(isinstance(x, str) and x for x in pair)
    ):
        raise ValueError(f"{name}: expected two different non-empty strings, got {pair!r}")


class LLMJudge:
    """Judges completions by the log-probs a causal LM gives to fixed answer strings."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        template: str = PAIRWISE_TEMPLATE,
        pointwise_template: str = POINTWISE_TEMPLATE,
        choices: tuple[str, str] = (" A", " B"),
        verdicts: tuple[str, str] = (" yes", " no"),
        batch_size: int = 32,
    ) -> None:
        _check_template("template", template, ("{prompt}", "{a}", "{b}"))
        _check_template("pointwise_template", pointwise_template, ("{prompt}", "{completion}"))
        _check_pair("choices", tuple(choices))
        _check_pair("verdicts", tuple(verdicts))
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.template, self.pointwise_template = template, pointwise_template
        self.choices, self.verdicts = choices, verdicts

    def prefer(self, problem, a: str, b: str) -> float:
        """Probability that completion ``a`` is better than ``b``, averaged over both orders."""
        return float(self.prefer_batch([problem], [a], [b])[0])

    def prefer_batch(self, problems: list, a: list[str], b: list[str]) -> torch.Tensor:
        """[n] float32: ``P(a[i] better than b[i])`` for each problem."""
        check_batch(problems, a)
        check_batch(problems, b)
        fwd = [self.template.format(prompt=p.prompt, a=x, b=y) for p, x, y in zip(problems, a, b)]
        rev = [self.template.format(prompt=p.prompt, a=y, b=x) for p, x, y in zip(problems, a, b)]
        p_fwd = self._binary(fwd, self.choices)
        p_rev = self._binary(rev, self.choices)
        return 0.5 * (p_fwd + 1.0 - p_rev)

    def __call__(self, problems: list, completions: list[str]) -> torch.Tensor:
        """[n] float32 pointwise reward ``σ(ℓ_yes − ℓ_no)``."""
        check_batch(problems, completions)
        contexts = [
            self.pointwise_template.format(prompt=p.prompt, completion=c) for p, c in zip(problems, completions)
        ]
        return self._binary(contexts, self.verdicts)

    def _binary(self, contexts: list[str], pair: tuple[str, str]) -> torch.Tensor:
        """σ(ℓ_first − ℓ_second) for each context, ℓ = log-prob of the answer string after it."""
        first = self.continuation_logprob(contexts, [pair[0]] * len(contexts))
        second = self.continuation_logprob(contexts, [pair[1]] * len(contexts))
        return torch.sigmoid(first - second)

    @torch.no_grad()
    def continuation_logprob(self, contexts: list[str], continuations: list[str]) -> torch.Tensor:
        """[n] float32: Σ log p(continuation tokens | context) under the judge model."""
        if len(contexts) != len(continuations):
            raise ValueError(f"continuations: expected one per context ({len(contexts)}), got {len(continuations)}")
        device = next(self.model.parameters()).device
        ctx = [encode(self.tokenizer, c, special=True) for c in contexts]
        cont = [encode(self.tokenizer, c, special=False) for c in continuations]
        out = []
        for start in range(0, len(ctx), self.batch_size):
            pairs = list(zip(ctx[start : start + self.batch_size], cont[start : start + self.batch_size]))
            ids, mask = right_pad([x + y for x, y in pairs], pad_id(self.tokenizer), device)
            logp = self.model(input_ids=ids, attention_mask=mask).logits[:, :-1].float().log_softmax(-1)
            token_logp = logp.gather(-1, ids[:, 1:, None])[..., 0]  # [B, T-1]: log p(ids[:, t+1])
            out += [token_logp[i, len(x) - 1 : len(x) - 1 + len(y)].sum().cpu() for i, (x, y) in enumerate(pairs)]
        return torch.stack(out) if out else torch.zeros(0)
