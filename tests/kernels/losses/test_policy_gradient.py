"""REINFORCE/RLOO policy gradient vs a per-sequence float64 loop (torch path and the Triton kernel under the
interpreter)."""

import math

import pytest
import torch

from hotloop.kernels.losses.policy_gradient import policy_gradient_loss, reference_policy_gradient_loss
from hotloop.kernels.losses.segments import reference_unpack
from tests.helpers import assert_close

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]


def _inputs(dtype, b=5, t=9):
    logp = (-2 + torch.randn(b, t)).to(dtype).requires_grad_()
    mask = torch.rand(b, t) > 0.3
    mask[b // 2 + 1] = False  # an empty row
    return logp, mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", ["token", "sequence"])
@pytest.mark.parametrize("adv_shape", ["seq", "token"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_policy_gradient_matches_reference(monkeypatch, nan_empty, backend, normalize, adv_shape, dtype):
    monkeypatch.setenv("HOTLOOP_BACKEND", backend)
    logp, mask = _inputs(dtype)
    adv = 0.5 + torch.rand(5) if adv_shape == "seq" else 0.5 + torch.rand(5, 9)  # one sign: no cancellation
    out = policy_gradient_loss(logp, adv, mask.int(), normalize=normalize)
    lp64 = logp.detach().double().requires_grad_()
    r = reference_policy_gradient_loss(lp64, adv, mask, normalize)
    assert_close(out.loss, r.detach(), dtype, "value")
    g = torch.autograd.grad(out.loss * 0.7, logp)[0]
    assert_close(g, torch.autograd.grad(r * 0.7, lp64)[0], dtype, "grad")
    assert g.dtype == dtype and (g[3] == 0).all()
    m, a = mask.double(), adv.double() if adv.dim() == 2 else adv.double()[:, None].expand(5, 9)
    assert_close(out.metrics["advantages/mean"], (a * m).sum() / m.sum(), torch.float32, "advantages/mean")
    assert_close(out.metrics["logps/mean"], (logp.detach().double() * m).sum() / m.sum(), torch.float32, "logps/mean")


@pytest.mark.interpreter
@pytest.mark.parametrize("normalize", ["token", "sequence"])
def test_triton_kernel_walks_rows_longer_than_one_block(monkeypatch, nan_empty, normalize):
    monkeypatch.setenv("HOTLOOP_BACKEND", "triton")
    logp, mask = _inputs(torch.float32, b=3, t=150)  # BLOCK_T 64 under the interpreter
    adv = 0.5 + torch.rand(3, 150)
    out = policy_gradient_loss(logp, adv, mask, normalize=normalize)
    lp64 = logp.detach().double().requires_grad_()
    r = reference_policy_gradient_loss(lp64, adv, mask, normalize)
    assert_close(out.loss, r.detach(), torch.float32, "value")
    assert_close(torch.autograd.grad(out.loss, logp)[0], torch.autograd.grad(r, lp64)[0], torch.float32, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_masked_gives_zero_and_padding_is_not_read(monkeypatch, backend):
    monkeypatch.setenv("HOTLOOP_BACKEND", backend)
    logp, mask = _inputs(torch.float32)
    out = policy_gradient_loss(logp, torch.randn(5), torch.zeros_like(mask), normalize="sequence")
    assert out.loss.item() == 0 and (torch.autograd.grad(out.loss, logp)[0] == 0).all()
    if backend == "triton":  # the kernel never loads masked tokens
        adv = torch.randn(5, 9).masked_fill(~mask, math.nan)
        out = policy_gradient_loss(logp, adv, mask)
        assert torch.isfinite(out.loss) and torch.isfinite(torch.autograd.grad(out.loss, logp)[0]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("adv_shape", ["seq", "token"])
def test_packed_batch_with_cu_seqlens_equals_its_padded_form(monkeypatch, backend, adv_shape):
    monkeypatch.setenv("HOTLOOP_BACKEND", backend)
    cu, n = torch.tensor([0, 6, 6, 13, 20]), 22  # an empty sequence, two trailing tokens in none
    logp, mask = (-2 + torch.randn(n)).requires_grad_(), torch.rand(n) > 0.2
    adv = torch.randn(4) if adv_shape == "seq" else torch.randn(n)
    packed = policy_gradient_loss(logp, adv, mask, normalize="sequence", cu_seqlens=cu)
    lp = reference_unpack(logp.detach(), cu).requires_grad_()
    padded_adv = adv if adv_shape == "seq" else reference_unpack(adv, cu)
    padded = policy_gradient_loss(lp, padded_adv, reference_unpack(mask, cu), normalize="sequence")
    torch.testing.assert_close(packed.loss, padded.loss)
    for k in padded.metrics:
        torch.testing.assert_close(packed.metrics[k], padded.metrics[k])
    grad = torch.autograd.grad(packed.loss, logp)[0]
    torch.testing.assert_close(reference_unpack(grad, cu), torch.autograd.grad(padded.loss, lp)[0])


def test_validation_errors():
    logp, mask = _inputs(torch.float32)
    with pytest.raises(ValueError, match="advantages"):
        policy_gradient_loss(logp, torch.randn(4), mask)
    with pytest.raises(ValueError, match="normalize"):
        policy_gradient_loss(logp, torch.randn(5), mask, normalize="batch")
    with pytest.raises(ValueError, match="mask"):
        policy_gradient_loss(logp, torch.randn(5), mask[:, 1:])
