"""fused_linear_dpo_loss vs a float64 materialized reference: every loss type and option, both strategies,
padded and packed layouts, precomputed reference vs reference head, bf16, no_grad, argument errors."""

import pytest
import torch

from hotloop.kernels import FusedLinearDPOLoss, fused_linear_dpo_loss, fused_linear_logprob
from hotloop.kernels import _fused_linear_common as common
from hotloop.kernels._fused_linear_common import make_layout, reference_padded, sequence_strategy
from hotloop.kernels.fused_linear_dpo import LOSS_TYPES, reference_fused_linear_dpo_loss
from tests.helpers import assert_close, assert_scalar_close, logit_scale

PAIRS, T, D, V = 3, 7, 16, 97
SMOOTHING = {"exo_pair": 1e-3, "robust": 0.1, "sigmoid": 0.2}  # the loss types with label smoothing
REFERENCE_FREE = ("orpo",)


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    monkeypatch.setenv("HOTLOOP_BACKEND", "torch")


def _batch(dtype=torch.float32, *, bias=True, empty=True):
    """2·PAIRS padded sequences with a masked prompt column and (``empty``) one empty rejected sequence.

    ORPO's log odds ``p̄ − log(1 − exp(p̄))`` of an empty sequence (``p̄ = 0``) are infinite in every implementation,
    so ORPO runs without the empty sequence.
    """
    hidden = torch.randn(2 * PAIRS, T, D).to(dtype).requires_grad_(True)
    weight = (0.5 * torch.randn(V, D)).to(dtype).requires_grad_(True)
    b = torch.randn(V).to(dtype).requires_grad_(True) if bias else None
    targets = torch.randint(0, V, (2 * PAIRS, T))
    mask = torch.rand(2 * PAIRS, T) > 0.25
    mask[:, 0], mask[PAIRS + 1] = False, not empty
    return hidden, weight, targets, b, mask


def _ref_logps():
    return -25.0 + 4.0 * torch.randn(2 * PAIRS)


def _check(hidden, weight, targets, bias, dtype=torch.float32, metrics=True, **kw):
    """Value, metrics and gradients (non-unit upstream) of the fused loss against the float64 reference."""
    out = fused_linear_dpo_loss(hidden, weight, targets, bias, **kw)
    scale = 0.5 + torch.rand(())
    inputs = [x for x in (hidden, weight, bias) if x is not None]
    grads = torch.autograd.grad(out.loss * scale, inputs)
    leaves = [x.detach().double().requires_grad_(True) for x in inputs]
    ref = reference_fused_linear_dpo_loss(leaves[0], leaves[1], targets, leaves[2] if bias is not None else None, **kw)
    ref_grads = torch.autograd.grad(ref.loss * scale.double(), leaves)
    assert_scalar_close(out.loss, ref.loss, dtype, "loss")
    if metrics:
        assert out.metrics.keys() == ref.metrics.keys()
        logit_mean = logit_scale(hidden, weight, bias, targets, **kw)[0]
        for name, value in out.metrics.items():
            scale = logit_mean if name.startswith("logits/") else 1.0
            assert_scalar_close(value, ref.metrics[name], dtype, name, scale)
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert g.dtype == dtype, f"grad {name} dtype {g.dtype}"
        assert_close(g, r, dtype, f"grad {name}")
    return out


def _options(loss_type):
    opts = {"loss_type": loss_type, "label_smoothing": SMOOTHING.get(loss_type, 0.0)}
    return opts if loss_type in REFERENCE_FREE else {**opts, "ref_logps": _ref_logps()}


