"""Build and check the CUDA row kernels (``csrc/row_kernels_cuda.cu``), which no installed extension links.

Built here with the machine's ``nvcc`` into a small pybind11 module (``row_kernels_cuda_ext.cpp`` +
the .cu, cudart linked statically, sm_90 code plus PTX), then imported from the build folder. Checked against
float64: ``row_stats`` (lse, logp, entropy of whole [R, V] rows) and ``row_grad`` (the in-place logit gradient
of g_lp·logp + g_ent·H), fp32 and bf16, with ignored rows and logits offset by 1e4.
"""

from __future__ import annotations

import importlib.util
import math
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import torch

from hotloop.kernels import _cpu_ext

from . import _reference
from ._report import Check

HERE = Path(__file__).resolve().parent
CSRC = HERE.parents[1] / "csrc"
IGNORE = -100


def build(build_dir: Path, arch: str = "90"):
    """nvcc-compile the module into ``build_dir`` and import it; raises with nvcc's error on failure."""
    import pybind11

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise RuntimeError("nvcc: not on PATH")
    build_dir.mkdir(parents=True, exist_ok=True)
    out = build_dir / f"_row_kernels_cuda{sysconfig.get_config_var('EXT_SUFFIX')}"
    cmd = [
        nvcc,
        "-O3",
        "-std=c++17",
        "-shared",
        "-Xcompiler",
        "-fPIC",
        f"-gencode=arch=compute_{arch},code=sm_{arch}",
        f"-gencode=arch=compute_{arch},code=compute_{arch}",
        f"-I{CSRC}",
        f"-I{pybind11.get_include()}",
        f"-I{sysconfig.get_paths()['include']}",
        str(HERE / "row_kernels_cuda_ext.cpp"),
        str(CSRC / "row_kernels_cuda.cu"),
        "-o",
        str(out),
    ]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"nvcc failed: {run.stderr.strip()[-2000:]}")
    spec = importlib.util.spec_from_file_location("_row_kernels_cuda", out)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["_row_kernels_cuda"] = module
    return module


def _reference_rows(x, targets, s):
    """float64 (lse, logp, entropy, log_softmax) of s·x [R, V]; ignored rows get logp = entropy = 0."""
    z = x.double() * s
    lp = torch.log_softmax(z, dim=-1)
    keep = targets != IGNORE
    logp = torch.where(keep, lp.gather(1, targets.clamp_min(0)[:, None])[:, 0], 0.0)
    ent = torch.where(keep, -(lp.exp() * lp).sum(-1), 0.0)
    return torch.logsumexp(z, dim=-1), logp, ent, lp


def check_rows(module, rows: int, vocab: int, device) -> list[Check]:
    checks = []
    stream = torch.cuda.current_stream(device).cuda_stream
    for dtype, offset in ((torch.float32, 0.0), (torch.bfloat16, 0.0), (torch.float32, 1e4)):
        x = (torch.randn(rows, vocab, device=device) * 2 + offset).to(dtype)
        targets = torch.randint(0, vocab, (rows,), device=device)
        targets[torch.rand(rows, device=device) < 0.1] = IGNORE
        s, flag = 1 / 0.7, 0 if dtype == torch.float32 else 1
        lse, logp, ent = (torch.full((rows,), math.nan, device=device) for _ in range(3))
        err = module.row_stats(
            x.data_ptr(),
            targets.data_ptr(),
            lse.data_ptr(),
            logp.data_ptr(),
            ent.data_ptr(),
            rows,
            vocab,
            x.stride(0),
            flag,
            s,
            IGNORE,
            stream,
        )
        ref_lse, ref_logp, ref_ent, lp = _reference_rows(x, targets, s)
        tag = f"R={rows} V={vocab} {str(dtype).split('.')[-1]}{' +1e4' if offset else ''}"
        tol = 8 * torch.finfo(torch.float32).eps * 1.5e4 if offset else 1e-5
        checks.append(Check("cuda-rows", f"{tag}: launch status (cudaError_t)", float(err), 0.0, "abs"))
        for name, out, ref in (("lse", lse, ref_lse), ("logp", logp, ref_logp), ("entropy", ent, ref_ent)):
            checks.append(Check("cuda-rows", f"{tag}: row_stats {name}", _reference.relative_error(out, ref), tol))
        checks.append(_check_grad(module, x, targets, ref_lse, ref_ent, lp, s, flag, stream, tag, tol))
    return checks


def _check_grad(module, x, targets, ref_lse, ref_ent, lp, s, flag, stream, tag, tol) -> Check:
    rows, vocab = x.shape
    g_lp, g_ent = torch.randn(rows, device=x.device), torch.randn(rows, device=x.device)
    hi, lo = _cpu_ext.split_lse(ref_lse, rows)
    ent32 = ref_ent.float()
    block = x.clone()
    err = module.row_grad(
        block.data_ptr(),
        targets.data_ptr(),
        hi.data_ptr(),
        lo.data_ptr(),
        ent32.data_ptr(),
        g_lp.data_ptr(),
        g_ent.data_ptr(),
        rows,
        vocab,
        block.stride(0),
        0,
        flag,
        s,
        IGNORE,
        stream,
    )
    p = lp.exp()
    onehot = torch.zeros_like(p).scatter_(1, targets.clamp_min(0)[:, None], 1.0)
    ref = s * (g_lp.double()[:, None] * (onehot - p) - g_ent.double()[:, None] * p * (lp + ref_ent[:, None]))
    ref = torch.where((targets != IGNORE)[:, None], ref, 0.0)
    e = _reference.relative_error(block, ref) if err == 0 else math.inf
    return Check("cuda-rows", f"{tag}: row_grad", e, max(tol, _reference.TOLERANCE[x.dtype]))
