"""fused_linear_grpo_loss vs a float64 materialized reference: every loss type, importance-sampling level and
option, padded and packed layouts, precomputed reference vs reference head, bf16, no_grad, argument errors."""

import pytest
import torch

from hotloop.kernels import FusedLinearGRPOLoss, fused_linear_grpo_loss, fused_linear_logprob
from hotloop.kernels import fused_linear_grpo as grpo_module
from hotloop.kernels._fused_linear_common import reference_padded
from hotloop.kernels.fused_linear_grpo import reference_fused_linear_grpo_loss
from hotloop.kernels.losses.grpo import CLIPPED, LOSS_TYPES
from tests.helpers import TOLERANCE, assert_close

B, T, D, V = 4, 7, 16, 97


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    monkeypatch.setenv("HOTLOOP_BACKEND", "torch")


def _batch(dtype=torch.float32, *, bias=True):
    """Padded completions (one empty) and per-token old / reference / sampler log-probs near the policy's."""
    hidden = torch.randn(B, T, D).to(dtype).requires_grad_(True)
    weight = (0.5 * torch.randn(V, D)).to(dtype).requires_grad_(True)
    b = torch.randn(V).to(dtype).requires_grad_(True) if bias else None
    targets = torch.randint(0, V, (B, T))
    mask = torch.rand(B, T) > 0.25
    mask[2] = False
    with torch.no_grad():
        logp = fused_linear_logprob(hidden.float(), weight.float(), targets, None if b is None else b.float())
    near = {name: logp + 0.3 * torch.randn(B, T) for name in ("old_logp", "ref_logp", "sampler_logp")}
    return hidden, weight, targets, torch.randn(B), b, mask, near


def _assert_loss_close(out, ref, dtype, natural_scale, what="loss"):
    """Within the dtype tolerance of max(|ref|, natural_scale): terms of both signs cancel in the sum (the loss:
    signs of A; the k1 ``kl`` metric: signs of logp − ref, whose token mean can be far below its terms)."""
    err = abs(out.item() - ref.item()) / max(abs(ref.item()), natural_scale)
    assert err <= TOLERANCE[dtype], f"{what}: relative error {err:.3e} > {TOLERANCE[dtype]:.0e} ({dtype})"


def _check(hidden, weight, targets, advantages, bias, dtype=torch.float32, metrics=True, **kw):
    """Value, metrics and gradients (non-unit upstream) of the fused loss against the float64 reference."""
    out = fused_linear_grpo_loss(hidden, weight, targets, bias, advantages=advantages, **kw)
    scale = 0.5 + torch.rand(())
    inputs = [x for x in (hidden, weight, bias) if x is not None]
    grads = torch.autograd.grad(out.loss * scale, inputs)
    leaves = [x.detach().double().requires_grad_(True) for x in inputs]
    ref = reference_fused_linear_grpo_loss(
        leaves[0], leaves[1], targets, leaves[2] if bias is not None else None, advantages=advantages, **kw
    )
    ref_grads = torch.autograd.grad(ref.loss * scale.double(), leaves)
    _assert_loss_close(out.loss, ref.loss, dtype, advantages.abs().mean().item())
    if metrics:
        assert out.metrics.keys() == ref.metrics.keys()
        for name, value in out.metrics.items():  # token means of O(0.1)-O(1) terms (_batch: |logp − ref| ~ 0.3)
            _assert_loss_close(value, ref.metrics[name], dtype, 0.1, name)
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert g.dtype == dtype, f"grad {name} dtype {g.dtype}"
        assert_close(g, r, dtype, f"grad {name}")
    return out


CASES = [(t, "token") for t in LOSS_TYPES] + [(t, "sequence") for t in CLIPPED]


