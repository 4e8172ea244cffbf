"""Self-rewarding DPO: the policy judges pairs of its own samples and DPO learns from its verdicts.

Self-rewarding language models (Yuan et al. 2024, https://arxiv.org/abs/2401.10020) let the model
being trained act as its own judge (LLM-as-a-judge), so preference pairs need neither a reward
model nor a verifier. Judging here is pairwise with :class:`hotloop.algorithms.rewards.judge.LLMJudge`
(``P(a ≻ b) = σ(ℓ_A − ℓ_B)`` after the judging template, averaged over both orders). The distinct
completions of each prompt play a round robin, and each one's score is its mean win probability

    s_i = mean_{j ≠ i} P(y_i ≻ y_j)          (over the other distinct texts of the same prompt)

then the i-th best is paired with the i-th worst (:func:`hotloop.algorithms.preference_data.preference_pairs`
on the scores), pairs whose score gap is at most ``min_margin`` are dropped, and the DPO loss of
:mod:`hotloop.algorithms.dpo` trains on them (``dpo.*``: β, loss_type, IPO, ...).

The judge is the model that sampled, the engine's module: with ``sync_every = 1`` the current
policy, with ``s > 1`` the copy last synced (the paper's iteration model M_t both generates and
judges). The loop's own reward is still computed and logged (e.g. accuracy) but not used for the
pairs. Judging happens in ``build_batch``, so the loop's ``batching`` phase includes it.

Templates. The judge's template and choices must be encodable by the run's tokenizer. With
``template``/``choices`` unset, the English ``PAIRWISE_TEMPLATE`` with choices " A"/" B" is used
when the tokenizer can encode it, else (the built-in :class:`CharTokenizer`, which has no
letters) ``DIGIT_TEMPLATE`` ``"{prompt}{a}={b}="`` with choices "1"/"2". A tiny arithmetic model
was never taught to judge, so on the built-in task the verdicts carry no designed meaning (the
run works end to end, which is what the tests check); self-rewarding is meant for a model that
can judge, loaded with ``hotloop train`` (``model.path``).

Cost: for m distinct samples of a prompt, m(m − 1)/2 comparisons × 2 orders × 2 choices judge
forwards (no grad) of about ``len(template) + 2|y|`` tokens, then one DPO step (policy forward +
backward and reference forward over both rows of each pair).
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from dataclasses import dataclass, field
from itertools import combinations

import torch
from torch import nn

from hotloop.algorithms.base import BuildContext, group_by_prompt, grouped_rewards, sampler_version
from hotloop.algorithms.dpo import DPOConfig, _DPOLoss
from hotloop.algorithms.preference_data import PairBatch, pair_batch, preference_pairs
from hotloop.algorithms.rewards.judge import PAIRWISE_TEMPLATE, LLMJudge
from hotloop.algorithms.rewards.reward_model import encode
from hotloop.runtime.engine import Completion

ENGLISH_CHOICES = (" A", " B")
DIGIT_TEMPLATE = "{prompt}{a}={b}="
DIGIT_CHOICES = ("1", "2")


@dataclass(frozen=True, kw_only=True)
class SelfRewardingConfig:
    """Settings of self-rewarding DPO: the DPO section plus the judge's prompt."""

    dpo: DPOConfig = field(default_factory=lambda: DPOConfig(samples_per_prompt=4))
    """β, loss_type, samples_per_prompt, pairs_per_prompt, ... of the DPO step (see DPOConfig)."""
    template: str | None = None
    """Judging prompt with {prompt}, {a} and {b}; None = PAIRWISE_TEMPLATE, or DIGIT_TEMPLATE when the
    tokenizer cannot encode letters (see the module docstring)."""
    choices: tuple[str, str] | None = None
    """The judge's two answers (a better, b better); None = (" A", " B"), or ("1", "2") with DIGIT_TEMPLATE."""
    min_margin: float = 0.0
    """Drop pairs whose judge scores differ by at most this (in [0, 1))."""
    judge_batch_size: int = 64
    """Judging sequences per forward pass."""

    def __post_init__(self) -> None:
        missing = [f for f in ("{prompt}", "{a}", "{b}") if self.template is not None and f not in self.template]
        if self.template is not None and (not isinstance(self.template, str) or missing):
            raise ValueError(
                f"template: expected None or a str with {{prompt}}, {{a}} and {{b}}, got {self.template!r}"
            )
        if self.choices is not None and (
            len(self.choices) != 2
            or len(set(self.choices)) != 2
            or not all(isinstance(c, str) and c for c in self.choices)
        ):
            raise ValueError(f"choices: expected None or two different non-empty strings, got {self.choices!r}")
        if not isinstance(self.min_margin, (int, float)) or not 0 <= self.min_margin < 1:
            raise ValueError(f"min_margin: expected a float in [0, 1), got {self.min_margin!r}")
        if not isinstance(self.judge_batch_size, int) or self.judge_batch_size < 1:
            raise ValueError(f"judge_batch_size: expected an int >= 1, got {self.judge_batch_size!r}")


