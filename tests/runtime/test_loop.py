"""OnlineLoop bookkeeping on a tiny model: sync schedule and staleness, sampler log-probs vs a fresh
forward, learning signal, exact resume after an interruption, a failed save, and with an engine
that holds no in-process weights."""

import dataclasses
import json
import math
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from hotloop.algorithms.base import pack_rows
from hotloop.algorithms.logprobs import token_logprobs
from hotloop.algorithms.tasks.tiny_model import build_tiny_model, tiny_llama_config
from hotloop.runtime import checkpoint
from hotloop.runtime.checkpoint import latest_checkpoint
from hotloop.runtime.engine import SamplingParams
from hotloop.runtime.loop import OnlineLoop
from hotloop.runtime.loop_config import LoopConfig
from hotloop.runtime.torch_engine import TorchEngine
from tests.helpers import assert_close
from tests.runtime.tiny_loop import PROBLEMS, TOK, make_loop, random_reward, sevens


@pytest.mark.parametrize(
    "sync_every, expected",
    [
        (1, [0, 0, 0, 0, 0, 0, 0]),
        (3, [0, 1, 2, 0, 1, 2, 0]),
        (math.inf, [0, 1, 2, 3, 4, 5, 6]),
        (None, [0, 1, 2, 3, 4, 5, 6]),
    ],
)
def test_sync_happens_every_s_steps_and_staleness_is_step_mod_s(tmp_path, sync_every, expected):
    loop = make_loop(tmp_path, sync_every=sync_every, steps=7)
    initial = {k: v.clone() for k, v in loop.engine.model.state_dict().items()}
    synced_at = []
    original = loop.engine.sync_weights
    loop.engine.sync_weights = lambda version, state=None: (synced_at.append(version), original(version, state))
    result = loop.run()
    assert [r["staleness"] for r in result.records] == expected
    period = LoopConfig(sync_every=sync_every).sync_period
    assert synced_at == ([t for t in range(7) if t % period == 0] if period else [])
    assert loop.zero_copy == (sync_every == 1)
    if period is None:  # offline: the sampler's weights never change
        assert all(torch.equal(v, initial[k]) for k, v in loop.engine.model.state_dict().items())
    assert result.phase_seconds["sync"] >= 0 and all("time/sampling" in r for r in result.records)


def test_an_engine_on_the_trainers_module_gets_a_stale_copy_bound_to_the_sync_buckets_when_s_is_not_one(tmp_path):
    loop = make_loop(tmp_path, sync_every=2, steps=1)
    copy_, trainer_model = loop.engine.model, loop.trainer.model
    assert copy_ is not trainer_model and not loop.zero_copy
    storages = {b.untyped_storage().data_ptr() for b in loop.sync.buffers}
    assert all(p.untyped_storage().data_ptr() in storages for p in copy_.parameters())
    assert_same_weights(copy_, trainer_model)


def test_an_engine_on_the_trainers_module_that_cannot_take_a_copy_is_refused_when_s_is_not_one(tmp_path):
    loop = make_loop(tmp_path, sync_every=1, steps=1)

    class Bare:  # the engine protocol without adopt_model
        def __init__(self, engine):
            self.shares_weights_with, self.local_model = engine.shares_weights_with, engine.local_model

    with pytest.raises(ValueError, match="engine"):
        OnlineLoop(
            LoopConfig(steps=1, sync_every=2, out_dir=str(tmp_path)),
            trainer=loop.trainer,
            engine=Bare(loop.engine),
            algorithm=loop.algorithm,
            reward_fn=random_reward,
            problems=PROBLEMS,
            tokenizer=TOK,
            sampling=SamplingParams(),
        )


