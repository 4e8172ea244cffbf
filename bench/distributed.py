"""Step time and sync time on 1 vs 2 ranks (FSDP2, gloo on CPU; NCCL where GPUs are lent).

Rows, one process group per world size, all contenders of a world size timed in shared rounds
(``measure_interleaved``: every rank runs the same rounds, so the collectives line up):

- ``step``: one GRPO optimizer step (DAPO loss, a reference, AdamW) on the same global batch of
  ``P`` prompts × ``G`` samples. ``1 rank``: the plain single-process Trainer; ``2 ranks FSDP2``:
  ``hotloop.runtime.distributed.train_step``, each rank training on its half of the groups.
- ``sync``: the policy's weights into the engine's bucket buffers. ``1 rank``: ``SyncPlan.pack``,
  one memcpy per tensor (the floor: it moves every byte once); ``2 ranks: bucketed gather``:
  ``ShardedGather.pack`` (one in-place broadcast per rank segment and bucket on gloo, double-buffered);
  ``2 ranks: full_tensor per parameter``: the peer the field moved away from, one
  ``DTensor.full_tensor()`` per parameter copied into its slot.

Peak extra memory is rank 0's (``torch.profiler`` allocation events, as in ``bench/_harness.py``).
Every rank runs one thread, so 2 ranks use two cores where 1 rank uses one: the step ratio is what
a second device buys (half the rows per rank) net of the collectives, not the same cores split.

    python -m bench.distributed [--quick] [--out-dir bench/results]
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import os
import socket
import tempfile
from pathlib import Path

import torch

from bench._harness import Contender, Row, time_section
from bench._results import RESULTS_DIR, collect_meta, device_slug, write_results
from hotloop.algorithms.grpo import GRPO, GRPOConfig
from hotloop.algorithms.tasks.tiny_model import build_tiny_model, tiny_llama_config
from hotloop.runtime import distributed
from hotloop.runtime.distributed_sync import ShardedGather
from hotloop.runtime.engine import Completion
from hotloop.runtime.trainer import Trainer, TrainerConfig, make_reference
from hotloop.runtime.weight_sync import SyncPlan

VOCAB, HIDDEN, LAYERS, INTERMEDIATE = 2048, 256, 4, 512
PROMPTS, SAMPLES, PROMPT_LEN, COMPLETION_LEN = 8, 4, 16, 24
BUCKET_MB = 4


def model():
    """The benchmark policy: a Llama of ~3.7M parameters (real transformers code, seeded weights)."""
    return build_tiny_model(
        tiny_llama_config(
            VOCAB, hidden_size=HIDDEN, layers=LAYERS, heads=4, kv_heads=2, intermediate=INTERMEDIATE, max_position=64
        ),
        seed=0,
    )


def global_batch(algorithm: GRPO):
    """``PROMPTS`` groups of ``SAMPLES`` random completions with random rewards (seeded)."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, VOCAB, (PROMPT_LEN,), generator=g).tolist() for _ in range(PROMPTS)]
    tokens = lambda: torch.randint(3, VOCAB, (COMPLETION_LEN,), generator=g).tolist()  # noqa: E731
    completions = [
        Completion(
            prompt_index=p,
            token_ids=tokens(),
            logprobs=(-torch.rand(COMPLETION_LEN, generator=g) * 5).tolist(),
            finish_reason="length",
            weight_version=0,
        )
        for p in range(PROMPTS)
        for _ in range(SAMPLES)
    ]
    rewards = torch.rand(len(completions), generator=g)
    return algorithm.build_batch([None] * PROMPTS, prompts, completions, rewards)


