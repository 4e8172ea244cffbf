"""What each rank runs in the two-process tests of ``hotloop.runtime.distributed`` (gloo on CPU, real processes).

Each entry point takes ``(rank, world, port, out_dir, ...)``, opens the process group the way torchrun's
environment would and writes what the test checks into ``out_dir`` (rank 0, or one file per rank).
"""

import copy
import json
import os
import shutil
import time
import zlib
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor
from torch.profiler import ProfilerActivity, profile

from hotloop.algorithms.tasks.tiny_model import build_tiny_model, tiny_llama_config
from hotloop.runtime import distributed
from hotloop.runtime.distributed import init_distributed, shard_model
from hotloop.runtime.distributed_sync import ShardedGather
from hotloop.runtime.torch_engine import TorchEngine
from hotloop.runtime.trainer import Trainer, TrainerConfig, make_reference
from hotloop.runtime.weight_sync import SyncPlan, fingerprints
from tests.runtime.tiny_loop import TOK, make_loop


def init(rank: int, world: int, port: int, timeout_s: float = 60.0):
    """The process group of a torchrun launch of ``world`` ranks on this host."""
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    return init_distributed(timeout_s=timeout_s)


def finish() -> None:
    """Close the process group on every rank (a spawned process exits without atexit hooks, and gloo's threads
    must be stopped before it does)."""
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def tiny_model(seed: int = 3):
    """The tiny Llama of the runtime tests, with an even vocabulary (no dim-0 padding on two ranks)."""
    return build_tiny_model(tiny_llama_config(TOK.vocab_size, hidden_size=32, layers=2, intermediate=64), seed=seed)


def sharded_trainer(ctx, config: TrainerConfig, seed: int = 3) -> Trainer:
    """A Trainer on the sharded tiny Llama with a sharded frozen reference."""
    model = tiny_model(seed)
    reference = shard_model(make_reference(model), ctx, trainable=False)
    return Trainer(shard_model(model, ctx), config, reference=reference)


def full_params(model) -> dict[str, torch.Tensor]:
    """Every parameter as a plain full tensor (collective when sharded)."""
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in model.named_parameters()}


def train_gather_agree(rank, world, port, out_dir, cases, config, steps, bucket_mb):
    """One process group for three checks: :func:`train_steps` of each case, :func:`gather`, :func:`agreement`."""
    ctx = init(rank, world, port)
    for name, (algorithm, batch) in cases.items():
        train_steps(ctx, Path(out_dir) / f"train-{name}.pt", algorithm, batch, config, steps)
    gather(ctx, out_dir, bucket_mb)
    agreement(ctx, out_dir)
    finish()


def train_steps(ctx, out: Path, algorithm, batch, config, steps):
    """``steps`` optimizer steps of ``algorithm`` on the global ``batch``, each rank training on its part."""
    trainer = sharded_trainer(ctx, config)
    rule = algorithm.split_rule()
    loss_fn = lambda model, b: algorithm.loss(model, b, reference=trainer.reference)  # noqa: E731
    records = [distributed.train_step(trainer, loss_fn, batch, rule, ctx) for _ in range(steps)]
    params = full_params(trainer.model)
    if ctx.is_main:
        torch.save({"records": records, "params": params}, out)


def agreement(ctx, out_dir):
    """A check that fails on rank 1 only: what ``agree`` raises on each rank."""

    def check():
        if ctx.rank == 1:
            raise RuntimeError("engine log-prob differs")
        return "fine"

    try:
        distributed.agree(ctx, check, "sync check of loop step 3")
        message = None
    except RuntimeError as error:
        message = str(error)
    (Path(out_dir) / f"agree-{ctx.rank}.json").write_text(json.dumps(message))


