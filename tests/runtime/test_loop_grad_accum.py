"""Gradient accumulation in the online loop: k micro batches of whole units, weighted by their share of
the loss normaliser, give the gradient and the update of one batch; losses that couple the whole
batch are refused when the loop is built."""

import pytest
import torch

from hotloop.algorithms.kto import KTO, KTOConfig
from hotloop.algorithms.preference_data import PairBatch
from hotloop.runtime.loop import OnlineLoop
from hotloop.runtime.micro_batches import SplitRule, split_batch
from tests.helpers import relative_error
from tests.runtime.tiny_loop import PROBLEMS, TOK, make_loop


def one_step(tmp_path, algorithm, k):
    """Run one loop step with ``grad_accum_steps = k``; the trainer's model and the weights it was given."""
    loop = make_loop(
        tmp_path / f"{algorithm}-{k}",
        sync_every=1,
        steps=1,
        algorithm=algorithm,
        grad_accum_steps=k,
        max_grad_norm=None,
        eps=1e-3,
        samples=4,
        max_new_tokens=8,
    )
    given = []
    step = loop.trainer.step
    loop.trainer.step = lambda loss_fn, parts, weights: given.append(weights) or step(loss_fn, parts, weights=weights)
    torch.manual_seed(0)  # random_reward draws from the global RNG
    before = [p.detach().clone() for p in loop.trainer.model.parameters()]
    record = loop.run().records[0]
    assert not record["skipped"]
    return loop.trainer.model, before, given[0], record


@pytest.mark.parametrize("algorithm", ["dpo", "grpo", "grpo-rows"])
@pytest.mark.parametrize("k", [2, 3])
def test_k_micro_batches_give_the_gradient_and_update_of_one_batch(tmp_path, algorithm, k):
    whole, before, whole_weights, whole_record = one_step(tmp_path, algorithm, 1)
    accum, _, weights, record = one_step(tmp_path, algorithm, k)
    assert whole_weights == [1.0] and len(weights) == k and sum(weights) == pytest.approx(1.0)
    if algorithm == "grpo":  # token-mean loss: micro batches with different token counts weigh differently
        assert max(weights) - min(weights) > 0.01, weights
    grads = lambda model: torch.cat([p.grad.flatten() for p in model.parameters()])  # noqa: E731
    assert relative_error(grads(accum), grads(whole)) <= 1e-5
    for p_accum, p_whole, p0 in zip(accum.parameters(), whole.parameters(), before, strict=True):
        assert torch.allclose(p_accum, p_whole, rtol=1e-6, atol=1e-7)
        assert relative_error(p_accum - p0, p_whole - p0) <= 1e-4  # the update itself, not just the weights
    assert record["loss"] == pytest.approx(whole_record["loss"], rel=1e-5, abs=1e-6)  # GRPO on-policy: ~0


def test_split_keeps_pairs_together_and_rebases_their_row_indices():
    ids = torch.arange(10 * 3).view(10, 3)
    mask = torch.ones_like(ids)
    batch = PairBatch(
        input_ids=ids,
        attention_mask=mask,
        completion_mask=mask,
        rewards=torch.arange(10.0),
        sampler_version=7,
        chosen=torch.arange(0, 10, 2),
        rejected=torch.arange(1, 10, 2),
    )
    rule = SplitRule(unit_rows=2, normalizer="rows", row_index_fields=("chosen", "rejected"))
    parts = split_batch(batch, 3, rule)
    assert [p.rows for p, _ in parts] == [4, 4, 2]
    assert [w for _, w in parts] == pytest.approx([0.4, 0.4, 0.2])
    for (part, _), first_row in zip(parts, (0, 4, 8)):
        assert torch.equal(part.input_ids, ids[first_row : first_row + part.rows])
        assert torch.equal(part.chosen, torch.arange(0, part.rows, 2))
        assert torch.equal(part.rejected, torch.arange(1, part.rows, 2))
        assert part.sampler_version == 7
    assert len(split_batch(batch, 8, rule)) == 5  # never more micro batches than pairs
    with pytest.raises(ValueError, match="unit_rows"):
        split_batch(batch, 2, SplitRule(unit_rows=3, normalizer="rows"))


def test_kto_with_a_batch_wide_reference_point_refuses_grad_accumulation(tmp_path):
    loop = make_loop(tmp_path, sync_every=1, steps=1, grad_accum_steps=2)
    kto = KTO(KTOConfig(samples_per_prompt=4, reference_point="mismatched"), pad_token_id=TOK.pad_id)
    with pytest.raises(ValueError, match=r"grad_accum_steps: expected 1, got 2: KTO: reference_point"):
        OnlineLoop(
            loop.config,
            trainer=loop.trainer,
            engine=loop.engine,
            algorithm=kto,
            reward_fn=loop.reward_fn,
            problems=PROBLEMS,
            tokenizer=TOK,
            sampling=loop.sampling,
        )
