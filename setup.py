"""Builds csrc/ (pybind11, OpenMP) as the optional extensions ``hotloop.kernels._row_kernels`` (the fused
log-prob's row kernels) and ``hotloop.runtime._word_sum`` (weight-sync fingerprints).

The build never fails the install: without a C++ compiler (or OpenMP) it prints one warning and
hotloop runs its PyTorch path (see docs/native-kernels.md). When ``nvcc`` is on PATH it also
compiles csrc/row_kernels_cuda.cu to an object, as a compile check only: the CUDA kernels are not
linked into this CPU extension. Environment:

- ``HOTLOOP_MARCH_NATIVE=1``: add ``-march=native`` (the .so then runs only on CPUs like this one;
  the default build is portable and picks AVX-512 / AVX2 clones at run time).
- ``HOTLOOP_SKIP_CUDA_CHECK=1``: skip the nvcc compile check.
"""

import os
import shutil
import subprocess
import sys

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext

CSRC = "csrc"


def _compile_flags() -> list[str]:
    flags = ["-O3", "-fopenmp"]
    if os.environ.get("HOTLOOP_MARCH_NATIVE", "0") == "1":
        flags.append("-march=native")
    return flags


class OptionalBuildExt(build_ext):
    """build_ext that turns a failed native build into a one-line warning."""

    _warned = False

    def run(self) -> None:
        try:
            super().run()
        except Exception as err:  # no compiler at all (DistutilsPlatformError), or the copy of a .so never built
            self._warn(err)
        _check_cuda_sources(self.build_temp)

    def build_extension(self, ext) -> None:
        try:
            super().build_extension(ext)
        except Exception as err:  # CompileError, LinkError, missing OpenMP, ...
            self._warn(err)

    def _warn(self, err: Exception) -> None:
        if not self._warned:
            detail = (str(err).splitlines() or [""])[0][:200]
            print(
                f"WARNING: hotloop: native kernels not built ({type(err).__name__}: {detail}); "
                "the PyTorch path will be used.",
                file=sys.stderr,
            )
        self._warned = True


def _check_cuda_sources(build_temp: str) -> None:
    """Compile csrc/row_kernels_cuda.cu with nvcc -c when nvcc exists (a check; nothing is linked)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None or os.environ.get("HOTLOOP_SKIP_CUDA_CHECK", "0") == "1":
        return
    os.makedirs(build_temp, exist_ok=True)
    out = os.path.join(build_temp, "row_kernels_cuda.o")
    cmd = [nvcc, "-c", "-O3", "-std=c++17", os.path.join(CSRC, "row_kernels_cuda.cu"), "-o", out]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        first = (result.stderr.strip().splitlines() or ["no output"])[0]
        print(f"WARNING: hotloop: nvcc could not compile csrc/row_kernels_cuda.cu: {first}", file=sys.stderr)


def _extension(name: str, *sources: str) -> Pybind11Extension:
    """One csrc/ extension: C++17, OpenMP, headers from csrc/."""
    return Pybind11Extension(
        name,
        sources=[os.path.join(CSRC, source) for source in sources],
        include_dirs=[CSRC],
        extra_compile_args=_compile_flags(),
        extra_link_args=["-fopenmp"],
        cxx_std=17,
    )


row_kernels = _extension("hotloop.kernels._row_kernels", "bindings.cpp", "row_kernels_cpu.cpp")
word_sum = _extension("hotloop.runtime._word_sum", "word_sum.cpp")
bf16_gemm = _extension("hotloop.kernels._bf16_gemm", "bf16_gemm.cpp")

setup(ext_modules=[row_kernels, word_sum, bf16_gemm], cmdclass={"build_ext": OptionalBuildExt})
