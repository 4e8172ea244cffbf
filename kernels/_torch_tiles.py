"""Building blocks of the PyTorch (CPU) path shared by the fused kernels: tile budget, GEMMs into tiles, row passes.

A tile is an fp32 ``[R, Vb]`` block of logits (rows R of the tokens, columns Vb of the vocabulary)
that one GEMM writes and the row passes then read while it is still in cache:

- ``fold_block_``: folds a tile into running fp64 per-row statistics (max, Σe^{z−m}, Σe^{z−m}(z−m),
  z_t), so a row may be swept in vocabulary blocks (``_cpu_ext.new_row_state`` / ``finish_row_state``);
- ``row_grad_``: overwrites a tile with d(g_lp·logp + g_ent·H)/d logit, in place, or writes it as the bf16
  operand of the gradient GEMMs in the same pass (``out``).

Both use the csrc/ row kernels on CPU when they were built (``_cpu_ext``), else a few fp32 torch
passes (max-shifted, so |logits| ~ 1e4 neither overflows nor cancels). Budget: ``HOTLOOP_BLOCK_BYTES``
(CPU default: half the last-level cache, read from sysfs, in [8, 64] MiB, 16 MiB if unknown: the tile is
still in cache when its row pass reads it; CUDA with ``HOTLOOP_BACKEND=torch``: 1/64 of free memory in
[32, 256] MiB); vocabulary-blocked tiles take at most 1/4 of the [N, V] logits once those pass 32 MiB. Full-row
chunks (``block_rows``) are at least ``min_chunk_rows()`` tall (256 rows per BLAS thread in [256, 1024]: thinner ones
make the grad_W GEMM skinny and re-stream the weight; measured on 2 cores at N = 2048, V = 32000: 256-row chunks
1.18x the matmul floor, 512-row ones 1.09x) and split N into equal chunks. The buffers are lent by ``_workspace``.
A bf16 head's logits come from the bf16 → fp32 GEMM of ``_bf16_gemm_ext`` when it can run (``packable``: the
weight packed once per call, ``packed_head``), else from an fp32 GEMM on upcast slices.
Whole units of the sequence-sum losses (``unit_block_bytes``) may take a larger block, up to 1/8 of the
available memory: one pair's ``[2T, V]`` logits, which Liger's chunked losses also materialize.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterator
from contextlib import nullcontext

import torch
from torch import Tensor

from . import _bf16_gemm_ext, _cpu_ext
from ._bf16_gemm_ext import PackedHead

MIN_BLOCK_BYTES = 32 << 20
MAX_BLOCK_BYTES = 256 << 20
# CPU: a tile of half the last-level cache stays there between its GEMM and its row pass (16 MiB on a
# 32 MiB L3, which also keeps the extra peak memory of fwd+bwd at N=2048, V=32000 under 1/8 of naive's).
CPU_BLOCK_BYTES = 16 << 20
CPU_BLOCK_RANGE = (8 << 20, 64 << 20)
MIN_BLOCK_COLS = 1024  # narrower vocabulary blocks make skinny GEMMs; taller N is split into row tiles
# Full-row chunks thinner than min_chunk_rows() make the grad_W GEMM (K = rows) skinny and re-stream the
# [V, D] weight and its fp32 gradient once per chunk; they exceed the default budget to stay that tall.
ROWS_PER_THREAD = 256
CHUNK_ROWS_RANGE = (256, 1024)
_LLC_PATH = "/sys/devices/system/cpu/cpu0/cache/index{}/size"


@functools.cache
def cpu_block_bytes() -> int:
    """Half the largest CPU cache sysfs reports, within ``CPU_BLOCK_RANGE``; ``CPU_BLOCK_BYTES`` if unknown."""
    sizes = []
    for index in range(8):
        try:
            with open(_LLC_PATH.format(index)) as f:
                text = f.read().strip().upper()
        except OSError:
            break
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * scale)
    if not sizes:
        return CPU_BLOCK_BYTES
    return min(CPU_BLOCK_RANGE[1], max(CPU_BLOCK_RANGE[0], max(sizes) // 2))


def min_chunk_rows() -> int:
    """Least rows of a full-row chunk: ``ROWS_PER_THREAD`` per BLAS thread, within ``CHUNK_ROWS_RANGE``."""
    return min(CHUNK_ROWS_RANGE[1], max(CHUNK_ROWS_RANGE[0], ROWS_PER_THREAD * torch.get_num_threads()))


def block_bytes(device: torch.device) -> int:
    """Byte budget of one fp32 tile: ``HOTLOOP_BLOCK_BYTES`` if set; CPU ``cpu_block_bytes()``; CUDA 1/64 of free
    memory in [32, 256] MiB."""
    if "HOTLOOP_BLOCK_BYTES" in os.environ:
        return max(4, int(os.environ["HOTLOOP_BLOCK_BYTES"]))
    if device.type != "cuda":
        return cpu_block_bytes()
    return min(MAX_BLOCK_BYTES, max(MIN_BLOCK_BYTES, torch.cuda.mem_get_info(device)[0] // 64))


def unit_block_bytes(device: torch.device) -> int:
    """Largest fp32 block of one whole unit (a DPO pair, a KTO sample): ``HOTLOOP_BLOCK_BYTES`` if set (a hard
    cap), else 1/8 of the available memory (CPU) or of the free memory (CUDA), at least ``block_bytes``."""
    if "HOTLOOP_BLOCK_BYTES" in os.environ or device.type not in ("cpu", "cuda"):
        return block_bytes(device)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return max(block_bytes(device), free // 8)


def block_elements(n: int, v: int, device: torch.device) -> int:
    """fp32 elements per tile: within the budget, and at most 1/4 of the [N, V] logits once they pass 32 MiB."""
    return max(1, min(block_bytes(device), max(MIN_BLOCK_BYTES, n * v)) // 4)


def block_rows(n: int, v: int, device: torch.device) -> int:
    """Rows C of a full-row [C, V] chunk (``logprob_fwd_bwd``): the budget's, by default >= min(N, min_chunk_rows())."""
    rows = block_bytes(device) // (4 * max(v, 1))
    if "HOTLOOP_BLOCK_BYTES" not in os.environ:  # an explicit budget is a hard cap
        rows = max(rows, min_chunk_rows())
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