def test_sampler_logprobs_equal_token_logprobs_of_a_fresh_forward():
    model = build_tiny_model(tiny_llama_config(TOK.vocab_size, hidden_size=48, layers=2), seed=1)
    engine = TorchEngine(model, pad_token_id=TOK.pad_id, eos_token_id=TOK.eos_id, seed=5)
    prompts = [TOK.encode(p) for p in ("1+2=", "31+4=", "5=", "12+34=")]
    completions = engine.generate(prompts, SamplingParams(temperature=0.7, max_new_tokens=7, n=3))
    ids, mask, comp = pack_rows(
        [prompts[c.prompt_index] for c in completions], [c.token_ids for c in completions], TOK.pad_id
    )
    with torch.no_grad():
        fresh = token_logprobs(model, ids, mask, temperature=0.7)
    picked = fresh[comp[:, 1:].bool()]
    sampler = torch.tensor([lp for c in completions for lp in c.logprobs], dtype=torch.float64)
    assert_close(picked, sampler, torch.float32, "sampler vs fresh forward")


def test_short_online_loop_raises_reward(tmp_path):
    loop = make_loop(tmp_path, sync_every=1, steps=24, reward=sevens, lr=1e-2, samples=6)
    records = loop.run().records
    first = sum(r["reward"] for r in records[:4]) / 4
    last = sum(r["reward"] for r in records[-4:]) / 4
    assert last > first + 0.2, (first, last)


def sigterm_while_scoring(step, reward=sevens):
    """``reward`` that sends this process SIGTERM while scoring loop step ``step`` (counted from its first call)."""
    calls = []

    def reward_fn(problems, texts):
        calls.append(1)
        if len(calls) == step + 1:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-step; the loop finishes it, checkpoints, stops
        return reward(problems, texts)

    return reward_fn


def assert_same_weights(a, b):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


def test_interrupted_then_resumed_run_matches_an_uninterrupted_one_bit_for_bit(tmp_path):
    steps, stop_at = 7, 4
    straight = make_loop(tmp_path / "a", sync_every=3, steps=steps, reward=sevens, lr=1e-2)
    straight.run()
    first = make_loop(tmp_path / "b", sync_every=3, steps=steps, reward=sigterm_while_scoring(stop_at), lr=1e-2)
    result = first.run()
    assert result.interrupted and result.next_step == stop_at + 1
    resumed = make_loop(tmp_path / "b", sync_every=3, steps=steps, reward=sevens, lr=1e-2)
    assert resumed.run(resume=True).next_step == steps
    assert_same_weights(straight.trainer.model, resumed.trainer.model)
    assert_same_weights(straight.engine.model, resumed.engine.model)
    records_a, records_b = (metrics_without_timings(tmp_path / run) for run in ("a", "b"))
    assert len(records_a) == steps and records_a == records_b