@pytest.mark.parametrize("strategy", ["grouped", "two_pass"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_loss_type_matches_float64_reference(loss_type, strategy, monkeypatch):
    monkeypatch.setenv("HOTLOOP_BLOCK_BYTES", str(4 * V * 2 * T))  # one pair per chunk: several chunks
    hidden, weight, targets, bias, mask = _batch(empty=loss_type != "orpo")
    _check(hidden, weight, targets, bias, mask=mask, strategy=strategy, beta=0.3, **_options(loss_type))


@pytest.mark.parametrize(
    "options",
    [
        {"loss_type": "sigmoid", "nll_coef": 0.7},  # RPO
        {"loss_type": "ipo", "nll_coef": 0.3, "beta": 0.5},  # IPO + RPO term
        {"loss_type": "ipo", "length_normalize": False, "beta": 0.5},  # IPO on sequence sums (Azar et al.)
        {"loss_type": "sigmoid", "reference_free": True, "length_normalize": True, "gamma": 0.6, "beta": 2.0},  # SimPO
        {"loss_type": "sigmoid", "reference_free": True, "nll_coef": 1.0, "label_smoothing": 0.1},  # CPO
        {"loss_type": "hinge", "length_normalize": True},
        {"loss_type": "discopop", "discopop_tau": 0.3},
        {"loss_type": "orpo", "beta": 0.7, "temperature": 0.7},
    ],
)
@pytest.mark.parametrize("strategy", ["grouped", "two_pass"])
def test_options_match_float64_reference(options, strategy):
    hidden, weight, targets, _, mask = _batch(bias=False, empty=options["loss_type"] != "orpo")
    needs_ref = not options.get("reference_free") and options["loss_type"] != "orpo"
    refs = {"ref_logps": _ref_logps()} if needs_ref else {}
    _check(hidden, weight, targets, None, mask=mask, strategy=strategy, **options, **refs)


@pytest.mark.parametrize("strategy", ["auto", "grouped", "two_pass"])
def test_tiny_block_budget_many_chunks_match_reference(strategy, monkeypatch):
    monkeypatch.setenv("HOTLOOP_BLOCK_BYTES", str(4 * V * 3))  # 3 rows per chunk: a pair never fits
    hidden, weight, targets, bias, mask = _batch()
    _check(
        hidden,
        weight,
        targets,
        bias,
        mask=mask,
        strategy=strategy,
        ref_logps=_ref_logps(),
        nll_coef=0.5,
        temperature=1.3,
    )


def test_auto_strategy_is_grouped_when_a_pair_fits_the_block_budget_else_two_pass(monkeypatch):
    hidden, weight, targets, bias, mask = _batch()
    layout = make_layout(hidden, weight, targets, bias, mask=mask, cu_seqlens=None, temperature=1.0, ignore_index=-100)
    pairs = torch.arange(PAIRS)
    units = torch.stack((pairs, pairs + PAIRS), dim=1)
    largest = int(mask[units].sum((1, 2)).max())
    monkeypatch.setenv("HOTLOOP_BLOCK_BYTES", str(4 * V * largest))
    assert sequence_strategy(layout, weight, units, "auto") == "grouped"
    monkeypatch.setenv("HOTLOOP_BLOCK_BYTES", str(4 * V * (largest - 1)))
    assert sequence_strategy(layout, weight, units, "auto") == "two_pass"
    assert sequence_strategy(layout, weight, units, "grouped") == "grouped"


def _packed_batch():
    """Packed sequences of random lengths (some empty) plus two trailing rows that belong to no sequence."""
    lengths = torch.randint(0, T + 1, (2 * PAIRS,))
    lengths[0] = T
    cu = torch.cat((torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)))
    n = int(cu[-1]) + 2
    hidden = torch.randn(n, D, requires_grad=True)
    targets = torch.randint(0, V, (n,))
    mask = torch.rand(n) > 0.2
    targets[torch.rand(n) < 0.1] = -100
    return hidden, targets, mask, cu


def _unpack_grad(grad, targets, mask, cu):
    return reference_padded(grad, targets, mask, cu, -100)[0]


@pytest.mark.parametrize("strategy", ["grouped", "two_pass"])
def test_packed_layout_equals_padded_layout(strategy):
    hidden, targets, mask, cu = _packed_batch()
    weight, bias = torch.randn(V, D, requires_grad=True), torch.randn(V, requires_grad=True)
    padded_hidden, padded_targets, padded_mask = reference_padded(hidden.detach(), targets, mask, cu, -100)
    padded_hidden.requires_grad_(True)
    ref_logps, opts = _ref_logps(), {"strategy": strategy, "nll_coef": 0.4, "loss_type": "ipo"}
    packed = fused_linear_dpo_loss(
        hidden, weight, targets, bias, mask=mask, cu_seqlens=cu.int(), ref_logps=ref_logps, **opts
    )
    padded = fused_linear_dpo_loss(
        padded_hidden, weight, padded_targets, bias, mask=padded_mask, ref_logps=ref_logps, **opts
    )
    g_packed = torch.autograd.grad(packed.loss, (hidden, weight, bias))
    g_padded = torch.autograd.grad(padded.loss, (padded_hidden, weight, bias))
    assert_close(packed.loss, padded.loss.double(), torch.float32, "loss")
    for name in padded.metrics:
        assert_close(packed.metrics[name], padded.metrics[name].double(), torch.float32, name)
    assert torch.equal(g_packed[0][int(cu[-1]) :], torch.zeros(2, D))  # rows outside every sequence
    assert_close(_unpack_grad(g_packed[0], targets, mask, cu), g_padded[0].double(), torch.float32, "grad hidden")
    for name, a, b in zip(("weight", "bias"), g_packed[1:], g_padded[1:]):
        assert_close(a, b.double(), torch.float32, f"grad {name}")


def test_reference_head_equals_precomputed_reference_and_gets_no_gradient():
    hidden, weight, targets, bias, mask = _batch()
    ref_hidden = torch.randn(2 * PAIRS, T, 12, requires_grad=True)
    ref_weight, ref_bias = torch.randn(V, 12, requires_grad=True), torch.randn(V)
    with torch.no_grad():
        ref_tok = fused_linear_logprob(ref_hidden, ref_weight, targets.masked_fill(~mask, -100), ref_bias)
    head = fused_linear_dpo_loss(
        hidden, weight, targets, bias, mask=mask, ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias
    )
    cached = fused_linear_dpo_loss(hidden, weight, targets, bias, mask=mask, ref_logps=ref_tok.sum(-1))
    g_head = torch.autograd.grad(head.loss, (hidden, weight, bias))
    g_cached = torch.autograd.grad(cached.loss, (hidden, weight, bias))
    assert_close(head.loss, cached.loss.double(), torch.float32, "loss")
    for name, a, b in zip(("hidden", "weight", "bias"), g_head, g_cached):
        assert_close(a, b.double(), torch.float32, f"grad {name}")
    assert ref_hidden.grad is None and ref_weight.grad is None
    _check(hidden, weight, targets, bias, mask=mask, ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias)


@pytest.mark.parametrize("strategy", ["grouped", "two_pass"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust", "bco_pair", "apo_zero", "discopop"])
def test_bf16_matches_float64_reference(loss_type, strategy):
    hidden, weight, targets, bias, mask = _batch(torch.bfloat16)
    _check(
        hidden,
        weight,
        targets,
        bias,
        torch.bfloat16,
        metrics=False,
        strategy=strategy,
        mask=mask,
        **_options(loss_type),
    )


def test_no_grad_runs_the_forward_only_and_equals_grad_mode(monkeypatch):
    hidden, weight, targets, bias, mask = _batch()
    ref_logps = _ref_logps()
    with_grad = fused_linear_dpo_loss(hidden, weight, targets, bias, mask=mask, ref_logps=ref_logps, nll_coef=0.5)

    def forbidden(*args, **kwargs):
        raise AssertionError("logprob_fwd_bwd called without grad")

    monkeypatch.setattr(common, "logprob_fwd_bwd", forbidden)
    with torch.no_grad():
        out = fused_linear_dpo_loss(hidden, weight, targets, bias, mask=mask, ref_logps=ref_logps, nll_coef=0.5)
    frozen = fused_linear_dpo_loss(
        *(x.detach() for x in (hidden, weight, targets, bias)), mask=mask, ref_logps=ref_logps, nll_coef=0.5
    )
    for o in (out, frozen):
        assert o.loss.grad_fn is None
        assert_close(o.loss, with_grad.loss.detach().double(), torch.float32, "loss")
        for name, value in o.metrics.items():
            assert_close(value, with_grad.metrics[name].double(), torch.float32, name)


def test_fully_masked_batch_gives_finite_loss_and_zero_gradients():
    hidden, weight, targets, bias, mask = _batch()
    out = fused_linear_dpo_loss(hidden, weight, targets, bias, mask=torch.zeros_like(mask), ref_logps=_ref_logps())
    grads = torch.autograd.grad(out.loss, (hidden, weight, bias))
    assert torch.isfinite(out.loss)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_module_matches_function():
    hidden, weight, targets, bias, mask = _batch()
    ref_logps = _ref_logps()
    options = {"beta": 0.2, "loss_type": "robust", "label_smoothing": 0.1, "strategy": "two_pass"}
    out = FusedLinearDPOLoss(**options)(hidden, weight, targets, bias, mask=mask, ref_logps=ref_logps)
    ref = fused_linear_dpo_loss(hidden, weight, targets, bias, mask=mask, ref_logps=ref_logps, **options)
    assert torch.equal(out.loss, ref.loss)


@pytest.mark.parametrize(
    "change, error, name",
    [
        (
            lambda a: {**a, "hidden": a["hidden"][:5], "targets": a["targets"][:5], "mask": a["mask"][:5]},
            ValueError,
            "2B sequences",
        ),
        (lambda a: {**a, "reference_free": True}, ValueError, "ref_logps"),
        (lambda a: {**a, "ref_logps": None}, ValueError, "ref_logps"),
        (lambda a: {**a, "ref_hidden": a["hidden"], "ref_weight": a["weight"]}, ValueError, "ref_hidden"),
        (lambda a: {**a, "ref_logps": None, "ref_hidden": a["hidden"]}, ValueError, "ref_weight"),
        (lambda a: {**a, "ref_logps": torch.randn(2 * PAIRS + 1)}, ValueError, "ref_logps"),
        (
            lambda a: {**a, "ref_logps": None, "ref_hidden": a["hidden"], "ref_weight": torch.randn(V, D + 1)},
            ValueError,
            "ref_weight",
        ),
        (
            lambda a: {**a, "ref_logps": None, "ref_hidden": a["hidden"][:, 1:], "ref_weight": a["weight"]},
            ValueError,
            "ref_hidden",
        ),
        (
            lambda a: {
                **a,
                "ref_logps": None,
                "ref_hidden": a["hidden"],
                "ref_weight": a["weight"],
                "ref_bias": torch.randn(V - 1),
            },
            ValueError,
            "ref_bias",
        ),
        (lambda a: {**a, "ref_logps": None, "loss_type": "orpo", "nll_coef": 1.0}, ValueError, "nll_coef"),
        (lambda a: {**a, "loss_type": "kto"}, ValueError, "loss_type"),
        (lambda a: {**a, "strategy": "chunked"}, ValueError, "strategy"),
        (lambda a: {**a, "loss_type": "exo_pair"}, ValueError, "label_smoothing"),
        (lambda a: {**a, "beta": 0.0}, ValueError, "beta"),
        (lambda a: {**a, "mask": a["mask"][:, :3]}, ValueError, "mask"),
        (lambda a: {**a, "hidden": a["hidden"].reshape(-1, D)}, ValueError, "hidden"),
        (lambda a: {**a, "cu_seqlens": torch.tensor([1, 4, 7])}, ValueError, "hidden"),
        (
            lambda a: {
                **a,
                "hidden": a["hidden"].reshape(-1, D),
                "targets": a["targets"].reshape(-1),
                "mask": None,
                "cu_seqlens": torch.tensor([1, 4, 7]),
            },
            ValueError,
            "cu_seqlens",
        ),
        (lambda a: {**a, "targets": a["targets"].masked_fill(a["mask"], V)}, ValueError, "targets"),
    ],
)
def test_invalid_arguments_raise_naming_the_argument(change, error, name):
    hidden, weight, targets, bias, mask = (x.detach() if x.dtype.is_floating_point else x for x in _batch())
    args = change({"hidden": hidden, "weight": weight, "targets": targets, "mask": mask, "ref_logps": _ref_logps()})
    with pytest.raises(error, match=name):
        fused_linear_dpo_loss(args.pop("hidden"), args.pop("weight"), args.pop("targets"), **args)


@pytest.mark.interpreter
@pytest.mark.parametrize("strategy", ["grouped", "two_pass"])
def test_triton_backend_matches_reference(strategy, monkeypatch):
    monkeypatch.setenv("HOTLOOP_BACKEND", "triton")
    hidden, weight, targets, bias, mask = _batch()
    _check(hidden, weight, targets, bias, mask=mask, ref_logps=_ref_logps(), nll_coef=0.5, strategy=strategy)
