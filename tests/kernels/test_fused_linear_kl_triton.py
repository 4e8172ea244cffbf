"""fused_linear_kl's Triton path under TRITON_INTERPRET=1 vs float64 (tiny shapes: the interpreter runs every
program in numpy): several vocabulary chunks, bf16, logits of magnitude 1e4, and the public function."""

import pytest
import torch

from hotloop.kernels import fused_linear_kl
from hotloop.kernels.fused_linear_kl import KLOptions, reference_fused_linear_kl
from hotloop.kernels.fused_linear_logprob import reference_fused_linear_logprob
from tests.helpers import assert_close, poison_
from tests.kernels.test_fused_linear_kl import DIVERGENCES, _inputs, _leaves

# Triton kernels under TRITON_INTERPRET=1 (tiny shapes: the interpreter runs every program in numpy).


def _triton_case(divergence, dtype, *, bias=True, n=37, v=257):
    """Triton launcher (vocab chunks of 64), random per-row weights: (stats, grads, float64 expectations)."""
    from hotloop.kernels._fused_linear_kl_triton import triton_kl_fwd_bwd

    hidden, weight, _, b, ref = _inputs(1, n, 37, 24, v, dtype, bias=bias)
    h2d, r2d, w = hidden.detach()[0], ref["ref_hidden"][0], weight.detach()
    b = None if b is None else b.detach()
    row_weight = torch.randn(n)
    stats, *grads = triton_kl_fwd_bwd(
        h2d,
        w,
        b,
        r2d,
        ref["ref_weight"],
        ref["ref_bias"],
        row_weight,
        options=KLOptions(divergence=divergence, beta=0.3),
        temperature=0.7,
        needs_grad=(True, True, True),
        vocab_chunk=64,
    )
    leaves = [x.double().requires_grad_(True) for x in _leaves(h2d, w, b)]
    kw = dict(
        ref_hidden=r2d,
        ref_weight=ref["ref_weight"],
        ref_bias=ref["ref_bias"],
        beta=0.3,
        temperature=0.7,
        normalize="sum",
    )
    targets = torch.zeros(n, dtype=torch.int64)
    expect = {
        d: reference_fused_linear_kl(
            *leaves[:2], targets, leaves[2] if b is not None else None, **kw, divergence=d
        ).per_token
        for d in ("kl", divergence)
    }
    expect["grads"] = torch.autograd.grad((expect[divergence] * row_weight.double()).sum(), leaves)
    b64 = None if b is None else b.double()
    expect["entropy"] = reference_fused_linear_logprob(
        h2d.double(), w.double(), targets, b64, temperature=0.7, return_entropy=True
    )[1]
    return stats, grads, expect


def _check_triton(stats, grads, expect, divergence, dtype):
    for name, out, ref in (
        ("divergence", stats.divergence, expect[divergence]),
        ("kl", stats.kl, expect["kl"]),
        ("entropy", stats.entropy, expect["entropy"]),
    ):
        assert out.dtype == torch.float32
        assert_close(out, ref, dtype, name)
    if len(expect["grads"]) == 2:  # no bias
        assert grads[2] is None
    for name, g, r in zip(("hidden", "weight", "bias"), grads, expect["grads"]):
        assert g.dtype == dtype, f"grad {name} dtype {g.dtype}"
        assert_close(g, r, dtype, f"grad {name}")


@pytest.mark.interpreter
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_triton_matches_float64_over_several_vocab_chunks(divergence, monkeypatch):
    """V = 257 (no tile multiple), D = 37, D_ref = 24; five gradient chunks, the last ragged; three vocab splits.

    Every ``torch.empty`` during the launch is poisoned with NaN, so a partial or gradient-buffer entry the
    kernels leave unwritten would show.
    """
    monkeypatch.setenv("HOTLOOP_BACKEND", "triton")
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison_(empty(*a, **k)))
    stats, grads, expect = _triton_case(divergence, torch.float32)
    monkeypatch.setattr(torch, "empty", empty)
    _check_triton(stats, grads, expect, divergence, torch.float32)


@pytest.mark.interpreter
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_triton_bf16_without_bias_within_bf16_tolerance(divergence, monkeypatch):
    monkeypatch.setenv("HOTLOOP_BACKEND", "triton")
    _check_triton(*_triton_case(divergence, torch.bfloat16, bias=False, n=20, v=150), divergence, torch.bfloat16)


@pytest.mark.interpreter
def test_triton_public_function_matches_torch_backend_and_is_bit_identical_run_to_run(monkeypatch):
    hidden, weight, targets, bias, ref = _inputs(3, 6, 24, 16, 150)
    opts = dict(divergence="jsd", beta=0.7, normalize="sequence", temperature=1.3, mask=torch.rand(3, 6) > 0.3)
    runs = {}
    for backend in ("torch", "triton", "triton"):
        monkeypatch.setenv("HOTLOOP_BACKEND", backend)
        out = fused_linear_kl(hidden, weight, targets, bias, **ref, **opts)
        runs.setdefault(backend, []).append(
            [out.loss, out.per_token, *out.metrics.values(), *torch.autograd.grad(out.loss, (hidden, weight, bias))]
        )
    first, second = runs["triton"]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    for a, b in zip(first, runs["torch"][0]):
        assert_close(a, b.double(), torch.float32)
