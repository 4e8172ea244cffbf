"""GRPO family vs float64 formulas written per token (Liger comparisons: test_grpo_liger; Triton: test_grpo_triton)."""

import math

import pytest
import torch

from hotloop.kernels.losses.grpo import LOSS_TYPES, GRPOOptions, grpo_loss, grpo_per_token
from hotloop.kernels.losses.segments import reference_unpack
from tests.helpers import TOLERANCE, assert_close

B, T = 5, 13


def _inputs(dtype=torch.float32, empty_row=True):
    logp = (-1.5 + 0.6 * torch.randn(B, T)).to(dtype).requires_grad_()
    old = (logp.detach().float() + 0.25 * torch.randn(B, T)).to(dtype)
    ref = (logp.detach().float() + 0.3 * torch.randn(B, T)).to(dtype)
    mask = torch.rand(B, T) > 0.3
    if empty_row:
        mask[2] = False
    # Both signs on non-empty rows, always (clip-low counts, SAPO's τ_neg and VESPO's negative shape need A < 0).
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0]) * (0.5 + torch.rand(B))
    return logp, old, ref, mask, adv


def _vespo_phi(b, logp, old, mask, a, is_ratio, shape):
    """VESPO φ = w^k · e^{λ(1 − w)} of sequence b, log w = Σ_mask clamp(log ratio) + Σ_T clamp(log ρ_s), with
    Liger's clamps (±20; log 1e-8) and λ ≥ 1e-4."""
    low = math.log(1e-8)
    k, lam = (shape[0], shape[1]) if a >= 0 else (shape[2], shape[3])
    s = sum(float(torch.clamp(logp[b, t] - old[b, t], -20, 20)) for t in range(logp.shape[1]) if mask[b, t])
    if is_ratio is not None:
        s += sum(min(max(math.log(float(r)), low), 20.0) for r in is_ratio[b])
    w = math.exp(min(max(s, low), 20.0))
    lam = max(lam, 1e-4)
    return w**k * math.exp(lam * (1 - w))


def reference_grpo(
    logp,
    old,
    ref,
    mask,
    adv,
    *,
    loss_type,
    beta=0.0,
    est="k3",
    el=0.2,
    eh=0.2,
    delta=None,
    level="token",
    is_ratio=None,
    max_len=None,
    entropy=None,
    ent_coef=0.0,
    sapo=(1.0, 1.05),
    bias_kl=False,
    vespo=(2.0, 3.0, 3.0, 2.0),
):
    """Float64 GRPO-family loss, one sequence and one token at a time (every loss type)."""
    rows, lens = [], mask.sum(-1).tolist()
    for b in range(logp.shape[0]):
        a = adv[b].item()
        toks = [t for t in range(logp.shape[1]) if mask[b, t]]
        seq_lw = sum(logp[b, t] - old[b, t] for t in toks) / max(len(toks), 1)
        phi = _vespo_phi(b, logp.detach(), old, mask, a, is_ratio, vespo) if loss_type == "vespo" else None
        row = []
        for t in toks:
            lw = seq_lw if level == "sequence" else logp[b, t] - old[b, t]
            w = torch.exp(lw)
            if loss_type == "cispo":
                pg = -min(w.item(), eh) * a * logp[b, t]
            elif loss_type == "sapo":
                tau = sapo[0] if a > 0 else sapo[1]
                pg = -a * 4 / tau / (1 + torch.exp(-tau * (w - 1)))
            elif loss_type == "vespo":
                pg = -phi * a * logp[b, t]
            else:
                w1 = w if delta is None or w.item() <= delta else w * 0 + delta
                pg = -torch.minimum(w1 * a, torch.clamp(w, 1 - el, 1 + eh) * a)
            if is_ratio is not None and loss_type != "vespo":
                pg = pg * is_ratio[b, t]
            if beta:
                x = ref[b, t] - logp[b, t]
                kl = {"k1": -x, "k2": x * x / 2, "k3": torch.exp(x) - x - 1}[est]
                pg = pg + beta * (kl * w if bias_kl else kl)
            if entropy is not None:
                pg = pg - ent_coef * entropy[b, t]
            row.append(pg)
        rows.append(sum(row) if row else logp.sum() * 0)
    n_tok = max(sum(lens), 1)
    if loss_type in ("grpo", "sapo"):
        return sum(r / max(n, 1) for r, n in zip(rows, lens)) / len(rows)
    if loss_type == "dr_grpo":
        return sum(rows) / (len(rows) * (max_len or logp.shape[1]))
    if loss_type == "luspo":
        return sum(rows) / len(rows)
    return sum(rows) / n_tok


