"""DPO family and ORPO vs float64 formulas from the papers, and vs Liger-Kernel 0.8.5's own loss functions."""

import math

import pytest
import torch

from hotloop.kernels.losses.dpo import LOSS_TYPES, dpo_loss, orpo_loss
from tests.helpers import assert_close

B = 7


def _lsig(x):
    return -torch.log1p(torch.exp(-x))  # log σ(x), float64, written out


def _sig(x):
    return 1 / (1 + torch.exp(-x))


def reference_pair_loss(c, r, rc, rr, loss_type, beta, eps=0.0, gamma=0.0, lc=None, lr=None, tau=0.05):
    """Per-pair losses from the papers' formulas, float64."""
    rho_c, rho_r = c - rc, r - rr
    if lc is not None:
        rho_c, rho_r = rho_c / lc, rho_r / lr
    h = rho_c - rho_r
    z = beta * h - gamma
    table = {
        "sigmoid": lambda: -(1 - eps) * _lsig(z) - eps * _lsig(-z),
        "hinge": lambda: torch.clamp(1 - z, min=0),
        "ipo": lambda: (h - 1 / (2 * beta)) ** 2,
        "exo_pair": lambda: _sig(z) * (_lsig(z) - math.log(1 - eps)) + _sig(-z) * (_lsig(-z) - math.log(eps)),
        "nca_pair": lambda: -_lsig(beta * rho_c) - 0.5 * _lsig(-beta * rho_c) - 0.5 * _lsig(-beta * rho_r),
        "robust": lambda: ((1 - eps) * -_lsig(z) - eps * -_lsig(-z)) / (1 - 2 * eps),
        "bco_pair": lambda: -_lsig(beta * rho_c) - _lsig(-beta * rho_r),
        "sppo_hard": lambda: (rho_c - 1 / (2 * beta)) ** 2 + (rho_r + 1 / (2 * beta)) ** 2,
        "apo_zero": lambda: (1 - _sig(beta * rho_c)) + _sig(beta * rho_r),
        "apo_down": lambda: _sig(beta * rho_c) + (1 - _sig(z)),
        "discopop": lambda: -_lsig(z) * (1 - _sig(z / tau)) + torch.exp(-z) * _sig(z / tau),
    }
    return table[loss_type]()


def _inputs(dtype=torch.float32):
    c = (-20 + 3 * torch.randn(B)).to(dtype).requires_grad_()
    r = (-22 + 3 * torch.randn(B)).to(dtype).requires_grad_()
    rc, rr = (c.detach() + torch.randn(B)).to(dtype), (r.detach() + torch.randn(B)).to(dtype)
    lc, lr = torch.randint(3, 30, (B,)), torch.randint(3, 30, (B,))
    return c, r, rc, rr, lc, lr


def _check(out_loss, c, r, ref_loss, c64, r64, dtype, what):
    g = torch.randn(()).item() + 2.0  # non-unit upstream gradient
    gc, gr = torch.autograd.grad(out_loss * g, (c, r))
    rc_, rr_ = torch.autograd.grad(ref_loss * g, (c64, r64))
    assert_close(out_loss, ref_loss, dtype, f"{what} value")
    assert_close(torch.stack([gc, gr]), torch.stack([rc_, rr_]), dtype, f"{what} grad")


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_each_loss_type_matches_paper_formula_value_and_grad(loss_type):
    c, r, rc, rr, lc, lr = _inputs()
    eps = {"exo_pair": 1e-3, "robust": 0.1}.get(loss_type, 0.0)
    lens = dict(chosen_lengths=lc, rejected_lengths=lr) if loss_type == "ipo" else {}
    out = dpo_loss(
        c, r, ref_chosen_logps=rc, ref_rejected_logps=rr, beta=0.1, loss_type=loss_type, label_smoothing=eps, **lens
    )
    c64, r64 = c.detach().double().requires_grad_(), r.detach().double().requires_grad_()
    lcd, lrd = (lc.double(), lr.double()) if loss_type == "ipo" else (None, None)
    ref = reference_pair_loss(c64, r64, rc.double(), rr.double(), loss_type, 0.1, eps, lc=lcd, lr=lrd).mean()
    _check(out.loss, c, r, ref, c64, r64, torch.float32, loss_type)