@pytest.mark.parametrize("loss_type, level", CASES)
def test_every_loss_type_and_level_matches_float64_reference(loss_type, level):
    hidden, weight, targets, adv, bias, mask, near = _batch()
    eps_high = 1.5 if loss_type == "cispo" else 0.28
    out = _check(
        hidden,
        weight,
        targets,
        adv,
        bias,
        mask=mask,
        old_logp=near["old_logp"],
        ref_logp=near["ref_logp"],
        beta=0.04,
        loss_type=loss_type,
        importance_sampling_level=level,
        epsilon_low=0.2,
        epsilon_high=eps_high,
        entropy_coef=0.01,
    )
    logged = {"clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "kl", "entropy"}
    assert logged <= out.metrics.keys()


@pytest.mark.parametrize(
    "options",
    [
        {"kl_estimator": "k1", "beta": 0.1},
        {"kl_estimator": "k2", "beta": 0.1, "use_bias_correction_kl": True},
        {"loss_type": "grpo", "delta": 1.2},
        {"loss_type": "dapo", "sampler_is_cap": 1.3},
        {"loss_type": "vespo", "sampler_is_cap": 2.0, "vespo_shape": (1.5, 2.0, 2.5, 1.0)},
        {"loss_type": "dr_grpo", "max_completion_length": 11},
        {"loss_type": "dapo", "num_items_in_batch": 9},
        {"loss_type": "sapo", "sapo_temperature_pos": 0.7, "sapo_temperature_neg": 1.4},
        {"loss_type": "bnpo", "old_logp": None, "entropy_coef": 0.05, "temperature": 0.7},  # on-policy
        {
            "loss_type": "grpo",
            "importance_sampling_level": "sequence",
            "sampler_is_cap": 1.5,
            "beta": 0.1,
            "use_bias_correction_kl": True,
        },
    ],
)
def test_options_match_float64_reference(options):
    hidden, weight, targets, adv, _, mask, near = _batch(bias=False)
    tensors = {"old_logp": near["old_logp"]}
    if options.get("beta"):
        tensors["ref_logp"] = near["ref_logp"]
    if options.get("sampler_is_cap"):
        tensors["sampler_logp"] = near["sampler_logp"]
    _check(hidden, weight, targets, adv, None, mask=mask, **{**tensors, **options})


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_tiny_block_budget_many_chunks_match_reference(level, monkeypatch):
    monkeypatch.setenv("HOTLOOP_BLOCK_BYTES", str(4 * V * 3))  # 3 rows per chunk; whole sequences still together
    hidden, weight, targets, adv, bias, mask, near = _batch()
    _check(
        hidden,
        weight,
        targets,
        adv,
        bias,
        mask=mask,
        old_logp=near["old_logp"],
        ref_logp=near["ref_logp"],
        beta=0.1,
        entropy_coef=0.02,
        importance_sampling_level=level,
        loss_type="grpo",
    )


def test_packed_layout_equals_padded_layout():
    lengths = torch.tensor([T, 0, 3, 5])
    cu = torch.cat((torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)))
    n = int(cu[-1]) + 2  # two trailing rows outside every sequence
    hidden = torch.randn(n, D, requires_grad=True)
    weight, bias = (0.5 * torch.randn(V, D)).requires_grad_(True), torch.randn(V, requires_grad=True)
    targets, mask, adv = torch.randint(0, V, (n,)), torch.rand(n) > 0.2, torch.randn(B)
    old, ref = -4.0 + torch.randn(n), -4.0 + torch.randn(n)
    padded_hidden, padded_targets, padded_mask = reference_padded(hidden.detach(), targets, mask, cu, -100)
    padded_hidden.requires_grad_(True)

    def pad(x):
        return reference_padded(x.unsqueeze(-1), targets, mask, cu, -100)[0].squeeze(-1)

    opts = {"loss_type": "grpo", "importance_sampling_level": "sequence", "beta": 0.1, "entropy_coef": 0.01}
    packed = fused_linear_grpo_loss(
        hidden, weight, targets, bias, advantages=adv, mask=mask, cu_seqlens=cu, old_logp=old, ref_logp=ref, **opts
    )
    padded = fused_linear_grpo_loss(
        padded_hidden,
        weight,
        padded_targets,
        bias,
        advantages=adv,
        mask=padded_mask,
        old_logp=pad(old),
        ref_logp=pad(ref),
        **opts,
    )
    g_packed = torch.autograd.grad(packed.loss, (hidden, weight, bias))
    g_padded = torch.autograd.grad(padded.loss, (padded_hidden, weight, bias))
    assert_close(packed.loss, padded.loss.double(), torch.float32, "loss")
    for name in padded.metrics:
        assert_close(packed.metrics[name], padded.metrics[name].double(), torch.float32, name)
    assert torch.equal(g_packed[0][int(cu[-1]) :], torch.zeros(2, D))
    unpacked = reference_padded(g_packed[0], targets, mask, cu, -100)[0]
    assert_close(unpacked, g_padded[0].double(), torch.float32, "grad hidden")
    for name, a, b in zip(("weight", "bias"), g_packed[1:], g_padded[1:]):
        assert_close(a, b.double(), torch.float32, f"grad {name}")


