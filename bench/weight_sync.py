"""Weight-sync benchmark: handing a trainer's weights to a sampler, against model size, with the memcpy floor.

    python -m bench.weight_sync [--sizes 10M,100M,1B] [--dtype fp32|bf16|both] [--reps k] [--quick]

A synthetic parameter set of P parameters (square [1024, 1024] matrices, each followed by a [1024]
norm vector, like a transformer's) plays the trainer; all its tensors are views into one flat
block, so the floor can copy exactly those bytes in one call. Contenders, each in the same process
and the same interleaved rounds:

- ``floor``: ``copy_`` of the whole flat block into the same bucket memory, one call per 512 MiB
  bucket (the slots are unpadded here, so these are exactly the bytes a sync moves): the memcpy floor.
- ``bucketed (pack)``: ``SyncPlan.pack`` into preallocated 512 MiB buckets (one copy per tensor) —
  what a sync costs a ``TorchEngine`` whose stale copy is bound to the buckets.
- ``bucketed + fingerprints``: ``SyncPlan.pack_fingerprinted`` (the producer's fingerprint summed
  from cache during the pack) plus the consumer's fingerprint of every bucket (the in-process
  transport's whole sync with the proof's byte check on).
- ``shm → process``: the same pack into POSIX shared-memory buckets, one message to a real child
  process which maps the buckets once (no copy: it keeps views of them as its weights),
  fingerprints them and answers per bucket.
- ``shm → process (copy)``: the same, the child copying every bucket into memory of its own.
- ``load_state_dict``: ``module.load_state_dict(trainer.state_dict())`` into a module whose tensors
  are views into the same destination memory (per-tensor copies, no buckets).
- ``pickle → pipe``: ``pickle.dumps(state_dict)`` through a ``multiprocessing`` pipe, unpickled by
  the child (the usual "send the state dict to the worker").
- ``safetensors → disk``: ``save_file`` to a temporary file, ``load_file`` back, copied in place.

Memory: the 1B fp32 point needs ~12 GiB (trainer, buckets, shared buckets); it is skipped,
saying so, when ``free`` reports less than 14 GiB available. The pickle, safetensors and child-copy
peers need two more copies of the weights and run only up to 100M parameters; they get cloned,
independent tensors (a view into the flat block would pickle the whole block once per tensor).
"""

from __future__ import annotations

import argparse
import os
import pickle
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from bench._harness import Contender, Row, time_section
from bench._results import RESULTS_DIR, collect_meta, device_slug, write_results
from hotloop.runtime.weight_sync import SyncPlan, compare_fingerprints, fingerprints
from hotloop.runtime.weight_transport import ProcessTransport, serve, start_consumer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SIZES = {"1M": 10**6, "10M": 10**7, "100M": 10**8, "1B": 10**9}
FULL, QUICK = ["10M", "100M", "1B"], ["1M"]
BIG_PEERS_MAX = 10**8
FREE_GIB_FOR_1B = 14
NOTES = [
    "Medians of interleaved rounds: read the ratios, and the load average above (other jobs slow all rows).",
    "floor = one memcpy of the same bytes; bucketed (pack) is what a TorchEngine's stale copy costs per sync.",
]


