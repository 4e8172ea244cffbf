"""Per-sequence sums over a packed batch: ``out[b] = Σ values[cu_seqlens[b] : cu_seqlens[b+1]]``.

Packed layout (``[N]`` tokens of ``B`` sequences back to back, boundaries ``cu_seqlens [B + 1]``) as in
FlashAttention's varlen API. The segment id of each token comes from ``searchsorted`` (no host sync, no
Python loop), then one ``index_add`` accumulates in float32 (or float64 for float64 input); the result is
cast back to ``values``' dtype. Differentiable in ``values``. Empty segments give 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_tensor


def segment_ids(cu_seqlens: Tensor, n: int) -> Tensor:
    """``[n]`` int64 segment index of each packed token (tokens past ``cu_seqlens[-1]`` get ``B``)."""
    positions = torch.arange(n, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), positions, right=True)


def segment_sum(values: Tensor, cu_seqlens: Tensor) -> Tensor:
    """Sum of ``values`` within each packed segment.

    Args:
        values: ``[N]`` floats.
        cu_seqlens: ``[B + 1]`` int32/int64, non-decreasing, ``cu_seqlens[0] = 0``, ``cu_seqlens[-1] <= N``.

    Returns:
        ``[B]`` in ``values``' dtype.
    """
    check_tensor("values", values, ndim=1)
    check_tensor("cu_seqlens", cu_seqlens, ndim=1)
    if cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be int32/int64 [B + 1], got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
    b = cu_seqlens.numel() - 1
    acc = torch.float64 if values.dtype == torch.float64 else torch.float32
    ids = segment_ids(cu_seqlens, values.numel())
    # One extra bucket swallows tokens after the last boundary (trailing padding).
    out = torch.zeros(b + 1, device=values.device, dtype=acc).index_add(0, ids, values.to(acc))
    return out[:b].to(values.dtype)


def reference_segment_sum(values: Tensor, cu_seqlens: Tensor) -> Tensor:
    """Float64 reference: one slice per segment."""
    cu = cu_seqlens.tolist()
    return torch.stack([values.double()[cu[i] : cu[i + 1]].sum() for i in range(len(cu) - 1)])
