"""NaN injected into rewards, the loss and the gradients of a real online loop: the step is skipped
(weights, optimizer and version untouched, gradients dropped), counted as ``skipped/nonfinite``, the
following steps train normally, no checkpoint holds a non-finite weight, and past
``trainer.max_skipped_steps`` the run stops with an error naming the step and the quantity."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from hotloop.runtime.checkpoint import latest_checkpoint
from hotloop.runtime.guards import NonFiniteError, RewardRangeWarning
from tests.faults.tally import fault
from tests.runtime.tiny_loop import make_loop, random_reward

STEPS, BAD_STEP = 4, 2


def at_step(loop, at):
    """A predicate that is true while ``loop`` runs loop step ``at``."""
    now = {"step": -1}
    step = loop.step

    def tracked(t):
        now["step"] = t
        return step(t)

    loop.step = tracked
    return lambda: now["step"] == at


def poison_rewards(loop, at):
    due = at_step(loop, at)

    def reward(problems, texts):
        r = random_reward(problems, texts)
        if due():
            r[1] = float("nan")
        return r

    loop.reward_fn = reward


def poison_loss(loop, at):
    due, loss = at_step(loop, at), loop.algorithm.loss

    def poisoned(model, batch, **kwargs):
        out = loss(model, batch, **kwargs)
        return dataclasses.replace(out, loss=out.loss * float("inf")) if due() else out

    loop.algorithm.loss = poisoned


def poison_gradients(loop, at):
    due = at_step(loop, at)
    loop.trainer.params[0].register_hook(lambda g: g * float("nan") if due() else g)


INJECT = {"reward": poison_rewards, "loss": poison_loss, "grad_norm": poison_gradients}


def checkpoints_are_finite(out_dir):
    for path in out_dir.glob("step-*"):
        for file in path.glob("*.safetensors"):
            assert all(torch.isfinite(t).all() for t in load_file(str(file)).values()), file


@pytest.mark.parametrize("quantity", INJECT)
def test_a_nonfinite_step_is_skipped_counted_and_the_run_goes_on(quantity, tmp_path):
    with fault(f"NaN in {quantity}"):
        torch.manual_seed(0)
        loop = make_loop(tmp_path, sync_every=2, steps=STEPS, checkpoint_every=1, lr=1e-2)
        INJECT[quantity](loop, BAD_STEP)
        with pytest.warns(UserWarning, match=f"loop step {BAD_STEP}: {quantity} is non-finite"):
            loop.run()
        records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
        assert [r.get("nonfinite") for r in records] == [None, None, quantity, None]
        assert [r["skipped/nonfinite"] for r in records] == [0, 0, 1, 1]
        assert [r["version"] for r in records] == [0, 1, 2, 2]  # the skipped step did not advance the policy
        assert loop.trainer.version == STEPS - 1
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in loop.trainer.params)
        assert all(torch.isfinite(p).all() for p in loop.trainer.params)
        checkpoints_are_finite(tmp_path)
        assert "loss" in records[3] and "loss" not in records[2]


def test_nonfinite_rewards_are_reported_with_the_completion(tmp_path):
    with fault("NaN in reward (report)"):
        torch.manual_seed(0)
        loop = make_loop(tmp_path, sync_every=2, steps=3)
        poison_rewards(loop, 1)
        with pytest.warns(
            RewardRangeWarning,
            match=r"step 1: 1 of 16 rewards .* non-finite: \[1\] reward nan "
            r"for completion '",
        ):
            loop.run()


def test_past_the_limit_the_run_stops_naming_the_step_and_quantity_and_the_last_checkpoint_is_good(tmp_path):
    with fault("NaN in every reward"):
        torch.manual_seed(0)
        loop = make_loop(tmp_path, sync_every=2, steps=6, checkpoint_every=1)
        loop.trainer.config = dataclasses.replace(loop.trainer.config, max_skipped_steps=1)
        reward = random_reward
        due = at_step(loop, 2)
        loop.reward_fn = lambda p, t: reward(p, t) * (float("nan") if due() or loop.trainer.version >= 2 else 1.0)
        with (
            pytest.warns(UserWarning),
            pytest.raises(
                NonFiniteError,
                match=r"loop step 3: reward is non-finite "
                r"\(16 of 16 .*more than trainer",
            ),
        ):
            loop.run()
        assert json.loads((latest_checkpoint(tmp_path) / "loop_state.json").read_text())["next_step"] == 3
        checkpoints_are_finite(tmp_path)


def test_trainer_refuses_to_checkpoint_a_poisoned_model(tmp_path):
    with fault("NaN weight at save"):
        loop = make_loop(tmp_path, sync_every=2, steps=1)
        good = loop.checkpoint(0)
        with torch.no_grad():
            loop.trainer.params[0][0, 0] = float("nan")
        with pytest.raises(NonFiniteError, match=r"model: parameter .* is non-finite"):
            loop.checkpoint(1)
        assert latest_checkpoint(tmp_path) == good


def test_rewards_outside_the_declared_range_are_reported_with_the_completion():
    from hotloop.algorithms.rewards.mixture import WeightedMixture
    from hotloop.algorithms.rewards.verifiers import ExactMatchReward
    from hotloop.runtime.guards import check_rewards

    class Task:
        def score(self, problem, completion):
            return 1.0

    mixture = WeightedMixture([(ExactMatchReward(Task()), 2.0), (ExactMatchReward(Task()), 0.5)])
    assert mixture.reward_range == (0.0, 2.5)
    with fault("reward out of range"):
        with pytest.warns(
            RewardRangeWarning,
            match=r"step 7: 2 of 3 rewards .* outside the declared range "
            r"\[0.0, 2.5\].*\[0\] reward 3.0 for completion '12'.*"
            r"\[2\] reward -0.5 for completion 'x'",
        ):
            assert check_rewards(torch.tensor([3.0, 1.0, -0.5]), ["12", "7", "x"], mixture, step=7) == 2
