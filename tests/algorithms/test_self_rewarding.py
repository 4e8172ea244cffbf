"""Self-rewarding DPO: round-robin judge scores, pairs from the judge (not the loop's reward), a tiny-model judge."""

import math

import pytest
import torch

from hotloop.algorithms.base import BuildContext
from hotloop.algorithms.dpo import DPOConfig
from hotloop.algorithms.logprobs import sequence_logprobs
from hotloop.algorithms.rewards.judge import PAIRWISE_TEMPLATE, LLMJudge
from hotloop.algorithms.self_rewarding import (
    DIGIT_TEMPLATE,
    SelfRewardingConfig,
    SelfRewardingDPO,
    judge_prompt,
    judge_scores,
)
from hotloop.algorithms.tasks.arithmetic import Problem
from hotloop.algorithms.tasks.tiny_model import build_tiny_model, tiny_llama_config
from hotloop.algorithms.tasks.tokenizer import CharTokenizer
from hotloop.runtime.engine import Completion, SamplingParams
from hotloop.runtime.torch_engine import TorchEngine
from hotloop.runtime.trainer import make_reference

TOK = CharTokenizer("0123456789+=")
PROBLEMS = [Problem(prompt="12+3=", answer="15"), Problem(prompt="4+4=", answer="8")]


class LongerIsBetter:
    """A stub judge: P(a ≻ b) = σ(len(a) − len(b))."""

    def __init__(self):
        self.calls = []

    def prefer_batch(self, problems, a, b):
        self.calls.append(list(zip(a, b)))
        return torch.sigmoid(torch.tensor([float(len(x) - len(y)) for x, y in zip(a, b)]))


def _completions(texts_per_prompt, version=6):
    return [
        Completion(
            prompt_index=p,
            token_ids=TOK.encode(t, add_bos=False) + [TOK.eos_id],
            logprobs=[-1.0] * (len(t) + 1),
            finish_reason="stop",
            weight_version=version,
        )
        for p, texts in enumerate(texts_per_prompt)
        for t in texts
    ]


def test_judge_scores_are_round_robin_win_rates_over_distinct_texts():
    judge = LongerIsBetter()
    texts = ["1", "123", "12", "123", "7", "7"]
    scores = judge_scores(judge, PROBLEMS, texts, [[0, 1, 2, 3], [4, 5]])
    s = lambda d: 1 / (1 + math.exp(-d))  # noqa: E731
    expected = [(s(-2) + s(-1)) / 2, (s(2) + s(1)) / 2, (s(1) + s(-1)) / 2, (s(2) + s(1)) / 2, 0.5, 0.5]
    assert scores.tolist() == pytest.approx(expected, rel=1e-6)
    assert sorted(judge.calls[0]) == [("1", "12"), ("1", "123"), ("123", "12")]  # duplicates judged once


def test_build_batch_pairs_the_judges_best_with_its_worst_and_ignores_the_loop_reward():
    algo = SelfRewardingDPO(
        SelfRewardingConfig(dpo=DPOConfig(samples_per_prompt=4, pairs_per_prompt=1)),
        pad_token_id=TOK.pad_id,
        judge=LongerIsBetter(),
        decode=TOK.decode,
    )
    prompts = [TOK.encode(p.prompt) for p in PROBLEMS]
    completions = _completions([["1", "123", "12", "9"], ["7", "7", "7", "7"]])
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0])  # the verifier disagrees with the judge
    batch = algo.build_batch(PROBLEMS, prompts, completions, rewards)
    rows = [TOK.decode(batch.input_ids[r][batch.completion_mask[r].bool()]) for r in range(batch.rows)]
    assert rows == ["123", "1"] and batch.chosen.tolist() == [0] and batch.rejected.tolist() == [1]
    assert batch.rewards[0] > 0.5 > batch.rewards[1] and batch.sampler_version == 6  # judge scores, not rewards
    margin = (batch.rewards[0] - batch.rewards[1]).item()
    strict = SelfRewardingDPO(
        SelfRewardingConfig(dpo=DPOConfig(samples_per_prompt=4), min_margin=margin + 1e-3),
        pad_token_id=TOK.pad_id,
        judge=LongerIsBetter(),
        decode=TOK.decode,
    )
    assert strict.build_batch(PROBLEMS, prompts, completions, rewards) is None