@pytest.mark.parametrize("length_normalize", [None, True, False])
def test_ipo_averages_log_ratios_by_default_and_takes_the_papers_sums_with_length_normalize_false(length_normalize):
    c, r, rc, rr, lc, lr = _inputs()
    averaged = length_normalize is not False
    lens = dict(chosen_lengths=lc, rejected_lengths=lr) if averaged else {}
    out = dpo_loss(
        c,
        r,
        ref_chosen_logps=rc,
        ref_rejected_logps=rr,
        beta=0.1,
        loss_type="ipo",
        length_normalize=length_normalize,
        **lens,
    )
    c64, r64 = c.detach().double().requires_grad_(), r.detach().double().requires_grad_()
    lcd, lrd = (lc.double(), lr.double()) if averaged else (None, None)
    ref = reference_pair_loss(c64, r64, rc.double(), rr.double(), "ipo", 0.1, lc=lcd, lr=lrd).mean()
    _check(out.loss, c, r, ref, c64, r64, torch.float32, f"ipo length_normalize={length_normalize}")


def test_cdpo_label_smoothing_on_sigmoid_matches_formula():
    c, r, rc, rr, _, _ = _inputs()
    out = dpo_loss(c, r, ref_chosen_logps=rc, ref_rejected_logps=rr, beta=0.3, label_smoothing=0.2)
    c64, r64 = c.detach().double().requires_grad_(), r.detach().double().requires_grad_()
    ref = reference_pair_loss(c64, r64, rc.double(), rr.double(), "sigmoid", 0.3, 0.2).mean()
    _check(out.loss, c, r, ref, c64, r64, torch.float32, "cDPO")


def test_simpo_is_reference_free_length_normalized_sigmoid_with_margin():
    c, r, _, _, lc, lr = _inputs()
    out = dpo_loss(
        c,
        r,
        beta=2.0,
        gamma=0.7,
        reference_free=True,
        length_normalize=True,
        chosen_lengths=lc,
        rejected_lengths=lr,
        label_smoothing=0.1,
    )
    c64, r64 = c.detach().double().requires_grad_(), r.detach().double().requires_grad_()
    z = 2.0 * (c64 / lc - r64 / lr) - 0.7
    ref = (-0.9 * _lsig(z) - 0.1 * _lsig(-z)).mean()
    _check(out.loss, c, r, ref, c64, r64, torch.float32, "SimPO")


def test_rpo_and_cpo_add_nll_coef_times_mean_nll():
    c, r, rc, rr, _, _ = _inputs()
    nll = (2 + torch.rand(B)).requires_grad_()
    out = dpo_loss(c, r, ref_chosen_logps=rc, ref_rejected_logps=rr, beta=0.1, nll_loss=nll, nll_coef=0.6)
    base = dpo_loss(c, r, ref_chosen_logps=rc, ref_rejected_logps=rr, beta=0.1)
    assert_close(out.loss, base.loss.detach() + 0.6 * nll.detach().double().mean(), torch.float32, "RPO")
    (gn,) = torch.autograd.grad(out.loss, nll)
    assert_close(gn, torch.full((B,), 0.6 / B, dtype=torch.float64), torch.float32, "RPO nll grad")
    cpo = dpo_loss(c, r, beta=0.1, reference_free=True, nll_loss=nll, nll_coef=1.0)
    z = 0.1 * (c.detach().double() - r.detach().double())
    assert_close(cpo.loss, (-_lsig(z)).mean() + nll.detach().double().mean(), torch.float32, "CPO")


