"""One-pass Triton kernel for the masked KL penalty (``kl_penalty``): row sums and d KL / d logp together.

With ``r = ref − logp`` (formulas in :mod:`.kl_penalty`) the estimators and their derivatives are elementwise:

    k1 = −r             d/dlogp = 1
    k2 = r² / 2         d/dlogp = −r
    k3 = e^r − r − 1    d/dlogp = 1 − e^r

One program per row ``b`` walks ``T`` in ``BLOCK_T`` chunks, writes ``m · d k / d logp`` into ``grad [B, T]`` and
reduces ``Σ_t m·k`` and ``Σ_t m``; the mean over masked tokens and the backward's ``grad · upstream / n`` are a few
``[B]`` torch ops. Masked tokens are never loaded, so non-finite padding cannot leak NaN. Inputs of any float
dtype are read as float32. Memory: reads 3 ``[B, T]`` arrays, writes one float32 ``[B, T]``.
:func:`kl_term` is shared with the GRPO kernel (``_grpo_triton``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._triton_rows import block_t, load_row_chunk, mask_operand, num_warps

KL_CODES = {"k1": 1, "k2": 2, "k3": 3}


@triton.jit
def kl_term(lp, ref, KL_EST: tl.constexpr):
    """(k, d k / d logp) of estimator ``KL_EST`` (1, 2, 3 = k1, k2, k3) per element."""
    d = ref - lp
    if KL_EST == 1:
        kl = -d
        dkl = tl.zeros_like(d) + 1.0
    elif KL_EST == 2:
        kl = 0.5 * d * d
        dkl = -d
    else:
        e = tl.exp(d)
        kl = e - d - 1.0
        dkl = 1.0 - e
    return kl, dkl


@triton.jit
def _kl_penalty_kernel(
    Logp,  # [B, T] float
    Ref,  # [B, T] float
    Mask,  # [B, T] 0/1 (bool passed as uint8)
    Grad,  # [B, T] f32 out: m · d k / d logp
    RowStats,  # [B, 2] f32 out: Σ m·k, Σ m
    T,
    KL_EST: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kl_acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    m_acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    for start in range(0, T, BLOCK_T):
        offs, inb, m, live, lp = load_row_chunk(Mask, Logp, b, start, T, BLOCK_T)
        ref = tl.load(Ref + offs, mask=live, other=0.0).to(tl.float32)
        kl, dkl = kl_term(lp, ref, KL_EST)
        tl.store(Grad + offs, tl.where(live, dkl * m, 0.0), mask=inb)
        kl_acc += tl.where(live, kl * m, 0.0)
        m_acc += m
    tl.store(RowStats + b * 2 + 0, tl.sum(kl_acc, axis=0))
    tl.store(RowStats + b * 2 + 1, tl.sum(m_acc, axis=0))


def kl_penalty_fwd(logp: Tensor, ref: Tensor, mask: Tensor, kl_estimator: str) -> tuple[Tensor, Tensor]:
    """Launch the kernel; returns ``(row_stats [B, 2], grad [B, T])`` in float32."""
    lp = logp.detach().contiguous()
    b, t = lp.shape
    grad = torch.empty(b, t, device=lp.device, dtype=torch.float32)
    row_stats = torch.empty(b, 2, device=lp.device, dtype=torch.float32)
    bt = block_t(t, lp.device)
    _kl_penalty_kernel[(b,)](
        lp,
        ref.detach().contiguous(),
        mask_operand(mask),
        grad,
        row_stats,
        t,
        KL_EST=KL_CODES[kl_estimator],
        BLOCK_T=bt,
        num_warps=num_warps(bt),
    )
    return row_stats, grad


class KLPenaltyFunction(torch.autograd.Function):
    """Masked mean of the estimator from the one-pass kernel; backward scales the saved ``m · d k / d logp``."""

    @staticmethod
    def forward(ctx, logp: Tensor, ref: Tensor, mask: Tensor, kl_estimator: str) -> Tensor:
        row_stats, grad = kl_penalty_fwd(logp, ref, mask, kl_estimator)
        sums = row_stats.sum(0)
        n = sums[1].clamp_min(1.0)
        ctx.save_for_backward(grad, n)
        ctx.logp_dtype = logp.dtype
        return sums[0] / n

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad, n = ctx.saved_tensors
        return (grad * (grad_out / n)).to(ctx.logp_dtype), None, None, None
