"""The weight hand-over protocol: a plan of flat per-dtype buckets, packing, named views and fingerprints.

A :class:`SyncPlan` is built once from the trainer's module. Every distinct tensor of its
``state_dict()`` (parameters and persistent buffers) gets a slot in a flat 1-D bucket of its dtype
and device; a bucket holds at most ``bucket_mb`` MiB (a larger tensor gets a bucket of its own).
Slots start at 64-byte boundaries, so every bucket's byte length is a multiple of 8 and can be
viewed as int64 for the fingerprint. The buckets are allocated once (``allocate``, or by a
transport in shared memory); each sync ``pack`` copies the trainer's tensors into them, one memcpy
per tensor and no allocation, and ``views`` hands out ``(name, tensor)`` pairs that are views into
the buckets (the engine contract of ``RolloutEngine.sync_weights``).

Names. The engine receives HF names as in the trainer's ``state_dict()``. A tied weight (the input
embedding and the LM head of a model with ``tie_word_embeddings``) is one tensor under two names: it
travels once, under its first ``state_dict`` name (``model.embed_tokens.weight``, the name
``named_parameters`` gives it), and the other names are recorded in ``plan.aliases`` (alias →
name sent). Serving engines' loaders skip the LM head of a tied model for the same reason; an engine
that needs every name can resolve the aliases.

Fingerprint. ``fingerprint(bucket)`` is the wrapping int64 sum of the bucket's bytes read as int64
words, computed by the producer after packing and by the consumer on what it received. Any change
of one word (a flipped bit, a corrupted byte, a truncated copy) changes it; it does not see two
words swapped, which the log-probe of ``hotloop.runtime.sync_policy`` does. It reads the bucket
once at memory bandwidth (measured in ``bench/weight_sync.py`` next to the memcpy floor).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

ALIGN_BYTES = 64
"""Every slot starts at a multiple of this many bytes (and every bucket's length is one)."""


@dataclass(frozen=True)
class Slot:
    """Where one tensor lives: bucket index, element offset and shape."""

    name: str
    bucket: int
    offset: int
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class BucketSpec:
    """One flat bucket: its dtype, device and length in elements."""

    dtype: torch.dtype
    device: torch.device
    numel: int

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class SyncPlan:
    """Flat per-dtype buckets for a module's ``state_dict``, built once.

    Args:
        module: the trainer's module (or a name → tensor mapping); its ``state_dict`` names and shapes fix the plan.
        bucket_mb: most MiB per bucket (a larger tensor gets one of its own).
    """

    def __init__(self, module: nn.Module | Mapping[str, torch.Tensor], *, bucket_mb: float = 512) -> None:
        if not isinstance(bucket_mb, (int, float)) or not bucket_mb > 0:
            raise ValueError(f"bucket_mb: expected a number > 0, got {bucket_mb!r}")
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.slots: list[Slot] = []
        self.buckets: list[BucketSpec] = []
        self.aliases: dict[str, str] = {}
        open_bucket: dict[tuple[torch.dtype, torch.device], int] = {}
        first_name: dict[tuple[int, int, tuple], str] = {}
        for name, tensor in _state(module).items():
            key = (tensor.data_ptr(), tensor.storage_offset(), tuple(tensor.shape)) if tensor.numel() else (id(tensor),)
            if key in first_name:
                self.aliases[name] = first_name[key]
                continue
            first_name[key] = name
            self.slots.append(self._place(name, tensor, open_bucket))
        self.index = {slot.name: i for i, slot in enumerate(self.slots)}

    def _place(self, name: str, tensor: torch.Tensor, open_bucket: dict) -> Slot:
        """A slot for ``tensor`` at the end of the open bucket of its dtype, or in a new bucket."""
        key = (tensor.dtype, tensor.device)
        align = ALIGN_BYTES // tensor.dtype.itemsize
        size = -(-tensor.numel() // align) * align
        b = open_bucket.get(key)
        if b is None or (self.buckets[b].numel + size) * tensor.dtype.itemsize > self.bucket_bytes:
            b = open_bucket[key] = len(self.buckets)
            self.buckets.append(BucketSpec(tensor.dtype, tensor.device, 0))
        spec = self.buckets[b]
        self.buckets[b] = BucketSpec(spec.dtype, spec.device, spec.numel + size)
        return Slot(name, b, spec.numel, tuple(tensor.shape))

    @property
    def nbytes(self) -> int:
        """Total bytes of all buckets (padding included)."""
        return sum(b.nbytes for b in self.buckets)

    def allocate(self, device: torch.device | str | None = None) -> list[torch.Tensor]:
        """Zero-filled bucket buffers (on each bucket's device, or ``device``), allocated once per plan."""
        return [torch.zeros(b.numel, dtype=b.dtype, device=device if device is not None else b.device)
                for b in self.buckets]

    def check_buffers(self, buffers: list[torch.Tensor]) -> None:
        """Raise unless ``buffers`` match the plan's buckets in number, dtype and length."""
        if len(buffers) != len(self.buckets):
            raise ValueError(f"buffers: expected {len(self.buckets)} buckets, got {len(buffers)}")
        for i, (buf, spec) in enumerate(zip(buffers, self.buckets)):
            if buf.dtype != spec.dtype or buf.shape != (spec.numel,):
                raise ValueError(f"buffers[{i}]: expected a flat {spec.dtype} tensor of {spec.numel} elements, "
                                 f"got {buf.dtype} of shape {tuple(buf.shape)}")

    def pack(self, module: nn.Module | Mapping[str, torch.Tensor], buffers: list[torch.Tensor]) -> None:
        """Copy ``module``'s tensors into their slots: one memcpy per tensor, no allocation."""
        state = _state(module)
        with torch.no_grad():
            for slot, view in zip(self.slots, self._slot_views(buffers)):
                view.copy_(state[slot.name])

    def views(self, buffers: list[torch.Tensor]) -> BucketedWeights:
        """The named views into ``buffers`` an engine loads from (see :class:`BucketedWeights`)."""
        return BucketedWeights(self, buffers)

    def bind(self, module: nn.Module, buffers: list[torch.Tensor]) -> nn.Module:
        """Make ``module``'s tensors (same names as the plan's) views into ``buffers``, so packing updates it."""
        state = module.state_dict(keep_vars=True)
        with torch.no_grad():
            for slot, view in zip(self.slots, self._slot_views(buffers)):
                view.copy_(state[slot.name])
                state[slot.name].data = view
        return module

    def _slot_views(self, buffers: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        for slot in self.slots:
            yield buffers[slot.bucket][slot.offset:slot.offset + slot.numel].view(slot.shape)


class BucketedWeights:
    """``(name, view)`` pairs over packed bucket buffers; engines that know buckets use ``plan``/``buffers``.

    It satisfies ``RolloutEngine.sync_weights``'s ``weights`` argument (an iterable of pairs,
    re-iterable) and carries the plan and the flat buffers for engines that ship whole buckets
    (SGLang's ``flattened_bucket`` format, CUDA IPC, shared memory).
    """

    def __init__(self, plan: SyncPlan, buffers: list[torch.Tensor]) -> None:
        plan.check_buffers(buffers)
        self.plan, self.buffers = plan, buffers

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        return zip((s.name for s in self.plan.slots), self.plan._slot_views(self.buffers))

    def __len__(self) -> int:
        return len(self.plan.slots)


def _state(source) -> Mapping[str, torch.Tensor]:
    if isinstance(source, nn.Module):
        return source.state_dict(keep_vars=True)
    if isinstance(source, Mapping):
        return source
    raise TypeError(f"module: expected an nn.Module or a name -> tensor mapping, got {type(source).__name__}")


def fingerprint(buffer: torch.Tensor) -> int:
    """Wrapping int64 sum of ``buffer``'s bytes read as int64 words (a flat bucket, length a multiple of 8 bytes)."""
    words = buffer.detach().view(torch.uint8).view(torch.int64)
    return int(words.sum())


def fingerprints(buffers: list[torch.Tensor]) -> list[int]:
    """One :func:`fingerprint` per bucket."""
    return [fingerprint(b) for b in buffers]


def compare_fingerprints(version: int, sent: list[int], received: list[int], *, side: str = "consumer") -> None:
    """Raise naming the first bucket whose fingerprint the ``side`` saw differs from what was sent."""
    if len(sent) != len(received):
        raise RuntimeError(f"weight sync v{version}: {side} reported {len(received)} fingerprints, "
                           f"expected {len(sent)} (one per bucket)")
    for i, (a, b) in enumerate(zip(sent, received)):
        if a != b:
            raise RuntimeError(f"weight sync v{version}: bucket {i}: {side} fingerprint {b:#x} != "
                               f"producer fingerprint {a:#x} (the bytes changed in transit)")


def named_tensors(weights) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs from a Mapping or an iterable of pairs (the ``sync_weights`` argument)."""
    return iter(weights.items()) if hasattr(weights, "items") else iter(weights)