class SyntheticWeights(nn.Module):
    """``params`` parameters as [d, d] matrices each followed by a [d] vector, all views into one flat block."""

    def __init__(self, params: int, dtype: torch.dtype, d: int = 1024) -> None:
        super().__init__()
        d = min(d, max(64, int((params / 4) ** 0.5) // 64 * 64))  # multiples of 64: unpadded slots
        layers = max(1, round(params / (d * d + d)))
        self.flat = torch.randn(layers * (d * d + d), dtype=torch.float32).to(dtype)
        for i in range(layers):
            base = i * (d * d + d)
            self.register_parameter(f"w{i}", nn.Parameter(self.flat[base : base + d * d].view(d, d)))
            self.register_parameter(f"n{i}", nn.Parameter(self.flat[base + d * d : base + d * d + d]))


def _binding_consumer(conn) -> None:
    """Child process: keep the shared buckets mapped (the engine samples from them); fingerprint what it holds."""
    serve(conn, lambda version, index, bucket, plan: bucket)


def _copying_consumer(conn) -> None:
    """Child process: copy every bucket into memory of its own, fingerprint the copy."""
    held: dict[int, torch.Tensor] = {}

    def load(version, index, bucket, plan):
        held.setdefault(index, torch.empty_like(bucket)).copy_(bucket)
        return held[index]

    serve(conn, load)


def _pickle_consumer(conn) -> None:
    """Child process: unpickle every state dict it is sent, answer with its size."""
    while True:
        data = conn.recv_bytes()
        if not data:
            return
        state = pickle.loads(data)
        conn.send(sum(t.numel() for t in state.values()))


def free_gib() -> float:
    """Available memory in GiB (``MemAvailable`` of /proc/meminfo, what ``free -g`` shows as available)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return 0.0


class _Child:
    """A consumer process and its pipe; ``close`` tells it to stop (a :func:`serve` loop, or the pickle loop)."""

    def __init__(self, target) -> None:
        self.process, self.conn = start_consumer(target)
        self.transport = ProcessTransport(self.conn)
        self.serves_pickles = False

    def close(self) -> None:
        if self.process.is_alive():
            try:
                self.conn.send_bytes(b"") if self.serves_pickles else self.transport.close()
            except (BrokenPipeError, OSError):
                pass
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()


def _process_sync(plan: SyncPlan, trainer: nn.Module, transport: ProcessTransport, buffers) -> None:
    sent = plan.pack_fingerprinted(trainer, buffers)
    compare_fingerprints(0, sent, transport.send(0, plan.views(buffers), timeout_s=600))


def section(size: str, dtype: torch.dtype, *, warmup: int, reps: int) -> list[Row]:
    """Every contender at one size and dtype, timed in shared rounds."""
    params = SIZES[size]
    trainer = SyntheticWeights(params, dtype)
    nbytes = trainer.flat.numel() * trainer.flat.element_size()
    label = f"{size} {str(dtype).removeprefix('torch.')} ({nbytes / 2**30:.2f} GiB)"
    plan = SyncPlan(trainer, bucket_mb=512)
    buffers = plan.allocate()
    chunks = _flat_chunks(trainer.flat, buffers)
    engine = _bound_module(plan, buffers)
    state = trainer.state_dict()
    children, entries = [], []

    def row(impl: str, note: str) -> Row:
        return Row(impl, "sync", label, note=note)

    entries.append(
        (
            row("floor", "memcpy of the flat block into the buckets, one call per bucket"),
            Contender(lambda: [b.copy_(c) for b, c in chunks]),
        )
    )
    entries.append(
        (
            row("bucketed (pack)", f"{len(plan.slots)} tensors into {len(plan.buckets)} buckets"),
            Contender(lambda: plan.pack(trainer, buffers)),
        )
    )
    entries.append(
        (
            row("bucketed + fingerprints", "pack summing the producer fingerprint; consumer fingerprint"),
            Contender(lambda: _in_process_sync(plan, trainer, buffers)),
        )
    )
    entries.append(
        (
            row("load_state_dict", "per-tensor copies into the same destination"),
            Contender(lambda: engine.load_state_dict(state, strict=False)),
        )
    )
    shm = _Child(_binding_consumer)
    children.append(shm)
    shm_transport = shm.transport
    shm_buffers = shm_transport.buffers(plan)
    _process_sync(plan, trainer, shm_transport, shm_buffers)  # waits for the child's start-up, untimed
    entries.append(
        (
            row("shm → process", "child maps the shared buckets; fingerprints both sides"),
            Contender(lambda: _process_sync(plan, trainer, shm_transport, shm_buffers)),
        )
    )
    if params <= BIG_PEERS_MAX:
        entries += _big_peers(plan, trainer, state, engine, children, row)
    try:
        return time_section(entries, warmup=warmup, reps=reps, device="cpu")
    finally:
        for child in children:
            child.close()


def _big_peers(plan, trainer, state, engine, children, row) -> list:
    """Peers that need two more copies of the weights: the child copying, pickle through a pipe, safetensors."""
    from safetensors.torch import load_file, save_file

    # independent tensors: a view into the flat block would pickle (and save) the whole block each time
    state = {k: v.detach().clone() for k, v in state.items()}
    copying = _Child(_copying_consumer)
    pickled = _Child(_pickle_consumer)
    pickled.serves_pickles = True
    children += [copying, pickled]
    copy_transport = copying.transport
    copy_buffers = copy_transport.buffers(plan)
    _process_sync(plan, trainer, copy_transport, copy_buffers)  # waits for the child's start-up, untimed
    path = Path(tempfile.mkdtemp(prefix="hotloop-bench-")) / "weights.safetensors"

    def through_pipe() -> None:
        pickled.conn.send_bytes(pickle.dumps(state, protocol=5))
        pickled.conn.recv()

    def through_disk() -> None:
        save_file(state, str(path))
        engine.load_state_dict(load_file(str(path)), strict=False)
        path.unlink()

    through_pipe()  # waits for the child's start-up, untimed
    return [
        (
            row("shm → process (copy)", "the child copies each bucket into its own memory"),
            Contender(lambda: _process_sync(plan, trainer, copy_transport, copy_buffers)),
        ),
        (
            row("pickle → pipe", "pickle.dumps(state_dict) through a pipe, unpickled in the child"),
            Contender(through_pipe),
        ),
        (row("safetensors → disk", "save_file, load_file, copied in place"), Contender(through_disk)),
    ]


def _in_process_sync(plan: SyncPlan, trainer: nn.Module, buffers) -> None:
    sent = plan.pack_fingerprinted(trainer, buffers)
    compare_fingerprints(0, sent, fingerprints(buffers))


def _flat_chunks(flat: torch.Tensor, buffers: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(bucket, the slice of ``flat`` holding the same bytes) pairs: the floor's copies."""
    out, start = [], 0
    for buffer in buffers:
        out.append((buffer, flat[start : start + buffer.numel()]))
        start += buffer.numel()
    if start != flat.numel():
        raise RuntimeError(f"buckets hold {start} elements, the flat block {flat.numel()}: slots are padded")
    return out


def _bound_module(plan: SyncPlan, buffers) -> nn.Module:
    """A module with the trainer's parameter names whose tensors are views into ``buffers`` (no extra memory)."""
    module = nn.Module()
    for name, view in plan.views(buffers):
        module.register_parameter(name, nn.Parameter(view, requires_grad=False))
    return module


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=lambda s: s.split(","), default=None, help=f"subset of {list(SIZES)}")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "both"), default="both")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="1M parameters, one rep (tests)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    bad = set(args.sizes or ()) - set(SIZES)
    if bad:
        parser.error(f"--sizes: unknown {sorted(bad)}; expected a subset of {list(SIZES)}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Path]:
    """Run the benchmark and write ``<out-dir>/weight_sync-cpu.{md,json,png}``; returns the paths."""
    args = parse_args(argv)
    sizes = args.sizes or (QUICK if args.quick else FULL)
    reps = args.reps or (1 if args.quick else 5)
    warmup = args.warmup if args.warmup is not None else (0 if args.quick else 1)
    dtypes = ["fp32", "bf16"] if args.dtype == "both" else [args.dtype]
    torch.manual_seed(0)
    rows, skipped = [], []
    for size in sizes:
        for name in dtypes:
            if SIZES[size] >= 10**9 and free_gib() < FREE_GIB_FOR_1B:
                skipped.append(f"{size} {name}: skipped, {free_gib():.1f} GiB available < {FREE_GIB_FOR_1B} GiB")
                continue
            t0 = time.perf_counter()
            rows += section(size, DTYPES[name], warmup=warmup, reps=reps)
            print(f"{size} {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    meta = collect_meta(
        "cpu",
        slug=device_slug("cpu"),
        warmup=warmup,
        reps=reps,
        threads=torch.get_num_threads(),
        skipped="; ".join(skipped) or "none",
        notes=NOTES,
    )
    paths = write_results("weight_sync", rows, meta, ratios_to=("floor", "pickle → pipe"), out_dir=args.out_dir)
    print(paths["md"].read_text())
    return paths


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    main()