def metrics_without_timings(run_dir):
    """The records of ``run_dir``'s metrics.jsonl without the wall-clock fields (``time/*``), which differ per run."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")} for line in lines]


def test_a_save_that_fails_while_writing_the_sampler_copy_keeps_the_previous_checkpoint_and_resume_is_exact(
    tmp_path, monkeypatch
):
    steps = 6
    straight = make_loop(tmp_path / "a", sync_every=3, steps=steps)
    torch.manual_seed(0)  # random_reward draws from the global RNG (which checkpoints restore)
    straight.run()
    real_save_weights = checkpoint.files.save_weights

    def disk_full_on_engine_of_step_4(state, file):
        if "step-000004" in str(file) and file.name == "engine.safetensors":
            raise OSError("No space left on device")  # after model.safetensors of that save was written
        real_save_weights(state, file)

    monkeypatch.setattr(checkpoint.files, "save_weights", disk_full_on_engine_of_step_4)
    torch.manual_seed(0)
    with pytest.raises(OSError, match="No space"):
        make_loop(tmp_path / "b", sync_every=3, steps=steps, checkpoint_every=1).run()
    monkeypatch.undo()
    latest = latest_checkpoint(tmp_path / "b")
    assert latest.name == "step-000003" and (latest / "engine.safetensors").exists()
    assert not [p for p in (tmp_path / "b").iterdir() if p.name.startswith(".tmp-")]
    resumed = make_loop(tmp_path / "b", sync_every=3, steps=steps, checkpoint_every=1)
    assert resumed.run(resume=True).next_step == steps
    assert_same_weights(straight.trainer.model, resumed.trainer.model)
    assert_same_weights(straight.engine.model, resumed.engine.model)


def test_engine_without_in_process_weights_lags_is_checkpointed_from_the_host_copy_and_resumes_exactly(tmp_path):
    steps, stop_at = 7, 4
    straight = make_loop(tmp_path / "a", sync_every=3, steps=steps, lr=1e-2, host_only_engine=True)
    assert not straight.zero_copy
    torch.manual_seed(0)  # random_reward draws from the global RNG (which checkpoints restore)
    records = straight.run().records
    assert [r["staleness"] for r in records] == [0, 1, 2, 0, 1, 2, 0]
    first = make_loop(
        tmp_path / "b",
        sync_every=3,
        steps=steps,
        lr=1e-2,
        host_only_engine=True,
        reward=sigterm_while_scoring(stop_at, random_reward),
    )
    torch.manual_seed(0)
    assert first.run().next_step == stop_at + 1
    saved = load_file(str(latest_checkpoint(tmp_path / "b") / "engine.safetensors"))
    # the buckets the engine was last synced from, not a host copy of the state dict
    buckets = [saved[f"bucket{i}"] for i in range(len(saved))]
    held = first.engine.model.state_dict()  # stale: synced at step 3, two optimizer steps behind
    assert dict(first.sync.plan.views(buckets)).keys() == held.keys() - first.sync.plan.aliases.keys()
    assert all(torch.equal(t, held[k]) for k, t in first.sync.plan.views(buckets))
    assert not all(torch.equal(held[k], v) for k, v in first.trainer.model.state_dict().items())
    resumed = make_loop(tmp_path / "b", sync_every=3, steps=steps, lr=1e-2, host_only_engine=True)
    assert resumed.run(resume=True).next_step == steps
    assert_same_weights(straight.trainer.model, resumed.trainer.model)
    assert_same_weights(straight.engine.model, resumed.engine.model)


def test_loop_config_rejects_sync_every_below_one_and_checkpoints_periodically_by_default():
    with pytest.raises(ValueError, match="sync_every"):
        LoopConfig(sync_every=0)
    assert LoopConfig().checkpoint_every == 10 and LoopConfig().writes_final_checkpoint


def test_checkpoint_every_zero_writes_no_periodic_checkpoint_and_the_final_one_is_optional(tmp_path):
    make_loop(tmp_path / "a", sync_every=2, steps=3, checkpoint_every=0).run()
    assert [p.name for p in (tmp_path / "a").iterdir() if p.name.startswith("step-")] == ["step-000003"]
    loop = make_loop(tmp_path / "b", sync_every=2, steps=3, checkpoint_every=0)
    loop.config = dataclasses.replace(loop.config, final_checkpoint=False)
    loop.run()
    assert latest_checkpoint(tmp_path / "b") is None


@pytest.mark.parametrize("sync_every", [1, 2, math.inf])
def test_after_every_sync_the_engines_logprobs_equal_the_trainers_and_offline_never_syncs(tmp_path, sync_every):
    loop = make_loop(tmp_path, sync_every=sync_every, steps=4, lr=1e-2)
    checks, check = [], loop.sync.check
    loop.sync.check = lambda version, *args: checks.append((version, check(version, *args))) or checks[-1][1]
    synced, sync_weights = [], loop.engine.sync_weights
    loop.engine.sync_weights = lambda version, weights=None: (synced.append(version), sync_weights(version, weights))
    records = loop.run().records
    period = LoopConfig(sync_every=sync_every).sync_period
    due = [r["step"] for r in records if period and r["step"] % period == 0]
    assert synced == [r["version"] for r in records if r["step"] in due]
    assert [r["step"] for r in records if "time/check" in r] == due
    if loop.zero_copy:  # s = 1: the engine is the trainer's module, so identity is the check (no log-prob pass)
        assert checks == [] and loop.engine.shares_weights_with(loop.trainer.model) and len(due) == 4
        prompts = [TOK.encode(p.prompt) for p in PROBLEMS[:3]]
        rows = loop.engine.generate(prompts, SamplingParams(temperature=0.7, max_new_tokens=6, seed=3))
        checks.append(
            (loop.trainer.version, check(loop.trainer.version, [prompts[c.prompt_index] for c in rows], rows, 0.7))
        )
    else:
        assert [v for v, _ in checks] == synced and len(checks) == len(due)
    assert all(worst < 1e-4 for _, worst in checks)
    if period is None:
        assert synced == [] and loop.engine.weight_version == 0


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_the_check_fires_when_the_engine_is_handed_wrong_weights(tmp_path, temperature):
    loop = make_loop(tmp_path, sync_every=2, steps=1)
    wrong = {name: t + 0.05 * torch.randn_like(t) for name, t in loop.trainer.model.state_dict().items()}
    loop.engine.sync_weights(1, wrong)
    with pytest.raises(RuntimeError, match=r"sync check v1: probe row \d+, token \d+ \(id \d+\)"):
        if temperature == 0:
            loop.sync.probe(1)  # the greedy probe of a step that samples nothing
        else:
            prompts = [TOK.encode(p.prompt) for p in PROBLEMS[:3]]
            rows = loop.engine.generate(prompts, SamplingParams(temperature=temperature, max_new_tokens=4, seed=1))
            loop.sync.check(1, [prompts[c.prompt_index] for c in rows], rows, temperature)


def drop_the_weights(engine, sync_weights):
    """A broken sync: the engine takes the new version but keeps its old weights."""
    engine.sync_weights = lambda version, weights=None: sync_weights(version)


def keep_the_version(engine, sync_weights):
    """A broken sync: the engine takes the new weights but keeps reporting its old version."""
    engine.sync_weights = lambda version, weights=None: sync_weights(engine.weight_version, weights)


@pytest.mark.parametrize(
    "fault, caught",
    [
        (drop_the_weights, r"sync check v2: probe row \d+, token \d+ .* does not sample with the trainer's weights"),
        (keep_the_version, r"sync check v2: engine and samples carry weight versions \[0\], expected \[2\]"),
    ],
)
def test_a_wrong_sync_inside_a_run_is_caught_by_the_check_and_passes_silently_without_it(tmp_path, fault, caught):
    def run(check):
        loop = make_loop(tmp_path / str(check), sync_every=2, steps=3, lr=1e-2, host_only_engine=True, sync_check=check)
        fault(loop.engine, loop.engine.sync_weights)
        return loop

    with pytest.raises(RuntimeError, match=caught):
        run(check=True).run()
    unchecked = run(check=False)
    initial = {k: v.clone() for k, v in unchecked.engine.model.state_dict().items()}
    records = unchecked.run().records  # the same fault goes unnoticed: what the check is for
    assert [r["step"] for r in records] == [0, 1, 2] and records[2]["version"] == 2
    never_updated = all(torch.equal(v, initial[k]) for k, v in unchecked.engine.model.state_dict().items())
    assert never_updated == (fault is drop_the_weights)
    assert (records[2]["sampler_version"] == 0) == (fault is keep_the_version)


def test_at_s_one_the_check_fires_when_the_engine_stops_sampling_from_the_trainers_module(tmp_path):
    loop = make_loop(tmp_path, sync_every=1, steps=2)
    loop.run()
    loop.engine.model = loop.engine.model.__class__(loop.engine.model.config)  # pointed at other weights
    with pytest.raises(RuntimeError, match="sync check v2: the engine no longer samples from the trainer's module"):
        loop.step(2)


def test_bytes_changed_between_packing_and_the_consumer_fail_the_sync_naming_the_bucket(tmp_path):
    loop = make_loop(tmp_path, sync_every=2, steps=1)
    send, last = loop.sync.transport.send, len(loop.sync.buffers) - 1

    def send_with_a_flipped_bit(version, weights, *, timeout_s, with_fingerprints=True):
        weights.buffers[last].view(torch.uint8)[5] ^= 1  # after the producer's fingerprint, before the consumer's
        return send(version, weights, timeout_s=timeout_s, with_fingerprints=with_fingerprints)

    loop.sync.transport.send = send_with_a_flipped_bit
    with pytest.raises(RuntimeError, match=f"weight sync v1: bucket {last}: consumer fingerprint"):
        loop.sync.sync(1)
    loop.sync.transport.send = send
    loop.sync.sync(1)  # the next sync packs the bucket again and passes
