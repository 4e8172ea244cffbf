"""FSDP2 on two real gloo processes: two ranks take one rank's step on the same global batch (DPO, GRPO), the
bucketed gather fills the engine's buckets with at most two staging buckets, a check failing on one rank
raises on both, distributed checkpoints resume on one and on two ranks, and a rank that dies mid-step stops
the other with an error instead of a hang. Three launches of two processes in all (fixtures share them)."""

import json
import multiprocessing
import shutil
import socket
import time

import pytest
import torch

from hotloop.algorithms.dpo import DPOConfig, OnlineDPO
from hotloop.algorithms.grpo import GRPO, GRPOConfig
from hotloop.runtime import distributed_checkpoint
from hotloop.runtime.distributed import DistContext
from hotloop.runtime.engine import SamplingParams
from hotloop.runtime.torch_engine import TorchEngine
from hotloop.runtime.trainer import Trainer, TrainerConfig, make_reference
from tests.helpers import relative_error
from tests.runtime import distributed_child as child
from tests.runtime.tiny_loop import PROBLEMS, TOK

WORLD = 2


def launch(fn, *args, world=WORLD, timeout_s=120.0) -> list[int]:
    """Run ``fn(rank, world, port, *args)`` in ``world`` fresh processes; their exit codes (killed past the timeout)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=fn, args=(rank, world, port, *args)) for rank in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join()
    assert not hung, f"{len(hung)} of {world} ranks still running after {timeout_s} s"
    return [p.exitcode for p in procs]


def global_batch(algorithm, prompts: int):
    """A real batch: the tiny Llama samples ``samples_per_prompt`` completions per prompt, rewards drawn at random."""
    engine = TorchEngine(child.tiny_model(seed=7), pad_token_id=TOK.pad_id, eos_token_id=TOK.eos_id, seed=1)
    prompt_ids = [TOK.encode(p.prompt) for p in PROBLEMS[:prompts]]
    completions = engine.generate(
        prompt_ids,
        SamplingParams(n=algorithm.samples_per_prompt, max_new_tokens=6, seed=int(torch.randint(1 << 30, ()))),
    )
    rewards = torch.rand(len(completions))
    batch = algorithm.build_batch(PROBLEMS[:prompts], prompt_ids, completions, rewards)
    assert batch is not None and batch.rows // algorithm.split_rule().unit_rows >= 3
    return batch


ALGORITHMS = {
    "dpo": lambda: OnlineDPO(DPOConfig(beta=0.5, samples_per_prompt=4), pad_token_id=TOK.pad_id),
    "grpo-dapo": lambda: GRPO(
        GRPOConfig(samples_per_prompt=4, loss_type="dapo", beta=0.05), pad_token_id=TOK.pad_id, max_completion_length=6
    ),
}


CONFIG = TrainerConfig(lr=1e-2, eps=1e-3, grad_accum_steps=2, max_grad_norm=None)
BUCKET_MB = 0.02  # several buckets on the tiny model


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One 2-rank launch: two optimizer steps of each algorithm on its global batch, the gather, ``agree``."""
    out = tmp_path_factory.mktemp("two_ranks")
    cases = {}
    for name, build in ALGORITHMS.items():
        algorithm = build()
        cases[name] = (algorithm, global_batch(algorithm, prompts=3))  # odd: the ranks' parts differ in size
    assert launch(child.train_gather_agree, str(out), cases, CONFIG, 2, BUCKET_MB) == [0, 0]
    return out, cases


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_two_ranks_take_the_step_one_rank_takes_on_the_same_global_batch(two_ranks, name):
    out, cases = two_ranks
    algorithm, batch = cases[name]
    config = CONFIG
    got = torch.load(out / f"train-{name}.pt")
    model = child.tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(model, config, reference=make_reference(model))
    loss_fn = lambda m, b: algorithm.loss(m, b, reference=trainer.reference)  # noqa: E731
    records = [trainer.step(loss_fn, [batch]) for _ in range(2)]
    for record, mine in zip(records, got["records"]):
        for key in ("loss", "grad_norm"):
            assert abs(mine[key] - record[key]) <= 1e-5 * max(abs(record[key]), 1e-3), (key, mine[key], record[key])
    for n, p in model.named_parameters():
        assert relative_error(got["params"][n], p) <= 1e-5, n
        assert relative_error(got["params"][n] - before[n], p.detach() - before[n]) <= 1e-4, n  # the update itself


def test_bucketed_gather_fills_the_engine_buckets_holding_at_most_two_buckets(two_ranks):
    out, _ = two_ranks
    for rank in range(WORLD):
        got = json.loads((out / f"gather-{rank}.json").read_text())
        assert got["same_layout"] and got["equal"] and got["fingerprints_equal"], got
        assert got["buckets"] >= 3 and got["max_bucket"] < got["model_bytes"] / 2
        assert got["staging"] <= 2 * got["max_bucket"]
        assert 0 < got["peak"] <= 2 * got["max_bucket"], got  # on top of the shards it already held
        assert got["shard_bytes"] <= 0.55 * got["model_bytes"]  # a rank holds about half of the weights


