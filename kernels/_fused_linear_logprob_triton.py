"""Triton kernels of the fused linear log-prob: per-token log p(target), entropy and their gradients.

Math (notation of ``docs/notation.md``; s = 1/temperature, x = hidden @ weight.T + bias):

    z = s·x,   lse = logsumexp_j z_j,   logp = z_t − lse,   p_j = exp(z_j − lse),
    entropy H = lse − Σ_j p_j z_j = log S − E/S   with S = Σ_j e^{z_j−m}, E = Σ_j e^{z_j−m}(z_j − m),
    d(g_lp·logp + g_ent·H)/dx_j = s·[g_lp(1[j=t] − p_j) − g_ent·p_j(log p_j + H)].

The second form of H (shifted by the running max m) avoids the cancellation of lse − Σ p·z when the
logits are large (|z| ~ 1e4 keeps full fp32 accuracy). −inf logits (a bias masking vocabulary, whole tiles
or splits of it) have p = 0 and add 0·log 0 = 0: a row with no finite column yet is shifted by 0, not by its
max, and terms with p = 0 are dropped before they multiply a −inf, as on the CPU path.

Forward: grid (cdiv(N, BLOCK_N), SPLITS). A program owns BLOCK_N rows and a contiguous range of
vocabulary tiles; per [BLOCK_N, BLOCK_V] tile it computes the logits with ``tl.dot`` over D (fp32
accumulation, operands in their own dtype, so bf16 runs on tensor cores) and folds them into an
online (m, S, E) per row, plus the target logit when the target falls in the tile. Partials
[SPLITS, N] are merged by a few torch ops. FLOPs: one matmul, 2·N·V·D. Memory: O(N·SPLITS); the
[N, V] logits never exist.

Backward: the vocabulary is walked in chunks of Vc columns (≤ V/8 and within the tile budget of
``_torch_tiles.block_bytes``, at least one tile). For each chunk
a Triton kernel recomputes the logits and writes d/dx into an [N, Vc] buffer in the input dtype; then
cuBLAS does grad_W[chunk] = buf.T @ hidden and grad_H += buf @ W[chunk], and grad_b[chunk] is the
column sum of buf. FLOPs: three matmuls (recompute, grad_W, grad_H). Memory: the chunk buffer
(≤ 1/8 of the naive logits, ≤ the budget) plus an fp32 [N, D] accumulator. Every output element is written by
exactly one program or one cuBLAS call per chunk, in a fixed order: no atomics, so results are
bit-identical run to run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import _cpu_ext, _triton_utils
from ._stats import TokenStats


@triton.jit
def _logits_tile(
    H,
    W,
    Bias,
    rows,
    cols,
    N,
    V,
    D,
    stride_h,
    stride_w,
    scale,
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """s·(hidden[rows] @ weight[cols].T + bias[cols]) as an fp32 [BLOCK_N, BLOCK_V] tile (0 outside)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    row_ok = rows < N
    col_ok = cols < V
    offs_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        d_ok = d < D
        h = tl.load(H + rows[:, None] * stride_h + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(W + cols[None, :] * stride_w + d[:, None], mask=d_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:  # interpreter only: see _triton_utils.upcast_dot_operands
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        # "ieee" keeps fp32 inputs out of TF32 (the fp32 contract is 1e-5); bf16/fp16 use tensor cores anyway.
        acc = tl.dot(h, w, acc, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(Bias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc * scale


@triton.jit
def _logprob_fwd_kernel(
    H,
    W,
    Bias,
    Targets,  # [N, D], [V, D], [V], [N] int64
    M,
    S,
    E,
    ZT,  # [SPLITS, N] fp32 partials: running max, Σe^{z−m}, Σe^{z−m}(z−m), target logit
    N,
    V,
    D,
    stride_h,
    stride_w,
    tiles_per_split,
    n_tiles,
    scale,
    HAS_BIAS: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < N
    tgt = tl.load(Targets + rows, mask=row_ok, other=-1)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    e = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zt = tl.zeros((BLOCK_N,), dtype=tl.float32)
    tile_lo = pid_s * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, n_tiles)
    for tile in range(tile_lo, tile_hi):
        cols = (tile * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_ok = cols < V
        z = _logits_tile(
            H, W, Bias, rows, cols, N, V, D, stride_h, stride_w, scale, HAS_BIAS, UPCAST, BLOCK_N, BLOCK_V, BLOCK_D
        )
        z = tl.where(col_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        # A row whose columns so far are all −inf (padding, or a −inf bias masking whole tiles) keeps
        # m = −inf: shift it by 0 instead, so e^{z−0} = e^{−inf} = 0 and α = 0, never e^{−inf+inf} = NaN.
        m_ref = tl.where(m_new > float("-inf"), m_new, 0.0)
        alpha = tl.exp(m - m_ref)
        p = tl.exp(z - m_ref[:, None])
        if WITH_ENTROPY:
            # Re-centre E on m_new: E' = α(E + (m − m_new)S). Guarded: m = −inf while S = 0 (−inf·0 = NaN).
            shift = tl.where(s > 0, m - m_ref, 0.0) * s
            # 0·log 0 = 0: p = 0 where z = −inf, and p·(z − m) would be 0·(−inf) = NaN
            e = alpha * (e + shift) + tl.sum(p * tl.where(p > 0, z - m_ref[:, None], 0.0), axis=1)
        s = s * alpha + tl.sum(p, axis=1)
        zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
        m = m_new
    out = pid_s * N + rows
    tl.store(M + out, m, mask=row_ok)
    tl.store(S + out, s, mask=row_ok)
    tl.store(ZT + out, zt, mask=row_ok)
    if WITH_ENTROPY:
        tl.store(E + out, e, mask=row_ok)


@triton.jit
def _logprob_bwd_kernel(
    H,
    W,
    Bias,
    Targets,
    Lse,
    LseLo,
    Ent,
    GradLogp,
    GradEnt,  # [N, D], [V, D], [V], [N] × 6; lse = Lse + LseLo
    Buf,  # [N, width] view of the chunk buffer (row stride stride_buf), input dtype
    N,
    V,
    D,
    stride_h,
    stride_w,
    stride_buf,
    vocab_start,
    width,
    scale,
    ignore_index,
    HAS_BIAS: tl.constexpr,
    HAS_ENT_GRAD: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    local = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    cols = vocab_start + local
    row_ok = rows < N
    z = _logits_tile(
        H, W, Bias, rows, cols, N, V, D, stride_h, stride_w, scale, HAS_BIAS, UPCAST, BLOCK_N, BLOCK_V, BLOCK_D
    )
    tgt = tl.load(Targets + rows, mask=row_ok, other=ignore_index)
    lse = tl.load(Lse + rows, mask=row_ok, other=0.0)
    lse_lo = tl.load(LseLo + rows, mask=row_ok, other=0.0)
    g_lp = tl.load(GradLogp + rows, mask=row_ok, other=0.0)
    # (z − lse) − lse_lo: exact to fp32 where z ≈ lse ~ 1e4; padding rows: keep exp() finite
    log_p = tl.where(row_ok[:, None], (z - lse[:, None]) - lse_lo[:, None], 0.0)
    p = tl.exp(log_p)
    grad = g_lp[:, None] * (tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0) - p)
    if HAS_ENT_GRAD:
        ent = tl.load(Ent + rows, mask=row_ok, other=0.0)
        g_ent = tl.load(GradEnt + rows, mask=row_ok, other=0.0)
        grad -= g_ent[:, None] * p * tl.where(p > 0, log_p + ent[:, None], 0.0)  # z = −inf: 0, not 0·(−inf)
    grad = tl.where((tgt != ignore_index)[:, None], grad * scale, 0.0)
    mask = row_ok[:, None] & (local < width)[None, :]
    tl.store(Buf + rows[:, None] * stride_buf + local[None, :], grad.to(Buf.dtype.element_ty), mask=mask)


def _rowmajor(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def triton_logprob_fwd(
    hidden2d, weight, targets, bias, *, temperature: float, ignore_index: int, with_entropy: bool
) -> TokenStats:
    """Per-row log p(target), entropy and lse without materializing the logits.

    Args:
        hidden2d: [N, D] float32 / bfloat16 / float16. weight: [V, D], same dtype. targets: [N] int64.
        bias: [V] or None. temperature: logits are divided by it. ignore_index: rows with this target
        get logp = entropy = 0. with_entropy: compute the entropy.
    Returns:
        TokenStats of float32 [N] tensors (entropy None unless with_entropy).
    """
    hidden2d = _rowmajor(hidden2d)
    weight = _rowmajor(weight)
    targets = targets.contiguous()
    bias = bias.contiguous() if bias is not None else None
    n, d = hidden2d.shape
    v = weight.shape[0]
    tiles = _triton_utils.logits_tiles(hidden2d.device, n, d, hidden2d.dtype)
    row_blocks = triton.cdiv(n, tiles.block_n)
    n_tiles = triton.cdiv(v, tiles.block_v)
    splits, tiles_per_split = _triton_utils.vocab_splits(hidden2d.device, row_blocks, n_tiles)
    m, s, e, zt = torch.empty(4, splits, n, device=hidden2d.device, dtype=torch.float32).unbind(0)
    _logprob_fwd_kernel[(row_blocks, splits)](
        hidden2d,
        weight,
        bias if bias is not None else hidden2d,
        targets,
        m,
        s,
        e,
        zt,
        n,
        v,
        d,
        hidden2d.stride(0),
        weight.stride(0),
        tiles_per_split,
        n_tiles,
        1.0 / temperature,
        HAS_BIAS=bias is not None,
        WITH_ENTROPY=with_entropy,
        UPCAST=_triton_utils.upcast_dot_operands(hidden2d.device, hidden2d.dtype),
        BLOCK_N=tiles.block_n,
        BLOCK_V=tiles.block_v,
        BLOCK_D=tiles.block_d,
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )
    return _combine_splits(m, s, e if with_entropy else None, zt, targets != ignore_index)


def _combine_splits(m, s, e, zt, keep) -> TokenStats:
    """Merge [SPLITS, N] fp32 online-softmax partials into per-row lse (fp64), logp and entropy (fp32)."""
    m = m.double()  # [SPLITS, N]: cheap, and lse keeps its low digits
    s = s.double()
    zt = zt.double()
    m_max = m.amax(dim=0)
    # a split whose columns are all −inf (a masking bias) has m = −inf, S = E = 0: weight 0, shift 0
    shift = torch.where(s > 0, m - m_max, 0.0)
    scale = torch.where(s > 0, torch.exp(shift), 0.0)
    total = (s * scale).sum(dim=0)
    lse = m_max + torch.log(total)
    logp = torch.where(keep, zt.sum(dim=0) - lse, 0.0).float()
    entropy = None
    if e is not None:
        shifted = (scale * (e.double() + shift * s)).sum(dim=0)
        entropy = torch.where(keep, torch.log(total) - shifted / total, 0.0).float()
    return TokenStats(logp=logp, entropy=entropy, lse=lse)


def triton_logprob_bwd(
    hidden2d,
    weight,
    targets,
    bias,
    stats: TokenStats,
    grad_logp,
    grad_entropy,
    *,
    temperature: float,
    ignore_index: int,
    needs_grad: tuple[bool, bool, bool],
    vocab_chunk: int | None = None,
):
    """Gradients of Σ g_lp·logp + g_ent·entropy w.r.t. hidden, weight and bias, vocabulary chunk by chunk.

    Args:
        hidden2d, weight, targets, bias, temperature, ignore_index: as in ``triton_logprob_fwd``.
        stats: its output (lse, and entropy when grad_entropy is given). grad_logp: [N] float32.
        grad_entropy: [N] float32 or None. needs_grad: which of (hidden, weight, bias) to return.
        vocab_chunk: columns per chunk (rounded up to a tile); default ``_triton_utils.vocab_chunk``.
    Returns:
        (grad_hidden [N, D] | None, grad_weight [V, D] | None, grad_bias [V] | None) in the input dtype.
    """
    hidden2d = _rowmajor(hidden2d)
    weight = _rowmajor(weight)
    bias = bias.contiguous() if bias is not None else None
    n, d = hidden2d.shape
    v = weight.shape[0]
    dev = hidden2d.device
    dtype = hidden2d.dtype
    want_h = needs_grad[0]
    want_w = needs_grad[1]
    want_b = needs_grad[2] and bias is not None
    if not (want_h or want_w or want_b):
        return None, None, None
    # grad_H is summed over chunks in fp32: each chunk's cuBLAS product accumulates in fp32 and is
    # rounded to the input dtype once, so the fp32 sum keeps one rounding per chunk, where addmm into a
    # bf16 grad_H would round the running sum at every chunk. Costs an fp32 [N, D], small next to buf.
    grad_h = torch.zeros(n, d, device=dev, dtype=torch.float32) if want_h else None
    grad_w = torch.empty(v, d, device=dev, dtype=weight.dtype) if want_w else None
    grad_b = torch.empty(v, device=dev, dtype=bias.dtype) if want_b else None
    tiles = _triton_utils.logits_tiles(dev, n, d, dtype)
    buf = _triton_utils.grad_chunk_buffer(n, v, tiles.block_v, dtype, dev, vocab_chunk)
    rows = _RowInputs(
        targets.contiguous(),
        *_cpu_ext.split_lse(stats.lse, n),
        grad_logp.to(torch.float32).contiguous(),
        None if grad_entropy is None else stats.entropy.contiguous(),
        None if grad_entropy is None else grad_entropy.to(torch.float32).contiguous(),
    )
    for v0 in range(0, v, buf.shape[1]):
        block = buf[:, : min(buf.shape[1], v - v0)]
        _logit_grads(hidden2d, weight, bias, rows, block, v0, tiles, 1.0 / temperature, ignore_index)
        v1 = v0 + block.shape[1]
        if grad_w is not None:
            torch.mm(block.t(), hidden2d, out=grad_w[v0:v1])
        if grad_h is not None and dtype == torch.float32:
            grad_h.addmm_(block, weight[v0:v1])
        elif grad_h is not None:
            grad_h += block @ weight[v0:v1]
        if grad_b is not None:
            grad_b[v0:v1] = block.sum(dim=0, dtype=torch.float32)
    return (grad_h.to(dtype) if grad_h is not None else None), grad_w, grad_b


@dataclass
class _RowInputs:
    """Per-row [N] tensors the backward kernel reads (entropy pair None when there is no entropy grad)."""

    targets: torch.Tensor
    lse: torch.Tensor  # fp32 rounding of the fp64 lse ...
    lse_lo: torch.Tensor  # ... and its remainder
    grad_logp: torch.Tensor
    entropy: torch.Tensor | None
    grad_entropy: torch.Tensor | None


def _logit_grads(hidden2d, weight, bias, rows: _RowInputs, block, vocab_start, tiles, scale, ignore_index):
    """Fill ``block`` [N, width] with d objective / d raw logit for vocabulary columns vocab_start + [0, width)."""
    n, width = block.shape
    has_ent = rows.grad_entropy is not None
    _logprob_bwd_kernel[(triton.cdiv(n, tiles.block_n), triton.cdiv(width, tiles.block_v))](
        hidden2d,
        weight,
        bias if bias is not None else hidden2d,
        rows.targets,
        rows.lse,
        rows.lse_lo,
        rows.entropy if has_ent else rows.lse,
        rows.grad_logp,
        rows.grad_entropy if has_ent else rows.grad_logp,
        block,
        n,
        weight.shape[0],
        hidden2d.shape[1],
        hidden2d.stride(0),
        weight.stride(0),
        block.stride(0),
        vocab_start,
        width,
        scale,
        ignore_index,
        HAS_BIAS=bias is not None,
        HAS_ENT_GRAD=has_ent,
        UPCAST=_triton_utils.upcast_dot_operands(hidden2d.device, hidden2d.dtype),
        BLOCK_N=tiles.block_n,
        BLOCK_V=tiles.block_v,
        BLOCK_D=tiles.block_d,
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )
