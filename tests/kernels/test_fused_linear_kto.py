"""fused_linear_kto_loss vs a float64 materialized reference: options, both strategies, padded and packed layouts,
precomputed reference vs reference head, bf16, no_grad, argument errors."""

import pytest
import torch

from hotloop.kernels import FusedLinearKTOLoss, fused_linear_kto_loss, fused_linear_logprob
from hotloop.kernels import _fused_linear_common as common
from hotloop.kernels._fused_linear_common import reference_padded
from hotloop.kernels.fused_linear_kto import reference_fused_linear_kto_loss
from tests.helpers import assert_close, assert_scalar_close, logit_scale

B, T, D, V = 5, 7, 16, 97


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    monkeypatch.setenv("HOTLOOP_BACKEND", "torch")


def _batch(dtype=torch.float32, *, bias=True):
    """Padded samples (one empty), labels with both classes, reference sequence log-probs."""
    hidden = torch.randn(B, T, D).to(dtype).requires_grad_(True)
    weight = (0.5 * torch.randn(V, D)).to(dtype).requires_grad_(True)
    b = torch.randn(V).to(dtype).requires_grad_(True) if bias else None
    targets = torch.randint(0, V, (B, T))
    mask = torch.rand(B, T) > 0.25
    mask[3] = False
    labels = torch.tensor([True, False, True, False, True])
    return hidden, weight, targets, labels, b, mask, -25.0 + 4.0 * torch.randn(B)


def _check(hidden, weight, targets, labels, bias, dtype=torch.float32, metrics=True, **kw):
    """Value, metrics and gradients (non-unit upstream) of the fused loss against the float64 reference."""
    out = fused_linear_kto_loss(hidden, weight, targets, bias, labels=labels, **kw)
    scale = 0.5 + torch.rand(())
    inputs = [x for x in (hidden, weight, bias) if x is not None]
    grads = torch.autograd.grad(out.loss * scale, inputs)
    leaves = [x.detach().double().requires_grad_(True) for x in inputs]
    ref = reference_fused_linear_kto_loss(
        leaves[0], leaves[1], targets, leaves[2] if bias is not None else None, labels=labels, **kw
    )
    ref_grads = torch.autograd.grad(ref.loss * scale.double(), leaves)
    assert_scalar_close(out.loss, ref.loss, dtype, "loss")
    if metrics:
        assert out.metrics.keys() == ref.metrics.keys()
        logit_total = logit_scale(hidden, weight, bias, targets, **kw)[1] * weight.shape[0]
        for name, value in out.metrics.items():
            scale = logit_total if name.startswith("logits/") else 1.0
            assert_scalar_close(value, ref.metrics[name], dtype, name, scale)
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert g.dtype == dtype, f"grad {name} dtype {g.dtype}"
        assert_close(g, r, dtype, f"grad {name}")


@pytest.mark.parametrize("strategy", ["auto", "grouped", "two_pass"])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"beta": 0.5, "reference_point": 0.8, "desirable_weight": 1.3, "undesirable_weight": 0.6},
        {"reference_point": torch.tensor(2.5), "temperature": 0.7},
        {"length_normalize": True, "beta": 2.0, "reference_point": 0.1},  # Liger's average_log_prob
    ],
)
def test_options_and_strategies_match_float64_reference(options, strategy, monkeypatch):
    monkeypatch.setenv("HOTLOOP_BLOCK_BYTES", str(4 * V * T))  # one sample per chunk: several chunks
    hidden, weight, targets, labels, bias, mask, ref_logps = _batch()
    _check(hidden, weight, targets, labels, bias, mask=mask, ref_logps=ref_logps, strategy=strategy, **options)


