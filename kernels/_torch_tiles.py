"""Building blocks of the PyTorch (CPU) path shared by the fused kernels: tile budget, GEMMs into tiles, row passes.

A tile is an fp32 ``[R, Vb]`` block of logits (rows R of the tokens, columns Vb of the vocabulary)
that one GEMM writes and the row passes then read while it is still in cache:

- ``fold_block_``: folds a tile into running fp64 per-row statistics (max, Σe^{z−m}, Σe^{z−m}(z−m),
  z_t), so a row may be swept in vocabulary blocks (``_cpu_ext.new_row_state`` / ``finish_row_state``);
- ``row_grad_``: overwrites a tile with d(g_lp·logp + g_ent·H)/d logit, in place.

Both use the csrc/ row kernels on CPU when they were built (``_cpu_ext``), else a few fp32 torch
passes (max-shifted, so |logits| ~ 1e4 neither overflows nor cancels). Budget: ``HOTLOOP_BLOCK_BYTES``
(CPU default 16 MiB: the tile is still in L3 when its row pass reads it; CUDA with
``HOTLOOP_BACKEND=torch``: 1/64 of free memory in [32, 256] MiB), at most 1/4 of the [N, V] logits
once those pass 32 MiB.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import torch
from torch import Tensor

from . import _cpu_ext

MIN_BLOCK_BYTES, MAX_BLOCK_BYTES = 32 << 20, 256 << 20
# CPU: a 16 MiB logits tile stays in a server L3 between its GEMM and its row pass (and keeps the
# extra peak memory of fwd+bwd at N=2048, V=32000 under 1/8 of the naive computation's).
CPU_BLOCK_BYTES = 16 << 20
MIN_BLOCK_COLS = 1024  # narrower vocabulary blocks make skinny GEMMs; taller N is split into row tiles
# Full-row chunks thinner than this make the grad_W GEMM (K = rows) skinny and re-stream the [V, D]
# weight and its fp32 gradient once per chunk; they exceed the default budget to stay this tall.
MIN_CHUNK_ROWS = 256
def block_bytes(device: torch.device) -> int:
    """Byte budget of one fp32 tile: ``HOTLOOP_BLOCK_BYTES`` if set; CPU 16 MiB; CUDA 1/64 of free memory in [32, 256] MiB."""
    if "HOTLOOP_BLOCK_BYTES" in os.environ:
        return max(4, int(os.environ["HOTLOOP_BLOCK_BYTES"]))
    if device.type != "cuda":
        return CPU_BLOCK_BYTES
    return min(MAX_BLOCK_BYTES, max(MIN_BLOCK_BYTES, torch.cuda.mem_get_info(device)[0] // 64))


def block_elements(n: int, v: int, device: torch.device) -> int:
    """fp32 elements per tile: within the budget, and at most 1/4 of the [N, V] logits once they pass 32 MiB."""
    return max(1, min(block_bytes(device), max(MIN_BLOCK_BYTES, n * v)) // 4)


def block_rows(n: int, v: int, device: torch.device) -> int:
    """Rows C of a full-row [C, V] chunk (``logprob_fwd_bwd``): the budget's; with the default budget >= min(N, 256)."""
    rows = block_elements(n, v, device) // max(v, 1)
    if "HOTLOOP_BLOCK_BYTES" not in os.environ:  # an explicit budget is a hard cap
        rows = max(rows, MIN_CHUNK_ROWS)
    return max(1, min(n, rows))