def even_step(total: int, most: int) -> int:
    """Step of ``spans(total, step)`` giving as few spans as steps of ``most`` do, of (near) equal length."""
    return math.ceil(total / math.ceil(total / most)) if total else most


def fold_block_(
    block: Tensor,
    targets: Tensor,
    vocab_start: int,
    inv_temperature: float,
    state: Tensor,
    *,
    with_entropy: bool = True,
) -> None:
    """Fold block [R, Vb] fp32 (columns vocab_start.. of the rows) into the running state [4, R] float64.

    The state (``_cpu_ext.new_row_state``: max m, S = Σe^{z−m}, T = Σe^{z−m}(z−m), z_t) is merged
    block by block, so a row may be swept in vocabulary blocks; ``_cpu_ext.finish_row_state``
    turns it into (lse, logp, entropy). Native kernel on CPU when built, else torch ops. Without
    ``with_entropy`` the native kernel leaves T alone (the entropy it would give is meaningless).
    """
    if block.device.type == "cpu" and _cpu_ext.available():
        _cpu_ext.row_stats_fold_(
            block,
            targets,
            vocab_start=vocab_start,
            inv_temperature=inv_temperature,
            state=state,
            with_entropy=with_entropy,
        )
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


def row_grad_(
    block, targets, vocab_start, lse, entropy, grad_logp, grad_entropy, inv_temperature, ignore_index, out=None
):
    """Overwrite block [R, Vb] fp32 (columns vocab_start.. of the rows) with d objective / d raw logit; or, with
    ``out`` ([R, Vb] bf16), write the gradient there in one pass (``block`` is then scratch: the native kernel
    leaves it, the torch ops overwrite it).

    ``lse`` [R] is float64 (``finish_row_state``); it is applied as fp32 hi + lo (``_cpu_ext.split_lse``).
    """
    if block.device.type == "cpu" and _cpu_ext.available():
        _cpu_ext.row_grad_(
            block,
            targets,
            vocab_start=vocab_start,
            lse=lse,
            entropy=entropy,
            grad_logp=grad_logp,
            grad_entropy=grad_entropy,
            inv_temperature=inv_temperature,
            ignore_index=ignore_index,
            out=out,
        )
        return
    s = inv_temperature
    keep = targets != ignore_index
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
    if out is not None:
        out.copy_(block)