def _compare(logp, old, ref, mask, adv, dtype=torch.float32, ref_kw=None, **kw):
    """grpo_loss vs reference_grpo in float64: value, d/dlogp and (when it requires grad) d/dentropy."""
    out = grpo_loss(logp, adv, mask, old_logp=old, ref_logp=ref, **kw)
    g = 1.7
    ent = kw.get("entropy")
    with_ent = ent is not None and ent.requires_grad
    grads = torch.autograd.grad(out.loss * g, (logp, ent) if with_ent else (logp,))
    lp64 = logp.detach().double().requires_grad_()
    ref_kw = dict(ref_kw or {})
    if with_ent:
        ref_kw["entropy"] = ent.detach().double().requires_grad_()
    r = reference_grpo(lp64, old.double(), ref.double(), mask, adv.double(), **ref_kw)
    rgrads = torch.autograd.grad(r * g, (lp64, ref_kw["entropy"]) if with_ent else (lp64,))
    # Loss within the tolerance of max(|exact|, mean |A|): rows of both signs of A (and k1's signed terms) can
    # cancel the sum far below its terms, where no fp32 sum gets a relative 1e-5 of the result.
    err = abs(out.loss.item() - r.item()) / max(abs(r.item()), adv.abs().mean().item())
    assert err <= TOLERANCE[dtype], f"loss: error {err:.3e} > {TOLERANCE[dtype]:.0e}"
    for name, grad, rgrad in zip(("grad", "entropy grad"), grads, rgrads):
        assert_close(grad, rgrad, dtype, name)
        assert grad.dtype == logp.dtype and torch.isfinite(grad).all() and (grad[~mask] == 0).all()
    return out


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo"])
@pytest.mark.parametrize("est", ["k1", "k3"])
def test_token_level_loss_types_match_formula_with_kl(loss_type, est):
    logp, old, ref, mask, adv = _inputs()
    eh = 1.25 if loss_type == "cispo" else 0.28
    _compare(
        logp,
        old,
        ref,
        mask,
        adv,
        beta=0.07,
        kl_estimator=est,
        loss_type=loss_type,
        epsilon_high=eh,
        max_completion_length=17,
        ref_kw=dict(loss_type=loss_type, beta=0.07, est=est, eh=eh, max_len=17),
    )


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "luspo"])
def test_gspo_sequence_level_ratio_matches_formula(loss_type):
    logp, old, ref, mask, adv = _inputs()
    _compare(
        logp,
        old,
        ref,
        mask,
        adv,
        loss_type=loss_type,
        importance_sampling_level="sequence",
        beta=0.04,
        kl_estimator="k2",
        ref_kw=dict(loss_type=loss_type, level="sequence", beta=0.04, est="k2"),
    )


def test_delta_sampler_correction_and_entropy_bonus_match_formula():
    logp, old, ref, mask, adv = _inputs()
    sampler = old + 0.3 * torch.randn(B, T)
    entropy = (1 + torch.rand(B, T)).requires_grad_()
    is_ratio = torch.exp(old.double() - sampler.double()).clamp(max=1.5)
    out = _compare(
        logp,
        old,
        ref,
        mask,
        adv,
        loss_type="dapo",
        delta=1.1,
        sampler_logp=sampler,
        sampler_is_cap=1.5,
        entropy=entropy,
        entropy_coef=0.01,
        ref_kw=dict(loss_type="dapo", delta=1.1, is_ratio=is_ratio, entropy=entropy.detach().double(), ent_coef=0.01),
    )
    m = mask.float()
    torch.testing.assert_close(out.metrics["entropy"], (entropy.detach() * m).sum() / m.sum())