def block_shape(n: int, v: int, device: torch.device) -> tuple[int, int]:
    """(R, Vb) of the [R, Vb] tiles of the vocabulary-blocked passes.

    All N rows while that leaves Vb >= min(MIN_BLOCK_COLS, elements / 16); taller inputs are split into row tiles.
    """
    elements = block_elements(n, v, device)
    cols = min(v, max(min(MIN_BLOCK_COLS, max(1, elements // 16)), elements // max(n, 1)))
    return max(1, min(n, elements // cols)), cols


def spans(total: int, step: int) -> Iterator[tuple[int, int]]:  # [a, b) ranges covering [0, total)
    return ((a, min(total, a + step)) for a in range(0, total, step))


def fold_block_(block: Tensor, targets: Tensor, vocab_start: int, inv_temperature: float, state: Tensor, *,
                with_entropy: bool = True) -> None:
    """Fold block [R, Vb] fp32 (columns vocab_start.. of the rows) into the running state [4, R] float64.

    The state (``_cpu_ext.new_row_state``: max m, S = Σe^{z−m}, T = Σe^{z−m}(z−m), z_t) is merged
    block by block, so a row may be swept in vocabulary blocks; ``_cpu_ext.finish_row_state``
    turns it into (lse, logp, entropy). Native kernel on CPU when built, else torch ops. Without
    ``with_entropy`` the native kernel leaves T alone (the entropy it would give is meaningless).
    """
    if block.device.type == "cpu" and _cpu_ext.available():
        _cpu_ext.row_stats_fold_(block, targets, vocab_start=vocab_start, inv_temperature=inv_temperature,
                                 state=state, with_entropy=with_entropy)  # fmt: skip
        return
    m, total, shifted, target_logit = state.unbind(0)
    s = inv_temperature
    new_m = torch.maximum(m, block.amax(dim=1).double() * s)
    seen = total > 0  # S' = S e^{m−m'}, T' = e^{m−m'}(T + (m−m')S); nothing to rescale before the first column
    shift = torch.where(seen, m - new_m, 0.0)
    shifted.copy_(torch.where(seen, torch.exp(shift) * (shifted + shift * total), 0.0))
    total.mul_(torch.exp(shift))
    m.copy_(new_m)
    d = block.mul(s).sub_(torch.where(new_m > -math.inf, new_m, 0.0).float().unsqueeze(1))  # z − m' <= 0
    e = torch.exp(d)
    total.add_(e.sum(dim=1, dtype=torch.float64))
    shifted.add_(d.mul_(e).nan_to_num_(nan=0.0).sum(dim=1, dtype=torch.float64))  # e·d → 0 where z = −inf
    col = targets - vocab_start
    hit = (col >= 0) & (col < block.shape[1])
    picked = block.gather(1, col.clamp(0, block.shape[1] - 1).unsqueeze(1)).squeeze(1).double() * s
    target_logit.copy_(torch.where(hit, picked, target_logit))


def row_stats(logits: Tensor, targets: Tensor, inv_temperature: float, ignore_index: int):
    """(lse [R] fp64, logp, entropy [R] fp32) of whole rows ``inv_temperature · logits`` [R, V] fp32 (unchanged)."""
    state = _cpu_ext.new_row_state(logits.shape[0], logits.device)
    fold_block_(logits, targets, 0, inv_temperature, state)
    return _cpu_ext.finish_row_state(state, targets, ignore_index)


def row_grad_(block, targets, vocab_start, lse, entropy, grad_logp, grad_entropy, inv_temperature, ignore_index):
    """Overwrite block [R, Vb] fp32 (columns vocab_start.. of the rows) with d objective / d raw logit.

    ``lse`` [R] is float64 (``finish_row_state``); it is applied as fp32 hi + lo (``_cpu_ext.split_lse``).
    """
    if block.device.type == "cpu" and _cpu_ext.available():
        _cpu_ext.row_grad_(block, targets, vocab_start=vocab_start, lse=lse, entropy=entropy, grad_logp=grad_logp,
                           grad_entropy=grad_entropy, inv_temperature=inv_temperature, ignore_index=ignore_index)
        return
    s, keep = inv_temperature, targets != ignore_index
    g_lp = torch.where(keep, grad_logp, 0.0)
    lse_hi, lse_lo = _cpu_ext.split_lse(lse, block.shape[0])
    log_p = block.mul_(s).sub_(lse_hi.unsqueeze(1)).sub_(lse_lo.unsqueeze(1))  # log p_j = (z − hi) − lo, in place
    if grad_entropy is None:
        log_p.exp_().mul_((-s * g_lp).unsqueeze(1))
    else:  # -s·p·[g_lp + g_ent·H + g_ent·log p]
        g_ent = torch.where(keep, grad_entropy, 0.0)
        p = torch.exp(log_p)
        log_p.mul_(g_ent.unsqueeze(1)).add_((g_lp + g_ent * entropy).unsqueeze(1)).mul_(p).mul_(-s)
    col = targets - vocab_start
    hit = keep & (col >= 0) & (col < block.shape[1])
    col = torch.where(hit, col, 0).unsqueeze(1)
    block.scatter_add_(1, col, torch.where(hit, s * g_lp, 0.0).unsqueeze(1))


def linear_into(out: Tensor, hidden32: Tensor, weight32: Tensor, bias: Tensor | None) -> None:
    """out [R, Vb] fp32 ← hidden32 [R, D] @ weight32 [Vb, D].T (+ bias [Vb], upcast), no extra copy."""
    if bias is None:
        torch.mm(hidden32, weight32.T, out=out)
    else:
        torch.addmm(bias.float(), hidden32, weight32.T, out=out)


def logits_into(out: Tensor, hidden32: Tensor, weight: Tensor, bias: Tensor | None, vocab_start: int) -> None:
    """out [R, Vb] fp32 ← hidden32 @ weight[v0:v0+Vb].T + bias; a low-precision weight is upcast in slices."""
    d = weight.shape[1]
    step = out.shape[1] if weight.dtype == torch.float32 else max(1, block_bytes(out.device) // (4 * max(d, 1)))
    for c0, c1 in spans(out.shape[1], step):
        cols = slice(vocab_start + c0, vocab_start + c1)
        linear_into(out[:, c0:c1], hidden32, weight[cols].float(), None if bias is None else bias[cols])


def scratch(buf: Tensor, rows: int, cols: int) -> Tensor:  # contiguous [rows, cols] view of a flat buffer
    return buf[: rows * cols].view(rows, cols)


def grad_gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    """Operand dtype of the two gradient GEMMs (fp32 accumulation inside either way).

    bf16 GEMMs run ~2x faster than fp32 on CPUs with AVX512-BF16/AMX and match the Triton path
    (gradient block in the input dtype); CPU fp16 GEMMs are ~50x slower, so fp16 uses fp32.
    """
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


def add_row_grads(g: Tensor, h: Tensor, w: Tensor, rows: Tensor, span: slice | None, gh, gw) -> None:
    """grad_H[rows] = g @ w and grad_W += g.T @ h into fp32 [N, D] / [V, D] (g [R, V], h [R, D], w [V, D])."""
    if gh is not None and span is not None and g.dtype == gh.dtype:
        torch.mm(g, w, out=gh[span])
    elif gh is not None:
        gh.index_copy_(0, rows, torch.mm(g, w).to(gh.dtype))
    if gw is not None and g.dtype == gw.dtype:
        gw.addmm_(g.T, h)
    elif gw is not None:
        gw.add_(torch.mm(g.T, h))
