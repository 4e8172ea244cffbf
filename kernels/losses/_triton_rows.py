"""Launch helpers shared by the per-row token-loss kernels (``_grpo_triton``, ``_kl_penalty_triton``,
``_policy_gradient_triton``): one program per ``[B, T]`` row, walking ``T`` in ``BLOCK_T`` chunks.

Chosen at call time from the device: the interpreter pays per block op, so small blocks there; on the GPU a row of
up to 4096 tokens per block (one pass, no loop, for typical completion lengths).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._dispatch import triton_interpreting


def block_t(t: int, device: torch.device) -> int:
    """``BLOCK_T`` for rows of ``t`` tokens: a power of two in [16, 64] under the interpreter, [16, 4096] on CUDA."""
    cap = 64 if (triton_interpreting() and device.type != "cuda") else 4096
    return min(cap, max(16, triton.next_power_of_2(t)))


def num_warps(block: int) -> int:
    """Warps per program for a ``BLOCK_T`` of ``block`` elements."""
    return 4 if block <= 1024 else 8


def mask_operand(mask: Tensor) -> Tensor:
    """``mask`` as a contiguous kernel operand (bool reinterpreted as uint8, no copy)."""
    mask = mask.contiguous()
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


@triton.jit
def load_row_chunk(Mask, Logp, b, start, T, BLOCK_T: tl.constexpr):
    """Columns ``start .. start + BLOCK_T`` of row ``b`` of ``[B, T]`` operands.

    Returns (offs, inb, m, live, lp): flat offsets, in-bounds flags, the mask as fp32, ``m != 0``, and
    the log-probs as fp32 (0 where not live, so padding NaN never enters).
    """
    cols = start + tl.arange(0, BLOCK_T)
    inb = cols < T
    offs = b * T + cols
    m = tl.load(Mask + offs, mask=inb, other=0).to(tl.float32)
    live = m != 0.0
    lp = tl.load(Logp + offs, mask=live, other=0.0).to(tl.float32)
    return offs, inb, m, live, lp
