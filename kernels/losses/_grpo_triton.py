"""One-pass Triton kernel for token-level clipped GRPO-family losses: loss terms and d loss/d logp together.

Per token (formulas in :mod:`.grpo`): ``w = exp(logp − old)``, policy term ``−min(min(w, δ)·A, clip(w)·A)``,
times the sampler ratio ``ρ_s``, plus ``β·KL_k(logp, ref)``; weighted by the reduction ``weights [B, T]``.
Because every term is elementwise in ``logp``, the derivative is known in the same pass:

    d/dlogp policy = −A·w·[unclipped branch active]   (ties: half of each branch, as torch.minimum)
    d/dlogp k1 = 1,   k2 = logp − ref,   k3 = 1 − exp(ref − logp)

One program per row ``b`` walks ``T`` in ``BLOCK_T`` chunks, writes ``grad [B, T]`` (already weighted) and reduces
the row's loss, clip counts and KL sum. Masked tokens are selected out (``tl.where``), so padding values that are
not finite cannot leak NaN. Memory: reads 4–6 ``[B, T]`` float32 arrays, writes one; ``O(B·T)``.

Covers loss types grpo, bnpo, dr_grpo, dapo, luspo at ``importance_sampling_level="token"`` with k1/k2/k3, δ and
the sampler correction; sequence level, cispo, sapo, vespo and the bias-corrected KL run grpo.py's torch path.
Only ``logp`` receives a gradient (old/ref log-probs, advantages, weights are constants).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._dispatch import triton_interpreting

_KL_CODE = {"k1": 1, "k2": 2, "k3": 3}


@triton.jit
def _grpo_token_kernel(
    Logp,  # [B, T] f32
    Old,  # [B, T] f32
    Ref,  # [B, T] f32 (unused unless HAS_KL)
    IsRatio,  # [B, T] f32 (unused unless HAS_IS)
    Adv,  # [B] f32
    Mask,  # [B, T] f32
    Weight,  # [B, T] f32
    Grad,  # [B, T] f32 out: weight · d per_token_loss / d logp
    RowLoss,  # [B] f32 out: Σ_t weight · per_token_loss
    RowStats,  # [B, 3] f32 out: low-clipped count, high-clipped count, Σ mask · KL
    T,
    beta,
    eps_low,
    eps_high,
    delta,
    HAS_DELTA: tl.constexpr,
    HAS_KL: tl.constexpr,
    KL_EST: tl.constexpr,
    HAS_IS: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    a = tl.zeros([BLOCK_T], dtype=tl.float32) + tl.load(Adv + b)  # broadcast: bool ops need tensors
    lo = 1.0 - eps_low
    hi = 1.0 + eps_high
    loss_acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    low_acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    high_acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    kl_acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    for start in range(0, T, BLOCK_T):
        cols = start + tl.arange(0, BLOCK_T)
        inb = cols < T
        offs = b * T + cols
        m = tl.load(Mask + offs, mask=inb, other=0.0)
        live = m != 0.0
        lp = tl.load(Logp + offs, mask=live, other=0.0)
        old = tl.load(Old + offs, mask=live, other=0.0)
        w = tl.load(Weight + offs, mask=live, other=0.0)
        coef = tl.exp(lp - old)
        c2 = tl.minimum(tl.maximum(coef, lo), hi)
        g2 = tl.where((coef >= lo) & (coef <= hi), -a * coef, 0.0)
        c1 = coef
        g1 = -a * coef
        if HAS_DELTA:
            c1 = tl.minimum(coef, delta)
            g1 = tl.where(coef <= delta, g1, 0.0)
        t1 = c1 * a
        t2 = c2 * a
        pg = -tl.minimum(t1, t2)
        g = tl.where(t1 < t2, g1, tl.where(t1 > t2, g2, 0.5 * (g1 + g2)))
        if HAS_IS:
            r = tl.load(IsRatio + offs, mask=live, other=0.0)
            pg = pg * r
            g = g * r
        if HAS_KL:
            ref = tl.load(Ref + offs, mask=live, other=0.0)
            d = ref - lp
            if KL_EST == 1:
                kl = -d
                dkl = tl.full([BLOCK_T], 1.0, tl.float32)
            elif KL_EST == 2:
                kl = 0.5 * d * d
                dkl = -d
            else:
                kl = tl.exp(d) - d - 1.0
                dkl = 1.0 - tl.exp(d)
            pg = pg + beta * kl
            g = g + beta * dkl
            kl_acc += tl.where(live, kl * m, 0.0)
        tl.store(Grad + offs, tl.where(live, g * w, 0.0), mask=inb)
        loss_acc += tl.where(live, pg * w, 0.0)
        low_acc += tl.where(live & (coef < lo) & (a < 0), m, 0.0)
        high_acc += tl.where(live & (coef > hi) & (a > 0), m, 0.0)
    tl.store(RowLoss + b, tl.sum(loss_acc, axis=0))
    tl.store(RowStats + b * 3 + 0, tl.sum(low_acc, axis=0))
    tl.store(RowStats + b * 3 + 1, tl.sum(high_acc, axis=0))
    tl.store(RowStats + b * 3 + 2, tl.sum(kl_acc, axis=0))


def grpo_token_fwd(logp, old, adv, mask, weights, ref, is_ratio, *, beta, kl_estimator, eps_low, eps_high, delta):
    """Launch the kernel; returns ``(row_loss [B], row_stats [B, 3], grad [B, T])`` in float32."""
    f32 = [t.detach().to(torch.float32).contiguous() for t in (logp, old, mask, weights)]
    lp, old, m, w = f32
    b, t = lp.shape
    ref_ = lp if ref is None else ref.to(torch.float32).contiguous()
    is_ = lp if is_ratio is None else is_ratio.to(torch.float32).contiguous()
    grad = torch.empty_like(lp)
    row_loss = torch.empty(b, device=lp.device, dtype=torch.float32)
    row_stats = torch.empty(b, 3, device=lp.device, dtype=torch.float32)
    # The interpreter pays per block op, so small blocks; on the GPU a row of up to 4096 tokens per block.
    cap = 64 if (triton_interpreting() and lp.device.type != "cuda") else 4096
    block_t = min(cap, max(16, triton.next_power_of_2(t)))
    _grpo_token_kernel[(b,)](
        lp, old, ref_, is_, adv.detach().to(torch.float32).contiguous(), m, w, grad, row_loss, row_stats,
        t, float(beta), float(eps_low), float(eps_high), float(delta or 0.0),
        HAS_DELTA=delta is not None, HAS_KL=beta != 0.0, KL_EST=_KL_CODE[kl_estimator], HAS_IS=is_ratio is not None,
        BLOCK_T=block_t, num_warps=4 if block_t <= 1024 else 8,
    )  # fmt: skip
    return row_loss, row_stats, grad


class GrpoTokenLossFunction(torch.autograd.Function):
    """Scalar loss from the one-pass kernel; backward scales the saved ``d loss/d logp``."""

    @staticmethod
    def forward(ctx, logp, old, adv, mask, weights, ref, is_ratio, opts: dict):
        row_loss, row_stats, grad = grpo_token_fwd(logp, old, adv, mask, weights, ref, is_ratio, **opts)
        ctx.save_for_backward(grad)
        ctx.logp_dtype = logp.dtype
        stats = row_stats.sum(0)
        ctx.mark_non_differentiable(stats)
        return row_loss.sum(), stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss).to(ctx.logp_dtype), None, None, None, None, None, None, None


def grpo_token_loss(logp: Tensor, old: Tensor, adv: Tensor, mask: Tensor, weights: Tensor, ref: Tensor | None,
                    is_ratio: Tensor | None, o) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:  # fmt: skip
    """``(loss, low-clipped count, high-clipped count, Σ mask·KL or None)`` for grpo.py's CUDA path (``o``: its options)."""
    opts = dict(beta=o.beta, kl_estimator=o.kl_estimator, eps_low=o.epsilon_low, eps_high=o.epsilon_high,
                delta=o.delta)  # fmt: skip
    loss, stats = GrpoTokenLossFunction.apply(logp, old, adv, mask, weights, ref, is_ratio, opts)
    return loss, stats[0], stats[1], (stats[2] if o.beta != 0.0 else None)
