"""One-pass Triton kernel for token-level GRPO-family losses: loss row sums and d loss/d logp together.

Per token (formulas in :mod:`.grpo`), with ``w = exp(logp − old)``, the sampler ratio
``ρ_s = exp(min(old − sampler, log cap))`` and advantage ``A`` of the row:

    clipped (grpo, bnpo, dr_grpo, dapo, luspo)  −min(min(w, δ)·A, clip(w)·A)   d/dlogp = −A·w·[active branch]
                                                (ties: half of each branch, as torch.minimum)
    cispo                                       −min(w, ε_high)·A·logp         d/dlogp = −min(w, ε_high)·A
    sapo                                        −σ(τ(w − 1))·4/τ·A             d/dlogp = −4A·σ(1 − σ)·w
    vespo                                       −φ_b·A·logp                    d/dlogp = −φ_b·A

times ``ρ_s`` (vespo folds it into φ), plus ``β·k`` (k1/k2/k3 from ``_kl_penalty_triton.kl_term``; with the bias
correction ``β·k·w``, derivative ``β·(k' + k)·w``), minus ``entropy_coef·entropy``. Every term is elementwise in
``logp`` once vespo's per-row φ is known, so the derivative comes out of the same pass.

One program per row ``b``: vespo first walks the row once for φ (its clamped sequence log-ratio, sampler term over
all ``T`` columns as Liger); then ``T`` in ``BLOCK_T`` chunks, writing ``m · d loss/d logp`` into ``grad [B, T]``
and reducing ``Σ m·loss``, ``Σ m``, clip counts, ``Σ m·KL`` and ``Σ m·entropy``. The reduction weights are
``m · c_b`` for every loss type (``grpo.row_scale``), so ``c_b`` is applied afterwards from the counts: a few
``[B]`` ops, and the backward is ``grad · c_b · upstream``. Masked tokens are not loaded (vespo's φ pass reads every
column: its sampler term covers padding, as Liger's) and masked lanes are selected out (``tl.where``), so non-finite
padding cannot leak NaN. Any float input dtype is read as float32. Memory: reads 3–7 ``[B, T]`` arrays once (vespo:
its φ pass reads up to 4 of them again), writes one float32 ``[B, T]``.

Sequence-level ratios (GSPO) couple every token of a row through its mean log-ratio and need a second reduction of
the row for the gradient: they run grpo.py's torch path. Only ``logp`` and ``entropy`` receive gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._kl_penalty_triton import KL_CODES, kl_term
from ._triton_rows import block_t, load_row_chunk, mask_operand, num_warps

LOSS_CODES = {"grpo": 0, "bnpo": 0, "dr_grpo": 0, "dapo": 0, "luspo": 0, "cispo": 1, "sapo": 2, "vespo": 3}
_LOG_MIN = tl.constexpr(math.log(1e-8))  # vespo's lower clamp of log-ratios (Liger's get_gamma_weights)
_STATS = 6  # Σ m·loss, Σ m, low-clipped, high-clipped, Σ m·KL, Σ m·entropy


@triton.jit
def _sampler_log_ratio(old, sampler, log_cap, HAS_CAP: tl.constexpr):
    """log ρ_s = min(old − sampler, log cap)."""
    lr = old - sampler
    if HAS_CAP:
        lr = tl.minimum(lr, log_cap)
    return lr


@triton.jit
def _vespo_phi(
    Logp,
    Old,
    Sampler,
    Mask,
    b,
    T,
    a,
    log_cap,
    k_pos,
    lam_pos,
    k_neg,
    lam_neg,
    HAS_OLD: tl.constexpr,
    HAS_IS: tl.constexpr,
    HAS_CAP: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """VESPO φ = exp(λ + k·log w − λ·w) of row ``b`` as a ``[BLOCK_T]`` block (log w: clamped sequence log-ratio)."""
    acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    for start in range(0, T, BLOCK_T):
        cols = start + tl.arange(0, BLOCK_T)
        inb = cols < T
        offs = b * T + cols
        m = tl.load(Mask + offs, mask=inb, other=0).to(tl.float32)
        # Every column is read (the sampler term covers padding); tl.where selects, so padding NaN stays out.
        lp = tl.load(Logp + offs, mask=inb, other=0.0).to(tl.float32)
        old = lp
        if HAS_OLD:
            old = tl.load(Old + offs, mask=inb, other=0.0).to(tl.float32)
        acc += tl.where(m != 0.0, tl.minimum(tl.maximum(lp - old, -20.0), 20.0) * m, 0.0)
        if HAS_IS:
            sampler = tl.load(Sampler + offs, mask=inb, other=0.0).to(tl.float32)
            lr = _sampler_log_ratio(old, sampler, log_cap, HAS_CAP)
            acc += tl.where(inb, tl.minimum(tl.maximum(lr, _LOG_MIN), 20.0), 0.0)
    log_w = tl.zeros([BLOCK_T], dtype=tl.float32) + tl.sum(acc, axis=0)
    log_w = tl.minimum(tl.maximum(log_w, _LOG_MIN), 20.0)
    k = tl.where(a >= 0, k_pos, k_neg)
    lam = tl.maximum(tl.where(a >= 0, lam_pos, lam_neg), 1e-4)
    phi = tl.exp(lam + k * log_w - lam * tl.exp(log_w))
    return tl.where(tl.abs(phi) <= 3.4028234e38, phi, 0.0)  # nan_to_num(nan=0, posinf=0) as Liger; NaN fails <=


@triton.jit
def _clipped_term(coef, a, lo, hi, delta, HAS_DELTA: tl.constexpr):
    """(loss, d loss/d logp) of −min(min(w, δ)·A, clip(w, lo, hi)·A) at ``w = coef``."""
    c2 = tl.minimum(tl.maximum(coef, lo), hi)
    g2 = tl.where((coef >= lo) & (coef <= hi), -a * coef, 0.0)
    c1 = coef
    g1 = -a * coef
    if HAS_DELTA:
        c1 = tl.minimum(coef, delta)
        g1 = tl.where(coef <= delta, g1, 0.0)
    t1 = c1 * a
    t2 = c2 * a
    return -tl.minimum(t1, t2), tl.where(t1 < t2, g1, tl.where(t1 > t2, g2, 0.5 * (g1 + g2)))


# Over 80 lines on purpose: one pass per row computes the loss, its gradient and five metric sums for every loss
# type (constexpr branches, compiled away); its argument list alone is 35 lines. The per-type math is already in the
# helpers above.
@triton.jit
def _grpo_token_kernel(
    Logp,  # [B, T] float
    Old,  # [B, T] float (unused unless HAS_OLD; else old = logp)
    Ref,  # [B, T] float (unused unless HAS_KL)
    Sampler,  # [B, T] float (unused unless HAS_IS)
    Entropy,  # [B, T] float (unused unless HAS_ENT)
    Adv,  # [B] float
    Mask,  # [B, T] 0/1 (bool passed as uint8)
    Grad,  # [B, T] f32 out: m · d per_token_loss / d logp
    RowStats,  # [B, 6] f32 out: Σ m·loss, Σ m, low-clipped, high-clipped, Σ m·KL, Σ m·entropy
    T,
    beta,
    eps_low,
    eps_high,
    delta,
    log_cap,
    entropy_coef,
    tau_pos,
    tau_neg,
    k_pos,
    lam_pos,
    k_neg,
    lam_neg,
    LOSS: tl.constexpr,  # 0 clipped family, 1 cispo, 2 sapo, 3 vespo
    HAS_OLD: tl.constexpr,
    HAS_DELTA: tl.constexpr,
    HAS_KL: tl.constexpr,
    KL_EST: tl.constexpr,
    BIAS_KL: tl.constexpr,
    HAS_IS: tl.constexpr,
    HAS_CAP: tl.constexpr,
    HAS_ENT: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    a = tl.zeros([BLOCK_T], dtype=tl.float32) + tl.load(Adv + b).to(tl.float32)  # a block: bool ops need tensors
    lo = 1.0 - eps_low
    hi = 1.0 + eps_high
    if LOSS == 3:
        phi = _vespo_phi(
            Logp,
            Old,
            Sampler,
            Mask,
            b,
            T,
            a,
            log_cap,
            k_pos,
            lam_pos,
            k_neg,
            lam_neg,
            HAS_OLD,
            HAS_IS,
            HAS_CAP,
            BLOCK_T,
        )
    loss_acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    m_acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    low_acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    high_acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    kl_acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    ent_acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    for start in range(0, T, BLOCK_T):
        offs, inb, m, live, lp = load_row_chunk(Mask, Logp, b, start, T, BLOCK_T)
        old = lp
        if HAS_OLD:
            old = tl.load(Old + offs, mask=live, other=0.0).to(tl.float32)
        coef = tl.exp(lp - old)
        low = tl.zeros([BLOCK_T], dtype=tl.int1)
        high = tl.zeros([BLOCK_T], dtype=tl.int1)
        if LOSS == 0:
            pg, g = _clipped_term(coef, a, lo, hi, delta, HAS_DELTA)
            low = (coef < lo) & (a < 0)
            high = (coef > hi) & (a > 0)
        elif LOSS == 1:
            cap = tl.minimum(coef, eps_high)
            pg = -cap * a * lp
            g = -cap * a
            high = (coef > eps_high) & (a > 0)
        elif LOSS == 2:
            tau = tl.where(a > 0, tau_pos, tau_neg)
            s = tl.sigmoid(tau * (coef - 1.0))
            pg = -s * 4.0 / tau * a
            g = -4.0 * a * s * (1.0 - s) * coef
        else:
            pg = -phi * a * lp
            g = -phi * a
        if HAS_IS:
            if LOSS != 3:  # vespo has ρ_s inside φ
                sampler = tl.load(Sampler + offs, mask=live, other=0.0).to(tl.float32)
                r = tl.exp(_sampler_log_ratio(old, sampler, log_cap, HAS_CAP))
                pg = pg * r
                g = g * r
        if HAS_KL:
            ref = tl.load(Ref + offs, mask=live, other=0.0).to(tl.float32)
            kl, dkl = kl_term(lp, ref, KL_EST)
            if BIAS_KL:
                dkl = (dkl + kl) * coef
                kl = kl * coef
            pg = pg + beta * kl
            g = g + beta * dkl
            kl_acc += tl.where(live, kl * m, 0.0)
        if HAS_ENT:
            ent = tl.load(Entropy + offs, mask=live, other=0.0).to(tl.float32)
            pg = pg - entropy_coef * ent
            ent_acc += tl.where(live, ent * m, 0.0)
        tl.store(Grad + offs, tl.where(live, g * m, 0.0), mask=inb)
        loss_acc += tl.where(live, pg * m, 0.0)
        m_acc += m
        low_acc += tl.where(live & low, m, 0.0)
        high_acc += tl.where(live & high, m, 0.0)
    row = RowStats + b * 6
    tl.store(row + 0, tl.sum(loss_acc, axis=0))
    tl.store(row + 1, tl.sum(m_acc, axis=0))
    tl.store(row + 2, tl.sum(low_acc, axis=0))
    tl.store(row + 3, tl.sum(high_acc, axis=0))
    tl.store(row + 4, tl.sum(kl_acc, axis=0))
    tl.store(row + 5, tl.sum(ent_acc, axis=0))


def grpo_token_fwd(
    logp: Tensor,
    old: Tensor | None,
    adv: Tensor,
    mask: Tensor,
    ref: Tensor | None,
    sampler: Tensor | None,
    entropy: Tensor | None,
    o,
) -> tuple[Tensor, Tensor]:
    """Launch the kernel (``o``: grpo.py's options); returns ``(row_stats [B, 6], grad [B, T])`` in float32."""
    lp = logp.detach().contiguous()
    b, t = lp.shape

    def operand(x):  # an unused pointer argument is bound to logp
        return lp if x is None else x.detach().contiguous()

    grad = torch.empty(b, t, device=lp.device, dtype=torch.float32)
    row_stats = torch.empty(b, _STATS, device=lp.device, dtype=torch.float32)
    bt = block_t(t, lp.device)
    cap = o.sampler_is_cap
    k_pos, lam_pos, k_neg, lam_neg = (float(x) for x in o.vespo_shape)
    _grpo_token_kernel[(b,)](
        lp,
        operand(old),
        operand(ref),
        operand(sampler),
        operand(entropy),
        adv.detach().contiguous(),
        mask_operand(mask),
        grad,
        row_stats,
        t,
        float(o.beta),
        float(o.epsilon_low),
        float(o.epsilon_high),
        float(o.delta or 0.0),
        math.log(cap) if cap is not None else 0.0,
        float(o.entropy_coef),
        float(o.sapo_temperature_pos),
        float(o.sapo_temperature_neg),
        k_pos,
        lam_pos,
        k_neg,
        lam_neg,
        LOSS=LOSS_CODES[o.loss_type],
        HAS_OLD=old is not None,
        HAS_DELTA=o.delta is not None,
        HAS_KL=o.beta != 0.0,
        KL_EST=KL_CODES[o.kl_estimator],
        BIAS_KL=o.use_bias_correction_kl,
        HAS_IS=sampler is not None,
        HAS_CAP=cap is not None,
        HAS_ENT=entropy is not None,
        BLOCK_T=bt,
        num_warps=num_warps(bt),
    )
    return row_stats, grad


class GrpoTokenLossFunction(torch.autograd.Function):
    """Scalar loss ``Σ_b c_b · Σ_t m·loss`` from the one-pass kernel; backward scales the saved ``m · d loss/dlogp``.

    ``row_scale(counts [B]) -> c [B]`` is the loss type's reduction (``grpo.row_scale``); the entropy gradient is the
    constant ``−entropy_coef · m · c_b``.
    """

    @staticmethod
    def forward(ctx, logp, entropy, old, adv, mask, ref, sampler, o, row_scale: Callable[[Tensor], Tensor]):
        row_stats, grad = grpo_token_fwd(logp, old, adv, mask, ref, sampler, entropy, o)
        scale = row_scale(row_stats[:, 1])
        entropy_grad = entropy is not None and entropy.requires_grad and o.entropy_coef != 0.0
        ctx.save_for_backward(grad, scale, mask if entropy_grad else None)
        ctx.dtypes = (logp.dtype, None if entropy is None else entropy.dtype)
        ctx.entropy_coef = o.entropy_coef
        sums = row_stats[:, 1:].sum(0)
        ctx.mark_non_differentiable(sums)
        return torch.linalg.vecdot(scale, row_stats[:, 0]), sums

    @staticmethod
    def backward(ctx, grad_loss, _grad_sums):
        grad, scale, mask = ctx.saved_tensors
        per_row = (scale * grad_loss).unsqueeze(1)
        grad_entropy = None
        if mask is not None:
            grad_entropy = (mask * (-ctx.entropy_coef * per_row)).to(ctx.dtypes[1])
        return (grad * per_row).to(ctx.dtypes[0]), grad_entropy, None, None, None, None, None, None, None
