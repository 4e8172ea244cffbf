"""``hotloop compare``: the bandit is Tajwar et al.'s, its metrics are exact, short runs of every loss
learn through the real loop, a replayed online run gives bit-identical parameters, bad arguments
are refused with clear errors, and a (tiny) run of every experiment writes every promised file."""

import json
import math

import pytest
import torch

from hotloop.algorithms.base import pack_rows
from hotloop.algorithms.cli import main
from hotloop.algorithms.experiments import bandit, bandit_loop, compare, replay, tabular
from hotloop.algorithms.experiments.arithmetic import ArithmeticConfig
from hotloop.algorithms.logprobs import sequence_logprobs
from hotloop.runtime.engine import SamplingParams

TINY = bandit_loop.BanditConfig(steps=25, eval_every=5)


def exact_bin_masses() -> torch.Tensor:
    """P(tanh(X) in bin k), X ~ Cauchy(−0.7, 0.4), from the Cauchy CDF at atanh of the bin edges."""
    edges = torch.linspace(-1, 1, tabular.NUM_ACTIONS + 1, dtype=torch.float64)
    u = torch.atanh(edges)  # ±inf at the ends
    cdf = 0.5 + torch.atan((u - tabular.CAUCHY_LOC) / tabular.CAUCHY_SCALE) / math.pi
    return cdf[1:] - cdf[:-1]


def test_reference_is_the_tanh_cauchy_histogram_with_its_interior_mode_near_action_20():
    ref = tabular.reference_probs()
    exact = exact_bin_masses()
    assert ref.shape == (100,) and ref.dtype == torch.float64 and bool((ref > 0).all())
    assert float(ref.sum()) == pytest.approx(1.0, abs=1e-12)
    counts = ref * tabular.REFERENCE_SAMPLES  # a histogram of 10,000 draws
    assert torch.allclose(counts, counts.round(), rtol=0, atol=1e-9)
    sigma = (exact * (1 - exact) / tabular.REFERENCE_SAMPLES).sqrt()
    assert bool(((ref - exact).abs() <= 5 * sigma).all())  # of tanh(Cauchy(−0.7, 0.4))
    interior_mode = 1 + int(ref[1:-1].argmax())
    assert 12 <= interior_mode <= 22 and 15 <= 1 + int(exact[1:-1].argmax()) <= 20


def test_rewards_peak_at_70_and_20_with_width_10_and_r1_sits_where_the_reference_is_unlikely():
    r1, r2 = tabular.reward_table("R1"), tabular.reward_table("R2")
    assert int(r1.argmax()) == 70 and int(r2.argmax()) == 20 and float(r1[70]) == 1.0
    assert float(r1[60]) == pytest.approx(math.exp(-1)) and float(r2[40]) == pytest.approx(math.exp(-4))
    ref = tabular.reference_probs()
    assert tabular.expected_reward(ref, r1) < 0.1 < 0.3 < tabular.expected_reward(ref, r2)
    with pytest.raises(ValueError, match="reward"):
        tabular.reward_table("R3")


def test_expected_reward_and_kl_are_exact_sums():
    logits = torch.randn(100, dtype=torch.float64) * 2
    p, q, r = torch.softmax(logits, 0), tabular.reference_probs(), torch.rand(100, dtype=torch.float64)
    assert tabular.expected_reward(p, r) == pytest.approx(sum(float(p[a] * r[a]) for a in range(100)), rel=1e-13)
    kl = sum(float(p[a] * math.log(float(p[a]) / float(q[a]))) for a in range(100))
    assert tabular.kl_divergence(p, q) == pytest.approx(kl, rel=1e-12) and tabular.kl_divergence(q, q) == 0.0
    one_hot = torch.zeros(100, dtype=torch.float64)
    one_hot[70] = 1.0
    assert tabular.expected_reward(one_hot, tabular.reward_table("R1")) == 1.0
    assert tabular.kl_divergence(one_hot, q) == pytest.approx(-math.log(float(q[70])), rel=1e-12)


def test_tabular_policy_logprobs_and_gradients_through_the_fused_kernel_match_log_softmax():
    logits = torch.randn(100) * 3
    policy = tabular.TabularPolicy(logits)
    actions = torch.randint(0, 100, (7,))
    ids, mask, comp = pack_rows([[tabular.PROMPT_TOKEN]] * 7, [[int(a)] for a in actions], tabular.PROMPT_TOKEN)
    upstream = torch.randn(7)
    (sequence_logprobs(policy, ids, mask, comp) * upstream).sum().backward()
    weight = logits.double().requires_grad_()
    expected = torch.log_softmax(weight, 0)[actions]
    (expected * upstream.double()).sum().backward()
    assert torch.allclose(sequence_logprobs(policy, ids, mask, comp).double(), expected.detach(), rtol=1e-5, atol=1e-5)
    assert torch.allclose(policy.lm_head.weight.grad[:, 0].double(), weight.grad, rtol=1e-5, atol=1e-5)


