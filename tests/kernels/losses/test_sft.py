"""(Reward-weighted) SFT vs a per-sequence float64 loop (torch path and the Triton kernel under the interpreter)."""

import pytest
import torch

from hotloop.kernels.losses.segments import reference_unpack
from hotloop.kernels.losses.sft import reference_sft_loss, sft_loss
from tests.helpers import assert_close

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]


def _inputs(dtype=torch.float32, b=5, t=9):
    logp = (-2 + torch.randn(b, t)).to(dtype).requires_grad_()
    mask = torch.rand(b, t) > 0.3
    mask[b // 2 + 1] = False  # an empty row
    return logp, mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", ["token", "sequence"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sft_matches_reference(monkeypatch, nan_empty, backend, normalize, weighted, dtype):
    monkeypatch.setenv("HOTLOOP_BACKEND", backend)
    logp, mask = _inputs(dtype)
    w = torch.rand(5) if weighted else None
    out = sft_loss(logp, mask, weights=w, normalize=normalize)
    lp64 = logp.detach().double().requires_grad_()
    r = reference_sft_loss(lp64, mask, w, normalize)
    g = 0.5 + torch.rand(())
    grad = torch.autograd.grad(out.loss * g, logp)[0]
    assert_close(out.loss, r.detach(), dtype, "value")
    assert_close(grad, torch.autograd.grad(r * g.double(), lp64)[0], dtype, "grad")
    assert grad.dtype == dtype and (grad[3] == 0).all()
    m = mask.double()
    assert_close(out.metrics["nll"], -(logp.detach().double() * m).sum() / m.sum(), torch.float32, "nll")
    assert out.metrics["num_tokens"].item() == mask.sum().item()


@pytest.mark.interpreter
def test_triton_kernel_walks_rows_longer_than_one_block(monkeypatch, nan_empty):
    monkeypatch.setenv("HOTLOOP_BACKEND", "triton")
    logp, mask = _inputs(b=3, t=150)  # BLOCK_T 64 under the interpreter
    w = torch.rand(3)
    out = sft_loss(logp, mask, weights=w, normalize="sequence")
    lp64 = logp.detach().double().requires_grad_()
    r = reference_sft_loss(lp64, mask, w, "sequence")
    assert_close(out.loss, r.detach(), torch.float32, "value")
    assert_close(torch.autograd.grad(out.loss, logp)[0], torch.autograd.grad(r, lp64)[0], torch.float32, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_masked_gives_zero_loss_grad_and_metrics(monkeypatch, backend):
    monkeypatch.setenv("HOTLOOP_BACKEND", backend)
    logp, mask = _inputs()
    out = sft_loss(logp, torch.zeros_like(mask), weights=torch.rand(5))
    assert out.loss.item() == 0 and (torch.autograd.grad(out.loss, logp)[0] == 0).all()
    assert out.metrics["nll"].item() == 0 and out.metrics["num_tokens"].item() == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", ["token", "sequence"])
def test_packed_batch_with_cu_seqlens_equals_its_padded_form(monkeypatch, backend, normalize):
    monkeypatch.setenv("HOTLOOP_BACKEND", backend)
    cu, n = torch.tensor([0, 6, 6, 13, 20]), 22  # an empty sequence, two trailing tokens in none
    logp, mask, w = (-2 + torch.randn(n)).requires_grad_(), torch.rand(n) > 0.2, torch.rand(4)
    packed = sft_loss(logp, mask, weights=w, normalize=normalize, cu_seqlens=cu)
    lp = reference_unpack(logp.detach(), cu).requires_grad_()
    padded = sft_loss(lp, reference_unpack(mask, cu), weights=w, normalize=normalize)
    torch.testing.assert_close(packed.loss, padded.loss)
    assert packed.metrics.keys() == padded.metrics.keys()
    for k in padded.metrics:
        torch.testing.assert_close(packed.metrics[k], padded.metrics[k])
    grad = torch.autograd.grad(packed.loss, logp)[0]
    torch.testing.assert_close(reference_unpack(grad, cu), torch.autograd.grad(padded.loss, lp)[0])
    assert (grad[20:] == 0).all()


def test_validation_errors():
    logp, mask = _inputs()
    with pytest.raises(ValueError, match="normalize"):
        sft_loss(logp, mask, normalize="batch")
    with pytest.raises(ValueError, match="weights"):
        sft_loss(logp, mask, weights=torch.rand(3))
    with pytest.raises(ValueError, match="mask"):
        sft_loss(logp, mask[:, :-1])
