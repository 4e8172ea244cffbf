"""Transports that hand packed buckets to an engine: in-process, shared memory, CUDA IPC.

All three sit behind :class:`Transport`: ``send(version, weights, timeout_s)`` hands over the
packed buckets of one sync and returns the consumer's fingerprint of every bucket, which the
caller compares with its own (``weight_sync.compare_fingerprints``); with
``with_fingerprints=False`` (the sync check off) no side reads the buckets again and each answer is None.

- :class:`InProcessTransport`: ``engine.sync_weights(version, weights)`` with the bucket views
  themselves; the consumer fingerprint is taken on the buckets after the engine loaded them. The
  producer's was summed from cache during the pack (``SyncPlan.pack_fingerprinted``), so this is
  the sync's one extra read of the weights. Both read the same memory: the comparison shows the
  buckets did not change between the pack and the engine's load, nothing about the engine's own
  storage (an engine that copies, as vLLM's repacking loader, holds a layout no bucket sum
  describes; one whose weights are views of the buckets, as a stale ``TorchEngine`` copy, holds
  exactly these bytes, so this one read is all the proof a fingerprint can give). That the engine
  samples with them is the log-prob probe's job (``hotloop.runtime.sync_policy``).
- :class:`ProcessTransport` over a ``multiprocessing`` pipe to a consumer running :func:`serve`.
  CPU buckets live in POSIX shared memory (``Tensor.share_memory_()``: torch's ``shm_open`` +
  file-descriptor passing), mapped by the consumer once at start-up; a sync is then one short
  message per bucket and an answer per bucket, no bytes through the pipe. CUDA buckets travel as
  CUDA IPC handles, one per bucket, sent at every sync; the producer keeps its buffers alive
  (they are the plan's buckets) until the consumer has answered for every bucket, then calls
  ``torch.cuda.ipc_collect()`` so the memory the consumer released is reclaimed.

Timeouts. Every wait on the consumer is bounded by ``timeout_s``; a silent consumer raises
``TimeoutError`` naming the version, the bucket and the side ("consumer") instead of hanging. A
consumer that fails answers with its exception text, raised here naming the bucket.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from typing import Protocol

import torch

from hotloop.runtime.weight_sync import BucketedWeights, SyncPlan, fingerprint, fingerprints

_STOP = "stop"


class Transport(Protocol):
    """Hands one sync's packed buckets to an engine and reports what it received.

    Call order::

        plan = SyncPlan(trainer.model, bucket_mb=512)
        buffers = transport.buffers(plan)          # allocated once
        sent = plan.pack_fingerprinted(trainer.model, buffers)   # every sync
        received = transport.send(version, plan.views(buffers), timeout_s=60)
        compare_fingerprints(version, sent, received)
    """

    def buffers(self, plan: SyncPlan) -> list[torch.Tensor]:
        """The bucket buffers the producer packs into (allocated once, where this transport needs them)."""
        ...

    def send(
        self, version: int, weights: BucketedWeights, *, timeout_s: float, with_fingerprints: bool = True
    ) -> list[int | None]:
        """Deliver ``weights`` of ``version``; the consumer's fingerprint of every bucket (None each without)."""
        ...

    def close(self) -> None:
        """Release what the transport holds (child pipes, shared memory)."""
        ...


