"""KL estimators k1/k2/k3 vs their definitions in float64; masked mean; no hidden clamps."""

import pytest
import torch

from hotloop.kernels.losses.kl_penalty import kl_penalty, kl_per_token, reference_kl_per_token
from tests.helpers import assert_close


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_mean_matches_reference_value_and_grad(estimator, dtype):
    logp = (-2 + torch.randn(4, 11)).to(dtype).requires_grad_()
    ref = (logp.detach().float() + 0.5 * torch.randn(4, 11)).to(dtype)
    mask = torch.rand(4, 11) > 0.4
    mask[1] = False
    out = kl_penalty(logp, ref, mask, estimator=estimator)
    lp64 = logp.detach().double().requires_grad_()
    r = (reference_kl_per_token(lp64, ref, estimator) * mask).sum() / mask.sum()
    assert_close(out, r.detach(), dtype, "value")
    assert_close(torch.autograd.grad(out, logp)[0], torch.autograd.grad(r, lp64)[0], dtype, "grad")


def test_k3_has_no_clamp_for_large_log_ratios():
    logp, ref = torch.tensor([0.0]), torch.tensor([30.0])
    assert kl_per_token(logp, ref, estimator="k3").item() == pytest.approx(torch.tensor(30.0).exp().item() - 31, rel=1e-5)


def test_empty_mask_gives_zero_and_unknown_estimator_is_an_error():
    logp = torch.randn(2, 3, requires_grad=True)
    out = kl_penalty(logp, torch.randn(2, 3), torch.zeros(2, 3))
    assert out.item() == 0 and (torch.autograd.grad(out, logp)[0] == 0).all()
    with pytest.raises(ValueError, match="estimator"):
        kl_penalty(logp, logp, torch.ones(2, 3), estimator="low_var_kl")