def test_bandit_engine_samples_the_exact_softmax_and_repeats_with_the_step_seed():
    policy = tabular.TabularPolicy(torch.randn(100))
    engine = tabular.BanditEngine(policy)
    sampling = SamplingParams(max_new_tokens=1, n=20_000, seed=11)
    completions = engine.generate([[tabular.PROMPT_TOKEN]], sampling)
    actions = torch.tensor([c.token_ids[0] for c in completions])
    p = policy.probs()
    freq = torch.bincount(actions, minlength=100).double() / actions.numel()
    assert bool(((freq - p).abs() <= 5 * (p * (1 - p) / actions.numel()).sqrt() + 1e-4).all())
    again = engine.generate([[tabular.PROMPT_TOKEN]], sampling)
    assert [c.token_ids for c in again] == [c.token_ids for c in completions]
    assert all(c.logprobs[0] == pytest.approx(float(p[c.token_ids[0]].log())) for c in completions[:50])
    with pytest.raises(ValueError, match="top_p"):
        engine.generate([[0]], SamplingParams(top_p=0.5))


@pytest.mark.parametrize("algorithm", bandit_loop.available_algorithms())
def test_a_short_bandit_run_of_every_loss_raises_the_expected_reward(algorithm):
    result = bandit_loop.run_bandit(algorithm, reward="R2", sync_every=1, seed=3, config=TINY)
    start = tabular.expected_reward(tabular.reference_probs(), tabular.reward_table("R2"))
    assert result.curve[0][1] == pytest.approx(start, abs=1e-6)
    assert result.reward > start + 0.1 and result.kl > 0
    assert [c[0] for c in result.curve] == [0, 5, 10, 15, 20, 25]


@pytest.mark.parametrize("sync_every", [1, 3])
@pytest.mark.parametrize("algorithm", bandit_loop.available_algorithms())
def test_replaying_a_recorded_run_offline_gives_bit_identical_parameters(algorithm, sync_every):
    result = replay.run_replay(algorithm, sync_every=sync_every, seed=5, config=TINY)
    assert result.max_abs_diff == 0.0 and torch.equal(result.online.weights, result.replay.weights)
    assert result.losses_equal and result.staleness_equal and result.calls == TINY.steps
    assert float((result.online.weights - result.control.weights).abs().max()) > 1e-3  # the check can fail


def test_replay_engine_refuses_a_request_that_was_not_recorded():
    engine = replay.RecordingEngine(tabular.BanditEngine(tabular.TabularPolicy(torch.zeros(100))))
    engine.generate([[0], [0]], SamplingParams(max_new_tokens=1, n=2, seed=1))
    replayer = replay.ReplayEngine(engine.local_model, engine.calls)
    with pytest.raises(ValueError, match="generate"):
        replayer.generate([[0], [0]], SamplingParams(max_new_tokens=1, n=2, seed=2))
    assert len(replayer.generate([[0], [0]], SamplingParams(max_new_tokens=1, n=2, seed=1))) == 4
    with pytest.raises(ValueError, match="recorded stream"):
        replayer.generate([[0], [0]], SamplingParams(max_new_tokens=1, n=2, seed=1))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["compare", "bandits"], "EXPERIMENT"),
        (["compare", "bandit", "--seeds", "0,x"], "--seeds"),
        (["compare", "bandit", "--seeds", "-1"], "--seeds"),
        (["compare", "bandit", "--seeds", "1,1"], "distinct"),
    ],
)
def test_compare_refuses_bad_experiment_names_and_seeds(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_run_compare_refuses_unknown_experiments_and_empty_seeds(tmp_path):
    with pytest.raises(ValueError, match="EXPERIMENT.*'bandit'"):
        compare.run_compare("nope", [0], tmp_path)
    with pytest.raises(ValueError, match="seeds"):
        compare.run_compare("bandit", [], tmp_path)
    assert compare.parse_seeds(" 0, 2,1") == [0, 2, 1]


def test_compare_all_writes_summary_tables_and_plots(tmp_path):
    tiny_bandit = bandit_loop.BanditConfig(steps=4, eval_every=2)
    arithmetic = ArithmeticConfig(
        steps=2,
        eval_every=1,
        eval_problems=8,
        semi_online_syncs=(2,),
        overrides=(
            "model.warm_start_steps=20",
            f"model.cache_dir={tmp_path / 'cache'}",
            "loop.prompts_per_step=4",
            "dpo.samples_per_prompt=4",
            "dpo.pairs_per_prompt=1",
            "grpo.samples_per_prompt=4",
        ),
    )
    configs = {"bandit": tiny_bandit, "kl-budget": tiny_bandit, "replay": tiny_bandit, "arithmetic": arithmetic}
    summary, _ = compare.run_compare("all", [4], tmp_path / "out", progress=False, configs=configs)
    out = tmp_path / "out"
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["experiments"] == list(compare.IN_ALL) and summary["seeds"] == [4]
    algorithms = bandit_loop.available_algorithms()
    counts = {name: sum(e["experiment"] == name for e in summary["entries"]) for name in compare.IN_ALL}
    assert counts["bandit"] == 2 * len(algorithms) * len(bandit.SYNC_PERIODS)
    assert counts["replay"] == len(algorithms) * len(replay.RECORDED_PERIODS) and counts["arithmetic"] >= 4
    assert all({"algorithm", "setting", "seed", "metric", "value", "kl"} <= e.keys() for e in summary["entries"])
    assert all(e["seed"] == 4 and math.isfinite(e["value"]) for e in summary["entries"])
    text = (out / "table.md").read_text()
    assert all(f"## {name}" in text for name in compare.IN_ALL) and "| dpo | 1 |" in text
    for png in ("bandit-curves", "bandit-policies", "kl-budget-frontier", "arithmetic-curves", "overview"):
        assert (out / f"{png}.png").stat().st_size > 1000
