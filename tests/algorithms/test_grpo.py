"""GRPO family: group advantages and kept rows, sampler log-probs as π_old, gradient direction, a short loop."""

import dataclasses
import statistics

import pytest
import torch

from hotloop.algorithms.grpo import GRPO, GRPOConfig
from hotloop.algorithms.logprobs import token_logprobs
from hotloop.algorithms.tasks.arithmetic import Problem
from hotloop.algorithms.tasks.tiny_model import build_tiny_model, tiny_llama_config
from hotloop.algorithms.tasks.tokenizer import CharTokenizer
from hotloop.runtime.engine import Completion, SamplingParams
from hotloop.runtime.engine_factory import make_engine
from hotloop.runtime.loop import OnlineLoop
from hotloop.runtime.loop_config import LoopConfig
from hotloop.runtime.trainer import Trainer, TrainerConfig, make_reference

PAD = 0
TOK = CharTokenizer("0123456789+=")


def _completions(groups, version=5):
    """Completions of hand-made token ids; log-prob of token j of a completion = −(j + 1) − id / 100."""
    return [
        Completion(
            prompt_index=p,
            token_ids=ids,
            logprobs=[-(j + 1) - t / 100 for j, t in enumerate(ids)],
            finish_reason="stop",
            weight_version=version,
        )
        for p, group in enumerate(groups)
        for ids in group
    ]


PROMPTS = [[1, 5, 6], [1, 7], [1, 8, 9, 4]]
GROUPS = [
    [[10, 2], [11, 12, 2], [13, 2]],  # rewards 0.0, 1.0, 0.5
    [[14, 2], [15, 2], [16, 2]],  # all 1.0: no contrast
    [[17, 18, 19, 2], [3, 2], [4, 2]],
]  # rewards 0.2, 0.2, 0.8
REWARDS = torch.tensor([0.0, 1.0, 0.5, 1.0, 1.0, 1.0, 0.2, 0.2, 0.8])


def _expected(kind):
    out = []
    for g in (REWARDS[0:3].tolist(), REWARDS[6:9].tolist()):
        mean = statistics.fmean(g)
        if kind == "group_std":
            out += [(r - mean) / (statistics.stdev(g) + 1e-6) for r in g]
        elif kind == "group_mean":
            out += [r - mean for r in g]
        else:
            out += [r - (sum(g) - r) / (len(g) - 1) for r in g]
    return out


@pytest.mark.parametrize("kind", ["group_std", "group_mean", "rloo"])
def test_build_batch_keeps_groups_with_contrast_and_their_group_relative_advantages(kind):
    algo = GRPO(GRPOConfig(samples_per_prompt=3, advantage=kind), pad_token_id=PAD)
    batch = algo.build_batch([None] * 3, PROMPTS, _completions(GROUPS), REWARDS)
    kept = [0, 1, 2, 6, 7, 8]
    assert batch.advantages.tolist() == pytest.approx(_expected(kind), rel=1e-6, abs=1e-6)
    assert batch.rewards.tolist() == pytest.approx([REWARDS[i].item() for i in kept])
    flat = [(p, ids) for p, g in enumerate(GROUPS) for ids in g]
    for row, i in enumerate(kept):
        p, ids = flat[i]
        assert batch.input_ids[row, : len(PROMPTS[p]) + len(ids)].tolist() == PROMPTS[p] + ids
        assert batch.completion_mask[row].sum().item() == len(ids)
    assert batch.sampler_version == 5


def test_sampler_logprobs_sit_in_the_column_that_predicts_each_completion_token():
    algo = GRPO(GRPOConfig(samples_per_prompt=3), pad_token_id=PAD)
    batch = algo.build_batch([None] * 3, PROMPTS, _completions(GROUPS), REWARDS)
    # row 1 = prompt [1, 5, 6] + completion [11, 12, 2]: column t predicts input_ids[t + 1]
    assert batch.old_logp[1].tolist() == pytest.approx([0.0, 0.0, -1.11, -2.12, -3.02, 0.0, 0.0])
    # row 3 = prompt [1, 8, 9, 4] + [17, 18, 19, 2] (the widest row)
    assert batch.old_logp[3].tolist() == pytest.approx([0.0, 0.0, 0.0, -1.17, -2.18, -3.19, -4.02])


def test_uniform_groups_are_kept_with_zero_advantage_when_not_dropped_and_all_uniform_gives_none():
    keep_all = GRPO(GRPOConfig(samples_per_prompt=3, drop_uniform_groups=False), pad_token_id=PAD)
    batch = keep_all.build_batch([None] * 3, PROMPTS, _completions(GROUPS), REWARDS)
    assert batch.rows == 9 and batch.advantages[3:6].tolist() == [0.0, 0.0, 0.0]
    uniform = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.3, 0.3, 0.3])
    for algo in (keep_all, GRPO(GRPOConfig(samples_per_prompt=3), pad_token_id=PAD)):
        assert algo.build_batch([None] * 3, PROMPTS, _completions(GROUPS), uniform) is None


def test_build_batch_refuses_completions_that_are_not_prompt_major_groups():
    algo = GRPO(GRPOConfig(samples_per_prompt=3), pad_token_id=PAD)
    swapped = _completions(GROUPS)
    swapped[2], swapped[3] = swapped[3], swapped[2]
    with pytest.raises(ValueError, match="completions"):
        algo.build_batch([None] * 3, PROMPTS, swapped, REWARDS)
    with pytest.raises(ValueError, match="rewards"):
        algo.build_batch([None] * 3, PROMPTS, _completions(GROUPS), REWARDS[:-1])


def _tiny(seed):
    return build_tiny_model(tiny_llama_config(23, hidden_size=32, layers=1, intermediate=64), seed=seed)