def _encodable(tokenizer, text: str) -> bool:
    try:
        encode(tokenizer, text, special=False)
    except ValueError:  # CharTokenizer: characters outside its alphabet
        return False
    return True


def judge_prompt(config: SelfRewardingConfig, tokenizer) -> tuple[str, tuple[str, str]]:
    """The template and choices the judge uses with ``tokenizer`` (see ``SelfRewardingConfig``)."""
    english = _encodable(tokenizer, PAIRWISE_TEMPLATE.format(prompt="", a="", b="") + "".join(ENGLISH_CHOICES))
    template = config.template or (PAIRWISE_TEMPLATE if english else DIGIT_TEMPLATE)
    choices = config.choices or (ENGLISH_CHOICES if english else DIGIT_CHOICES)
    for name, text in (("template", template.format(prompt="", a="", b="")), ("choices", "".join(choices))):
        if not _encodable(tokenizer, text):
            raise ValueError(
                f"{name}: expected text the run's tokenizer can encode, got {text!r} "
                f"(set self_rewarding.template and self_rewarding.choices)"
            )
    return template, choices


def judge_scores(judge, problems: list, texts: list[str], groups: list[list[int]]) -> torch.Tensor:
    """[n] float32 round-robin score of each text: mean ``judge.prefer_batch`` win probability against
    the other distinct texts of its group (0.5 when it has none)."""
    matches = [
        (g, a, b)
        for g, group in enumerate(groups)
        for a, b in combinations(list(dict.fromkeys(texts[i] for i in group)), 2)
    ]
    wins: dict[tuple[int, str], list[float]] = defaultdict(list)
    if matches:
        p = judge.prefer_batch(
            [problems[g] for g, _, _ in matches], [a for _, a, _ in matches], [b for _, _, b in matches]
        ).tolist()
        for (g, a, b), p_a in zip(matches, p):
            wins[g, a].append(p_a)
            wins[g, b].append(1.0 - p_a)
    scores = torch.full((len(texts),), 0.5)
    for g, group in enumerate(groups):
        for i in group:
            if wins[g, texts[i]]:
                scores[i] = math.fsum(wins[g, texts[i]]) / len(wins[g, texts[i]])
    return scores


@contextlib.contextmanager
def _eval_mode(model: nn.Module | None):
    """Judge without dropout; restore the module's mode afterwards."""
    was_training = model is not None and model.training
    if model is not None:
        model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


class SelfRewardingDPO(_DPOLoss):
    """DPO on pairs the policy's own judge picks among its samples."""

    def __init__(self, config: SelfRewardingConfig, *, pad_token_id: int, judge, decode) -> None:
        if not isinstance(config, SelfRewardingConfig):
            raise TypeError(f"config: expected SelfRewardingConfig, got {type(config).__name__}")
        if not callable(getattr(judge, "prefer_batch", None)):
            raise TypeError(f"judge: expected an object with prefer_batch(problems, a, b), got {type(judge).__name__}")
        super().__init__(config.dpo, pad_token_id=pad_token_id)
        self.settings, self.judge, self.decode = config, judge, decode
        self.samples_per_prompt = config.dpo.samples_per_prompt

    @classmethod
    def from_config(cls, config: SelfRewardingConfig, context: BuildContext) -> SelfRewardingDPO:
        """Factory for the config registry: an ``LLMJudge`` on the engine's module and the run's tokenizer."""
        model = getattr(context.engine, "model", None)
        if not isinstance(model, nn.Module):
            raise ValueError(
                f"engine: self-rewarding judges with the engine's module; expected an engine with "
                f".model (TorchEngine), got {type(context.engine).__name__}"
            )
        tokenizer = getattr(context.tokenizer, "inner", context.tokenizer)  # the CLI wraps HF tokenizers
        template, choices = judge_prompt(config, tokenizer)
        judge = LLMJudge(model, tokenizer, template=template, choices=choices, batch_size=config.judge_batch_size)
        return cls(config, pad_token_id=context.pad_token_id, judge=judge, decode=context.tokenizer.decode)

    def build_batch(
        self, problems: list, prompt_ids: list[list[int]], completions: list[Completion], rewards: torch.Tensor
    ) -> PairBatch | None:
        """Judge the samples of each prompt, pair best with worst by judge score; None when no pair is left."""
        grouped_rewards(completions, rewards, len(prompt_ids), self.samples_per_prompt)
        groups = group_by_prompt(completions, len(prompt_ids))
        with _eval_mode(getattr(self.judge, "model", None)):
            scores = judge_scores(self.judge, problems, [self.decode(c.token_ids) for c in completions], groups)
        pairs = [
            p
            for p in preference_pairs(prompt_ids, completions, scores, self.config.pairs_per_prompt)
            if p.chosen_reward - p.rejected_reward > self.settings.min_margin
        ]
        return pair_batch(pairs, self.pad_token_id, sampler_version(completions)) if pairs else None
