"""DPO family: pair construction (online best-vs-worst, offline replay) and the loss's wiring."""

import random

import pytest
import torch

from hotloop.algorithms.base import pack_rows
from hotloop.algorithms.dpo import DPOConfig, OfflineDPO, OnlineDPO, PreferencePair, best_worst_pairs
from hotloop.runtime.engine import Completion

PAD = 0


def _completions(groups: list[list[list[int]]], version: int = 3) -> list[Completion]:
    return [Completion(prompt_index=p, token_ids=ids, logprobs=[-1.0] * len(ids), finish_reason="stop",
                       weight_version=version) for p, group in enumerate(groups) for ids in group]


def test_online_dpo_pairs_best_with_worst_and_skips_groups_without_contrast():
    prompts = [[1, 5, 6], [1, 7], [1, 8, 9, 4]]
    groups = [[[10, 2], [11, 12, 2], [13, 2], [14, 2]],   # rewards 0.2, 0.9, 0.5, 0.1 -> (11,12) vs (14)
              [[15, 2], [16, 2], [17, 2], [18, 2]],      # all equal -> skipped
              [[19, 2], [20, 2], [21, 2], [22, 2]]]      # 1, 0, 1, 0 -> first correct vs last incorrect
    rewards = torch.tensor([0.2, 0.9, 0.5, 0.1, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    algo = OnlineDPO(DPOConfig(samples_per_prompt=4), pad_token_id=PAD)
    batch = algo.build_batch([None] * 3, prompts, _completions(groups), rewards)
    assert batch.chosen.tolist() == [0, 2] and batch.rejected.tolist() == [1, 3]
    expected = [prompts[0] + [11, 12, 2], prompts[0] + [14, 2], prompts[2] + [19, 2], prompts[2] + [22, 2]]
    for row, ids in enumerate(expected):
        assert batch.input_ids[row, : len(ids)].tolist() == ids
        assert batch.attention_mask[row].sum().item() == len(ids)
    assert batch.completion_mask[0].tolist()[:6] == [0, 0, 0, 1, 1, 1]
    assert batch.rewards.tolist() == pytest.approx([0.9, 0.1, 1.0, 0.0])
    assert batch.sampler_version == 3


def test_online_dpo_returns_none_when_no_group_has_contrast():
    algo = OnlineDPO(DPOConfig(samples_per_prompt=2), pad_token_id=PAD)
    completions = _completions([[[3, 2], [4, 2]], [[5, 2], [6, 2]]])
    assert algo.build_batch([None] * 2, [[1, 3], [1, 4]], completions, torch.tensor([1.0, 1.0, 0.0, 0.0])) is None


def test_best_worst_pairs_takes_ith_best_with_ith_worst_while_rewards_differ():
    rewards = torch.tensor([0.0, 3.0, 1.0, 2.0, 2.0, 2.0])
    assert best_worst_pairs(rewards, [[0, 1, 2, 3], [4, 5]], pairs_per_group=2) == [(1, 0), (3, 2)]


def test_offline_dpo_replays_stored_pairs_of_the_drawn_prompts_only():
    pairs = [PreferencePair((1, 5), (7, 2), (8, 2)), PreferencePair((1, 6), (9, 9, 2), (3, 2), 0.7, 0.2)]
    algo = OfflineDPO(DPOConfig(samples_per_prompt=2), pad_token_id=PAD, pairs=pairs, version=0)
    assert algo.samples_per_prompt == 0
    batch = algo.build_batch([None] * 2, [[1, 6], [1, 4]], [], torch.zeros(0))
    assert batch.input_ids.tolist() == [[1, 6, 9, 9, 2], [1, 6, 3, 2, PAD]]
    assert batch.rewards.tolist() == pytest.approx([0.7, 0.2]) and batch.sampler_version == 0
    assert algo.build_batch([None], [[1, 4]], [], torch.zeros(0)) is None


def test_offline_dpo_from_policy_builds_its_set_once_from_the_engines_samples():
    class Engine:
        weight_version, calls = 0, 0

        def generate(self, prompt_ids, sampling):
            Engine.calls += 1
            return _completions([[[3 + i, 2] for i in range(sampling.n)] for _ in prompt_ids], version=0)

    from hotloop.runtime.engine import SamplingParams
    problems = [object(), object()]
    reward = lambda probs, texts: torch.tensor([float(t == "x") for t in texts])  # noqa: E731
    decode = lambda ids: "x" if ids[0] == 4 else "y"  # noqa: E731
    algo = OfflineDPO.from_policy(DPOConfig(samples_per_prompt=4), pad_token_id=PAD, engine=Engine(),
                                  problems=problems, prompt_ids=[[1, 5], [1, 6]], reward_fn=reward, decode=decode,
                                  sampling=SamplingParams())
    assert Engine.calls == 1 and sorted(algo.prompts()) == [(1, 5), (1, 6)]
    assert all(p.chosen_ids == (4, 2) and p.rejected_ids == (6, 2) for ps in algo.pairs.values() for p in ps)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_loss_gradient_raises_chosen_over_rejected_logprob(loss_type):
    from hotloop.algorithms.logprobs import sequence_logprobs
    from hotloop.algorithms.tasks.tiny_model import build_tiny_model, tiny_llama_config
    from hotloop.runtime.trainer import make_reference

    model = build_tiny_model(tiny_llama_config(17, hidden_size=32, layers=1), seed=random.randrange(100))
    reference = make_reference(model)
    pairs = [PreferencePair((1, 5, 6), (7, 8, 2), (9, 2)), PreferencePair((1, 4), (10, 2), (11, 12, 13, 2))]
    from hotloop.algorithms.dpo import pair_batch
    batch = pair_batch(pairs, PAD, version=0)
    algo = OnlineDPO(DPOConfig(beta=0.5, loss_type=loss_type, samples_per_prompt=2), pad_token_id=PAD)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    margin = lambda: (lambda s: (s[batch.chosen] - s[batch.rejected]).sum().item())(  # noqa: E731
        sequence_logprobs(model, batch.input_ids, batch.attention_mask, batch.completion_mask))
    start = margin()
    out = algo.loss(model, batch, reference=reference)
    assert out.metrics["kl"].abs().item() < 1e-6   # policy == reference before the step
    out.loss.backward()
    optimizer.step()
    assert margin() > start


def test_pack_rows_right_pads_and_marks_completions():
    ids, mask, comp = pack_rows([[1, 5], [1, 6, 7]], [[8, 2], [2]], PAD)
    assert ids.tolist() == [[1, 5, 8, 2], [1, 6, 7, 2]]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]] and comp.tolist() == [[0, 0, 1, 1], [0, 0, 0, 1]]


def test_dpo_config_names_the_bad_field():
    with pytest.raises(ValueError, match="loss_type"):
        DPOConfig(loss_type="kto")
    with pytest.raises(ValueError, match="pairs_per_prompt"):
        DPOConfig(samples_per_prompt=4, pairs_per_prompt=3)
