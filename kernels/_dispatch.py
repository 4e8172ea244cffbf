"""Backend choice for every kernel, made at call time (never at import).

``HOTLOOP_BACKEND`` = ``auto`` (default) | ``triton`` | ``torch``:

- ``auto``:   CUDA tensors run the Triton kernels, CPU tensors the exact chunked PyTorch path
              (which uses the csrc/ row kernels when they were built).
- ``triton``: always Triton. On CPU tensors this only works under ``TRITON_INTERPRET=1``, which is
              how the tests cover the Triton kernels on a machine without a GPU.
- ``torch``:  always the PyTorch path, on any device.
"""

from __future__ import annotations

import os

import torch

from hotloop._errors import expected

BACKENDS = ("auto", "triton", "torch")


def requested_backend() -> str:
    """The value of ``HOTLOOP_BACKEND`` (default ``auto``), validated."""
    value = os.environ.get("HOTLOOP_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(expected("HOTLOOP_BACKEND", f"one of {BACKENDS}", repr(value)))
    return value


def triton_interpreting() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton kernels then run on CPU tensors via numpy."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(device: torch.device) -> bool:
    """Whether a kernel whose inputs live on ``device`` should run its Triton implementation."""
    backend = requested_backend()
    if backend == "torch":
        return False
    if backend == "triton":
        if device.type != "cuda" and not triton_interpreting():
            raise RuntimeError(
                f"HOTLOOP_BACKEND=triton needs CUDA tensors or TRITON_INTERPRET=1; got tensors on {device}"
            )
        return True
    return device.type == "cuda"