def test_judge_prompt_falls_back_to_digits_for_a_tokenizer_without_letters_and_names_bad_templates():
    assert judge_prompt(SelfRewardingConfig(), TOK) == (DIGIT_TEMPLATE, ("1", "2"))
    letters = CharTokenizer("".join(chr(c) for c in range(32, 127)) + "\n")
    assert judge_prompt(SelfRewardingConfig(), letters) == (PAIRWISE_TEMPLATE, (" A", " B"))
    with pytest.raises(ValueError, match="template"):
        judge_prompt(SelfRewardingConfig(template="Q{prompt} {a} {b}"), TOK)
    with pytest.raises(ValueError, match="choices"):
        judge_prompt(SelfRewardingConfig(choices=("1", "x")), TOK)
    with pytest.raises(ValueError, match="template"):
        SelfRewardingConfig(template="{prompt}{a}")


def _tiny(seed):
    return build_tiny_model(tiny_llama_config(TOK.vocab_size, hidden_size=32, layers=1, intermediate=64), seed=seed)


def test_tiny_policy_judges_its_own_samples_with_the_digit_template_and_the_dpo_step_follows_its_verdict():
    model = _tiny(int(torch.randint(100, ())))
    engine = TorchEngine(model, pad_token_id=TOK.pad_id, eos_token_id=TOK.eos_id, seed=0)
    context = BuildContext(
        pad_token_id=TOK.pad_id,
        engine=engine,
        problems=PROBLEMS,
        tokenizer=TOK,
        reward_fn=None,
        sampling=SamplingParams(),
    )
    config = SelfRewardingConfig(dpo=DPOConfig(beta=0.5, samples_per_prompt=4, pairs_per_prompt=1))
    algo = SelfRewardingDPO.from_config(config, context)
    prompts = [TOK.encode(p.prompt) for p in PROBLEMS]
    completions = engine.generate(prompts, SamplingParams(n=4, max_new_tokens=3, seed=1))
    model.train()
    batch = algo.build_batch(PROBLEMS, prompts, completions, torch.zeros(8))
    assert model.training  # judged in eval mode, mode restored
    judge, texts, expected = LLMJudge(model, TOK, template=DIGIT_TEMPLATE, choices=("1", "2")), [], []
    distinct = [list(dict.fromkeys(TOK.decode(c.token_ids) for c in completions[4 * p : 4 * p + 4])) for p in (0, 1)]
    ordered = [(p, t, u) for p in (0, 1) for t in distinct[p] for u in distinct[p] if u != t]
    prefer = judge.prefer_batch(
        [PROBLEMS[p] for p, _, _ in ordered], [t for _, t, _ in ordered], [u for _, _, u in ordered]
    ).tolist()  # every ordered pair, asked directly
    for p, group in enumerate(distinct):  # the round robin again: mean win probability against the others
        wins = {t: [x for (q, a, _), x in zip(ordered, prefer) if (q, a) == (p, t)] for t in group}
        score = {t: sum(w) / len(w) if w else 0.5 for t, w in wins.items()}
        best, worst = max(group, key=score.get), min(group, key=score.get)
        if score[best] > score[worst]:
            texts += [best, worst]
            expected += [score[best], score[worst]]
    assert texts, "the tiny policy's samples should differ"
    assert [TOK.decode(batch.input_ids[r][batch.completion_mask[r].bool()]) for r in range(batch.rows)] == texts
    assert batch.rewards.tolist() == pytest.approx(expected, rel=1e-4)
    reference = make_reference(model)
    args = (batch.input_ids, batch.attention_mask, batch.completion_mask)
    margin = lambda: (lambda s: (s[batch.chosen] - s[batch.rejected]).sum().item())(  # noqa: E731
        sequence_logprobs(model, *args)
    )
    start = margin()
    algo.loss(model, batch, reference=reference).loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    assert margin() > start
