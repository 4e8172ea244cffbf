"""Triton kernels of the fused linear KL: per-row KL / reverse KL / JSD between two heads, and the policy gradient
(launched by ``_fused_linear_kl_triton``).

Math as in ``fused_linear_kl`` (p = policy, q = reference, z = s·x the scaled logits of each head). Each
head's row is summarized by an online softmax over vocabulary tiles: m = running max, S = Σ e^{z−m}; so
log p_j = (z_j − m) − log S, with the shift exact near the max (no lse rounding of |z| ~ 1e4 in log p).
Accumulated alongside, re-centred whenever a max moves (m → m'):

    E = Σ e^{zp−mp}(zp − mp)                  E' = α_p(E + Δp·S_p) + …          H = log S_p − E/S_p
    A = Σ e^{zp−mp}((zp − mp) − (zq − mq))    A' = α_p(A + S_p·(Δp − Δq)) + …   KL(p‖q) = A/S_p − log S_p + log S_q
    B = Σ e^{zq−mq}((zq − mq) − (zp − mp))    B' = α_q(B + S_q·(Δq − Δp)) + …   KL(q‖p) = B/S_q − log S_q + log S_p

(α = e^{m−m'}, Δ = m − m'). −inf logits (a masking bias) are shifted and dropped as in the log-prob kernels:
columns with p = 0 (q = 0) add 0 to E, A, J_p (B, J_q) and get a zero gradient. "jsd" needs both normalizers
before M = βq + (1−β)p exists, so a second stats pass sums J_p = Σ p(log p − log M) and J_q = Σ q(log q − log M);
JSD = β·J_q + (1−β)·J_p.

Forward: grid (cdiv(N, BLOCK_N), SPLITS), as ``_fused_linear_logprob_triton``; [k, SPLITS, N] partials are
merged by a few torch ops. Gradient: the vocabulary is walked in chunks of Vc columns; a kernel recomputes
both logits tiles and writes row_scale·d/dz (see ``fused_linear_kl``) into an [N, Vc] buffer in the policy
dtype; cuBLAS does grad_W[chunk] = buf.T @ H, grad_H += buf @ W[chunk] (fp32 [N, D] accumulator) and
grad_b[chunk] is the column sum. FLOPs: 2·N·V·(D + D_ref) per logits pass (two passes, three for "jsd")
plus 4·N·V·D for the gradient GEMMs. Memory: partials O(N·SPLITS), the chunk buffer (≤ V/8 columns), the
fp32 [N, D] accumulator. No atomics: bit-identical run to run.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._fused_linear_logprob_triton import _logits_tile

KINDS = {"kl": 0, "reverse_kl": 1, "jsd": 2}


# Over 80 lines on purpose: the online softmax of both heads and the three re-centred sums (E, A, B) are one loop
# state; split across @triton.jit helpers it would be passed back and forth as 8 tuples per tile.
@triton.jit
def kl_fwd_kernel(
    H,
    W,
    Bias,
    RH,
    RW,
    RBias,  # [N, D], [V, D], [V], [N, D_ref], [V, D_ref], [V]
    Part,  # [7, SPLITS, N] fp32: m_p, S_p, E, A, m_q, S_q, B
    N,
    V,
    D,
    DR,
    stride_h,
    stride_w,
    stride_rh,
    stride_rw,
    tiles_per_split,
    n_tiles,
    scale,
    HAS_BIAS: tl.constexpr,
    HAS_RBIAS: tl.constexpr,
    REVERSE: tl.constexpr,
    UPCAST: tl.constexpr,
    R_UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < N
    mp = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    mq = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    sp = tl.zeros((BLOCK_N,), dtype=tl.float32)
    sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    e = tl.zeros((BLOCK_N,), dtype=tl.float32)
    a = tl.zeros((BLOCK_N,), dtype=tl.float32)
    b = tl.zeros((BLOCK_N,), dtype=tl.float32)
    tile_lo = pid_s * tiles_per_split
    for tile in range(tile_lo, tl.minimum(tile_lo + tiles_per_split, n_tiles)):
        cols = (tile * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_ok = (cols < V)[None, :]
        zp = _logits_tile(
            H, W, Bias, rows, cols, N, V, D, stride_h, stride_w, scale, HAS_BIAS, UPCAST, BLOCK_N, BLOCK_V, BLOCK_D
        )
        zq = _logits_tile(
            RH,
            RW,
            RBias,
            rows,
            cols,
            N,
            V,
            DR,
            stride_rh,
            stride_rw,
            scale,
            HAS_RBIAS,
            R_UPCAST,
            BLOCK_N,
            BLOCK_V,
            BLOCK_D,
        )
        mp_new = tl.maximum(mp, tl.max(tl.where(col_ok, zp, float("-inf")), axis=1))
        mq_new = tl.maximum(mq, tl.max(tl.where(col_ok, zq, float("-inf")), axis=1))
        # A row whose columns so far are all −inf (a −inf bias masking whole tiles) keeps m = −inf: shift
        # it by 0 instead, so its e^{z−0} = 0 and α = 0, never e^{−inf+inf} = NaN.
        mp_ref = tl.where(mp_new > float("-inf"), mp_new, 0.0)
        mq_ref = tl.where(mq_new > float("-inf"), mq_new, 0.0)
        # Shifts guarded: before the first real column m = −inf and S = 0 (−inf·0 = NaN).
        dp = tl.where(sp > 0, mp - mp_ref, 0.0)
        dq = tl.where(sq > 0, mq - mq_ref, 0.0)
        alpha_p = tl.exp(mp - mp_ref)
        alpha_q = tl.exp(mq - mq_ref)
        xp = tl.where(col_ok, zp - mp_ref[:, None], 0.0)  # padding columns: 0 here, e^{…} masked below
        xq = tl.where(col_ok, zq - mq_ref[:, None], 0.0)  # −inf where the bias masks a column
        ep = tl.where(col_ok, tl.exp(xp), 0.0)
        # 0·log 0 = 0: terms of columns with p = 0 are dropped before they multiply a −inf
        e = alpha_p * (e + dp * sp) + tl.sum(ep * tl.where(ep > 0, xp, 0.0), axis=1)
        a = alpha_p * (a + sp * (dp - dq)) + tl.sum(ep * tl.where(ep > 0, xp - xq, 0.0), axis=1)
        if REVERSE:
            eq = tl.where(col_ok, tl.exp(xq), 0.0)
            b = alpha_q * (b + sq * (dq - dp)) + tl.sum(eq * tl.where(eq > 0, xq - xp, 0.0), axis=1)
            sq = sq * alpha_q + tl.sum(eq, axis=1)
        else:
            sq = sq * alpha_q + tl.sum(tl.where(col_ok, tl.exp(xq), 0.0), axis=1)
        sp = sp * alpha_p + tl.sum(ep, axis=1)
        mp = mp_new
        mq = mq_new
    out = Part + pid_s * N + rows
    part = tl.num_programs(1) * N
    tl.store(out, mp, mask=row_ok)
    tl.store(out + part, sp, mask=row_ok)
    tl.store(out + 2 * part, e, mask=row_ok)
    tl.store(out + 3 * part, a, mask=row_ok)
    tl.store(out + 4 * part, mq, mask=row_ok)
    tl.store(out + 5 * part, sq, mask=row_ok)
    tl.store(out + 6 * part, b, mask=row_ok)


@triton.jit
def _log_probs(
    H,
    W,
    Bias,
    RH,
    RW,
    RBias,
    Stats,
    rows,
    cols,
    N,
    V,
    D,
    DR,
    stride_h,
    stride_w,
    stride_rh,
    stride_rw,
    scale,
    HAS_BIAS: tl.constexpr,
    HAS_RBIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    R_UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """(log p, log q) fp32 [BLOCK_N, BLOCK_V] tiles, from the row stats [4, N]: m_p, log S_p, m_q, log S_q."""
    row_ok = rows < N
    zp = _logits_tile(
        H, W, Bias, rows, cols, N, V, D, stride_h, stride_w, scale, HAS_BIAS, UPCAST, BLOCK_N, BLOCK_V, BLOCK_D
    )
    zq = _logits_tile(
        RH, RW, RBias, rows, cols, N, V, DR, stride_rh, stride_rw, scale, HAS_RBIAS, R_UPCAST, BLOCK_N, BLOCK_V, BLOCK_D
    )
    mp = tl.load(Stats + rows, mask=row_ok, other=0.0)
    lsp = tl.load(Stats + N + rows, mask=row_ok, other=0.0)
    mq = tl.load(Stats + 2 * N + rows, mask=row_ok, other=0.0)
    lsq = tl.load(Stats + 3 * N + rows, mask=row_ok, other=0.0)
    # Padding rows read zeros: finite values, never stored.
    lp = tl.where(row_ok[:, None], (zp - mp[:, None]) - lsp[:, None], 0.0)
    lq = tl.where(row_ok[:, None], (zq - mq[:, None]) - lsq[:, None], 0.0)
    return lp, lq


@triton.jit
def _log_mixture(lp, lq, log_a, log_b):
    """log M = log((1−β)p + βq) = logaddexp(lp + log(1−β), lq + log β); M itself underflows where p and q do."""
    x = lp + log_a
    y = lq + log_b
    hi = tl.maximum(x, y)
    hi_ref = tl.where(hi > float("-inf"), hi, 0.0)  # p = q = 0 (a masked column): log M = −inf, not NaN
    return hi + tl.log(1.0 + tl.exp(tl.minimum(x, y) - hi_ref))


@triton.jit
def jsd_fwd_kernel(
    H,
    W,
    Bias,
    RH,
    RW,
    RBias,
    Stats,  # heads as in kl_fwd_kernel; Stats [4, N] fp32
    Part,  # [2, SPLITS, N] fp32: J_p = Σ p(log p − log M), J_q = Σ q(log q − log M)
    N,
    V,
    D,
    DR,
    stride_h,
    stride_w,
    stride_rh,
    stride_rw,
    tiles_per_split,
    n_tiles,
    scale,
    log_a,
    log_b,
    HAS_BIAS: tl.constexpr,
    HAS_RBIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    R_UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    jp = tl.zeros((BLOCK_N,), dtype=tl.float32)
    jq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    tile_lo = pid_s * tiles_per_split
    for tile in range(tile_lo, tl.minimum(tile_lo + tiles_per_split, n_tiles)):
        cols = (tile * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
        lp, lq = _log_probs(
            H,
            W,
            Bias,
            RH,
            RW,
            RBias,
            Stats,
            rows,
            cols,
            N,
            V,
            D,
            DR,
            stride_h,
            stride_w,
            stride_rh,
            stride_rw,
            scale,
            HAS_BIAS,
            HAS_RBIAS,
            UPCAST,
            R_UPCAST,
            BLOCK_N,
            BLOCK_V,
            BLOCK_D,
        )
        lm = _log_mixture(lp, lq, log_a, log_b)
        col_ok = (cols < V)[None, :]
        p = tl.where(col_ok, tl.exp(lp), 0.0)
        q = tl.where(col_ok, tl.exp(lq), 0.0)
        jp += tl.sum(p * tl.where(p > 0, lp - lm, 0.0), axis=1)  # 0·log 0 = 0
        jq += tl.sum(q * tl.where(q > 0, lq - lm, 0.0), axis=1)
    row_ok = rows < N
    out = Part + pid_s * N + rows
    tl.store(out, jp, mask=row_ok)
    tl.store(out + tl.num_programs(1) * N, jq, mask=row_ok)


@triton.jit
def kl_bwd_kernel(
    H,
    W,
    Bias,
    RH,
    RW,
    RBias,
    Stats,  # Stats [6, N] fp32: m_p, log S_p, m_q, log S_q, C, row_scale
    Buf,  # [N, width] view of the chunk buffer (row stride stride_buf), policy dtype
    N,
    V,
    D,
    DR,
    stride_h,
    stride_w,
    stride_rh,
    stride_rw,
    stride_buf,
    vocab_start,
    width,
    scale,
    one_minus_beta,
    log_a,
    log_b,
    KIND: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RBIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    R_UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Buf ← row_scale·d D/dz: kl p(log p − log q − C), reverse_kl p − q, jsd (1−β)p(log p − log M − C)."""
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    local = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    row_ok = rows < N
    lp, lq = _log_probs(
        H,
        W,
        Bias,
        RH,
        RW,
        RBias,
        Stats,
        rows,
        vocab_start + local,
        N,
        V,
        D,
        DR,
        stride_h,
        stride_w,
        stride_rh,
        stride_rw,
        scale,
        HAS_BIAS,
        HAS_RBIAS,
        UPCAST,
        R_UPCAST,
        BLOCK_N,
        BLOCK_V,
        BLOCK_D,
    )
    c = tl.load(Stats + 4 * N + rows, mask=row_ok, other=0.0)
    row_scale = tl.load(Stats + 5 * N + rows, mask=row_ok, other=0.0)
    p = tl.exp(lp)
    if KIND == 0:
        grad = p * tl.where(p > 0, lp - lq - c[:, None], 0.0)  # masked columns (p = 0): 0, not 0·(−inf)
    elif KIND == 1:
        grad = p - tl.exp(lq)
    else:
        grad = one_minus_beta * p * tl.where(p > 0, lp - _log_mixture(lp, lq, log_a, log_b) - c[:, None], 0.0)
    mask = row_ok[:, None] & (local < width)[None, :]
    grad = grad * row_scale[:, None]
    tl.store(Buf + rows[:, None] * stride_buf + local[None, :], grad.to(Buf.dtype.element_ty), mask=mask)
