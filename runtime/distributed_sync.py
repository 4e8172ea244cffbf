"""Weight sync from an FSDP2-sharded policy: one flat all-gather per bucket of the :class:`SyncPlan`, double-buffered.

The plan is the one :mod:`hotloop.runtime.weight_sync` builds for a plain module, planned from the
*global* shapes of the sharded parameters (``DTensor.shape``), so the engine sees the same buckets,
names, aliases and fingerprints as on one rank. A sync never holds the whole model on a rank besides
the engine's own copy: for each bucket b, every rank packs its dim-0 shards of b's tensors into its
segment of a staging buffer ``[world, L_b]`` (``L_b`` = Σ ⌈rows / world⌉ · row size over b's tensors),
the collective fills the other segments in place, and the rows are copied into b's slots of the
engine's buckets. The collective is one ``all_gather_into_tensor`` on NCCL (in place: the rank's
segment is its input); on gloo, whose all-gather copies through a temporary as large as its output,
it is one in-place ``broadcast`` per rank segment, so no backend buffer adds to the staging. Two
staging buffers alternate: bucket b + 1 is being gathered (``async_op``) while bucket b is
unpacked into the engine's memory.

Memory per rank during a sync: the shards, the engine's buckets (the sampler's weights, which it
holds anyway) and two staging buffers of at most ``world · max L_b`` elements each (a bucket plus the
dim-0 padding of its tensors). The FSDP collectives of the gather all finish before the transport
sends anything to the engine (interleaving the two hangs TRL #7103).

FSDP2 shards dim 0 like ``torch.chunk``: rank r holds rows ``[r·c, min((r + 1)·c, rows))``, c = ⌈rows / world⌉.
Plain (replicated) tensors of the state dict (persistent buffers) are cut the same way, so every
tensor is gathered alike.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from hotloop.runtime.distributed import DistContext
from hotloop.runtime.weight_sync import SyncPlan


class ShardedGather:
    """Packs an FSDP2 model's weights into a :class:`SyncPlan`'s buckets, one all-gather per bucket.

    Args:
        model: the sharded policy (``shard_model``); its ``state_dict`` names fix the plan.
        ctx: the process group and rank.
        bucket_mb: most MiB per bucket (as ``SyncConfig.bucket_mb``).
    """

    def __init__(self, model: nn.Module, ctx: DistContext, *, bucket_mb: float = 512) -> None:
        self.model, self.ctx = model, ctx
        state = model.state_dict(keep_vars=True)
        # zero-stride stand-ins of the global shapes: the plan reads dtype, device, shape and identity only
        stubs: dict[int, torch.Tensor] = {}
        for tensor in state.values():
            if id(tensor) not in stubs:
                local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
                stubs[id(tensor)] = torch.empty(1, dtype=tensor.dtype, device=local.device).expand(tensor.shape)
        self.plan = SyncPlan({name: stubs[id(t)] for name, t in state.items()}, bucket_mb=bucket_mb)
        self._segments = [self._bucket_segments(b) for b in range(len(self.plan.buckets))]
        self._staging: dict[torch.dtype, list[torch.Tensor]] = {}

    def _bucket_segments(self, bucket: int) -> list[tuple[int, int, int, int]]:
        """(slot index, segment offset, rows per rank c, row size) of each tensor of ``bucket``."""
        out, offset = [], 0
        for i, slot in enumerate(self.plan.slots):
            if slot.bucket != bucket:
                continue
            rows = slot.shape[0] if slot.shape else 1
            row = math.prod(slot.shape[1:]) if slot.shape else 1
            c = -(-rows // self.ctx.world_size)
            out.append((i, offset, c, row))
            offset += c * row
        return out

    def staging_numel(self, bucket: int) -> int:
        """Elements of one staging buffer for ``bucket``: ``world · L_b``."""
        return self.ctx.world_size * sum(c * row for _, _, c, row in self._segments[bucket])

    def pack(self, buffers: list[torch.Tensor]) -> None:
        """Gather every bucket into ``buffers`` (the plan's layout, e.g. the engine's bound buckets) in turn."""
        self.plan.check_buffers(buffers)
        state = self.model.state_dict(keep_vars=True)
        n = len(self.plan.buckets)
        try:
            with torch.no_grad():
                pending = self._launch(0, state) if n else None
                for b in range(n):
                    staging, works = pending
                    for work in works:
                        work.wait()
                    if b + 1 < n:
                        pending = self._launch(b + 1, state)  # overlaps the unpacking of bucket b
                    self._unpack(b, staging, buffers[b])
        finally:
            self._staging.clear()  # the staging lives only during a sync

    def _launch(self, bucket: int, state: dict) -> tuple[torch.Tensor, list]:
        """Pack this rank's shards of ``bucket`` into its segment of a staging buffer and start the gather."""
        staging = self._buffer(bucket).view(self.ctx.world_size, -1)
        mine = staging[self.ctx.rank]
        for i, offset, c, _row in self._segments[bucket]:
            tensor = state[self.plan.slots[i].name]
            local = tensor.to_local() if isinstance(tensor, DTensor) else _rows(tensor, self.ctx.rank, c)
            mine[offset : offset + local.numel()].copy_(local.reshape(-1))
        if dist.get_backend() == "nccl":
            return staging, [dist.all_gather_into_tensor(staging.view(-1), mine, async_op=True)]
        return staging, [dist.broadcast(staging[r], src=r, async_op=True) for r in range(self.ctx.world_size)]

    def _unpack(self, bucket: int, staging: torch.Tensor, out: torch.Tensor) -> None:
        """Copy the gathered rows of each tensor of ``bucket`` from ``staging [world, L_b]`` into its slot."""
        for i, offset, c, row in self._segments[bucket]:
            slot = self.plan.slots[i]
            rows = slot.shape[0] if slot.shape else 1
            dst = out[slot.offset : slot.offset + slot.numel].view(rows, row)
            for r in range(self.ctx.world_size):
                n = max(0, min(c, rows - r * c))
                if n:
                    dst[r * c : r * c + n].copy_(staging[r, offset : offset + n * row].view(n, row))

    def _buffer(self, bucket: int) -> torch.Tensor:
        """The staging buffer of ``bucket``'s parity, allocated once per dtype at the largest size it needs."""
        spec = self.plan.buckets[bucket]
        pair = self._staging.get(spec.dtype)
        if pair is None:
            size = max(self.staging_numel(b) for b, s in enumerate(self.plan.buckets) if s.dtype == spec.dtype)
            pair = self._staging[spec.dtype] = [
                torch.empty(size, dtype=spec.dtype, device=spec.device) for _ in range(2)
            ]
        parity = sum(1 for s in self.plan.buckets[:bucket] if s.dtype == spec.dtype) % 2
        return pair[parity][: self.staging_numel(bucket)]

    def staging_nbytes(self) -> int:
        """Bytes of the two staging buffers per dtype a sync allocates: its whole overhead on this rank."""
        sizes: dict[torch.dtype, int] = {}
        for b, spec in enumerate(self.plan.buckets):
            sizes[spec.dtype] = max(sizes.get(spec.dtype, 0), self.staging_numel(b) * spec.dtype.itemsize)
        return 2 * sum(sizes.values())


def _rows(tensor: torch.Tensor, rank: int, c: int) -> torch.Tensor:
    """Rank ``rank``'s dim-0 chunk of a replicated tensor (a scalar counts as one row)."""
    flat = tensor.reshape(1, -1) if tensor.dim() == 0 else tensor
    return flat[rank * c : (rank + 1) * c]