def test_a_check_failing_on_one_rank_raises_on_every_rank_naming_it(two_ranks):
    out, _ = two_ranks
    messages = [json.loads((out / f"agree-{rank}.json").read_text()) for rank in range(WORLD)]
    assert messages[0] == "rank 0: sync check of loop step 3 failed on rank 1 (its error is in its log)"
    assert messages[1] == "rank 1: sync check of loop step 3 failed: engine log-prob differs"


@pytest.fixture(scope="module")
def loop_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("loops")
    assert launch(child.loop_runs, str(out), "grpo", timeout_s=240.0) == [0, 0]
    return out, torch.load(out / "finals.pt")


def test_a_two_rank_run_resumed_on_two_ranks_ends_where_the_uninterrupted_one_does(loop_runs):
    out, finals = loop_runs
    for name, tensor in finals["straight"].items():
        assert torch.equal(finals["resumed"][name], tensor), name
    for name, tensor in finals["straight-engine"].items():
        assert torch.equal(finals["resumed-engine"][name], tensor), name
    records = [json.loads(line) for line in (out / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]  # written once, by rank 0
    assert not any(r["skipped"] for r in records) and records[-1]["version"] == 2
    assert [("time/sync" in r, "time/check" in r) for r in records] == [(True, True), (False, False), (True, True)]
    assert not any(
        finals["first"][n].equal(t) for n, t in child.tiny_model(3).named_parameters() if n in finals["first"]
    )


def test_a_two_rank_checkpoint_loads_on_one_rank_with_the_same_values(loop_runs, tmp_path):
    out, finals = loop_runs
    path = distributed_checkpoint.latest(out / "first")
    assert path is not None and path.name == "dist-step-000002"
    loop = child.make_loop(
        tmp_path, sync_every=2, steps=3, algorithm="grpo", checkpoint_every=2, reward=child.hashed_reward
    )
    state = distributed_checkpoint.load(path, loop.trainer, extra=loop._engine_models())
    assert state["next_step"] == 2 and loop.trainer.version == 2
    for name, p in loop.trainer.model.named_parameters():
        assert torch.equal(p.detach(), finals["first"][name]), name
    assert all(s["step"] == 2 for s in loop.trainer.optimizer.state_dict()["state"].values())
    engine = loop.engine.local_model.state_dict()
    for name, tensor in finals["first-engine"].items():
        assert torch.equal(engine[name], tensor), name
    shutil.copytree(out / "first", tmp_path / "run")
    resumed = child.make_loop(
        tmp_path / "run", sync_every=2, steps=3, algorithm="grpo", checkpoint_every=2, reward=child.hashed_reward
    )
    result = resumed.run(resume=True)
    assert [r["step"] for r in result.records] == [2] and resumed.trainer.version == 3


def test_a_rank_dying_mid_step_stops_the_other_with_an_error_within_60_s(tmp_path):
    codes = launch(child.dies_mid_step, str(tmp_path), timeout_s=150.0)
    assert codes[1] == 17
    outcome = json.loads((tmp_path / "dead-0.json").read_text())
    assert outcome["error"].startswith(
        "RuntimeError: rank 0 of 2: loop step 1: a collective failed, so another rank died or stalled"
    ), outcome
    assert outcome["seconds"] < 60, outcome
    assert codes[0] == 0  # it reported the error and returned


def test_resume_takes_the_newer_checkpoint_kind_and_several_ranks_refuse_a_newer_single_process_one(tmp_path):
    dist_dir = tmp_path / "dist-step-000006"
    dist_dir.mkdir()
    (dist_dir / "state.json").write_text("{}")
    (tmp_path / distributed_checkpoint.LATEST).write_text(dist_dir.name + "\n")
    two_ranks = DistContext(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"), mesh=None, timeout_s=1.0)
    older, newer = tmp_path / "step-000004", tmp_path / "step-000008"
    assert distributed_checkpoint.newest(tmp_path, older, None) == ("dist", dist_dir)
    assert distributed_checkpoint.newest(tmp_path, older, two_ranks) == ("dist", dist_dir)
    assert distributed_checkpoint.newest(tmp_path, newer, None) == ("single", newer)
    with pytest.raises(ValueError, match="step-000008 was written by one process; resume it on one process"):
        distributed_checkpoint.newest(tmp_path, newer, two_ranks)
    assert distributed_checkpoint.newest(tmp_path / "empty", None, two_ranks) == ("dist", None)
