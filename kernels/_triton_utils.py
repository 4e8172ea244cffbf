"""Block, warp and grid heuristics shared by hotloop's Triton kernels.

Chosen at call time from the device (never at import): H100-sized tiles on CUDA, small tiles under
``TRITON_INTERPRET=1`` so that interpreter tests stay fast. ``tl.dot`` needs every tile dimension
≥ 16, so the smallest tiles are 16 wide; ragged edges are handled with masked loads in the kernels.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton

from . import _dispatch
from ._torch_tiles import block_bytes


@dataclass(frozen=True)
class MatmulTiles:
    """Tile sizes and launch options of a row-block × vocab-tile matmul kernel."""

    block_n: int
    block_v: int
    block_d: int
    num_warps: int
    num_stages: int


def logits_tiles(device: torch.device, n_rows: int, hidden: int, dtype: torch.dtype) -> MatmulTiles:
    """Tiles for a kernel that computes ``hidden[N, D] @ weight[V, D].T`` one [BLOCK_N, BLOCK_V] tile at a time."""
    if _dispatch.triton_interpreting() and device.type != "cuda":
        return MatmulTiles(block_n=16, block_v=32, block_d=16, num_warps=1, num_stages=1)
    # 128-row blocks reuse each weight tile across more rows (the weight is the big operand);
    # a short batch keeps 64 so fewer rows are masked out.
    block_n = 128 if n_rows >= 128 else 64
    # 3 stages of (BLOCK_N + BLOCK_V) × BLOCK_D operands: 96 KiB of shared memory at 16 bits and
    # BLOCK_D = 64; fp32 halves BLOCK_D to stay at that size.
    block_d = 64 if dtype.itemsize <= 2 else 32
    block_d = min(block_d, max(16, triton.next_power_of_2(hidden)))
    return MatmulTiles(
        block_n=block_n, block_v=128, block_d=block_d, num_warps=8 if block_n == 128 else 4, num_stages=3
    )


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def vocab_splits(device: torch.device, row_blocks: int, vocab_tiles: int) -> tuple[int, int]:
    """Split the vocabulary tiles of each row block across programs so the grid fills the GPU.

    Returns ``(splits, tiles_per_split)``; every split owns at least one tile.
    """
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        target = max(1, 2 * _sm_count(index) // max(row_blocks, 1))
    else:
        target = 3  # interpreter: a few splits, enough to exercise the cross-split combine
    splits = max(1, min(target, vocab_tiles))
    tiles_per_split = triton.cdiv(vocab_tiles, splits)
    return triton.cdiv(vocab_tiles, tiles_per_split), tiles_per_split


def vocab_chunk(vocab: int, block_v: int, *, rows: int, itemsize: int, budget_bytes: int | None) -> int:
    """Width Vc of the backward's [N, Vc] logit-gradient buffer, a multiple of ``block_v``.

    At most V/8 (an eighth of the naive logits) and, given ``budget_bytes``, at most what an
    [rows, Vc] buffer of ``itemsize``-byte elements fits in it, so the buffer stays O(budget) however
    large N·V grows; at least one tile.
    """
    chunk = vocab // 8
    if budget_bytes is not None:
        chunk = min(chunk, budget_bytes // max(rows * itemsize, 1))
    return max(block_v, chunk // block_v * block_v)


def grad_chunk_buffer(
    rows: int, vocab: int, block_v: int, dtype: torch.dtype, device: torch.device, vocab_chunk_cols: int | None = None
) -> torch.Tensor:
    """The backward's [N, Vc] logit-gradient buffer: ``vocab_chunk_cols`` rounded up to a tile, by default
    :func:`vocab_chunk` within the tile budget (``_torch_tiles.block_bytes``: 1/64 of free GPU memory in
    [32, 256] MiB); never wider than the vocabulary's tiles."""
    chunk = vocab_chunk_cols or vocab_chunk(
        vocab, block_v, rows=rows, itemsize=dtype.itemsize, budget_bytes=block_bytes(device)
    )
    width = min(triton.cdiv(chunk, block_v), triton.cdiv(vocab, block_v)) * block_v
    return torch.empty(rows, width, device=device, dtype=dtype)


def upcast_dot_operands(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether kernels must cast 16-bit ``tl.dot`` operands to fp32 first.

    Only under the interpreter: triton 3.x's interpreter keeps bf16 as raw uint16 bits and
    ``np.matmul``s them as integers, so a bf16 ``tl.dot`` returns garbage there. The cast is exact
    (bf16 ⊂ fp32), so the interpreted kernel computes what the GPU's bf16 × bf16 → fp32 dot computes.
    """
    return device.type != "cuda" and _dispatch.triton_interpreting() and dtype in (torch.bfloat16, torch.float16)
