"""KL estimators k1/k2/k3 vs their definitions in float64 (torch path and the Triton kernel under the interpreter);
masked mean; no hidden clamps."""

import math

import pytest
import torch

from hotloop.kernels.losses.kl_penalty import kl_penalty, kl_per_token, reference_kl_per_token
from hotloop.kernels.losses.segments import reference_unpack
from tests.helpers import assert_close

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]


def _inputs(dtype, b=4, t=11):
    logp = (-2 + torch.randn(b, t)).to(dtype).requires_grad_()
    ref = (logp.detach().float() + 0.5 * torch.randn(b, t)).to(dtype)
    mask = torch.rand(b, t) > 0.4
    mask[1] = False
    return logp, ref, mask


def _check(logp, ref, mask, estimator, dtype):
    out = kl_penalty(logp, mask, ref_logp=ref, kl_estimator=estimator)
    lp64 = logp.detach().double().requires_grad_()
    r = (reference_kl_per_token(lp64, ref, estimator) * mask).sum() / mask.sum()
    g = 0.5 + torch.rand(())
    grad = torch.autograd.grad(out * g, logp)[0]
    assert_close(out, r.detach(), dtype, "value")
    assert_close(grad, torch.autograd.grad(r * g.double(), lp64)[0], dtype, "grad")
    assert grad.dtype == logp.dtype and (grad[~mask] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_mean_matches_reference_value_and_grad(monkeypatch, nan_empty, backend, estimator, dtype):
    monkeypatch.setenv("HOTLOOP_BACKEND", backend)
    _check(*_inputs(dtype), estimator, dtype)


@pytest.mark.interpreter
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_triton_kernel_walks_rows_longer_than_one_block(monkeypatch, nan_empty, estimator):
    monkeypatch.setenv("HOTLOOP_BACKEND", "triton")
    _check(*_inputs(torch.float32, b=3, t=150), estimator, torch.float32)  # BLOCK_T 64 under the interpreter


@pytest.mark.parametrize("backend", BACKENDS)
def test_k3_has_no_clamp_for_large_log_ratios(monkeypatch, backend):
    monkeypatch.setenv("HOTLOOP_BACKEND", backend)
    logp, ref = torch.tensor([[0.0]]), torch.tensor([[30.0]])
    assert kl_per_token(logp, ref_logp=ref, kl_estimator="k3").item() == pytest.approx(math.exp(30.0) - 31, rel=1e-5)
    assert kl_penalty(logp, torch.ones(1, 1), ref_logp=ref).item() == pytest.approx(math.exp(30.0) - 31, rel=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_mask_gives_zero_loss_and_grad(monkeypatch, backend):
    monkeypatch.setenv("HOTLOOP_BACKEND", backend)
    logp = torch.randn(2, 3, requires_grad=True)
    out = kl_penalty(logp, torch.zeros(2, 3), ref_logp=torch.randn(2, 3))
    assert out.item() == 0 and (torch.autograd.grad(out, logp)[0] == 0).all()


@pytest.mark.interpreter
def test_triton_kernel_ignores_non_finite_padding(monkeypatch):
    monkeypatch.setenv("HOTLOOP_BACKEND", "triton")
    logp = torch.randn(2, 3, requires_grad=True)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    out = kl_penalty(logp, mask, ref_logp=torch.randn(2, 3).masked_fill(~mask, math.inf))
    grad = torch.autograd.grad(out, logp)[0]
    assert torch.isfinite(out) and torch.isfinite(grad).all() and (grad[~mask] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_batch_with_cu_seqlens_equals_its_padded_form(monkeypatch, backend):
    monkeypatch.setenv("HOTLOOP_BACKEND", backend)
    cu, n = torch.tensor([0, 6, 6, 13, 20]), 22  # an empty sequence, two trailing tokens in none
    logp, mask = (-2 + torch.randn(n)).requires_grad_(), torch.rand(n) > 0.2
    ref = logp.detach() + 0.5 * torch.randn(n)
    packed = kl_penalty(logp, mask, ref_logp=ref, cu_seqlens=cu)
    lp = reference_unpack(logp.detach(), cu).requires_grad_()
    padded = kl_penalty(lp, reference_unpack(mask, cu), ref_logp=reference_unpack(ref, cu))
    torch.testing.assert_close(packed, padded)
    grad = torch.autograd.grad(packed, logp)[0]
    torch.testing.assert_close(reference_unpack(grad, cu), torch.autograd.grad(padded, lp)[0])


def test_unknown_estimator_and_bad_shapes_are_errors():
    logp = torch.randn(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match="estimator"):
        kl_penalty(logp, torch.ones(2, 3), ref_logp=logp, kl_estimator="low_var_kl")
    with pytest.raises(ValueError, match="ref_logp"):
        kl_penalty(logp, torch.ones(2, 3), ref_logp=logp[:, :2])
    with pytest.raises(ValueError, match="mask"):
        kl_penalty(logp, torch.ones(2, 2), ref_logp=logp)
