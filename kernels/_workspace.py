"""Scratch buffers of the PyTorch path kept between calls, so a call does not page-fault its logits tiles in anew.

PyTorch's CPU allocator returns large blocks to the OS on free, so every fresh ``torch.empty`` of a tile buffer
(tens of MiB) is zero-filled page by page by the kernel on first touch: measured on the 2-core bench machine,
allocating and touching 65 MiB costs 21 ms against 5 ms for touching held memory — 7% of a GRPO call at
512 tokens, D = 512, V = 32000. ``workspace(elements, device)`` lends one flat buffer per (thread, device,
dtype); while it is lent, a nested request gets a fresh one, and on return the larger of the two is kept. Buffers
above ``HOTLOOP_WORKSPACE_BYTES`` (default 256 MiB) are not kept. CUDA tensors go to PyTorch's caching allocator
(it already keeps blocks), as do CPU calls with ``HOTLOOP_WORKSPACE_BYTES=0``.

Memory: a thread that ran a fused loss holds its largest tile buffer until :func:`release_workspace` (each
benchmark's memory column counts it: the bench releases it before the call it measures).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

DEFAULT_KEEP_BYTES = 256 << 20
_local = threading.local()


def keep_bytes() -> int:
    """Largest buffer kept between calls: ``HOTLOOP_WORKSPACE_BYTES`` or ``DEFAULT_KEEP_BYTES``."""
    return int(os.environ.get("HOTLOOP_WORKSPACE_BYTES", DEFAULT_KEEP_BYTES))


def _pool() -> dict:
    if not hasattr(_local, "pool"):
        _local.pool = {}
    return _local.pool


@contextmanager
def workspace(elements: int, device: torch.device, dtype: torch.dtype = torch.float32) -> Iterator[Tensor]:
    """A flat ``[>= elements]`` buffer of ``dtype`` on ``device`` (uninitialized), lent for the ``with`` block."""
    device = torch.device(device)
    if device.type == "cuda" or elements * dtype.itemsize > keep_bytes():
        yield torch.empty(elements, device=device, dtype=dtype)
        return
    pool = _pool()
    key = (device, dtype)
    buf = pool.pop(key, None)
    if buf is None or buf.numel() < elements:
        buf = None  # drop a too-small held buffer before allocating, so the two never coexist
        buf = torch.empty(elements, device=device, dtype=dtype)
    try:
        yield buf
    finally:
        kept = pool.get(key)  # a nested call may have returned one meanwhile
        pool[key] = buf if kept is None or buf.numel() >= kept.numel() else kept


def release_workspace() -> None:
    """Free every buffer the calling thread keeps (its next fused call allocates afresh)."""
    _pool().clear()


def held_bytes() -> int:
    """Bytes the calling thread keeps between calls."""
    return sum(b.numel() * b.element_size() for b in _pool().values())
