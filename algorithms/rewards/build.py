"""The reward function a run config asks for: one kind, or a weighted mixture of several.

Kinds (``reward.kind`` or the kinds of ``reward.mixture``):

- ``exact_match``: the built-in task's verifier (``task.score``; for the preference task its style rule);
- ``math_verify``: :class:`MathVerifyReward` against ``problem.answer``;
- ``reward_model``: a local ``*ForSequenceClassification`` directory (``reward.model``);
- ``preference_rule``: the rule-based :class:`StyleReward` (``reward.style``), on any task;
- ``llm_judge``: a pointwise :class:`LLMJudge` (``reward.judge``): a local causal-LM directory, or
  ``policy`` for the run's own policy module (self-rewarding: it judges with its current weights).

Models are loaded once, put on the run's device and used in eval mode, except the policy as judge,
which is the trainer's module itself.
"""

from __future__ import annotations

import torch

from hotloop.algorithms.rewards.judge import POLICY, JudgeConfig, LLMJudge
from hotloop.algorithms.rewards.mixture import WeightedMixture
from hotloop.algorithms.rewards.reward_model import SequenceClassifierReward, encode
from hotloop.algorithms.rewards.style import StyleReward
from hotloop.algorithms.rewards.verifiers import ExactMatchReward, MathVerifyReward


def build_reward(config, *, task, tokenizer, policy: torch.nn.Module, device: torch.device):
    """The ``RewardFn`` of ``config``.

    Args:
        config: a ``hotloop.algorithms.config.RewardConfig``.
        task: the built-in task (``score(problem, text)``), or None for a prompts file.
        tokenizer: the policy's tokenizer (a ``CharTokenizer`` or a Hugging Face tokenizer).
        policy: the policy module (the judge when ``config.judge.model == "policy"``).
        device: where loaded reward and judge models run.
    """
    if config.mixture:
        return WeightedMixture(
            [(_single(kind, config, task, tokenizer, policy, device), w) for kind, w in config.mixture],
            names=[kind for kind, _ in config.mixture],
        )
    return _single(config.kind or "exact_match", config, task, tokenizer, policy, device)


def _single(kind: str, config, task, tokenizer, policy, device):
    if kind == "exact_match":
        if task is None:
            raise ValueError(
                "reward.kind: 'exact_match' needs a built-in task; with a prompts file use "
                "math_verify, reward_model, preference_rule or llm_judge"
            )
        return ExactMatchReward(task)
    if kind == "math_verify":
        return MathVerifyReward()
    if kind == "preference_rule":
        return StyleReward(config.style)
    if kind == "llm_judge":
        return _judge(config.judge, tokenizer, policy, device)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(config.model).to(device).eval()
    return SequenceClassifierReward(model, AutoTokenizer.from_pretrained(config.model))


def _judge(config: JudgeConfig, tokenizer, policy, device) -> LLMJudge:
    """An LLM judge on the policy itself, or on the causal LM saved in ``config.model``."""
    if config.model == POLICY:
        model = policy
    else:
        from transformers import AutoModelForCausalLM

        from hotloop.algorithms.tasks.tokenizer import load_tokenizer

        model = AutoModelForCausalLM.from_pretrained(config.model, dtype=torch.float32).to(device).eval()
        tokenizer = load_tokenizer(config.model)
    for name, text in (
        ("template", config.template.format(prompt="", completion="")),
        ("verdicts", "".join(config.verdicts)),
    ):
        try:
            encode(tokenizer, text, special=False)
        except ValueError as err:  # a CharTokenizer without letters cannot read the English template
            raise ValueError(
                f"reward.judge.{name}: expected text the judge's tokenizer encodes, got {text!r} ({err})"
            ) from None
    return LLMJudge(
        model, tokenizer, pointwise_template=config.template, verdicts=config.verdicts, batch_size=config.batch_size
    )
