"""KTO on sampled completions: labels from the reward threshold, mismatched rows for z₀, gradient direction."""

import pytest
import torch

from hotloop.algorithms.kto import KTO, KTOConfig
from hotloop.algorithms.logprobs import sequence_logprobs
from hotloop.algorithms.tasks.tiny_model import build_tiny_model, tiny_llama_config
from hotloop.runtime.engine import Completion
from hotloop.runtime.trainer import make_reference

PAD = 0
PROMPTS = [[1, 5, 6], [1, 7], [1, 8, 9, 4]]
GROUPS = [[[10, 2], [11, 12, 2]], [[13, 2], [14, 15, 16, 2]], [[17, 2], [3, 4, 2]]]
REWARDS = torch.tensor([1.0, 0.0, 0.5, 0.9, 0.2, 0.51])


def _completions(groups, version=2):
    return [
        Completion(
            prompt_index=p, token_ids=ids, logprobs=[-1.0] * len(ids), finish_reason="stop", weight_version=version
        )
        for p, group in enumerate(groups)
        for ids in group
    ]


def _row(batch, name, r):
    ids = getattr(batch, f"{name}input_ids")[r]
    return ids[getattr(batch, f"{name}attention_mask")[r].bool()].tolist()


def test_build_batch_labels_every_sample_by_threshold_and_pairs_prompts_with_the_next_groups_completions():
    algo = KTO(KTOConfig(samples_per_prompt=2, threshold=0.5), pad_token_id=PAD)
    batch = algo.build_batch([None] * 3, PROMPTS, _completions(GROUPS), REWARDS)
    assert batch.labels.tolist() == [True, False, False, True, False, True]  # r > 0.5, so 0.5 is undesirable
    flat = [(p, ids) for p, g in enumerate(GROUPS) for ids in g]
    for r, (p, ids) in enumerate(flat):
        assert _row(batch, "", r) == PROMPTS[p] + ids
        mismatched = flat[(r + 2) % 6][1]  # same sample slot of the next prompt's group
        assert _row(batch, "kl_", r) == PROMPTS[p] + mismatched
        assert batch.kl_completion_mask[r].sum().item() == len(mismatched)
    assert batch.rewards.tolist() == pytest.approx(REWARDS.tolist()) and batch.sampler_version == 2


def test_zero_reference_point_builds_no_mismatched_rows():
    algo = KTO(KTOConfig(samples_per_prompt=2, reference_point="zero"), pad_token_id=PAD)
    batch = algo.build_batch([None] * 3, PROMPTS, _completions(GROUPS), REWARDS)
    assert batch.kl_input_ids is None and batch.rows == 6


def _tiny(seed):
    return build_tiny_model(tiny_llama_config(19, hidden_size=32, layers=1, intermediate=64), seed=seed)


def test_reference_point_is_the_clamped_mismatched_kl_estimate():
    model, reference = _tiny(int(torch.randint(100, ()))), _tiny(int(torch.randint(100, 200, ())))
    algo = KTO(KTOConfig(samples_per_prompt=2, beta=0.3), pad_token_id=PAD)
    batch = algo.build_batch([None] * 3, PROMPTS, _completions(GROUPS), REWARDS)
    out = algo.loss(model, batch, reference=reference)
    with torch.no_grad():
        kl_args = (batch.kl_input_ids, batch.kl_attention_mask, batch.kl_completion_mask)
        gap = (sequence_logprobs(model, *kl_args).double() - sequence_logprobs(reference, *kl_args).double()).mean()
        rho = (
            sequence_logprobs(model, batch.input_ids, batch.attention_mask, batch.completion_mask).double()
            - sequence_logprobs(reference, batch.input_ids, batch.attention_mask, batch.completion_mask).double()
        )
    z0 = max(gap.item(), 0.0)
    assert out.metrics["reference_point"].item() == pytest.approx(z0, rel=1e-5, abs=1e-6)
    sign = batch.labels.double() * 2 - 1
    expected = (1 - torch.sigmoid(0.3 * (rho - z0) * sign)).mean().item()
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("reference_point", ["mismatched", "zero"])
def test_loss_gradient_raises_desirable_and_lowers_undesirable_logprobs(reference_point):
    model = _tiny(int(torch.randint(100, ())))
    reference = make_reference(model)
    algo = KTO(KTOConfig(samples_per_prompt=2, beta=0.5, reference_point=reference_point), pad_token_id=PAD)
    batch = algo.build_batch([None] * 3, PROMPTS, _completions(GROUPS), REWARDS)
    args = (batch.input_ids, batch.attention_mask, batch.completion_mask)
    before = sequence_logprobs(model, *args).detach()
    out = algo.loss(model, batch, reference=reference)
    assert out.metrics["kl"].abs().item() < 1e-6
    out.loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    delta = sequence_logprobs(model, *args).detach() - before
    assert delta[batch.labels].mean() > 0 > delta[~batch.labels].mean(), delta


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(beta=0.0), "beta"),
        (dict(reference_point="batch"), "reference_point"),
        (dict(undesirable_weight=-1.0), "undesirable_weight"),
        (dict(threshold=float("nan")), "threshold"),
    ],
)
def test_config_names_the_bad_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        KTOConfig(**kwargs)
