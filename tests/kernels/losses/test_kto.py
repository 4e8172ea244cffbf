"""KTO vs the paper's formula in float64 and vs Liger-Kernel 0.8.5's KTO loss function."""

import pytest
import torch

from hotloop.kernels.losses.kto import kto_kl_estimate, kto_loss
from tests.helpers import assert_close

B = 9


def _inputs(dtype=torch.float32):
    logps = (-30 + 4 * torch.randn(B)).to(dtype).requires_grad_()
    ref = (logps.detach().float() + torch.randn(B)).to(dtype)
    labels = torch.rand(B) > 0.5
    labels[0], labels[1] = True, False
    return logps, ref, labels


def reference_kto(logps, ref, labels, beta, z0, wd, wu):
    """Float64, one sample at a time: λ_D(1 − σ(β(ρ − z0))) or λ_U(1 − σ(β(z0 − ρ)))."""
    terms = []
    for i in range(logps.shape[0]):
        rho = logps[i] - ref[i]
        if labels[i]:
            terms.append(wd * (1 - torch.sigmoid(beta * (rho - z0))))
        else:
            terms.append(wu * (1 - torch.sigmoid(beta * (z0 - rho))))
    return sum(terms) / len(terms)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_formula_with_reference_point_and_weights(dtype):
    logps, ref, labels = _inputs(dtype)
    z0 = torch.rand(()) * 0.5
    out = kto_loss(
        logps, labels, ref_logps=ref, beta=0.3, reference_point=z0, desirable_weight=1.3, undesirable_weight=0.7
    )
    lp64 = logps.detach().double().requires_grad_()
    r = reference_kto(lp64, ref.double(), labels, 0.3, z0.double(), 1.3, 0.7)
    g = torch.autograd.grad(out.loss * 2.5, logps)[0]
    rg = torch.autograd.grad(r * 2.5, lp64)[0]
    assert_close(out.loss, r.detach(), dtype, "value")
    assert_close(g, rg, dtype, "grad")


def test_length_normalize_uses_per_token_mean_log_ratios():
    logps, ref, labels = _inputs()
    lengths = torch.randint(0, 30, (B,))
    lengths[2] = 0  # an empty completion counts as length 1
    out = kto_loss(logps, labels, ref_logps=ref, beta=2.0, reference_point=0.1, lengths=lengths, length_normalize=True)
    lp64, n = logps.detach().double().requires_grad_(), lengths.double().clamp_min(1.0)
    r = reference_kto(lp64 / n, ref.double() / n, labels, 2.0, 0.1, 1.0, 1.0)
    g = torch.autograd.grad(out.loss * 1.5, logps)[0]
    assert_close(out.loss, r.detach(), torch.float32, "value")
    assert_close(g, torch.autograd.grad(r * 1.5, lp64)[0], torch.float32, "grad")
    assert_close(out.metrics["logps/chosen_sum"], (lp64.detach() / n)[labels].sum(), torch.float32, "logps sum")
    with pytest.raises(ValueError, match="lengths"):
        kto_loss(logps, labels, ref_logps=ref, length_normalize=True)


def test_reference_point_is_a_constant():
    logps, ref, labels = _inputs()
    z0 = torch.tensor(0.2, requires_grad=True)
    out = kto_loss(logps, labels, ref_logps=ref, reference_point=z0)
    out.loss.backward()
    assert z0.grad is None


def test_kl_estimate_is_clamped_detached_mean_of_mismatched_log_ratios():
    a, b = torch.randn(6, requires_grad=True), torch.randn(6)
    est = kto_kl_estimate(a, b)
    torch.testing.assert_close(est, (a.detach() - b).mean().clamp_min(0))
    assert not est.requires_grad
    assert kto_kl_estimate(b - 5, b).item() == 0.0


def test_metrics_follow_trl_names():
    logps, ref, labels = _inputs()
    m = kto_loss(logps, labels, ref_logps=ref, beta=0.5).metrics
    rw = 0.5 * (logps.detach() - ref)
    torch.testing.assert_close(m["rewards/chosen_sum"], rw[labels].sum())
    torch.testing.assert_close(m["logps/rejected_sum"], logps.detach()[~labels].sum())
    assert m["count/chosen"].item() == labels.sum().item()


def test_validation_errors():
    logps, ref, labels = _inputs()
    with pytest.raises(TypeError, match="labels"):
        kto_loss(logps, labels.float(), ref_logps=ref)
    with pytest.raises(ValueError, match="ref_logps"):
        kto_loss(logps, labels, ref_logps=ref[:-1])
    with pytest.raises(ValueError, match="beta"):
        kto_loss(logps, labels, ref_logps=ref, beta=0.0)


@pytest.fixture
def liger_kto():
    """Liger-Kernel's module, or a skip of the one comparison that needs it (the float64 tests never skip)."""
    return pytest.importorskip("liger_kernel.chunked_loss.kto_loss")


@pytest.mark.parametrize("with_kl", [False, True])
def test_matches_liger_kto_preference_loss_fn(with_kl, liger_kto):
    logps, ref, labels = (t.detach().double() if t.is_floating_point() else t for t in _inputs())
    kl = torch.tensor(0.3, dtype=torch.float64) if with_kl else None
    ours = kto_loss(logps, labels, ref_logps=ref, beta=0.2, reference_point=kl)
    theirs, chosen_sum, _ = liger_kto.LigerFusedLinearKTOFunction.preference_loss_fn(
        logps, labels, torch.empty(B), ref, beta=0.2, kl=kl
    )
    assert_close(ours.loss, theirs, torch.float64, "KTO")
    assert_close(ours.metrics["rewards/chosen_sum"], chosen_sum, torch.float64, "chosen rewards")
