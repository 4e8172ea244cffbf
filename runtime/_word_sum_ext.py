"""Word sums for weight-sync fingerprints: csrc/word_sum.cpp (``hotloop.runtime._word_sum``) or PyTorch.

``word_sum(buffer)`` is the wrapping int64 sum of a buffer's bytes read as 8-byte words (the
fingerprint of ``hotloop.runtime.weight_sync``), native for CPU tensors and ``torch.sum``
otherwise. ``native()`` hands ``SyncPlan``'s pack the extension itself, whose ``copy_sum`` copies
and sums in one pass; it is None when the extension was not built or ``HOTLOOP_NATIVE=0``, and the
pack then copies with ``copy_`` and sums each piece with ``torch.sum`` (the same fingerprint).
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch

_WRAP = 1 << 64


def wrap_int64(total: int) -> int:
    """``total`` modulo 2**64 as a signed int64 (what ``torch.sum`` of int64 words returns)."""
    total %= _WRAP
    return total - _WRAP if total >= 1 << 63 else total


@functools.cache
def _module() -> ModuleType | None:
    try:
        return importlib.import_module("hotloop.runtime._word_sum")
    except ImportError:
        return None


def native() -> ModuleType | None:
    """The compiled extension, or None (not built, or ``HOTLOOP_NATIVE=0``)."""
    if os.environ.get("HOTLOOP_NATIVE", "1").strip() == "0":
        return None
    return _module()


def word_sum(buffer: torch.Tensor) -> int:
    """Wrapping int64 sum of contiguous ``buffer``'s bytes as int64 words (over ``torch.get_num_threads()`` threads).

    Raises ``ValueError`` unless ``buffer`` is contiguous and its byte length a multiple of 8.
    """
    if not buffer.is_contiguous() or buffer.numel() * buffer.element_size() % 8:
        raise ValueError(
            f"buffer: expected a contiguous tensor of a multiple of 8 bytes, got {buffer.dtype} "
            f"of shape {tuple(buffer.shape)} (contiguous={buffer.is_contiguous()})"
        )
    module, nbytes = native(), buffer.numel() * buffer.element_size()
    if module is not None and buffer.device.type == "cpu" and buffer.data_ptr() % 8 == 0:
        return module.word_sum(buffer.data_ptr(), nbytes // 8, torch.get_num_threads())
    return int(buffer.detach().reshape(-1).view(torch.uint8).view(torch.int64).sum())