def linear_into(out: Tensor, hidden32: Tensor, weight32: Tensor, bias: Tensor | None) -> None:
    """out [R, Vb] fp32 ← hidden32 [R, D] @ weight32 [Vb, D].T (+ bias [Vb], upcast), no extra copy."""
    if bias is None:
        torch.mm(hidden32, weight32.T, out=out)
    else:
        torch.addmm(bias.float(), hidden32, weight32.T, out=out)


def logits_into(
    out: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None, vocab_start: int, head: PackedHead | None = None
) -> None:
    """out [R, Vb] fp32 ← hidden @ weight[v0:v0+Vb].T + bias.

    ``head``: the bf16 weight packed by ``_bf16_gemm_ext`` (hidden bf16): one bf16 → fp32 GEMM. Else hidden is fp32
    and a low-precision weight is upcast in slices.
    """
    if head is not None:
        _bf16_gemm_ext.logits_into(out, hidden, head, vocab_start)
        if bias is not None:
            out.add_(bias[vocab_start : vocab_start + out.shape[1]])
        return
    d = weight.shape[1]
    step = out.shape[1] if weight.dtype == torch.float32 else max(1, block_bytes(out.device) // (4 * max(d, 1)))
    for c0, c1 in spans(out.shape[1], step):
        cols = slice(vocab_start + c0, vocab_start + c1)
        linear_into(out[:, c0:c1], hidden, weight[cols].float(), None if bias is None else bias[cols])


def packable(weight: Tensor) -> bool:
    """Whether ``weight``'s logits GEMM runs as the bf16 → fp32 GEMM of ``_bf16_gemm_ext`` (bf16 CPU heads)."""
    return _bf16_gemm_ext.usable(weight)


def packed_head(weight: Tensor):
    """Context manager: the ``PackedHead`` of a ``packable`` weight, else None."""
    return _bf16_gemm_ext.packed_head(weight) if packable(weight) else nullcontext()


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


def add_row_grads(
    g: Tensor,
    h: Tensor,
    w: Tensor,
    rows: Tensor,
    span: slice | None,
    gh,
    gw,
    *,
    first: bool = False,
    product: Tensor | None = None,
) -> None:
    """grad_H[rows] = g @ w and grad_W += g.T @ h (``first``: grad_W = g.T @ h) into fp32 [N, D] / [V, D]
    (g [R, V], h [R, D], w [V, D]). A bf16 ``g`` forms its grad_W product in bf16, in ``product`` ([V, D] bf16,
    held memory: no page faults) when given, then adds it."""
    if gh is not None and span is not None and g.dtype == gh.dtype:
        torch.mm(g, w, out=gh[span])
    elif gh is not None:
        gh.index_copy_(0, rows, torch.mm(g, w).to(gh.dtype))
    if gw is None:
        return
    if g.dtype != gw.dtype:
        g_w = torch.mm(g.T, h) if product is None else torch.mm(g.T, h, out=product)
        if first:
            gw.copy_(g_w)
        else:
            gw.add_(g_w)
    elif first:
        torch.mm(g.T, h, out=gw)
    else:
        gw.addmm_(g.T, h)
