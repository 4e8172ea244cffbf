"""One-pass Triton kernel for the losses linear in logp: REINFORCE / RLOO (``policy_gradient_loss``) and
(reward-weighted) SFT (``sft_loss``), ``loss = Σ_b c_b Σ_t m·(−A_bt·logp_bt)``.

``A`` is the advantage (per sequence ``[B]`` or per token ``[B, T]``), the SFT weight ``w_b``, or 1 (plain SFT);
``c_b`` is the reduction: ``1/max(Σ m, 1)`` (``normalize="token"``) or ``1/(B·max(|y_b|, 1))`` (``"sequence"``).
The derivative ``−m·A`` is written in the same pass. One program per row ``b`` walks ``T`` in ``BLOCK_T`` chunks,
writes ``−m·A`` into ``grad [B, T]`` and reduces ``Σ m·A·logp``, ``Σ m``, ``Σ m·logp`` and ``Σ m·A`` (the last
two feed the metrics); ``c_b`` and the backward's ``grad · c_b · upstream`` are ``[B]`` torch ops. Masked tokens are
never loaded. Any float input dtype is read as float32. Memory: reads 2–3 ``[B, T]`` arrays, writes one float32
``[B, T]``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._triton_rows import block_t, load_row_chunk, mask_operand, num_warps

_STATS = 4  # Σ m·A·logp, Σ m, Σ m·logp, Σ m·A


@triton.jit
def _linear_token_kernel(
    Logp,  # [B, T] float
    Coef,  # [B] (COEF == 1) or [B, T] (COEF == 2) float; unused when COEF == 0 (A = 1)
    Mask,  # [B, T] 0/1 (bool passed as uint8)
    Grad,  # [B, T] f32 out: −m·A
    RowStats,  # [B, 4] f32 out: Σ m·A·logp, Σ m, Σ m·logp, Σ m·A
    T,
    COEF: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    row_coef = 1.0
    if COEF == 1:
        row_coef = tl.load(Coef + b).to(tl.float32)
    loss_acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    m_acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    lp_acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    coef_acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    for start in range(0, T, BLOCK_T):
        offs, inb, m, live, lp = load_row_chunk(Mask, Logp, b, start, T, BLOCK_T)
        a = tl.zeros([BLOCK_T], dtype=tl.float32) + row_coef
        if COEF == 2:
            a = tl.load(Coef + offs, mask=live, other=0.0).to(tl.float32)
        tl.store(Grad + offs, tl.where(live, -a * m, 0.0), mask=inb)
        loss_acc += tl.where(live, a * lp * m, 0.0)
        m_acc += m
        lp_acc += tl.where(live, lp * m, 0.0)
        coef_acc += tl.where(live, a * m, 0.0)
    row = RowStats + b * 4
    tl.store(row + 0, tl.sum(loss_acc, axis=0))
    tl.store(row + 1, tl.sum(m_acc, axis=0))
    tl.store(row + 2, tl.sum(lp_acc, axis=0))
    tl.store(row + 3, tl.sum(coef_acc, axis=0))


def linear_token_fwd(logp: Tensor, coef: Tensor | None, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Launch the kernel (``coef``: ``[B]``, ``[B, T]`` or None); returns fp32 ``(row_stats [B, 4], grad [B, T])``."""
    lp = logp.detach().contiguous()
    b, t = lp.shape
    grad = torch.empty(b, t, device=lp.device, dtype=torch.float32)
    row_stats = torch.empty(b, _STATS, device=lp.device, dtype=torch.float32)
    bt = block_t(t, lp.device)
    code = 0 if coef is None else coef.dim()
    _linear_token_kernel[(b,)](
        lp,
        lp if coef is None else coef.detach().contiguous(),
        mask_operand(mask),
        grad,
        row_stats,
        t,
        COEF=code,
        BLOCK_T=bt,
        num_warps=num_warps(bt),
    )
    return row_stats, grad


class LinearTokenLossFunction(torch.autograd.Function):
    """``Σ_b c_b Σ_t m·(−A·logp)`` and the row sums ``[B, 4]`` from the one-pass kernel.

    ``normalize``: "token" or "sequence" (``c_b`` of the module docstring). Backward: ``−m·A · c_b · upstream``.
    """

    @staticmethod
    def forward(ctx, logp: Tensor, coef: Tensor | None, mask: Tensor, normalize: str):
        row_stats, grad = linear_token_fwd(logp, coef, mask)
        counts = row_stats[:, 1]
        if normalize == "token":
            scale = (1.0 / counts.sum().clamp_min(1.0)).expand(counts.shape[0])
        else:
            scale = 1.0 / (counts.clamp_min(1.0) * counts.shape[0])
        ctx.save_for_backward(grad, scale)
        ctx.logp_dtype = logp.dtype
        ctx.mark_non_differentiable(row_stats)
        return -torch.linalg.vecdot(scale, row_stats[:, 0]), row_stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        grad, scale = ctx.saved_tensors
        return (grad * (scale * grad_loss).unsqueeze(1)).to(ctx.logp_dtype), None, None, None