def test_metrics_are_trl_rewards_of_the_log_ratios():
    c, r, rc, rr, _, _ = _inputs()
    m = dpo_loss(c, r, ref_chosen_logps=rc, ref_rejected_logps=rr, beta=0.5).metrics
    wc, wr = 0.5 * (c.detach() - rc), 0.5 * (r.detach() - rr)
    torch.testing.assert_close(m["rewards/chosen"], wc.mean())
    torch.testing.assert_close(m["rewards/margins"], (wc - wr).mean())
    torch.testing.assert_close(m["rewards/accuracies"], (wc > wr).float().mean())
    torch.testing.assert_close(m["logps/rejected"], r.detach().mean())
    assert all(not v.requires_grad and v.dim() == 0 for v in m.values())


@pytest.mark.parametrize(
    "loss_type", ["sigmoid", "hinge", "ipo", "robust", "bco_pair", "sppo_hard", "apo_down", "discopop"]
)
def test_bf16_inputs_within_bf16_tolerance(loss_type):
    c, r, rc, rr, lc, lr = _inputs(torch.bfloat16)
    eps = {"robust": 0.1, "sigmoid": 0.1}.get(loss_type, 0.0)
    lens = dict(chosen_lengths=lc, rejected_lengths=lr) if loss_type == "ipo" else {}
    out = dpo_loss(
        c, r, ref_chosen_logps=rc, ref_rejected_logps=rr, beta=0.1, loss_type=loss_type, label_smoothing=eps, **lens
    )
    c64, r64 = c.detach().double().requires_grad_(), r.detach().double().requires_grad_()
    lcd, lrd = (lc.double(), lr.double()) if loss_type == "ipo" else (None, None)
    ref = reference_pair_loss(c64, r64, rc.double(), rr.double(), loss_type, 0.1, eps, lc=lcd, lr=lrd).mean()
    _check(out.loss, c, r, ref, c64, r64, torch.bfloat16, f"bf16 {loss_type}")
    assert out.loss.dtype == torch.float32 and c.dtype == torch.bfloat16  # [B]-sized math runs in float32


def test_orpo_matches_odds_ratio_formula_with_average_logps():
    lc, lr = torch.randint(3, 30, (B,)), torch.randint(3, 30, (B,))
    c = (lc * (-0.5 - torch.rand(B))).requires_grad_()
    r = (lr * (-0.6 - torch.rand(B))).requires_grad_()
    nll = 1 + torch.rand(B)
    out = orpo_loss(c, r, beta=0.25, chosen_lengths=lc, rejected_lengths=lr, nll_loss=nll)
    c64, r64 = c.detach().double().requires_grad_(), r.detach().double().requires_grad_()
    pc, pr = torch.exp(c64 / lc), torch.exp(r64 / lr)
    log_odds = torch.log(pc / (1 - pc)) - torch.log(pr / (1 - pr))
    ref = nll.double().mean() - 0.25 * _lsig(log_odds).mean()
    _check(out.loss, c, r, ref, c64, r64, torch.float32, "ORPO")


# --- Liger-Kernel 0.8.5's own definitions -------------------------------------------------------------------


@pytest.fixture
def liger_dpo():
    """Liger-Kernel's module, or a skip of the one comparison that needs it (the float64 tests never skip)."""
    return pytest.importorskip("liger_kernel.chunked_loss.dpo_loss")


@pytest.mark.parametrize("loss_type", [t for t in LOSS_TYPES if t != "ipo"])
def test_matches_liger_dpo_preference_loss_fn(loss_type, liger_dpo):
    c, r, rc, rr, _, _ = _inputs(torch.float64)
    eps = {"exo_pair": 1e-3, "robust": 0.2}.get(loss_type, 0.0)
    ours = dpo_loss(
        c,
        r,
        ref_chosen_logps=rc,
        ref_rejected_logps=rr,
        beta=0.2,
        loss_type=loss_type,
        label_smoothing=eps,
        discopop_tau=0.07,
    )
    theirs, wc, wr = liger_dpo.LigerFusedLinearDPOFunction.preference_loss_fn(
        c, r, torch.empty(2 * B), rc, rr, beta=0.2, loss_type=loss_type, label_smoothing=eps, discopop_tau=0.07
    )
    # Liger builds exo_pair's ε as a float32 tensor, so its log(ε) carries float32 rounding.
    assert_close(ours.loss, theirs, torch.float32 if loss_type == "exo_pair" else torch.float64, loss_type)
    assert_close(ours.metrics["rewards/chosen"], wc.mean(), torch.float64, "rewards")