class InProcessTransport:
    """The engine loads straight from the bucket views (same process; no copy besides the engine's own)."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def buffers(self, plan: SyncPlan) -> list[torch.Tensor]:
        return plan.allocate()

    def send(
        self, version: int, weights: BucketedWeights, *, timeout_s: float, with_fingerprints: bool = True
    ) -> list[int | None]:
        # one call in this thread cannot be preempted: timeout_s bounds only the out-of-process waits
        self.engine.sync_weights(version, weights)
        return fingerprints(weights.buffers) if with_fingerprints else [None] * len(weights.buffers)

    def close(self) -> None:
        """Nothing held."""


class ProcessTransport:
    """Buckets into a consumer process (:func:`serve`) through shared memory (CPU) or CUDA IPC (GPU).

    Args:
        conn: the producer's end of a ``multiprocessing.Pipe`` whose other end runs :func:`serve`.
        device: where the buckets live: "cpu" (POSIX shared memory) or a CUDA device (CUDA IPC).
    """

    def __init__(self, conn, *, device: torch.device | str = "cpu") -> None:
        self.conn, self.device = conn, torch.device(device)
        self._plan: SyncPlan | None = None

    def buffers(self, plan: SyncPlan) -> list[torch.Tensor]:
        """Allocate the buckets (shared memory on CPU) and tell the consumer the plan (and, on CPU, the buffers)."""
        buffers = plan.allocate(self.device)
        if self.device.type == "cpu":
            buffers = [b.share_memory_() for b in buffers]
        self._plan = plan
        self.conn.send(("plan", plan, buffers if self.device.type == "cpu" else None))
        return buffers

    def send(
        self, version: int, weights: BucketedWeights, *, timeout_s: float, with_fingerprints: bool = True
    ) -> list[int | None]:
        """One message per sync (with CUDA IPC handles on GPU), then wait for one answer per bucket."""
        if self._plan is None:
            raise RuntimeError("send: expected buffers(plan) to be called first")
        handles = weights.buffers if self.device.type == "cuda" else None
        self.conn.send(("sync", version, handles, with_fingerprints))
        received = [self._answer(version, i, timeout_s) for i in range(len(weights.buffers))]
        if self.device.type == "cuda":
            torch.cuda.ipc_collect()
        return received

    def _answer(self, version: int, bucket: int, timeout_s: float) -> int:
        if not self.conn.poll(timeout_s):
            raise TimeoutError(
                f"weight sync v{version}: bucket {bucket} of {len(self._plan.buckets)}: consumer did "
                f"not answer within {timeout_s:g} s"
            )
        kind, index, value = self.conn.recv()
        if kind == "error":
            raise RuntimeError(f"weight sync v{version}: bucket {index}: consumer failed: {value}")
        if index != bucket:
            raise RuntimeError(
                f"weight sync v{version}: expected the consumer's answer for bucket {bucket}, got bucket {index}"
            )
        return value

    def close(self) -> None:
        """Stop the consumer's :func:`serve` loop and close the pipe."""
        try:
            self.conn.send((_STOP,))
        except (BrokenPipeError, OSError):
            pass
        self.conn.close()


def serve(conn, load: Callable[[int, int, torch.Tensor, SyncPlan], torch.Tensor]) -> None:
    """The consumer side of :class:`ProcessTransport`: receive the plan, then answer every sync, bucket by bucket.

    Args:
        conn: the consumer's end of the pipe.
        load: ``load(version, bucket_index, bucket, plan) -> held`` adopts one bucket (copies it into the
            engine's weights, or keeps the shared view) and returns the tensor now holding its bytes,
            which is fingerprinted for the answer.
    """
    plan, shared = None, None
    while True:
        message = conn.recv()
        if message[0] == _STOP:
            return
        if message[0] == "plan":
            _, plan, shared = message
            continue
        _, version, handles, with_fingerprints = message
        buffers = handles if handles is not None else shared
        for i, bucket in enumerate(buffers):
            try:
                held = load(version, i, bucket, plan)
                conn.send(("bucket", i, fingerprint(held) if with_fingerprints else None))
            except Exception as error:  # reported to the producer, which raises naming the bucket
                conn.send(("error", i, f"{type(error).__name__}: {error}"))
                break
        del buffers, handles  # drop the CUDA IPC mappings so the producer's ipc_collect can free them


def start_consumer(target: Callable, *args, context: str = "spawn"):
    """A child process running ``target(conn, *args)`` and a :class:`ProcessTransport`-ready producer end."""
    ctx = multiprocessing.get_context(context)
    parent, child = ctx.Pipe()
    process = ctx.Process(target=target, args=(child, *args), daemon=True)
    process.start()
    child.close()
    return process, parent
