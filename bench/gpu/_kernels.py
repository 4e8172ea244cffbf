"""Correctness of the fused linear Triton kernels (log-prob forward/backward with entropy and temperature; KL,
reverse KL and JSD between two heads) against the float64 references of ``_reference``, case by case.

Inputs are fresh random tensors per case; every ``torch.empty`` the launchers allocate would show if left
unwritten (the comparison fails on NaN and on a missing output alike). ``forced_tiles`` pins the launch
configuration the heuristics of ``_triton_utils`` would otherwise choose, so every choice is run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from unittest import mock

import torch

from hotloop.kernels import _triton_utils
from hotloop.kernels._fused_linear_kl_triton import triton_kl_fwd_bwd
from hotloop.kernels._fused_linear_logprob_triton import triton_logprob_bwd, triton_logprob_fwd
from hotloop.kernels.fused_linear_kl import KLOptions

from . import _reference
from ._plan import Case
from ._report import Check

IGNORE = -100
TEMPERATURE = 0.7


def _inputs(case: Case, device, *, d=None, dtype=None):
    dtype, d = dtype or case.dtype, d or case.d
    hidden = (torch.randn(case.n, d, device=device) * (2.0 / math.sqrt(d))).to(dtype)
    weight = torch.randn(case.v, d, device=device).to(dtype)
    bias = torch.randn(case.v, device=device) + case.offset if case.bias or case.masked or case.offset else None
    if case.masked:  # −inf on the first half (whole tiles; the first vocab splits see only −inf) and scattered
        bias[: case.v // 2] = -math.inf
        bias[torch.randperm(case.v, device=device)[: case.v // 50]] = -math.inf
    return hidden, weight, None if bias is None else bias.to(dtype)


def _targets(case: Case, bias, device):
    allowed = torch.arange(case.v, device=device) if bias is None else torch.isfinite(bias).nonzero()[:, 0]
    targets = allowed[torch.randint(0, allowed.numel(), (case.n,), device=device)]
    targets[torch.rand(case.n, device=device) < case.ignored] = IGNORE
    return targets


def _tolerance(case: Case, lse_max: float) -> float:
    """The dtype's tolerance; at |logits| ~ 1e4, the fp32 rounding of the logits (a few ulps of |lse|)."""
    tol = _reference.TOLERANCE[case.dtype]
    return max(tol, 8 * torch.finfo(torch.float32).eps * lse_max) if case.offset else tol


def check_logprob(case: Case, device, section="logprob") -> list[Check]:
    """Forward (logp, entropy) and backward (with and without the entropy term) of one case vs float64."""
    hidden, weight, bias = _inputs(case, device)
    targets = _targets(case, bias, device)
    g_lp, g_ent = torch.randn(case.n, device=device), torch.randn(case.n, device=device)
    stats = triton_logprob_fwd(
        hidden, weight, targets, bias, temperature=TEMPERATURE, ignore_index=IGNORE, with_entropy=True
    )
    chunk = case.v if case.full_chunk else None
    checks = []
    for label, ge in (("+entropy grad", g_ent), ("logp grad only", None)):
        grads = triton_logprob_bwd(
            hidden,
            weight,
            targets,
            bias,
            stats,
            g_lp,
            ge,
            temperature=TEMPERATURE,
            ignore_index=IGNORE,
            needs_grad=(True, True, True),
            vocab_chunk=chunk,
        )
        ref = _reference.logprob(
            hidden, weight, bias, targets, temperature=TEMPERATURE, ignore_index=IGNORE, grad_logp=g_lp, grad_entropy=ge
        )
        tol = _tolerance(case, stats.lse.abs().max().item() if case.n else 0.0)
        outs = {"grad_hidden": grads[0], "grad_weight": grads[1], "grad_bias": grads[2]}
        if ge is not None:
            outs = {"logp": stats.logp, "entropy": stats.entropy, **outs}
        refs = dict(zip(("logp", "entropy", "grad_hidden", "grad_weight", "grad_bias"), ref))
        checks += _compare(section, f"{case.label} {label}", outs, refs, tol)
        del grads, ref
    return checks


