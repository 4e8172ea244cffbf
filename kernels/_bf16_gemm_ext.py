"""bf16 × bf16 → fp32 logits GEMM on CPU (``csrc/bf16_gemm.cpp``): the speed of a bf16 GEMM, fp32 logits.

CPU PyTorch offers two ways to compute a bf16 head's logits, both bad for log-probs: ``torch.mm`` of the bf16
operands (AMX / AVX512-BF16, fast) rounds every logit to bf16 (relative 2^-9: a prototype erred by 1.7e-2 in
per-token entropies and 1.0e-2 in gradients), and upcasting the operands to fp32 runs a ~5x slower GEMM
(``python -m bench.bf16_gemm`` on the 2-core bench machine, 1024 × 512 × 32000: fp32 132 ms, bf16 with its upcast
28.2 ms). PyTorch exports the oneDNN micro-kernel of its CPU flash attention, ``at::native::cpublas::brgemm`` (bf16
operands, fp32 accumulation *and* output); this module finds it in libtorch_cpu with ctypes and the extension tiles a
GEMM over it: 20.5 ms at that shape (28.2 ms with the pack), logits within ~4e-6 of float64 at |logit| ~ 4, the fp32
GEMM's accuracy.

- :func:`packed_head`: the head ``weight [V, D]`` bf16 in the micro-kernel's VNNI layout (a ``[D/2, V]`` transpose of
  bf16 pairs; 5–8 ms and one weight's worth of memory per call at V = 32000, D = 512: timed alone, and as the
  difference of bench.bf16_gemm's two hotloop rows), into a workspace buffer;
- :func:`logits_into`: ``out [R, Vb]`` fp32 = ``hidden [R, D]`` bf16 @ ``weight[v0:v0+Vb].T`` from the packed head.

:func:`usable` is True for CPU bf16 heads with an even D (VNNI pairs) when the extension was built, PyTorch exports
the kernel and ``could_pack`` says this CPU runs it, and ``HOTLOOP_NATIVE`` is not ``0``; otherwise callers upcast.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor

from ._workspace import workspace

# at::native::cpublas::brgemm(long ×6, bool, const BFloat16*, const BFloat16*, float*, bool), brgemm_release(bool),
# could_pack(ScalarType): exported by libtorch_cpu (2.13 checked); a missing one turns this path off.
_BRGEMM = "_ZN2at6native7cpublas6brgemmEllllllbPKN3c108BFloat16ES5_Pfb"
_RELEASE = "_ZN2at6native7cpublas14brgemm_releaseEb"
_COULD_PACK = "_ZN2at6native7cpublas10could_packEN3c1010ScalarTypeE"
_BFLOAT16_SCALAR_TYPE = 15  # c10::ScalarType::BFloat16


@functools.cache
def _kernel() -> tuple[ModuleType, int, int] | None:
    """(extension, brgemm address, release address), or None where any part is missing."""
    try:
        module = importlib.import_module("hotloop.kernels._bf16_gemm")
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        could_pack = getattr(lib, _COULD_PACK)
        brgemm, release = getattr(lib, _BRGEMM), getattr(lib, _RELEASE)
    except (ImportError, OSError, AttributeError):
        return None
    could_pack.restype, could_pack.argtypes = ctypes.c_bool, [ctypes.c_int8]
    if not could_pack(_BFLOAT16_SCALAR_TYPE):
        return None
    address = functools.partial(ctypes.cast, typ=ctypes.c_void_p)
    return module, address(brgemm).value, address(release).value


def usable(weight: Tensor) -> bool:
    """Whether ``weight``'s logits GEMM can run here (module docstring)."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and weight.shape[1] % 2 == 0
        and os.environ.get("HOTLOOP_NATIVE", "1").strip() != "0"
        and _kernel() is not None
    )


@dataclass(frozen=True)
class PackedHead:
    """A head ``[V, D]`` in the micro-kernel's VNNI layout: ``packed`` int32 ``[D/2 · V]`` (bf16 pairs)."""

    packed: Tensor
    v: int
    d: int


@contextmanager
def packed_head(weight: Tensor) -> Iterator[PackedHead]:
    """Lend ``weight [V, D]`` bf16 (``usable``) packed into a workspace buffer for the ``with`` block."""
    v, d = weight.shape
    if weight.stride(1) != 1 or weight.stride(0) % 2 or weight.storage_offset() % 2:  # rows of aligned bf16 pairs
        weight = weight.contiguous()
    with workspace(v * d // 2, weight.device, torch.int32) as buf:
        threads = torch.get_num_threads()
        _kernel()[0].vnni_pack(weight.data_ptr(), v, d // 2, weight.stride(0) // 2, buf.data_ptr(), threads)
        yield PackedHead(buf, v, d)


def logits_into(out: Tensor, hidden: Tensor, head: PackedHead, vocab_start: int) -> None:
    """out [R, Vb] fp32 (unit column stride) ← hidden [R, D] bf16 @ weight[v0:v0+Vb].T from the packed head."""
    hidden = hidden if hidden.stride(1) == 1 else hidden.contiguous()
    module, brgemm, release = _kernel()
    rows, cols = out.shape
    module.gemm(
        brgemm,
        release,
        hidden.data_ptr(),
        rows,
        head.d,
        hidden.stride(0),
        head.packed.data_ptr(),
        head.v,
        vocab_start,
        cols,
        out.data_ptr(),
        out.stride(0),
        torch.get_num_threads(),
    )
