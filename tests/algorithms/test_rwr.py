"""Reward-weighted regression: softmax weights per group or batch, and the weighted NLL they feed."""

import math

import pytest
import torch

from hotloop.algorithms.logprobs import sequence_logprobs, token_logprobs
from hotloop.algorithms.rwr import RWR, RWRConfig, rwr_weights
from hotloop.algorithms.tasks.tiny_model import build_tiny_model, tiny_llama_config
from hotloop.runtime.engine import Completion

PAD = 0
PROMPTS = [[1, 5, 6], [1, 7]]
GROUPS = [[[10, 2], [11, 12, 2], [13, 2]], [[15, 2], [16, 17, 2], [3, 2]]]
REWARDS = torch.tensor([0.2, 1.0, 0.0, 0.5, 0.5, 0.5])


def _completions(groups, version=4):
    return [
        Completion(
            prompt_index=p, token_ids=ids, logprobs=[-1.0] * len(ids), finish_reason="stop", weight_version=version
        )
        for p, group in enumerate(groups)
        for ids in group
    ]


def _softmax_times_n(values, tau):
    e = [math.exp(v / tau) for v in values]
    return [len(values) * x / sum(e) for x in e]


@pytest.mark.parametrize("tau", [0.1, 0.7, 5.0])
def test_weights_are_n_times_the_softmax_of_reward_over_tau_per_group_or_batch(tau):
    r = REWARDS.tolist()
    group = rwr_weights(REWARDS.view(2, 3), tau, "group").tolist()
    assert group == pytest.approx(_softmax_times_n(r[:3], tau) + _softmax_times_n(r[3:], tau), rel=1e-6)
    assert rwr_weights(REWARDS.view(2, 3), tau, "batch").tolist() == pytest.approx(_softmax_times_n(r, tau), rel=1e-6)


def test_small_tau_approaches_best_of_n_and_large_tau_plain_sft():
    assert rwr_weights(REWARDS.view(2, 3), 1e-3, "group").tolist() == pytest.approx([0, 3, 0, 1, 1, 1], abs=1e-6)
    assert rwr_weights(REWARDS.view(2, 3), 1e6, "batch").tolist() == pytest.approx([1.0] * 6, abs=1e-5)


def test_build_batch_keeps_every_sample_in_order_with_its_weight():
    algo = RWR(RWRConfig(samples_per_prompt=3, tau=0.5, normalize_over="batch"), pad_token_id=PAD)
    batch = algo.build_batch([None] * 2, PROMPTS, _completions(GROUPS), REWARDS)
    flat = [PROMPTS[p] + ids for p, g in enumerate(GROUPS) for ids in g]
    assert [batch.input_ids[r][batch.attention_mask[r].bool()].tolist() for r in range(6)] == flat
    assert batch.weights.tolist() == pytest.approx(_softmax_times_n(REWARDS.tolist(), 0.5), rel=1e-6)
    assert batch.sampler_version == 4


def test_loss_is_the_weighted_token_mean_nll_and_favours_the_high_reward_sample():
    model = build_tiny_model(
        tiny_llama_config(19, hidden_size=32, layers=1, intermediate=64), seed=int(torch.randint(100, ()))
    )
    algo = RWR(RWRConfig(samples_per_prompt=3, tau=0.2), pad_token_id=PAD)
    batch = algo.build_batch([None] * 2, PROMPTS, _completions(GROUPS), REWARDS)
    with torch.no_grad():
        logp = token_logprobs(model, batch.input_ids, batch.attention_mask).double()
    m = batch.completion_mask[:, 1:].double()
    expected = (batch.weights.double()[:, None] * -logp * m).sum() / m.sum()
    out = algo.loss(model, batch, reference=None)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    args = (batch.input_ids, batch.attention_mask, batch.completion_mask)
    before = sequence_logprobs(model, *args).detach()
    out.loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    delta = sequence_logprobs(model, *args).detach() - before
    assert delta[1] > 0 and delta[1] > delta[0] and delta[1] > delta[2]  # group 0: reward 1.0 vs 0.2 and 0.0


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(tau=0.0), "tau"),
        (dict(normalize_over="prompt"), "normalize_over"),
        (dict(samples_per_prompt=0), "samples_per_prompt"),
    ],
)
def test_config_names_the_bad_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        RWRConfig(**kwargs)
