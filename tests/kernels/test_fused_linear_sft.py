"""fused_linear_sft_loss vs a float64 materialized reference: normalizations and per-sequence weights, mask and
ignore_index conventions, padded and packed layouts, bf16, no_grad, argument errors."""

import pytest
import torch

from hotloop.kernels import FusedLinearSFTLoss, fused_linear_sft_loss
from hotloop.kernels import fused_linear_sft as sft_module
from hotloop.kernels._fused_linear_common import reference_padded
from hotloop.kernels.fused_linear_sft import reference_fused_linear_sft_loss
from tests.helpers import assert_close

B, T, D, V = 4, 9, 16, 97


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    monkeypatch.setenv("HOTLOOP_BACKEND", "torch")


def _batch(dtype=torch.float32, *, bias=True):
    """Padded sequences (one empty) with rewards-like per-sequence weights (one 0, as rejection sampling drops)."""
    hidden = torch.randn(B, T, D).to(dtype).requires_grad_(True)
    weight = (0.5 * torch.randn(V, D)).to(dtype).requires_grad_(True)
    b = torch.randn(V).to(dtype).requires_grad_(True) if bias else None
    targets = torch.randint(0, V, (B, T))
    mask = torch.rand(B, T) > 0.25
    mask[1] = False
    weights = torch.rand(B) + 0.2
    weights[2] = 0.0
    return hidden, weight, targets, b, mask, weights


def _check(hidden, weight, targets, bias, dtype=torch.float32, metrics=True, **kw):
    """Value, metrics and gradients (non-unit upstream) of the fused loss against the float64 reference."""
    out = fused_linear_sft_loss(hidden, weight, targets, bias, **kw)
    scale = 0.5 + torch.rand(())
    inputs = [x for x in (hidden, weight, bias) if x is not None]
    grads = torch.autograd.grad(out.loss * scale, inputs)
    leaves = [x.detach().double().requires_grad_(True) for x in inputs]
    ref = reference_fused_linear_sft_loss(leaves[0], leaves[1], targets, leaves[2] if bias is not None else None, **kw)
    ref_grads = torch.autograd.grad(ref.loss * scale.double(), leaves)
    assert_close(out.loss, ref.loss, dtype, "loss")
    if metrics:
        assert out.metrics.keys() == ref.metrics.keys() == {"nll", "entropy", "num_tokens"}
        for name, value in out.metrics.items():
            assert_close(value, ref.metrics[name], dtype, name)
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert g.dtype == dtype, f"grad {name} dtype {g.dtype}"
        assert_close(g, r, dtype, f"grad {name}")


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("normalize", ["token", "sequence"])
def test_normalizations_and_weights_match_float64_reference(normalize, weighted):
    hidden, weight, targets, bias, mask, weights = _batch()
    _check(hidden, weight, targets, bias, mask=mask, weights=weights if weighted else None, normalize=normalize)


def test_ignore_index_without_mask_and_temperature_match_reference(monkeypatch):
    monkeypatch.setenv("HOTLOOP_BLOCK_BYTES", str(4 * V * 3))  # many chunks
    hidden, weight, targets, _, mask, weights = _batch(bias=False)
    _check(hidden, weight, targets.masked_fill(~mask, -1), None, weights=weights, ignore_index=-1, temperature=0.6)


def test_mask_and_ignore_index_agree():
    hidden, weight, targets, bias, mask, _ = _batch()
    by_mask = fused_linear_sft_loss(hidden, weight, targets, bias, mask=mask)
    by_index = fused_linear_sft_loss(hidden, weight, targets.masked_fill(~mask, -100), bias)
    assert torch.equal(by_mask.loss, by_index.loss)


@pytest.mark.parametrize("normalize", ["token", "sequence"])
def test_packed_layout_equals_padded_layout(normalize):
    cu = torch.tensor([0, 9, 9, 13, 20])
    hidden = torch.randn(23, D, requires_grad=True)  # three trailing rows outside every sequence
    weight, bias = (0.5 * torch.randn(V, D)).requires_grad_(True), torch.randn(V, requires_grad=True)
    targets, mask, weights = torch.randint(0, V, (23,)), torch.rand(23) > 0.2, torch.rand(B)
    padded_hidden, padded_targets, padded_mask = reference_padded(hidden.detach(), targets, mask, cu, -100)
    padded_hidden.requires_grad_(True)
    packed = fused_linear_sft_loss(
        hidden, weight, targets, bias, mask=mask, cu_seqlens=cu, weights=weights, normalize=normalize
    )
    padded = fused_linear_sft_loss(
        padded_hidden, weight, padded_targets, bias, mask=padded_mask, weights=weights, normalize=normalize
    )
    g_packed = torch.autograd.grad(packed.loss, (hidden, weight, bias))
    g_padded = torch.autograd.grad(padded.loss, (padded_hidden, weight, bias))
    assert_close(packed.loss, padded.loss.double(), torch.float32, "loss")
    for name in padded.metrics:
        assert_close(packed.metrics[name], padded.metrics[name].double(), torch.float32, name)
    assert torch.equal(g_packed[0][20:], torch.zeros(3, D))
    unpacked = reference_padded(g_packed[0], targets, mask, cu, -100)[0]
    assert_close(unpacked, g_padded[0].double(), torch.float32, "grad hidden")
    for name, a, b in zip(("weight", "bias"), g_packed[1:], g_padded[1:]):
        assert_close(a, b.double(), torch.float32, f"grad {name}")