def rank_main(rank: int, world: int, port: int, out: str, warmup: int, reps: int) -> None:
    """Time the contenders of ``world`` ranks; rank 0 writes the rows to ``out``."""
    torch.set_num_threads(1)  # one thread per rank at every world size: the 2-core VM has one core per rank
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    ctx = distributed.init_distributed(timeout_s=300.0)
    algorithm = GRPO(
        GRPOConfig(samples_per_prompt=SAMPLES, loss_type="dapo", beta=0.05),
        pad_token_id=0,
        max_completion_length=COMPLETION_LEN,
    )
    batch = global_batch(algorithm)
    policy = model()
    reference = make_reference(policy)
    size = f"{sum(p.numel() for p in policy.parameters()) / 1e6:.1f}M params, {PROMPTS}x{SAMPLES} rows"
    entries = [(row, Contender(fn)) for row, fn in contenders(ctx, policy, reference, algorithm, batch, size)]
    rows = time_section(entries, warmup=warmup, reps=reps, device="cpu")
    if rank == 0:
        Path(out).write_text(json.dumps([r.__dict__ for r in rows]))
    if ctx is not None:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def contenders(ctx, policy, reference, algorithm, batch, size: str) -> list:
    """(row, zero-argument call) pairs of one world size."""
    config = TrainerConfig(lr=1e-6, max_grad_norm=1.0)
    if ctx is None:
        trainer = Trainer(policy, config, reference=reference)
        loss_fn = lambda m, b: algorithm.loss(m, b, reference=reference)  # noqa: E731
        plan = SyncPlan(policy, bucket_mb=BUCKET_MB)
        buffers = plan.allocate()
        return [
            (Row("1 rank", "step", size), lambda: trainer.step(loss_fn, [batch])),
            (
                Row("1 rank", "sync", size, note="SyncPlan.pack: one memcpy per tensor"),
                lambda: plan.pack(policy, buffers),
            ),
        ]
    engine_copy = copy.deepcopy(policy)
    policy, reference = distributed.shard_run(ctx, policy, reference)
    trainer = Trainer(policy, config, reference=reference)
    loss_fn = lambda m, b: algorithm.loss(m, b, reference=reference)  # noqa: E731
    gather = ShardedGather(policy, ctx, bucket_mb=BUCKET_MB)
    buffers = gather.plan.allocate()
    gather.plan.bind(engine_copy, buffers)
    rule = algorithm.split_rule()
    return [
        (
            Row(f"{ctx.world_size} ranks FSDP2", "step", size),
            lambda: distributed.train_step(trainer, loss_fn, batch, rule, ctx),
        ),
        (
            Row(
                f"{ctx.world_size} ranks: bucketed gather",
                "sync",
                size,
                note=f"{len(gather.plan.buckets)} buckets of <= {BUCKET_MB} MiB",
            ),
            lambda: gather.pack(buffers),
        ),
        (
            Row(f"{ctx.world_size} ranks: full_tensor per parameter", "sync", size),
            lambda: per_parameter_gather(policy, gather.plan, buffers),
        ),
    ]


def per_parameter_gather(model, plan: SyncPlan, buffers) -> None:
    """The peer: one ``full_tensor()`` (an all-gather) per parameter, copied into its slot."""
    state = model.state_dict()
    with torch.no_grad():
        for slot in plan.slots:
            tensor = state[slot.name]
            full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
            buffers[slot.bucket][slot.offset : slot.offset + slot.numel].copy_(full.reshape(-1))


def run_world(world: int, warmup: int, reps: int) -> list[Row]:
    """Rows measured by ``world`` fresh processes (1: no process group)."""
    with socket.socket() as s:  # closed before the ranks start: rank 0's store listens on it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rows.json")
        ctx = multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=rank_main, args=(r, world, port, out, warmup, reps)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode for p in procs):
            raise RuntimeError(f"{world} ranks: exit codes {[p.exitcode for p in procs]}")
        return [Row(**r) for r in json.loads(Path(out).read_text())]


def main(argv: list[str] | None = None) -> dict[str, Path]:
    """Run both world sizes and write ``<out-dir>/distributed-cpu.{md,json,png}``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 timed round, no warm-up")
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    warmup, reps = (0, 1) if args.quick else (1, 5)
    rows = run_world(1, warmup, reps) + run_world(2, warmup, reps)
    meta = collect_meta(
        "cpu",
        slug=device_slug("cpu"),
        warmup=warmup,
        reps=reps,
        cpus=os.cpu_count(),
        threads_per_rank=1,
        backend="gloo",
        bucket_mb=BUCKET_MB,
    )
    paths = write_results("distributed", rows, meta, ratios_to=("1 rank",), out_dir=args.out_dir)
    print(paths["md"].read_text())
    return paths


if __name__ == "__main__":
    main()
