"""Packed batches: per-sequence sums, and the padded view the per-token losses take.

Packed layout (``[N]`` tokens of ``B`` sequences back to back, boundaries ``cu_seqlens [B + 1]``) as in
FlashAttention's varlen API; tokens past ``cu_seqlens[-1]`` belong to no sequence.

- :func:`segment_sum`: ``out[b] = Σ values[cu_seqlens[b] : cu_seqlens[b+1]]``. The segment id of each token comes
  from ``searchsorted`` (no host sync, no Python loop), then one ``index_add`` accumulates in float32 (or float64
  for float64 input); the result is cast back to ``values``' dtype. Differentiable in ``values``. Empty segments
  give 0.
- :func:`unpack`: packed ``[N]`` per-token tensors → padded ``[B, T]`` (T the longest sequence, 0 at padding),
  differentiable; ``grpo_loss``, ``sft_loss``, ``policy_gradient_loss`` and ``kl_penalty`` use it for ``cu_seqlens``.
  It checks ``cu_seqlens`` on the host (one sync: T and the boundaries).
"""

from __future__ import annotations

import torch
from torch import Tensor

from hotloop._errors import expected

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
        raise ValueError(expected("cu_seqlens", "int32/int64 [B + 1]", f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}"))
    b = cu_seqlens.numel() - 1
    acc = torch.float64 if values.dtype == torch.float64 else torch.float32
    ids = segment_ids(cu_seqlens, values.numel())
    # One extra bucket swallows tokens after the last boundary (trailing padding).
    out = torch.zeros(b + 1, device=values.device, dtype=acc).index_add(0, ids, values.to(acc))
    return out[:b].to(values.dtype)


def check_cu_seqlens(cu_seqlens: Tensor, n: int) -> list[int]:
    """``cu_seqlens`` as a host list, after checking it: int32/int64 ``[B + 1]``, B ≥ 1, from 0, non-decreasing, ≤ n."""
    check_tensor("cu_seqlens", cu_seqlens, ndim=1)
    if cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.numel() < 2:
        seen = f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}"
        raise ValueError(expected("cu_seqlens", "int32/int64 [B + 1] with B >= 1", seen))
    cu = cu_seqlens.tolist()
    if cu[0] != 0 or cu[-1] > n or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(expected("cu_seqlens", f"boundaries from 0, non-decreasing, ending <= N={n}", cu))
    return cu


def unpack(cu_seqlens: Tensor, names: tuple[str, ...], *values: Tensor | None) -> list[Tensor | None]:
    """Packed per-token tensors → padded ``[B, T]`` ones (T: the longest sequence; 0 at padding; differentiable).

    Args:
        cu_seqlens: ``[B + 1]`` int32/int64 boundaries.  names: the argument name of each value (for errors).
        values: ``[N]`` tensors (all the same N) or None.

    Returns:
        The values in order, each ``[B, T]`` in its own dtype (None stays None).
    """
    n = next(v.numel() for v in values if v is not None)
    for name, v in zip(names, values):
        if v is not None:
            check_tensor(name, v, (n,))
    cu = check_cu_seqlens(cu_seqlens, n)
    b = len(cu) - 1
    t = max(hi - lo for lo, hi in zip(cu, cu[1:]))
    device = next(v.device for v in values if v is not None)
    starts = torch.tensor(cu, device=device)
    ids = segment_ids(starts, cu[-1])
    idx = (ids, torch.arange(cu[-1], device=device) - starts[ids])
    return [None if v is None else v.new_zeros(b, t).index_put(idx, v[: cu[-1]]) for v in values]


def reference_segment_sum(values: Tensor, cu_seqlens: Tensor) -> Tensor:
    """Float64 reference: one slice per segment."""
    cu = cu_seqlens.tolist()
    return torch.stack([values.double()[cu[i] : cu[i + 1]].sum() for i in range(len(cu) - 1)])


def reference_unpack(values: Tensor, cu_seqlens: Tensor) -> Tensor:
    """Reference for :func:`unpack`: one slice per segment, right-padded with zeros to the longest."""
    cu = cu_seqlens.tolist()
    t = max(hi - lo for lo, hi in zip(cu, cu[1:]))
    return torch.stack([torch.nn.functional.pad(values[lo:hi], (0, t - (hi - lo))) for lo, hi in zip(cu, cu[1:])])