@pytest.mark.parametrize("normalize", ["token", "sequence"])
def test_bf16_matches_float64_reference(normalize):
    hidden, weight, targets, bias, mask, weights = _batch(torch.bfloat16)
    _check(
        hidden, weight, targets, bias, torch.bfloat16, metrics=False, mask=mask, weights=weights, normalize=normalize
    )


def test_no_grad_runs_the_forward_only_and_equals_grad_mode(monkeypatch):
    hidden, weight, targets, bias, mask, weights = _batch()
    with_grad = fused_linear_sft_loss(hidden, weight, targets, bias, mask=mask, weights=weights)

    def forbidden(*args, **kwargs):
        raise AssertionError("logprob_fwd_bwd called without grad")

    monkeypatch.setattr(sft_module, "logprob_fwd_bwd", forbidden)
    with torch.no_grad():
        out = fused_linear_sft_loss(hidden, weight, targets, bias, mask=mask, weights=weights)
    assert out.loss.grad_fn is None
    assert_close(out.loss, with_grad.loss.detach().double(), torch.float32, "loss")
    for name, value in out.metrics.items():
        assert_close(value, with_grad.metrics[name].double(), torch.float32, name)


def test_gradient_only_for_inputs_that_require_it():
    hidden, weight, targets, bias, mask, _ = _batch()
    frozen_weight = weight.detach()
    out = fused_linear_sft_loss(hidden, frozen_weight, targets, bias, mask=mask)
    out.loss.backward()
    assert hidden.grad is not None and bias.grad is not None and frozen_weight.grad is None
    leaves = [x.detach().double().requires_grad_(True) for x in (hidden, bias)]
    ref = reference_fused_linear_sft_loss(leaves[0], frozen_weight, targets, leaves[1], mask=mask)
    for name, g, r in zip(("hidden", "bias"), (hidden.grad, bias.grad), torch.autograd.grad(ref.loss, leaves)):
        assert_close(g, r, torch.float32, f"grad {name}")


def test_module_matches_function():
    hidden, weight, targets, bias, mask, weights = _batch()
    out = FusedLinearSFTLoss(normalize="sequence", temperature=0.8)(
        hidden, weight, targets, bias, mask=mask, weights=weights
    )
    ref = fused_linear_sft_loss(
        hidden, weight, targets, bias, mask=mask, weights=weights, normalize="sequence", temperature=0.8
    )
    assert torch.equal(out.loss, ref.loss)


@pytest.mark.parametrize(
    "change, error, name",
    [
        (lambda a: {**a, "weights": torch.rand(B + 1)}, ValueError, "weights"),
        (lambda a: {**a, "normalize": "batch"}, ValueError, "normalize"),
        (lambda a: {**a, "targets": a["targets"][:, :4]}, ValueError, "targets"),
        (lambda a: {**a, "weight": a["weight"].double()}, TypeError, "weight"),
        (lambda a: {**a, "hidden": a["hidden"][0]}, ValueError, "hidden"),
        (
            lambda a: {
                **a,
                "hidden": a["hidden"].reshape(-1, D),
                "targets": a["targets"].reshape(-1),
                "mask": None,
                "cu_seqlens": torch.tensor([0, 30, 20, 36]),
            },
            ValueError,
            "cu_seqlens",
        ),
        (
            lambda a: {
                **a,
                "hidden": a["hidden"].reshape(-1, D),
                "targets": a["targets"].reshape(-1),
                "mask": None,
                "cu_seqlens": torch.tensor([0.0, 36.0]),
            },
            ValueError,
            "cu_seqlens",
        ),
    ],
)
def test_invalid_arguments_raise_naming_the_argument(change, error, name):
    hidden, weight, targets, _, mask, _ = _batch()
    args = change({"hidden": hidden.detach(), "weight": weight.detach(), "targets": targets, "mask": mask})
    with pytest.raises(error, match=name):
        fused_linear_sft_loss(args.pop("hidden"), args.pop("weight"), args.pop("targets"), **args)


@pytest.mark.interpreter
def test_triton_backend_matches_reference(monkeypatch):
    monkeypatch.setenv("HOTLOOP_BACKEND", "triton")
    hidden, weight, targets, bias, mask, weights = _batch()
    _check(hidden, weight, targets, bias, mask=mask, weights=weights, normalize="sequence")