@pytest.mark.parametrize("kl_estimator", ["k1", "k2", "k3"])
def test_vespo_matches_formula_with_sampler_ratio_and_kl(kl_estimator):
    logp, old, ref, mask, adv = _inputs()
    sampler = old + 0.3 * torch.randn(B, T)
    is_ratio = torch.exp(old.double() - sampler.double()).clamp(max=1.5)
    shape = (1.5, 2.5, 2.0, 1.5)
    _compare(
        logp,
        old,
        ref,
        mask,
        adv,
        loss_type="vespo",
        beta=0.05,
        kl_estimator=kl_estimator,
        sampler_logp=sampler,
        sampler_is_cap=1.5,
        vespo_shape=shape,
        ref_kw=dict(loss_type="vespo", beta=0.05, est=kl_estimator, is_ratio=is_ratio, vespo=shape),
    )


@pytest.mark.parametrize("loss_type", ["bnpo", "cispo"])
@pytest.mark.parametrize("kl_estimator", ["k1", "k2", "k3"])
def test_bias_corrected_kl_matches_formula_value_and_grad(loss_type, kl_estimator):
    logp, old, ref, mask, adv = _inputs()
    eh = 1.25 if loss_type == "cispo" else 0.2
    out = _compare(
        logp,
        old,
        ref,
        mask,
        adv,
        loss_type=loss_type,
        beta=0.3,
        kl_estimator=kl_estimator,
        epsilon_high=eh,
        use_bias_correction_kl=True,
        ref_kw=dict(loss_type=loss_type, beta=0.3, est=kl_estimator, eh=eh, bias_kl=True),
    )
    lp, rf, w = logp.detach().double(), ref.double(), torch.exp(logp.detach().double() - old.double())
    k = {"k1": lp - rf, "k2": (lp - rf) ** 2 / 2, "k3": torch.exp(rf - lp) - (rf - lp) - 1}[kl_estimator]
    assert_close(out.metrics["kl"], (k * w * mask).sum() / mask.sum(), torch.float32, "bias-corrected kl metric")


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "vespo"])
def test_packed_batch_with_cu_seqlens_equals_its_padded_form(monkeypatch, backend, loss_type):
    monkeypatch.setenv("HOTLOOP_BACKEND", backend)
    cu, n = torch.tensor([0, 6, 6, 13, 20, 29]), 31  # an empty sequence, two trailing tokens in none
    logp = (-1.5 + 0.6 * torch.randn(n)).requires_grad_()
    old, ref, sampler = (logp.detach() + 0.25 * torch.randn(n) for _ in range(3))
    entropy = (1 + torch.rand(n)).requires_grad_()
    mask, adv = torch.rand(n) > 0.2, torch.randn(5)
    kw = dict(loss_type=loss_type, beta=0.1, entropy_coef=0.01, sampler_is_cap=1.3)
    packed = grpo_loss(
        logp, adv, mask, old_logp=old, ref_logp=ref, sampler_logp=sampler, entropy=entropy, cu_seqlens=cu, **kw
    )
    pad = lambda x: reference_unpack(x.detach(), cu)  # noqa: E731
    lp, ent = pad(logp).requires_grad_(), pad(entropy).requires_grad_()
    padded = grpo_loss(
        lp, adv, pad(mask), old_logp=pad(old), ref_logp=pad(ref), sampler_logp=pad(sampler), entropy=ent, **kw
    )
    torch.testing.assert_close(packed.loss, padded.loss)
    for k in padded.metrics:
        torch.testing.assert_close(packed.metrics[k], padded.metrics[k])
    for x, y in zip(torch.autograd.grad(packed.loss, (logp, entropy)), torch.autograd.grad(padded.loss, (lp, ent))):
        torch.testing.assert_close(pad(x), y)
        assert (x[29:] == 0).all()


