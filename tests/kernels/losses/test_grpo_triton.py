"""The GRPO family's one-pass Triton kernel under the interpreter vs the float64 per-token formulas of
``test_grpo``: every token-level loss type and KL estimator, rows longer than one block, non-finite padding."""

import math

import pytest
import torch

from hotloop.kernels.losses.grpo import LOSS_TYPES, grpo_loss
from tests.kernels.losses.test_grpo import B, T, _compare, _inputs

# --- Triton kernel under the interpreter -------------------------------------------------------------------------


@pytest.mark.interpreter
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
def test_triton_kernel_matches_formula_for_every_token_level_loss_type(monkeypatch, nan_empty, loss_type, est):
    logp, old, ref, mask, adv = _inputs()  # row 2 is empty
    sampler = old + 0.2 * torch.randn(B, T)
    entropy = (1 + torch.rand(B, T)).requires_grad_()
    is_ratio = torch.exp(old.double() - sampler.double()).clamp(max=1.4)
    eh, bias_kl = (1.25 if loss_type == "cispo" else 0.28), est == "k2"
    delta = 1.15 if loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo") and est == "k3" else None
    kw = dict(
        beta=0.08,
        kl_estimator=est,
        loss_type=loss_type,
        sampler_logp=sampler,
        sampler_is_cap=1.4,
        delta=delta,
        epsilon_high=eh,
        entropy=entropy,
        entropy_coef=0.02,
        use_bias_correction_kl=bias_kl,
        max_completion_length=17,
    )
    ref_kw = dict(
        loss_type=loss_type,
        beta=0.08,
        est=est,
        eh=eh,
        delta=delta,
        is_ratio=is_ratio,
        ent_coef=0.02,
        bias_kl=bias_kl,
        max_len=17,
    )
    monkeypatch.setenv("HOTLOOP_BACKEND", "triton")
    ours = _compare(logp, old, ref, mask, adv, ref_kw=ref_kw, **kw)
    monkeypatch.setenv("HOTLOOP_BACKEND", "torch")
    eager = grpo_loss(logp, adv, mask, old_logp=old, ref_logp=ref, **kw)
    assert ours.metrics.keys() == eager.metrics.keys()
    for k in eager.metrics:
        torch.testing.assert_close(ours.metrics[k], eager.metrics[k], msg=k)


@pytest.mark.interpreter
@pytest.mark.parametrize("loss_type", ["grpo", "cispo", "vespo"])
def test_triton_kernel_walks_rows_longer_than_one_block(monkeypatch, nan_empty, loss_type):
    b, t = 3, 150  # the interpreter's BLOCK_T is 64: three blocks per row, the last one ragged
    logp = (-1.5 + 0.6 * torch.randn(b, t)).requires_grad_()
    old, ref = logp.detach() + 0.05 * torch.randn(b, t), logp.detach() + 0.3 * torch.randn(b, t)
    sampler = old + 0.01 * torch.randn(b, t)
    mask, adv = torch.rand(b, t) > 0.2, torch.randn(b)
    is_ratio = torch.exp(old.double() - sampler.double())
    monkeypatch.setenv("HOTLOOP_BACKEND", "triton")
    shape = (1.0, 0.5, 1.0, 0.5)
    _compare(
        logp,
        old,
        ref,
        mask,
        adv,
        loss_type=loss_type,
        beta=0.1,
        sampler_logp=sampler,
        epsilon_high=1.2,
        vespo_shape=shape,
        ref_kw=dict(loss_type=loss_type, beta=0.1, is_ratio=is_ratio, eh=1.2, vespo=shape),
    )


@pytest.mark.interpreter
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_triton_kernel_ignores_non_finite_padding(monkeypatch, loss_type):
    logp, old, ref, mask, adv = _inputs()
    old, ref = old.masked_fill(~mask, math.inf), ref.masked_fill(~mask, -math.inf)
    entropy = torch.rand(B, T).masked_fill(~mask, math.nan)
    monkeypatch.setenv("HOTLOOP_BACKEND", "triton")
    out = grpo_loss(
        logp,
        adv,
        mask,
        old_logp=old,
        ref_logp=ref,
        beta=0.1,
        loss_type=loss_type,
        entropy=entropy,
        use_bias_correction_kl=True,
    )
    (grad,) = torch.autograd.grad(out.loss, logp)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all() and (grad[~mask] == 0).all()
    assert all(torch.isfinite(v) for v in out.metrics.values())
