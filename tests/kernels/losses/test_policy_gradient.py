"""REINFORCE/RLOO policy gradient vs a per-sequence float64 loop."""

import pytest
import torch

from hotloop.kernels.losses.policy_gradient import policy_gradient_loss, reference_policy_gradient_loss
from tests.helpers import assert_close


def _inputs(dtype):
    logp = (-2 + torch.randn(5, 9)).to(dtype).requires_grad_()
    mask = torch.rand(5, 9) > 0.3
    mask[3] = False
    return logp, mask


@pytest.mark.parametrize("normalize", ["token", "sequence"])
@pytest.mark.parametrize("adv_shape", ["seq", "token"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_policy_gradient_matches_reference(normalize, adv_shape, dtype):
    logp, mask = _inputs(dtype)
    adv = torch.randn(5) if adv_shape == "seq" else torch.randn(5, 9)
    out = policy_gradient_loss(logp, adv, mask.int(), normalize=normalize)
    lp64 = logp.detach().double().requires_grad_()
    r = reference_policy_gradient_loss(lp64, adv, mask, normalize)
    assert_close(out.loss, r.detach(), dtype, "value")
    g = torch.autograd.grad(out.loss * 0.7, logp)[0]
    assert_close(g, torch.autograd.grad(r * 0.7, lp64)[0], dtype, "grad")
    assert (g[3] == 0).all()


def test_validation_errors():
    logp, mask = _inputs(torch.float32)
    with pytest.raises(ValueError, match="advantages"):
        policy_gradient_loss(logp, torch.randn(4), mask)
    with pytest.raises(ValueError, match="normalize"):
        policy_gradient_loss(logp, torch.randn(5), mask, normalize="batch")
