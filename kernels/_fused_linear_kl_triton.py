"""Launchers of the fused linear KL's Triton kernels (``_fused_linear_kl_kernels``, whose docstring has the math):
tiles, the forward grid and the merge of its per-split partials, then the gradient by vocabulary chunks.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import triton

from . import _triton_utils
from ._fused_linear_kl_kernels import KINDS, jsd_fwd_kernel, kl_bwd_kernel, kl_fwd_kernel
from ._fused_linear_logprob_triton import _rowmajor
from ._stats import KLStats


def _tiles(device: torch.device, n: int, hidden: int, dtype: torch.dtype) -> _triton_utils.MatmulTiles:
    """The log-prob kernel's tiles, with half its vocabulary tile on CUDA.

    Two heads keep two fp32 logits tiles live; half of BLOCK_V keeps their registers at the single-head
    kernel's footprint (a heuristic, not yet tuned on a GPU).
    """
    tiles = _triton_utils.logits_tiles(device, n, hidden, dtype)
    return dataclasses.replace(tiles, block_v=max(16, tiles.block_v // 2)) if device.type == "cuda" else tiles


def _combine_splits(part: torch.Tensor, reverse: bool):
    """Merge [7, SPLITS, N] partials into (row stats [4, N]: m_p, log S_p, m_q, log S_q; KL; entropy; reverse KL)."""
    mp, sp, e, a, mq, sq, b = part.unbind(0)
    mp_max = mp.amax(dim=0)
    mq_max = mq.amax(dim=0)
    # a split whose columns are all −inf (a masking bias) has m = −inf, S = 0: weight 0, shift 0
    dp = torch.where(sp > 0, mp - mp_max, 0.0)
    dq = torch.where(sq > 0, mq - mq_max, 0.0)
    wp = torch.where(sp > 0, torch.exp(dp), 0.0)
    wq = torch.where(sq > 0, torch.exp(dq), 0.0)
    sp_tot = (sp * wp).sum(dim=0)
    sq_tot = (sq * wq).sum(dim=0)
    lsp = torch.log(sp_tot)
    lsq = torch.log(sq_tot)
    entropy = lsp - (wp * (e + dp * sp)).sum(dim=0) / sp_tot
    kl = (wp * (a + sp * (dp - dq))).sum(dim=0) / sp_tot - lsp + lsq
    rev = (wq * (b + sq * (dq - dp))).sum(dim=0) / sq_tot - lsq + lsp if reverse else None
    return torch.stack([mp_max, lsp, mq_max, lsq]), kl, entropy, rev


def triton_kl_fwd_bwd(
    hidden2d,
    weight,
    bias,
    ref_hidden2d,
    ref_weight,
    ref_bias,
    row_weight,
    *,
    options,
    temperature,
    needs_grad,
    vocab_chunk: int | None = None,
):
    """Per-row divergence, KL and entropy, and the gradients of Σ_i row_weight_i·D_i, without [N, V] logits.

    Args:
        hidden2d: [N, D] float32 / bfloat16 / float16. weight: [V, D], same dtype. bias: [V] | None.
        ref_hidden2d: [N, D_ref]. ref_weight: [V, D_ref], same dtype. ref_bias: [V] | None.
        row_weight: [N] float32 weight of each row in the loss. options: ``fused_linear_kl.KLOptions``.
        temperature: > 0; both heads' logits are divided by it.
        needs_grad: which of (hidden, weight, bias) to return. vocab_chunk: gradient buffer columns
            (rounded up to a tile; default ``_triton_utils.vocab_chunk`` within the tile budget).
    Returns:
        (KLStats of float32 [N], grad_hidden | None, grad_weight | None, grad_bias | None), grads in the input dtype.
    """
    hidden2d, weight, ref_hidden2d, ref_weight = map(_rowmajor, (hidden2d, weight, ref_hidden2d, ref_weight))
    bias, ref_bias = (None if t is None else t.contiguous() for t in (bias, ref_bias))
    n, d = hidden2d.shape
    v, dr = ref_weight.shape
    dev = hidden2d.device
    wide = max(hidden2d.dtype, ref_hidden2d.dtype, key=lambda t: t.itemsize)
    tiles = _tiles(dev, n, max(d, dr), wide)
    row_blocks = triton.cdiv(n, tiles.block_n)
    n_tiles = triton.cdiv(v, tiles.block_v)
    splits, tiles_per_split = _triton_utils.vocab_splits(dev, row_blocks, n_tiles)
    log_a, log_b = (math.log1p(-options.beta), math.log(options.beta)) if options.divergence == "jsd" else (0.0, 0.0)
    launch = _launch_args(hidden2d, weight, bias, ref_hidden2d, ref_weight, ref_bias, tiles)
    part = torch.empty(7, splits, n, device=dev, dtype=torch.float32)
    if n > 0:
        kl_fwd_kernel[(row_blocks, splits)](
            *launch["heads"],
            part,
            *launch["dims"],
            tiles_per_split,
            n_tiles,
            1.0 / temperature,
            REVERSE=options.divergence == "reverse_kl",
            **launch["flags"],
        )
    row_stats, kl, entropy, rev = _combine_splits(part, options.divergence == "reverse_kl")
    div, c = (kl, kl) if options.divergence == "kl" else (rev, torch.zeros_like(kl))
    if options.divergence == "jsd":
        part = torch.empty(2, splits, n, device=dev, dtype=torch.float32)
        if n > 0:
            jsd_fwd_kernel[(row_blocks, splits)](
                *launch["heads"],
                row_stats,
                part,
                *launch["dims"],
                tiles_per_split,
                n_tiles,
                1.0 / temperature,
                log_a,
                log_b,
                **launch["flags"],
            )
        jp, jq = part.sum(dim=1)
        div = options.beta * jq + (1.0 - options.beta) * jp
        c = jp
    stats = KLStats(div, kl, entropy)
    row_stats = torch.cat([row_stats, c[None], (row_weight.float() / temperature)[None]]).contiguous()
    return (
        stats,
        *_grads(launch, row_stats, bias, options, temperature, needs_grad, tiles, vocab_chunk, (log_a, log_b)),
    )


def _launch_args(hidden2d, weight, bias, ref_hidden2d, ref_weight, ref_bias, tiles) -> dict:
    """The kernels' shared arguments: ``heads`` (an absent bias is bound to its hidden), ``dims``, ``flags``."""
    dev = hidden2d.device
    heads = (hidden2d, weight, hidden2d if bias is None else bias)
    ref_heads = (ref_hidden2d, ref_weight, ref_hidden2d if ref_bias is None else ref_bias)
    n, d = hidden2d.shape
    v, dr = ref_weight.shape
    strides = (hidden2d.stride(0), weight.stride(0), ref_hidden2d.stride(0), ref_weight.stride(0))
    flags = dict(
        HAS_BIAS=bias is not None,
        HAS_RBIAS=ref_bias is not None,
        UPCAST=_triton_utils.upcast_dot_operands(dev, hidden2d.dtype),
        R_UPCAST=_triton_utils.upcast_dot_operands(dev, ref_hidden2d.dtype),
        BLOCK_N=tiles.block_n,
        BLOCK_V=tiles.block_v,
        BLOCK_D=tiles.block_d,
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )
    return dict(heads=(*heads, *ref_heads), dims=(n, v, d, dr, *strides), flags=flags)