def test_matches_liger_simpo_cpo_orpo(liger_dpo):
    from liger_kernel.chunked_loss.cpo_loss import LigerFusedLinearCPOFunction
    from liger_kernel.chunked_loss.orpo_loss import LigerFusedLinearORPOFunction
    from liger_kernel.chunked_loss.simpo_loss import LigerFusedLinearSimPOFunction

    lc, lr = torch.randint(3, 30, (B,)), torch.randint(3, 30, (B,))
    c, r = lc * (-0.5 - torch.rand(B, dtype=torch.float64)), lr * (-0.6 - torch.rand(B, dtype=torch.float64))
    ac, ar, tgt = c / lc, r / lr, torch.empty(2 * B)
    simpo = dpo_loss(
        c,
        r,
        beta=2.0,
        gamma=0.5,
        label_smoothing=0.1,
        reference_free=True,
        length_normalize=True,
        chosen_lengths=lc,
        rejected_lengths=lr,
    )
    ref = LigerFusedLinearSimPOFunction.preference_loss_fn(ac, ar, tgt, beta=2.0, gamma=0.5, label_smoothing=0.1)[0]
    assert_close(simpo.loss, ref, torch.float64, "SimPO")
    cpo = dpo_loss(c, r, beta=0.3, label_smoothing=0.1, reference_free=True)
    ref = LigerFusedLinearCPOFunction.preference_loss_fn(c, r, tgt, beta=0.3, label_smoothing=0.1)[0]
    assert_close(cpo.loss, ref, torch.float64, "CPO")
    nll = torch.rand(B, dtype=torch.float64)
    orpo = orpo_loss(c, r, beta=0.3, chosen_lengths=lc, rejected_lengths=lr, nll_loss=nll)
    ref, *_, lor, loc = LigerFusedLinearORPOFunction.preference_loss_fn(ac, ar, tgt, beta=0.3)
    assert_close(orpo.loss, ref + nll.mean(), torch.float64, "ORPO")
    assert_close(orpo.metrics["log_odds_ratio"], lor, torch.float64, "log_odds_ratio")


# --- validation -----------------------------------------------------------------------------------------------


def test_unknown_loss_type_lists_the_valid_ones():
    c, r, rc, rr, _, _ = _inputs()
    with pytest.raises(ValueError, match="discopop"):
        dpo_loss(c, r, ref_chosen_logps=rc, ref_rejected_logps=rr, loss_type="kto")


def test_shape_mismatch_and_missing_reference_are_errors():
    c, r, rc, rr, lc, _ = _inputs()
    with pytest.raises(ValueError, match="rejected_logps"):
        dpo_loss(c, r[:-1], ref_chosen_logps=rc, ref_rejected_logps=rr)
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        dpo_loss(c, r)
    with pytest.raises(ValueError, match="reference_free"):
        dpo_loss(c, r, ref_chosen_logps=rc, ref_rejected_logps=rr, reference_free=True)
    with pytest.raises(ValueError, match="lengths"):
        dpo_loss(c, r, ref_chosen_logps=rc, ref_rejected_logps=rr, loss_type="ipo", chosen_lengths=lc)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(c, r, ref_chosen_logps=rc, ref_rejected_logps=rr, loss_type="exo_pair")
    with pytest.raises(ValueError, match="gamma"):
        dpo_loss(c, r, ref_chosen_logps=rc, ref_rejected_logps=rr, loss_type="hinge", gamma=0.5)
