"""(Reward-weighted) SFT vs a per-sequence float64 loop."""

import pytest
import torch

from hotloop.kernels.losses.sft import reference_sft_loss, sft_loss
from tests.helpers import assert_close


def _inputs():
    logp = (-2 + torch.randn(5, 9)).requires_grad_()
    mask = torch.rand(5, 9) > 0.3
    mask[3] = False
    return logp, mask


@pytest.mark.parametrize("normalize", ["token", "sequence"])
@pytest.mark.parametrize("weighted", [False, True])
def test_sft_matches_reference(normalize, weighted):
    logp, mask = _inputs()
    w = torch.rand(5) if weighted else None
    out = sft_loss(logp, mask, weights=w, normalize=normalize)
    lp64 = logp.detach().double().requires_grad_()
    r = reference_sft_loss(lp64, mask, w, normalize)
    assert_close(out.loss, r.detach(), torch.float32, "value")
    assert_close(torch.autograd.grad(out.loss, logp)[0], torch.autograd.grad(r, lp64)[0], torch.float32, "grad")


def test_validation_errors():
    logp, mask = _inputs()
    with pytest.raises(ValueError, match="normalize"):
        sft_loss(logp, mask, normalize="batch")
    with pytest.raises(ValueError, match="weights"):
        sft_loss(logp, mask, weights=torch.rand(3))
    with pytest.raises(ValueError, match="mask"):
        sft_loss(logp, mask[:, :-1])