def test_reference_head_equals_precomputed_reference_and_gets_no_gradient():
    hidden, weight, targets, adv, bias, mask, near = _batch()
    ref_hidden = torch.randn(B, T, 12, requires_grad=True)
    ref_weight = torch.randn(V, 12, requires_grad=True)
    with torch.no_grad():
        ref_logp = fused_linear_logprob(ref_hidden, ref_weight, targets.masked_fill(~mask, -100))
    opts = {"mask": mask, "old_logp": near["old_logp"], "beta": 0.2, "kl_estimator": "k2"}
    head = fused_linear_grpo_loss(
        hidden, weight, targets, bias, advantages=adv, ref_hidden=ref_hidden, ref_weight=ref_weight, **opts
    )
    cached = fused_linear_grpo_loss(hidden, weight, targets, bias, advantages=adv, ref_logp=ref_logp, **opts)
    g_head = torch.autograd.grad(head.loss, (hidden, weight, bias))
    g_cached = torch.autograd.grad(cached.loss, (hidden, weight, bias))
    assert_close(head.loss, cached.loss.double(), torch.float32, "loss")
    assert_close(head.metrics["kl"], cached.metrics["kl"].double(), torch.float32, "kl")
    for name, a, b in zip(("hidden", "weight", "bias"), g_head, g_cached):
        assert_close(a, b.double(), torch.float32, f"grad {name}")
    assert ref_hidden.grad is None and ref_weight.grad is None
    _check(hidden, weight, targets, adv, bias, ref_hidden=ref_hidden, ref_weight=ref_weight, **opts)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_bf16_matches_float64_reference(level):
    hidden, weight, targets, adv, bias, mask, near = _batch(torch.bfloat16)
    _check(
        hidden,
        weight,
        targets,
        adv,
        bias,
        torch.bfloat16,
        metrics=False,
        mask=mask,
        old_logp=near["old_logp"],
        ref_logp=near["ref_logp"],
        beta=0.04,
        loss_type="grpo",
        importance_sampling_level=level,
    )


def test_no_grad_runs_the_forward_only_and_equals_grad_mode(monkeypatch):
    hidden, weight, targets, adv, bias, mask, near = _batch()
    opts = {"mask": mask, "old_logp": near["old_logp"], "ref_logp": near["ref_logp"], "beta": 0.1}
    with_grad = fused_linear_grpo_loss(hidden, weight, targets, bias, advantages=adv, **opts)

    def forbidden(*args, **kwargs):
        raise AssertionError("logprob_fwd_bwd called without grad")

    monkeypatch.setattr(grpo_module, "logprob_fwd_bwd", forbidden)
    with torch.no_grad():
        out = fused_linear_grpo_loss(hidden, weight, targets, bias, advantages=adv, **opts)
    assert out.loss.grad_fn is None
    assert_close(out.loss, with_grad.loss.detach().double(), torch.float32, "loss")
    for name, value in out.metrics.items():
        assert_close(value, with_grad.metrics[name].double(), torch.float32, name)


def test_module_matches_function():
    hidden, weight, targets, adv, bias, mask, near = _batch()
    options = {"loss_type": "dr_grpo", "max_completion_length": 9, "epsilon_high": 0.3, "delta": 1.5}
    out = FusedLinearGRPOLoss(**options)(
        hidden, weight, targets, bias, advantages=adv, mask=mask, old_logp=near["old_logp"]
    )
    ref = fused_linear_grpo_loss(
        hidden, weight, targets, bias, advantages=adv, mask=mask, old_logp=near["old_logp"], **options
    )
    assert torch.equal(out.loss, ref.loss)


@pytest.mark.parametrize(
    "change, error, name",
    [
        (lambda a: {**a, "advantages": torch.randn(B + 1)}, ValueError, "advantages"),
        (lambda a: {**a, "beta": 0.1}, ValueError, "ref_logp"),
        (lambda a: {**a, "ref_logp": torch.randn(B, T)}, ValueError, "ref_logp"),
        (lambda a: {**a, "sampler_is_cap": 2.0}, ValueError, "sampler_logp"),
        (lambda a: {**a, "old_logp": torch.randn(B, T + 1)}, ValueError, "old_logp"),
        (lambda a: {**a, "loss_type": "ppo"}, ValueError, "loss_type"),
        (
            lambda a: {**a, "loss_type": "cispo", "importance_sampling_level": "sequence"},
            ValueError,
            "importance_sampling_level",
        ),
        (lambda a: {**a, "kl_estimator": "k4"}, ValueError, "kl_estimator"),
        (lambda a: {**a, "mask": a["mask"].reshape(-1)}, ValueError, "mask"),
        (lambda a: {**a, "cu_seqlens": torch.tensor([0, 3])}, ValueError, "hidden"),
        (lambda a: {**a, "temperature": 0.0}, ValueError, "temperature"),
    ],
)
def test_invalid_arguments_raise_naming_the_argument(change, error, name):
    hidden, weight, targets, adv, _, mask, _ = _batch()
    args = change(
        {"hidden": hidden.detach(), "weight": weight.detach(), "targets": targets, "advantages": adv, "mask": mask}
    )
    with pytest.raises(error, match=name):
        fused_linear_grpo_loss(args.pop("hidden"), args.pop("weight"), args.pop("targets"), **args)


@pytest.mark.interpreter
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_triton_backend_matches_reference(level, monkeypatch):
    monkeypatch.setenv("HOTLOOP_BACKEND", "triton")
    hidden, weight, targets, adv, bias, mask, near = _batch()
    _check(
        hidden,
        weight,
        targets,
        adv,
        bias,
        mask=mask,
        old_logp=near["old_logp"],
        ref_logp=near["ref_logp"],
        beta=0.04,
        entropy_coef=0.01,
        loss_type="grpo",
        importance_sampling_level=level,
    )