def _on_policy_batch(model, algo, rewards):
    """A batch whose sampler log-probs are ``model``'s own (as with sync_every = 1)."""
    groups = [[[10, 11, 2], [12, 2]], [[13, 14, 15, 2], [16, 2]]]
    completions = _completions(groups)
    batch = algo.build_batch([None] * 2, [[1, 5, 6], [1, 7]], completions, rewards)
    with torch.no_grad():
        own = token_logprobs(model, batch.input_ids, batch.attention_mask, temperature=algo.temperature)
    return batch, own * batch.completion_mask[:, 1:]


def _sequence_logps(model, batch, temperature):
    logp = token_logprobs(model, batch.input_ids, batch.attention_mask, temperature=temperature)
    return (logp * batch.completion_mask[:, 1:]).sum(-1)


@pytest.mark.parametrize(
    "options",
    [
        dict(loss_type="grpo"),
        dict(loss_type="dapo", beta=0.05),
        dict(loss_type="dr_grpo", advantage="group_mean"),
        dict(loss_type="cispo"),
        dict(loss_type="grpo", importance_sampling_level="sequence"),
        dict(loss_type="bnpo", advantage="rloo"),
    ],
)
def test_loss_gradient_raises_positive_advantage_rows_and_lowers_negative_ones(options):
    model = _tiny(int(torch.randint(100, ())))
    reference = make_reference(model)
    algo = GRPO(GRPOConfig(samples_per_prompt=2, **options), pad_token_id=PAD, temperature=0.8, max_completion_length=4)
    batch, own = _on_policy_batch(model, algo, torch.tensor([1.0, 0.0, 0.0, 1.0]))
    batch = dataclasses.replace(batch, old_logp=own)
    before = _sequence_logps(model, batch, 0.8).detach()
    out = algo.loss(model, batch, reference=reference)
    assert out.metrics["ratio"].item() == pytest.approx(1.0, abs=1e-5)
    out.loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    delta = _sequence_logps(model, batch, 0.8).detach() - before
    assert (delta * batch.advantages).gt(0).all(), (delta, batch.advantages)


def test_clip_on_the_stale_sampler_ratio_stops_the_gradient_of_rows_outside_the_range():
    model = _tiny(int(torch.randint(100, ())))
    algo = GRPO(GRPOConfig(samples_per_prompt=2, loss_type="grpo"), pad_token_id=PAD)
    batch, own = _on_policy_batch(model, algo, torch.tensor([1.0, 0.0, 0.0, 1.0]))

    def grad_norm(old):
        model.zero_grad()
        algo.loss(model, dataclasses.replace(batch, old_logp=old), reference=None).loss.backward()
        return sum(p.grad.norm() ** 2 for p in model.parameters() if p.grad is not None).item()

    # a sampler far behind: ratio e (> 1 + ε) on A > 0 rows and e⁻¹ (< 1 − ε) on A < 0 rows → all clipped
    stale = own - batch.advantages.sign()[:, None] * batch.completion_mask[:, 1:]
    assert grad_norm(own) > 0 and grad_norm(stale) == 0.0


def test_kl_penalty_needs_a_reference_and_reports_kl():
    model = _tiny(1)
    algo = GRPO(GRPOConfig(samples_per_prompt=2, beta=0.1), pad_token_id=PAD)
    assert algo.needs_reference and not GRPO(GRPOConfig(), pad_token_id=PAD).needs_reference
    batch, _ = _on_policy_batch(model, algo, torch.tensor([1.0, 0.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="reference"):
        algo.loss(model, batch, reference=None)
    assert algo.loss(model, batch, reference=make_reference(model)).metrics["kl"].abs().item() < 1e-6


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(loss_type="ppo"), "loss_type"),
        (dict(advantage="std"), "advantage"),
        (dict(samples_per_prompt=1), "samples_per_prompt"),
        (dict(loss_type="cispo", importance_sampling_level="sequence"), "importance_sampling_level"),
        (dict(beta=-0.1), "beta"),
        (dict(kl_estimator="k4"), "kl_estimator"),
    ],
)
def test_config_names_the_bad_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        GRPOConfig(**kwargs)


def sevens(problems, texts):
    """Reward: fraction of '7' characters in the completion (a rule a tiny model learns quickly)."""
    return torch.tensor([t.count("7") / max(1, len(t)) for t in texts], dtype=torch.float32)


@pytest.mark.parametrize("sync_every", [1, 3])
def test_short_grpo_loop_raises_reward(tmp_path, sync_every):
    problems = [Problem(prompt=f"{a}+{b}=", answer=str(a + b)) for a in range(7) for b in range(5)]
    model = build_tiny_model(tiny_llama_config(TOK.vocab_size, hidden_size=32, layers=1, intermediate=64), seed=3)
    trainer = Trainer(model, TrainerConfig(lr=1e-2), reference=make_reference(model))
    engine = make_engine(model, pad_token_id=TOK.pad_id, eos_token_id=TOK.eos_id, seed=0)
    config = LoopConfig(steps=24, sync_every=sync_every, prompts_per_step=4, eval_every=0, out_dir=str(tmp_path))
    algo = GRPO(GRPOConfig(samples_per_prompt=6), pad_token_id=TOK.pad_id, max_completion_length=4)
    loop = OnlineLoop(
        config,
        trainer=trainer,
        engine=engine,
        algorithm=algo,
        reward_fn=sevens,
        problems=problems,
        tokenizer=TOK,
        sampling=SamplingParams(max_new_tokens=4),
        progress=False,
    )
    records = loop.run().records
    first = sum(r["reward"] for r in records[:4]) / 4
    last = sum(r["reward"] for r in records[-4:]) / 4
    assert last > first + 0.2, (first, last)
    assert all(r["staleness"] == r["step"] % sync_every for r in records)
