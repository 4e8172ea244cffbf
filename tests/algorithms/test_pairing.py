"""Pair construction that does not starve: reuse within a prompt, resampling tied prompts, counted skips; never a
pair across prompts. The end-to-end check samples the arithmetic task from a mostly wrong warm start."""

import random

import pytest
import torch

from hotloop.algorithms.dpo import DPOConfig, OnlineDPO
from hotloop.algorithms.pairing import contrast_pairs, skip_reasons
from hotloop.algorithms.preference_data import best_worst_pairs


def _groups(sizes):
    out, start = [], 0
    for size in sizes:
        out.append(list(range(start, start + size)))
        start += size
    return out


def test_one_right_sample_in_eight_gives_pairs_per_prompt_pairs_not_one():
    rewards = torch.tensor([0, 0, 1, 0, 0, 0, 0, 0], dtype=torch.float32)
    groups = _groups([8])
    assert len(best_worst_pairs(rewards, groups, 4)) == 1
    pairs = contrast_pairs(rewards, groups, 4)
    assert len(pairs) == 4 == len(set(pairs)) and all(c == 2 and rewards[r] == 0 for c, r in pairs)


@pytest.mark.parametrize("trial", range(20))
def test_reuse_pairs_stay_within_a_prompt_and_prefer_the_higher_reward(trial):
    rng = random.Random(trial)
    sizes = [rng.randint(2, 8) for _ in range(rng.randint(1, 5))]
    rewards = torch.tensor([float(rng.random() < 0.3) if trial % 2 else rng.random() for _ in range(sum(sizes))])
    groups = _groups(sizes)
    owner = {i: g for g, members in enumerate(groups) for i in members}
    k = rng.randint(1, 4)
    pairs = contrast_pairs(rewards, groups, k)
    assert all(owner[c] == owner[r] and rewards[c] > rewards[r] for c, r in pairs)
    for g, members in enumerate(groups):
        mine = [p for p in pairs if owner[p[0]] == g]
        contrast = len(set(rewards[members].tolist())) > 1
        assert (len(mine) > 0) == contrast and len(mine) <= k and len(mine) >= min(k, 1) * contrast
        assert len(mine) >= len([p for p in best_worst_pairs(rewards, [members], k)])


def test_skip_reasons_count_every_group_once():
    rewards = torch.tensor([1, 1, 0, 0, 0.5, 0.5, 1, 0], dtype=torch.float32)
    out = skip_reasons(rewards, _groups([2, 2, 2, 2]))
    assert out == {
        "pairs/groups_with_contrast": 1.0,
        "pairs/skipped_all_correct": 1.0,
        "pairs/skipped_all_wrong": 1.0,
        "pairs/skipped_tied": 1.0,
    }


def test_online_dpo_on_a_mostly_wrong_arithmetic_policy_gets_more_pairs_with_the_fallbacks(tmp_path):
    from hotloop.algorithms.rewards.verifiers import ExactMatchReward
    from hotloop.algorithms.tasks.arithmetic import ArithmeticTask
    from hotloop.algorithms.tasks.tokenizer import CharTokenizer
    from hotloop.algorithms.tasks.warm_start import sft_warm_start
    from hotloop.runtime.engine import SamplingParams
    from hotloop.runtime.torch_engine import TorchEngine

    task = ArithmeticTask(2, "+", seed=0)
    tok = CharTokenizer(task.alphabet)
    model = sft_warm_start(task, tok, out_dir=tmp_path / "warm", steps=400, error_rate=0.6, seed=0, progress=False)
    engine = TorchEngine(model, pad_token_id=tok.pad_id, eos_token_id=tok.eos_id, seed=0)
    problems = [p for p in task.problems(400) if task.carries(p) >= 1][:16]
    prompt_ids = [tok.encode(p.prompt) for p in problems]
    sampling = SamplingParams(temperature=1.0, max_new_tokens=4)
    completions = engine.generate(prompt_ids, SamplingParams(temperature=1.0, max_new_tokens=4, n=4, seed=1))
    reward = ExactMatchReward(task)
    rewards = reward([problems[c.prompt_index] for c in completions], [tok.decode(c.token_ids) for c in completions])
    assert rewards.mean() < 0.5  # mostly wrong, as on a real model
    counts = {}
    for name, extra in (
        ("none", {}),
        ("reuse", {"pair_fallback": "reuse"}),
        ("resample", {"pair_fallback": "reuse", "hard_prompt_samples": 8}),
    ):
        algo = OnlineDPO(
            DPOConfig(samples_per_prompt=4, pairs_per_prompt=2, **extra),
            pad_token_id=tok.pad_id,
            engine=engine,
            reward_fn=reward,
            decode=tok.decode,
            sampling=sampling,
        )
        batch = algo.build_batch(problems, prompt_ids, completions, rewards)
        counts[name] = 0 if batch is None else batch.chosen.numel()
        stats = algo.last_batch_metrics
        assert sum(v for k, v in stats.items() if k != "pairs/resampled_prompts") == len(problems)
        if batch is not None:  # every pair is one prompt's two samples
            prompts = batch.input_ids[:, :4]
            assert torch.equal(prompts[batch.chosen], prompts[batch.rejected])
    assert counts["none"] <= counts["reuse"] <= counts["resample"] and counts["resample"] > counts["none"]