@pytest.mark.parametrize("strategy", ["auto", "grouped", "two_pass"])
def test_tiny_block_budget_many_chunks_match_reference(strategy, monkeypatch):
    monkeypatch.setenv("HOTLOOP_BLOCK_BYTES", str(4 * V * 2))  # 2 rows per chunk: a sample never fits
    hidden, weight, targets, labels, _, mask, ref_logps = _batch(bias=False)
    _check(hidden, weight, targets, labels, None, mask=mask, ref_logps=ref_logps, strategy=strategy, beta=0.3)


@pytest.mark.parametrize("strategy", ["grouped", "two_pass"])
def test_packed_layout_equals_padded_layout(strategy):
    cu = torch.tensor([0, 7, 7, 10, 16, 17])
    hidden = torch.randn(19, D, requires_grad=True)  # two trailing rows outside every sequence
    weight, bias = (0.5 * torch.randn(V, D)).requires_grad_(True), torch.randn(V, requires_grad=True)
    targets, mask = torch.randint(0, V, (19,)), torch.rand(19) > 0.2
    labels, ref_logps = torch.tensor([True, True, False, False, True]), -20.0 + 3.0 * torch.randn(B)
    padded_hidden, padded_targets, padded_mask = reference_padded(hidden.detach(), targets, mask, cu, -100)
    padded_hidden.requires_grad_(True)
    opts = {"ref_logps": ref_logps, "strategy": strategy, "reference_point": 0.5}
    packed = fused_linear_kto_loss(hidden, weight, targets, bias, labels=labels, mask=mask, cu_seqlens=cu, **opts)
    padded = fused_linear_kto_loss(padded_hidden, weight, padded_targets, bias, labels=labels, mask=padded_mask, **opts)
    g_packed = torch.autograd.grad(packed.loss, (hidden, weight, bias))
    g_padded = torch.autograd.grad(padded.loss, (padded_hidden, weight, bias))
    assert_close(packed.loss, padded.loss.double(), torch.float32, "loss")
    for name in padded.metrics:
        assert_close(packed.metrics[name], padded.metrics[name].double(), torch.float32, name)
    assert torch.equal(g_packed[0][17:], torch.zeros(2, D))
    unpacked = reference_padded(g_packed[0], targets, mask, cu, -100)[0]
    assert_close(unpacked, g_padded[0].double(), torch.float32, "grad hidden")
    for name, a, b in zip(("weight", "bias"), g_packed[1:], g_padded[1:]):
        assert_close(a, b.double(), torch.float32, f"grad {name}")


def test_reference_head_equals_precomputed_reference_and_gets_no_gradient():
    hidden, weight, targets, labels, bias, mask, _ = _batch()
    ref_hidden = torch.randn(B, T, 12, requires_grad=True)
    ref_weight, ref_bias = torch.randn(V, 12, requires_grad=True), torch.randn(V)
    with torch.no_grad():
        ref_tok = fused_linear_logprob(ref_hidden, ref_weight, targets.masked_fill(~mask, -100), ref_bias)
    head = fused_linear_kto_loss(
        hidden,
        weight,
        targets,
        bias,
        labels=labels,
        mask=mask,
        ref_hidden=ref_hidden,
        ref_weight=ref_weight,
        ref_bias=ref_bias,
    )
    cached = fused_linear_kto_loss(hidden, weight, targets, bias, labels=labels, mask=mask, ref_logps=ref_tok.sum(-1))
    g_head = torch.autograd.grad(head.loss, (hidden, weight, bias))
    g_cached = torch.autograd.grad(cached.loss, (hidden, weight, bias))
    assert_close(head.loss, cached.loss.double(), torch.float32, "loss")
    for name, a, b in zip(("hidden", "weight", "bias"), g_head, g_cached):
        assert_close(a, b.double(), torch.float32, f"grad {name}")
    assert ref_hidden.grad is None and ref_weight.grad is None
    _check(
        hidden,
        weight,
        targets,
        labels,
        bias,
        mask=mask,
        ref_hidden=ref_hidden,
        ref_weight=ref_weight,
        ref_bias=ref_bias,
    )