def _grads(launch, row_stats, bias, options, temperature, needs_grad, tiles, vocab_chunk, log_ab):
    """(grad_hidden, grad_weight, grad_bias) by [N, Vc] chunks of d/dx and two cuBLAS GEMMs per chunk."""
    hidden2d, weight = launch["heads"][:2]
    n, d = hidden2d.shape
    v = weight.shape[0]
    dev = hidden2d.device
    dtype = hidden2d.dtype
    want_h = needs_grad[0]
    want_w = needs_grad[1]
    want_b = needs_grad[2] and bias is not None
    if not (want_h or want_w or want_b):
        return None, None, None
    # fp32 sum over chunks: one rounding per chunk's cuBLAS product (see _fused_linear_logprob_triton).
    grad_h = torch.zeros(n, d, device=dev, dtype=torch.float32) if want_h else None
    grad_w = torch.empty(v, d, device=dev, dtype=weight.dtype) if want_w else None
    grad_b = torch.empty(v, device=dev, dtype=bias.dtype) if want_b else None
    buf = _triton_utils.grad_chunk_buffer(n, v, tiles.block_v, dtype, dev, vocab_chunk)
    for v0 in range(0, v, buf.shape[1]):
        block = buf[:, : min(buf.shape[1], v - v0)]
        v1 = v0 + block.shape[1]
        if n > 0:
            kl_bwd_kernel[(triton.cdiv(n, tiles.block_n), triton.cdiv(block.shape[1], tiles.block_v))](
                *launch["heads"],
                row_stats,
                block,
                *launch["dims"],
                block.stride(0),
                v0,
                block.shape[1],
                1.0 / temperature,
                1.0 - options.beta,
                *log_ab,
                KIND=KINDS[options.divergence],
                **launch["flags"],
            )
        if grad_w is not None:
            torch.mm(block.t(), hidden2d, out=grad_w[v0:v1])
        if grad_h is not None and dtype == torch.float32:
            grad_h.addmm_(block, weight[v0:v1])
        elif grad_h is not None:
            grad_h += block @ weight[v0:v1]
        if grad_b is not None:
            grad_b[v0:v1] = block.sum(dim=0, dtype=torch.float32)
    return (grad_h.to(dtype) if grad_h is not None else None), grad_w, grad_b