def test_old_logp_none_is_on_policy_ratio_one():
    logp, _, ref, mask, adv = _inputs()
    out = grpo_loss(logp, adv, mask, old_logp=None, loss_type="bnpo")
    (grad,) = torch.autograd.grad(out.loss, logp)
    m = mask.float()
    assert_close(out.loss, -(adv[:, None] * m).sum().double() / m.sum(), torch.float32, "on-policy loss")
    assert_close(grad, (-adv[:, None] * m / m.sum()).double(), torch.float32, "on-policy grad = -A/N")


def test_clip_metrics_count_low_and_high_clipped_tokens_as_trl():
    logp, old, ref, mask, adv = _inputs()
    m = grpo_loss(logp, adv, mask, old_logp=old, epsilon_low=0.1, epsilon_high=0.15).metrics
    w, a, mf = torch.exp(logp.detach() - old), adv[:, None], mask.float()
    low = (((w < 0.9) & (a < 0)) * mf).sum() / mf.sum()
    high = (((w > 1.15) & (a > 0)) * mf).sum() / mf.sum()
    torch.testing.assert_close(m["clip_ratio/low_mean"], low)
    torch.testing.assert_close(m["clip_ratio/high_mean"], high)
    torch.testing.assert_close(m["clip_ratio/region_mean"], low + high)
    assert "kl" not in m


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("loss_type", ["grpo", "sapo", "vespo"])
def test_bf16_inputs_within_bf16_tolerance(monkeypatch, backend, loss_type):
    monkeypatch.setenv("HOTLOOP_BACKEND", backend)
    logp, old, ref, mask, adv = _inputs(torch.bfloat16)
    _compare(
        logp,
        old,
        ref,
        mask,
        adv,
        torch.bfloat16,
        loss_type=loss_type,
        beta=0.1,
        ref_kw=dict(loss_type=loss_type, beta=0.1),
    )


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_all_empty_mask_gives_zero_loss_and_zero_grad(monkeypatch, backend):
    monkeypatch.setenv("HOTLOOP_BACKEND", backend)
    logp, old, ref, mask, adv = _inputs()
    for lt in LOSS_TYPES:
        out = grpo_loss(logp, adv, torch.zeros_like(mask), old_logp=old, ref_logp=ref, beta=0.1, loss_type=lt)
        (grad,) = torch.autograd.grad(out.loss, logp)
        assert out.loss.item() == 0 and (grad == 0).all(), lt
        assert all(v.item() == 0 for v in out.metrics.values()), lt


def test_per_token_helper_reproduces_loss_and_grad():
    logp, old, ref, mask, adv = _inputs()
    kw = dict(beta=0.05, loss_type="grpo", importance_sampling_level="sequence")
    ptl, w = grpo_per_token(logp, adv, mask, old_logp=old, ref_logp=ref, options=GRPOOptions(**kw))
    full = grpo_loss(logp, adv, mask, old_logp=old, ref_logp=ref, **kw)
    ga = torch.autograd.grad((ptl * w).sum(), logp)[0]
    gb = torch.autograd.grad(full.loss, logp)[0]
    torch.testing.assert_close(ga, gb)
    assert not w.requires_grad


def test_validation_errors_name_the_argument():
    logp, old, ref, mask, adv = _inputs()
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(logp, adv, mask, old_logp=old, loss_type="ppo")
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, adv, mask, old_logp=old, beta=0.1)
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(logp, adv[:-1], mask, old_logp=old)
    with pytest.raises(ValueError, match="sequence"):
        grpo_loss(logp, adv, mask, old_logp=old, loss_type="cispo", importance_sampling_level="sequence")
    with pytest.raises(ValueError, match="kl_estimator"):
        grpo_loss(logp, adv, mask, old_logp=old, ref_logp=ref, beta=0.1, kl_estimator="k4")
    with pytest.raises(ValueError, match="sampler_is_cap"):
        grpo_loss(logp, adv, mask, old_logp=old, sampler_is_cap=2.0)


def test_unknown_option_is_a_type_error():
    logp, old, ref, mask, adv = _inputs()
    with pytest.raises(TypeError, match="epsilon"):
        grpo_loss(logp, adv, mask, old_logp=old, epsilon=0.2)
