"""Rejection sampling / Best-of-N SFT: which samples are kept, and that the loss is their mean NLL."""

import pytest
import torch

from hotloop.algorithms.logprobs import token_logprobs
from hotloop.algorithms.rejection_sampling import RejectionSampling, RejectionSamplingConfig, kept_rows
from hotloop.algorithms.tasks.tiny_model import build_tiny_model, tiny_llama_config
from hotloop.runtime.engine import Completion

PAD = 0
PROMPTS = [[1, 5, 6], [1, 7]]
GROUPS = [[[10, 2], [11, 12, 2], [13, 2], [14, 2]], [[15, 2], [16, 17, 2], [18, 2], [3, 2]]]
REWARDS = torch.tensor([0.3, 0.9, 0.9, 0.1, 0.0, 0.0, 0.4, 0.0])


def _completions(groups, version=1):
    return [
        Completion(
            prompt_index=p, token_ids=ids, logprobs=[-1.0] * len(ids), finish_reason="stop", weight_version=version
        )
        for p, group in enumerate(groups)
        for ids in group
    ]


@pytest.mark.parametrize(
    "top_k, min_reward, expected",
    [
        (1, None, [1, 6]),  # Best-of-N: ties go to the earlier sample
        (2, None, [1, 2, 6, 4]),  # top 2 per prompt, best first; 0.0 ties keep sampling order
        (None, 0.3, [1, 2, 0, 6]),  # ReST: every sample at or above the threshold
        (2, 0.35, [1, 2, 6]),  # both filters
        (1, 0.95, []),
    ],
)
def test_kept_rows_applies_rank_and_threshold_filters(top_k, min_reward, expected):
    assert kept_rows(REWARDS.view(2, 4), top_k, min_reward).tolist() == expected


def test_build_batch_packs_the_kept_samples_with_unit_weights_and_none_when_nothing_is_kept():
    algo = RejectionSampling(RejectionSamplingConfig(samples_per_prompt=4, top_k=2, min_reward=0.35), pad_token_id=PAD)
    batch = algo.build_batch([None] * 2, PROMPTS, _completions(GROUPS), REWARDS)
    expected = [PROMPTS[0] + [11, 12, 2], PROMPTS[0] + [13, 2], PROMPTS[1] + [18, 2]]
    assert [batch.input_ids[r][batch.attention_mask[r].bool()].tolist() for r in range(3)] == expected
    assert batch.completion_mask.sum(-1).tolist() == [3, 2, 2]
    assert batch.weights.tolist() == [1.0, 1.0, 1.0] and batch.rewards.tolist() == pytest.approx([0.9, 0.9, 0.4])
    strict = RejectionSampling(
        RejectionSamplingConfig(samples_per_prompt=4, min_reward=1.0, top_k=None), pad_token_id=PAD
    )
    assert strict.build_batch([None] * 2, PROMPTS, _completions(GROUPS), REWARDS) is None


@pytest.mark.parametrize("normalize", ["token", "sequence"])
def test_loss_is_the_mean_nll_of_the_kept_completion_tokens_and_its_step_raises_them(normalize):
    model = build_tiny_model(
        tiny_llama_config(19, hidden_size=32, layers=1, intermediate=64), seed=int(torch.randint(100, ()))
    )
    algo = RejectionSampling(
        RejectionSamplingConfig(samples_per_prompt=4, top_k=2, normalize=normalize), pad_token_id=PAD
    )
    batch = algo.build_batch([None] * 2, PROMPTS, _completions(GROUPS), REWARDS)
    with torch.no_grad():
        logp = token_logprobs(model, batch.input_ids, batch.attention_mask).double()
    rows = []
    for r in range(batch.rows):  # completion token j of row r sits at input position prompt_len + j
        start = int(batch.completion_mask[r].argmax())
        rows.append([-logp[r, t - 1].item() for t in range(start, start + int(batch.completion_mask[r].sum()))])
    if normalize == "token":
        expected = sum(map(sum, rows)) / sum(map(len, rows))
    else:
        expected = sum(sum(r) / len(r) for r in rows) / len(rows)
    out = algo.loss(model, batch, reference=None)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    out.loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    assert algo.loss(model, batch, reference=None).loss.item() < out.loss.item()


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(top_k=None, min_reward=None), "top_k"),
        (dict(top_k=9), "top_k"),
        (dict(normalize="row"), "normalize"),
        (dict(min_reward=float("inf")), "min_reward"),
    ],
)
def test_config_names_the_bad_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        RejectionSamplingConfig(**kwargs)
