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
words, computed by the producer while packing and by the consumer on what it received. Any change
of one word (a flipped bit, a corrupted byte, a truncated copy) changes it; it does not see two
words swapped, which the log-probe of ``hotloop.runtime.sync_policy`` does. The producer takes it
during the pack (``pack_fingerprinted``: csrc/word_sum.cpp sums every word as it stores it; without
the extension each piece is summed by ``torch.sum`` right after its copy, from cache), so a sync
reads the weights from memory once more only on the consumer's side (measured in
``bench/weight_sync.py`` next to the memcpy floor).
"""

from __future__ import annotations

import functools
import itertools
import math
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from hotloop.runtime import _word_sum_ext

ALIGN_BYTES = 64
"""Every slot starts at a multiple of this many bytes (and every bucket's length is one)."""
FUSED_CHUNK_BYTES = 4 << 20
"""Piece size of :meth:`SyncPlan.pack_fingerprinted`: copied, then summed while it is still in the last-level cache
(32 MiB on the 2-core bench machine; 1 MiB pieces measured slower there, per-piece overhead outweighing L2 hits)."""


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
        state = _state(module)
        self.aliases = tensor_aliases(state)
        open_bucket: dict[tuple[torch.dtype, torch.device], int] = {}
        for name, tensor in state.items():
            if name not in self.aliases:
                self.slots.append(self._place(name, tensor, open_bucket))
        self.index = {slot.name: i for i, slot in enumerate(self.slots)}
        self._pieces = _plan_pieces(self.slots, self.buckets)
        self._group_cache: dict[int, list[list[_Piece]]] = {}

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
        return [
            torch.zeros(b.numel, dtype=b.dtype, device=device if device is not None else b.device) for b in self.buckets
        ]

    def check_buffers(self, buffers: list[torch.Tensor]) -> None:
        """Raise unless ``buffers`` match the plan's buckets in number, dtype and length."""
        if len(buffers) != len(self.buckets):
            raise ValueError(f"buffers: expected {len(self.buckets)} buckets, got {len(buffers)}")
        for i, (buf, spec) in enumerate(zip(buffers, self.buckets)):
            if buf.dtype != spec.dtype or buf.shape != (spec.numel,):
                raise ValueError(
                    f"buffers[{i}]: expected a flat {spec.dtype} tensor of {spec.numel} elements, "
                    f"got {buf.dtype} of shape {tuple(buf.shape)}"
                )

    def pack(self, module: nn.Module | Mapping[str, torch.Tensor], buffers: list[torch.Tensor]) -> None:
        """Copy ``module``'s tensors into their slots: a memcpy per tensor (per piece of a large one), no allocation."""
        self._copy(module, buffers, summed=False)

    def pack_fingerprinted(
        self, module: nn.Module | Mapping[str, torch.Tensor], buffers: list[torch.Tensor]
    ) -> list[int]:
        """:meth:`pack`, returning every bucket's :func:`fingerprint`, summed while the copied bytes are in cache.

        On CPU buckets with the native extension every word is summed in a register as it is copied: 1B fp32
        parameters on the 2-core machine took 476-482 ms against 493-527 ms for ``pack``. Otherwise each piece of
        at most ``FUSED_CHUNK_BYTES`` is summed by ``torch.sum`` right after its copy, while it is in cache (the
        same value; +35-55% over ``pack`` there).
        """
        return self._copy(module, buffers, summed=True)

    def _copy(self, module, buffers: list[torch.Tensor], *, summed: bool) -> list[int] | None:
        """Copy (and sum) every piece, split over ``torch.get_num_threads()`` threads for CPU buckets.

        Why threads: a copy per tensor is one OpenMP region each, and on a loaded machine every region waits
        for a descheduled sibling thread (seen: 1906 tensors took 8-16x the memcpy floor at load 7). Threads
        running single-threaded copies of disjoint slots wait for each other once, at the end.
        """
        state = _state(module)
        self.check_buffers(buffers)
        cpu = all(b.device.type == "cpu" for b in buffers)
        groups = self._groups(torch.get_num_threads() if cpu else 1)
        native = _word_sum_ext.native() if summed and cpu else None
        words = [b.detach().view(torch.uint8).view(torch.int64) for b in buffers] if summed and native is None else None
        parts: list[list[tuple[int, int]]] = [[] for _ in groups]
        run = [
            functools.partial(self._copy_group, group, state, buffers, words, native, out, len(groups) > 1)
            for group, out in zip(groups, parts)
        ]
        _run_all(run)
        if not summed:
            return None
        totals = [0] * len(buffers)
        for bucket, part in itertools.chain.from_iterable(parts):
            totals[bucket] += part
        return [_word_sum_ext.wrap_int64(t) for t in totals]

    def _copy_group(self, group: list[_Piece], state, buffers, words, native, out: list, single_threaded: bool) -> None:
        if single_threaded:
            torch.set_num_threads(1)  # this worker thread's own OpenMP setting; the caller's stays as it was
        with torch.no_grad():
            for piece in group:
                if native is not None:
                    out.append((piece.bucket, self._copy_summed_native(piece, state, buffers[piece.bucket], native)))
                    continue
                for index, lo, hi in piece.copies:
                    self._copy_part(index, lo, hi, state, buffers[piece.bucket])
                if words is not None:
                    out.append((piece.bucket, int(words[piece.bucket][piece.start // 8 : piece.end // 8].sum())))

    def _copy_summed_native(self, piece: _Piece, state, bucket: torch.Tensor, native) -> int:
        """One piece copied and summed by csrc/word_sum.cpp: each word summed as it is stored, then the padding."""
        base, size = bucket.data_ptr(), bucket.element_size()
        total = 0
        for index, lo, hi in piece.copies:
            slot, source = self.slots[index], state[self.slots[index].name]
            start, nbytes = (slot.offset + lo) * size, (hi - lo) * size
            if source.is_contiguous() and source.dtype == bucket.dtype and source.device.type == "cpu":
                total += native.copy_sum(base + start, source.data_ptr() + lo * size, nbytes)
                continue
            self._copy_part(index, lo, hi, state, bucket)
            total += native.word_sum(base + start, -(-nbytes // 8), 1)
        for start, end in piece.padding:
            total += native.word_sum(base + start, (end - start) // 8, 1)
        return total

    def _copy_part(self, index: int, lo: int, hi: int, state, bucket: torch.Tensor) -> None:
        """Elements ``[lo, hi)`` of slot ``index``'s tensor into its bucket with ``copy_`` (dtype and device cast)."""
        slot, source = self.slots[index], state[self.slots[index].name]
        flat = bucket[slot.offset : slot.offset + slot.numel]
        if source.is_contiguous():
            flat[lo:hi].copy_(source.view(-1)[lo:hi])
        elif lo == 0:  # a strided source is copied whole, by the piece holding its start
            flat.view(slot.shape).copy_(source)

    def _groups(self, n: int) -> list[list[_Piece]]:
        """The pieces cut into at most ``n`` runs of about equal bytes, each cut at a slot's start."""
        if n not in self._group_cache:
            self._group_cache[n] = _split_runs(self._pieces, n)
        return self._group_cache[n]

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
            yield buffers[slot.bucket][slot.offset : slot.offset + slot.numel].view(slot.shape)


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


@dataclass(frozen=True)
class _Piece:
    """Copies filling bytes ``[start, end)`` of one bucket (the padding after them included), summed together."""

    bucket: int
    start: int
    end: int
    copies: tuple[tuple[int, int, int], ...]
    """(slot index, first element, end element) of each copy."""
    padding: tuple[tuple[int, int], ...]
    """Byte ranges of ``[start, end)`` that no copy's words cover (slot padding past each last word)."""


def _plan_pieces(slots: list[Slot], buckets: list[BucketSpec]) -> list[_Piece]:
    """Pieces that tile every bucket: large tensors cut at ``FUSED_CHUNK_BYTES``, small neighbours merged."""
    pieces: list[_Piece] = []
    for b, spec in enumerate(buckets):
        members = [(i, s) for i, s in enumerate(slots) if s.bucket == b]
        ends = [s.offset * spec.dtype.itemsize for _, s in members[1:]] + [spec.nbytes]
        step = FUSED_CHUNK_BYTES // spec.dtype.itemsize
        start, copies = 0, []
        for (i, slot), slot_end in zip(members, ends):
            for lo in range(0, max(slot.numel, 1), step):
                hi = min(lo + step, slot.numel)
                copies.append((i, lo, hi))
                end = slot_end if hi == slot.numel else (slot.offset + hi) * spec.dtype.itemsize
                if end - start >= FUSED_CHUNK_BYTES // 2 or end == spec.nbytes:
                    pieces.append(_Piece(b, start, end, tuple(copies), _padding(slots, copies, start, end, spec)))
                    start, copies = end, []
    return pieces


def _padding(slots: list[Slot], copies: list, start: int, end: int, spec: BucketSpec) -> tuple[tuple[int, int], ...]:
    """The byte ranges of ``[start, end)`` outside every copy's words (each copy rounded up to whole words)."""
    gaps, at = [], start
    for index, lo, hi in copies:
        first, last = (slots[index].offset + lo) * spec.dtype.itemsize, (slots[index].offset + hi) * spec.dtype.itemsize
        if first > at:
            gaps.append((at, first))
        at = max(at, -(-last // 8) * 8)
    if end > at:
        gaps.append((at, end))
    return tuple(gaps)


def _split_runs(pieces: list[_Piece], n: int) -> list[list[_Piece]]:
    """``pieces`` in at most ``n`` consecutive runs of about equal bytes, cut only where a piece starts a slot."""
    total = sum(p.end - p.start for p in pieces)
    runs, done = [[]], 0
    for piece in pieces:
        starts_slot = piece.copies[0][1] == 0
        if starts_slot and runs[-1] and len(runs) < n and done >= total * len(runs) / n:
            runs.append([])
        runs[-1].append(piece)
        done += piece.end - piece.start
    return runs


def _run_all(calls: list[Callable[[], None]]) -> None:
    """Run one call here, or several each in a thread of its own (this thread's settings untouched); re-raise."""
    if len(calls) == 1:
        calls[0]()
        return
    errors: list[Exception] = []

    def guarded(call):
        try:
            call()
        except Exception as error:  # noqa: BLE001 - re-raised in the caller's thread below
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(call,), daemon=True) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def tensor_aliases(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Names whose tensor is the same memory as an earlier name's (a tied head) → that earlier name."""
    first_name: dict[tuple, str] = {}
    aliases = {}
    for name, tensor in state.items():
        key = (tensor.data_ptr(), tensor.storage_offset(), tuple(tensor.shape)) if tensor.numel() else (id(tensor),)
        source = first_name.setdefault(key, name)
        if source != name:
            aliases[name] = source
    return aliases


def _state(source) -> Mapping[str, torch.Tensor]:
    if isinstance(source, nn.Module):
        return source.state_dict(keep_vars=True)
    if isinstance(source, Mapping):
        return source
    raise TypeError(f"module: expected an nn.Module or a name -> tensor mapping, got {type(source).__name__}")


def fingerprint(buffer: torch.Tensor) -> int:
    """Wrapping int64 sum of ``buffer``'s bytes read as int64 words (a flat bucket, length a multiple of 8 bytes)."""
    return _word_sum_ext.word_sum(buffer)


def fingerprints(buffers: list[torch.Tensor]) -> list[int]:
    """One :func:`fingerprint` per bucket."""
    return [fingerprint(b) for b in buffers]


def compare_fingerprints(version: int, sent: list[int], received: list[int], *, side: str = "consumer") -> None:
    """Raise naming the first bucket whose fingerprint the ``side`` saw differs from what was sent."""
    if len(sent) != len(received):
        raise RuntimeError(
            f"weight sync v{version}: {side} reported {len(received)} fingerprints, "
            f"expected {len(sent)} (one per bucket)"
        )
    for i, (a, b) in enumerate(zip(sent, received)):
        if a != b:
            raise RuntimeError(
                f"weight sync v{version}: bucket {i}: {side} fingerprint {b:#x} != "
                f"producer fingerprint {a:#x} (the bytes changed in transit)"
            )


def named_tensors(weights) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs from a Mapping or an iterable of pairs (the ``sync_weights`` argument)."""
    return iter(weights.items()) if hasattr(weights, "items") else iter(weights)