@pytest.mark.parametrize("strategy", ["grouped", "two_pass"])
def test_bf16_matches_float64_reference(strategy):
    hidden, weight, targets, labels, bias, mask, ref_logps = _batch(torch.bfloat16)
    _check(
        hidden,
        weight,
        targets,
        labels,
        bias,
        torch.bfloat16,
        metrics=False,
        mask=mask,
        ref_logps=ref_logps,
        strategy=strategy,
    )


def test_no_grad_runs_the_forward_only_and_equals_grad_mode(monkeypatch):
    hidden, weight, targets, labels, bias, mask, ref_logps = _batch()
    with_grad = fused_linear_kto_loss(hidden, weight, targets, bias, labels=labels, mask=mask, ref_logps=ref_logps)

    def forbidden(*args, **kwargs):
        raise AssertionError("logprob_fwd_bwd called without grad")

    monkeypatch.setattr(common, "logprob_fwd_bwd", forbidden)
    with torch.no_grad():
        out = fused_linear_kto_loss(hidden, weight, targets, bias, labels=labels, mask=mask, ref_logps=ref_logps)
    assert out.loss.grad_fn is None
    assert_close(out.loss, with_grad.loss.detach().double(), torch.float32, "loss")
    for name, value in out.metrics.items():
        assert_close(value, with_grad.metrics[name].double(), torch.float32, name)


def test_module_matches_function():
    hidden, weight, targets, labels, bias, mask, ref_logps = _batch()
    options = {"beta": 0.3, "desirable_weight": 1.2, "strategy": "two_pass"}
    out = FusedLinearKTOLoss(**options)(
        hidden, weight, targets, bias, labels=labels, mask=mask, ref_logps=ref_logps, reference_point=0.2
    )
    ref = fused_linear_kto_loss(
        hidden, weight, targets, bias, labels=labels, mask=mask, ref_logps=ref_logps, reference_point=0.2, **options
    )
    assert torch.equal(out.loss, ref.loss)


@pytest.mark.parametrize(
    "change, error, name",
    [
        (lambda a: {**a, "labels": a["labels"][:3]}, ValueError, "labels"),
        (lambda a: {**a, "labels": a["labels"].long()}, TypeError, "labels"),
        (lambda a: {**a, "ref_logps": None}, ValueError, "ref_logps"),
        (lambda a: {**a, "ref_logps": torch.randn(B - 1)}, ValueError, "ref_logps"),
        (lambda a: {**a, "ref_hidden": a["hidden"], "ref_weight": a["weight"]}, ValueError, "ref_hidden"),
        (lambda a: {**a, "beta": -1.0}, ValueError, "beta"),
        (lambda a: {**a, "strategy": "pairs"}, ValueError, "strategy"),
        (lambda a: {**a, "mask": a["mask"][:2]}, ValueError, "mask"),
    ],
)
def test_invalid_arguments_raise_naming_the_argument(change, error, name):
    hidden, weight, targets, labels, _, mask, ref_logps = _batch()
    args = change(
        {
            "hidden": hidden.detach(),
            "weight": weight.detach(),
            "targets": targets,
            "labels": labels,
            "mask": mask,
            "ref_logps": ref_logps,
        }
    )
    with pytest.raises(error, match=name):
        fused_linear_kto_loss(
            args.pop("hidden"), args.pop("weight"), args.pop("targets"), labels=args.pop("labels"), **args
        )


@pytest.mark.interpreter
@pytest.mark.parametrize("strategy", ["grouped", "two_pass"])
def test_triton_backend_matches_reference(strategy, monkeypatch):
    monkeypatch.setenv("HOTLOOP_BACKEND", "triton")
    hidden, weight, targets, labels, bias, mask, ref_logps = _batch()
    _check(
        hidden, weight, targets, labels, bias, mask=mask, ref_logps=ref_logps, strategy=strategy, reference_point=0.3
    )