def live_peak_bytes(fn) -> int:
    """Most bytes torch held at once while ``fn`` ran beyond what it held before (profiler allocation events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def gather(ctx, out_dir, bucket_mb):
    """Gather the sharded tiny Llama into engine buckets: their content, fingerprints and the gather's peak."""
    plain = tiny_model(seed=5)
    plain_plan = SyncPlan(plain, bucket_mb=bucket_mb)
    expected = plain_plan.allocate()
    plain_plan.pack(plain, expected)
    model = shard_model(copy.deepcopy(plain), ctx)
    source = ShardedGather(model, ctx, bucket_mb=bucket_mb)
    buffers = [b.fill_(float("nan")) for b in source.plan.allocate()]
    peak = live_peak_bytes(lambda: source.pack(buffers))
    shard_bytes = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    result = {
        "peak": peak,
        "staging": source.staging_nbytes(),
        "shard_bytes": shard_bytes,
        "max_bucket": max(b.nbytes for b in source.plan.buckets),
        "buckets": len(source.plan.buckets),
        "model_bytes": source.plan.nbytes,
        "same_layout": [(s.name, s.bucket, s.offset, s.shape) for s in source.plan.slots]
        == [(s.name, s.bucket, s.offset, s.shape) for s in plain_plan.slots],
        "equal": all(torch.equal(a, b) for a, b in zip(buffers, expected)),
        "fingerprints_equal": fingerprints(buffers) == fingerprints(expected),
    }
    (Path(out_dir) / f"gather-{ctx.rank}.json").write_text(json.dumps(result))


def loop_runs(rank, world, port, out_dir, algorithm):
    """Three OnlineLoop runs on ``world`` ranks: 2 steps (checkpointed), resumed to 3, and 3 uninterrupted."""
    ctx = init(rank, world, port)
    out = Path(out_dir)
    finals = {}
    for name, steps, source in (("first", 2, None), ("resumed", 3, "first"), ("straight", 3, None)):
        if source is not None and ctx.is_main:
            shutil.copytree(out / source, out / name)
        torch.distributed.barrier()
        loop = sharded_loop(ctx, out / name, steps=steps, algorithm=algorithm)
        loop.run(resume=source is not None)
        finals[name] = full_params(loop.trainer.model)
        finals[name + "-engine"] = {n: t.clone() for n, t in loop.engine.local_model.state_dict().items()}
    if ctx.is_main:
        torch.save(finals, out / "finals.pt")
    finish()


def hashed_reward(problems, texts):
    """A reward in [0, 1) that is a function of the text alone (no RNG to restore), ties only between equal texts."""
    return torch.tensor([zlib.crc32(t.encode()) % 1000 / 1000 for t in texts], dtype=torch.float32)


def sharded_loop(ctx, out_dir, *, steps, algorithm, sync_every=2):
    """``tiny_loop.make_loop``'s loop with the trainer's model and reference sharded and a plain engine copy."""
    loop = make_loop(
        out_dir, sync_every=sync_every, steps=steps, algorithm=algorithm, checkpoint_every=2, reward=hashed_reward
    )
    plain = loop.trainer.model
    engine = TorchEngine(
        copy.deepcopy(plain).requires_grad_(False), pad_token_id=TOK.pad_id, eos_token_id=TOK.eos_id, seed=0
    )
    reference = shard_model(loop.trainer.reference, ctx, trainable=False)
    trainer = Trainer(shard_model(plain, ctx), loop.trainer.config, reference=reference)
    return type(loop)(
        loop.config,
        trainer=trainer,
        engine=engine,
        algorithm=loop.algorithm,
        reward_fn=loop.reward_fn,
        problems=loop.problems,
        tokenizer=loop.tokenizer,
        sampling=loop.sampling,
        progress=False,
        dist=ctx,
    )


def dies_mid_step(rank, world, port, out_dir):
    """Rank 1 exits inside its loss of loop step 1 (no cleanup, like a SIGKILL); rank 0 reports how it ended."""
    ctx = init(rank, world, port, timeout_s=30.0)
    loop = sharded_loop(ctx, Path(out_dir) / "run", steps=4, algorithm="grpo", sync_every=1)
    loss = loop.algorithm.loss

    def dying_loss(model, batch, *, reference):
        if rank == 1 and loop.trainer.version == 1:
            os._exit(17)
        return loss(model, batch, reference=reference)

    loop.algorithm.loss = dying_loss
    t0 = time.monotonic()
    try:
        loop.run()
        outcome = {"error": None}
    except Exception as error:  # the test reads what happened
        outcome = {"error": f"{type(error).__name__}: {error}"}
    outcome["seconds"] = time.monotonic() - t0
    (Path(out_dir) / f"dead-{rank}.json").write_text(json.dumps(outcome))
    os._exit(0)  # its peer is gone: no barrier to close the group with
