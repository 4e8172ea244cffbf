"""Rewards built from a run config: a verifiable + non-verifiable mixture, and the LLM judge from a saved model."""

import pytest
import torch

from hotloop.algorithms.loader import load_config
from hotloop.algorithms.rewards import ExactMatchReward, LLMJudge, StyleReward, WeightedMixture
from hotloop.algorithms.rewards.build import build_reward
from hotloop.algorithms.tasks import ArithmeticTask, CharTokenizer, Problem

CPU = torch.device("cpu")


def _build(overrides, *, task=None, tokenizer=None, policy=None):
    return build_reward(load_config(None, overrides).reward, task=task, tokenizer=tokenizer, policy=policy, device=CPU)


def test_exact_match_plus_style_mixture_scores_clean_correct_answers_highest():
    reward = _build(
        ["reward.mixture=[[exact_match, 1.0], [preference_rule, 0.5]]", "reward.style.target_length=2"],
        task=ArithmeticTask(2, "+", 0),
    )
    problems = [Problem("12+39=", "51")] * 5
    texts = ["51", " 51 ", "5100", "x", ""]
    # exact: 1, 1, 0, 0, 0 (surrounding spaces are stripped); style = mean(format, length) with L = 2:
    # "51" (1, 1); " 51 " (2/4, 0); "5100" (1, 0); "x" (0, 1/2); "" scores 0
    expected = torch.tensor([1 + 0.5 * 1.0, 1 + 0.5 * 0.25, 0.5 * 0.5, 0.5 * 0.25, 0.0])
    out = reward(problems, texts)
    assert torch.allclose(out, expected) and len(set(out.tolist())) == len(texts)
    style = reward.components[1][0]
    assert isinstance(reward, WeightedMixture) and isinstance(style, StyleReward)
    assert not torch.equal(style(problems, texts), ExactMatchReward(ArithmeticTask())(problems, texts))


def test_style_reward_needs_no_task_and_the_task_verifier_does():
    problems = [Problem("q: name a number", "")]
    assert _build(["reward.kind=preference_rule"])(problems, ["123456"]).tolist() == [1.0]
    with pytest.raises(ValueError, match="exact_match"):
        _build(["reward.kind=exact_match"])


def test_llm_judge_from_config_on_a_saved_causal_lm_equals_the_judge_built_by_hand(local_model_dirs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = local_model_dirs / "policy"
    reward = _build(["reward.kind=llm_judge", f"reward.judge.model={path}", "reward.judge.batch_size=2"])
    by_hand = LLMJudge(AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path))
    problems = [Problem("12+39=", "51"), Problem("7+8=", "15"), Problem("1+1=", "2")]
    texts = ["51", "16", "two"]
    out = reward(problems, texts)
    assert isinstance(reward, LLMJudge) and not reward.model.training
    assert out.shape == (3,) and out.dtype == torch.float32 and bool(((out > 0) & (out < 1)).all())
    assert torch.allclose(out, by_hand(problems, texts), atol=1e-6)


def test_llm_judge_policy_is_the_policy_module_itself():
    from hotloop.algorithms.tasks import build_tiny_model, tiny_llama_config

    tok = CharTokenizer("0123456789+=?")
    policy = build_tiny_model(tiny_llama_config(tok.vocab_size, hidden_size=16, heads=2, kv_heads=1), seed=0)
    overrides = [
        "reward.kind=llm_judge",
        "reward.judge.model=policy",
        "reward.judge.template='{prompt}{completion}?'",
        "reward.judge.verdicts=['1', '0']",
    ]
    reward = _build(overrides, tokenizer=tok, policy=policy)
    assert reward.model is policy and reward([Problem("1+1=", "2")], ["2"]).shape == (1,)
    with pytest.raises(ValueError, match=r"reward\.judge\.template: .*Is the answer good"):
        _build(overrides[:2], tokenizer=tok, policy=policy)  # the English default has letters