def check_kl(case: Case, device, divergences=("kl", "reverse_kl", "jsd"), section="kl") -> list[Check]:
    """Each divergence's per-row value, KL, entropy and gradients (hidden, weight, bias) vs float64."""
    hidden, weight, bias = _inputs(case, device)
    ref_hidden, ref_weight, ref_bias = _inputs(
        dataclasses.replace(case, masked=False), device, d=max(16, case.d // 2), dtype=case.ref_dtype
    )
    if case.masked:  # the policy's masked columns in both heads (a column only the reference masks: KL = inf)
        ref_bias = torch.where(torch.isfinite(bias), ref_bias, -math.inf).to(ref_bias.dtype)
    row_weight = torch.randn(case.n, device=device)
    checks = []
    for div in divergences:
        options = KLOptions(divergence=div, beta=0.3)
        stats, *grads = triton_kl_fwd_bwd(
            hidden,
            weight,
            bias,
            ref_hidden,
            ref_weight,
            ref_bias,
            row_weight,
            options=options,
            temperature=TEMPERATURE,
            needs_grad=(True, True, True),
            vocab_chunk=case.v if case.full_chunk else None,
        )
        ref = _reference.kl(
            hidden,
            weight,
            bias,
            ref_hidden,
            ref_weight,
            ref_bias,
            row_weight,
            divergence=div,
            beta=0.3,
            temperature=TEMPERATURE,
        )
        outs = {
            "divergence": stats.divergence,
            "kl": stats.kl,
            "entropy": stats.entropy,
            "grad_hidden": grads[0],
            "grad_weight": grads[1],
            "grad_bias": grads[2],
        }
        refs = dict(zip(outs, ref))
        # offset: the divergences are differences of logits ~1e4, held to a few fp32 ulps of them, absolutely
        tol = _tolerance(case, 1e4 if case.offset else 0.0)
        checks += _compare(
            section,
            f"{case.label} {div}",
            outs,
            refs,
            tol,
            absolute=("divergence", "kl", "entropy") if case.offset else (),
        )
        del stats, grads, ref
    return checks


def _compare(section, name, outs, refs, tol, absolute=()) -> list[Check]:
    checks = []
    for key, out in outs.items():
        ref = refs[key]
        if ref is None:
            checks.append(Check(section, f"{name}: {key}", 0.0 if out is None else math.inf, tol, "is None"))
            continue
        if key in absolute:  # max |out − ref| in nats
            err = (out.double() - ref).abs().max().item() if torch.isfinite(out).all() else math.inf
        else:
            err = _reference.relative_error(out, ref)
        checks.append(Check(section, f"{name}: {key}", err, tol, "abs" if key in absolute else "rel"))
    return checks


def tile_choices(dtype: torch.dtype, d: int) -> list[_triton_utils.MatmulTiles]:
    """Every launch configuration ``logits_tiles`` can return for this dtype and hidden size on CUDA."""
    block_d = min(64 if dtype.itemsize <= 2 else 32, max(16, 1 << max(d - 1, 0).bit_length()))
    return [
        _triton_utils.MatmulTiles(
            block_n=bn, block_v=128, block_d=block_d, num_warps=8 if bn == 128 else 4, num_stages=3
        )
        for bn in (128, 64)
    ]


@contextlib.contextmanager
def forced_tiles(tiles: _triton_utils.MatmulTiles | None, splits_one: bool = False):
    """Make the heuristics return ``tiles`` (and, with ``splits_one``, one vocabulary split) inside the block."""
    with contextlib.ExitStack() as stack:
        if tiles is not None:
            stack.enter_context(mock.patch.object(_triton_utils, "logits_tiles", lambda *a, **k: tiles))
        if splits_one:
            stack.enter_context(
                mock.patch.object(_triton_utils, "vocab_splits", lambda device, rows, n_tiles: (1, n_tiles))
            )
        yield


def check_forced(case: Case, device) -> list[Check]:
    """The log-prob and KL checks of ``case`` under each tile choice, then with one vocabulary split."""
    checks = []
    for k, tiles in enumerate(tile_choices(case.dtype, case.d)):
        tag = f"BLOCK_N={tiles.block_n} BLOCK_D={tiles.block_d} warps={tiles.num_warps}"
        with forced_tiles(tiles):
            checks += [_tagged(c, tag) for c in check_logprob(case, device, "forced")]
            checks += [_tagged(c, tag) for c in check_kl(case, device, (("kl", "reverse_kl", "jsd")[k % 3],), "forced")]
    with forced_tiles(None, splits_one=True):
        checks += [_tagged(c, "one vocab split") for c in check_logprob(case, device, "forced")]
    return checks


def _tagged(check: Check, tag: str) -> Check:
    check.name = f"{check.name} [{tag}]"
    return check
