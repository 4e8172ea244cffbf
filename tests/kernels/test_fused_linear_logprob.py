"""fused_linear_logprob (PyTorch path) vs a float64 materialized reference: values, grads, edge cases."""

import importlib

import pytest
import torch

from bench._harness import _cpu_peak_extra_bytes
from hotloop.kernels import fused_linear_logprob as flp_module_fn  # noqa: F401  (public export works)
from hotloop.kernels.fused_linear_logprob import (
    FusedLinearLogprob,
    FusedLinearLogprobFunction,
    fused_linear_logprob,
    logprob_bwd,
    logprob_fwd,
    logprob_fwd_bwd,
    reference_fused_linear_logprob,
)
from tests.helpers import assert_close


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch, nan_empty):
    """PyTorch path, with every ``torch.empty`` buffer poisoned (NaN) so that unwritten outputs fail."""
    monkeypatch.setenv("HOTLOOP_BACKEND", "torch")


@pytest.fixture(params=["native", "eager"])
def row_path(request, monkeypatch):
    """Run with the csrc/ row kernels (when built) and with the eager torch row math."""
    monkeypatch.setenv("HOTLOOP_NATIVE", "1" if request.param == "native" else "0")
    return request.param


def _inputs(n, d, v, dtype, *, bias=True, scale=1.0, ignored=0.25):
    hidden = (torch.randn(n, d) * scale).to(dtype).requires_grad_(True)
    weight = torch.randn(v, d).to(dtype).requires_grad_(True)
    b = torch.randn(v).to(dtype).requires_grad_(True) if bias else None
    targets = torch.randint(0, v, (n,))
    targets[torch.rand(n) < ignored] = -100
    return hidden, weight, targets, b


def _check_against_reference(hidden, weight, targets, bias, dtype, **opts):
    logp, entropy = fused_linear_logprob(hidden, weight, targets, bias, return_entropy=True, **opts)
    g_lp, g_ent = torch.randn(logp.shape), torch.randn(logp.shape)
    inputs = [x for x in (hidden, weight, bias) if x is not None]
    grads = torch.autograd.grad((logp * g_lp + entropy * g_ent).sum(), inputs)
    leaves = [x.detach().double().requires_grad_(True) for x in (hidden, weight, bias) if x is not None]
    ref_lp, ref_ent = reference_fused_linear_logprob(
        *leaves[:2], targets, leaves[2] if bias is not None else None, return_entropy=True, **opts
    )
    ref_grads = torch.autograd.grad((ref_lp * g_lp.double() + ref_ent * g_ent.double()).sum(), leaves)
    assert logp.dtype == entropy.dtype == torch.float32
    assert_close(logp, ref_lp, dtype, "logp")
    assert_close(entropy, ref_ent, dtype, "entropy")
    for name, g, ref in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert g.dtype == dtype, f"grad {name} dtype {g.dtype}"
        assert_close(g, ref, dtype, f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_values_and_grads_match_float64_reference(dtype, row_path):
    _check_against_reference(*_inputs(45, 37, 1003, dtype), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_block_budget_spans_many_chunks_and_blocks(dtype, row_path, monkeypatch):
    monkeypatch.setenv("HOTLOOP_BLOCK_BYTES", "12000")  # fwd/bwd: 3 row tiles x 6 vocab blocks; fwd_bwd: 2-row chunks
    _check_against_reference(*_inputs(47, 37, 1003, dtype), dtype, temperature=0.7)


def test_temperature_without_bias_and_single_row(row_path):
    _check_against_reference(
        *_inputs(1, 37, 1003, torch.float32, bias=False, ignored=0.0), torch.float32, temperature=0.7
    )


def _value_and_grads(fn, leaves, targets, g_lp, g_ent):
    logp, entropy = fn(*leaves[:2], targets, leaves[2], return_entropy=True)
    grads = torch.autograd.grad((logp * g_lp + entropy * g_ent).sum(), leaves)
    return (logp, entropy, *grads)


def _relative_error(out, ref):
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _eager_fp32(hidden, weight, targets, bias, *, return_entropy):
    log_probs = torch.log_softmax(hidden @ weight.T + bias, dim=-1)
    logp = log_probs.gather(-1, targets.clamp_min(0)[:, None]).squeeze(-1).masked_fill(targets < 0, 0.0)
    entropy = -(log_probs.exp() * log_probs).sum(-1).masked_fill(targets < 0, 0.0)
    return logp, entropy


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_logits_of_magnitude_1e4_are_finite_and_as_accurate_as_eager_fp32(offset, row_path):
    """Peaked rows (|h @ W.T| ~ 1e4) and flat rows shifted by 1e4: no overflow, no cancellation.

    fp32 logits of size 1e4 carry absolute rounding ~1e-3, so the criterion is the error of eager
    fp32 PyTorch on the materialized logits (CCE style): ours at most 1.5x it (+1e-6). The saved lse is
    float64 and the backward forms log p = (z − lse_hi) − lse_lo; with an fp32 lse alone (rounded by up
    to 5e-4 at 1e4) our error was up to ~5x eager's. Over 30 seeds the worst ratio is now 1.0.
    """
    hidden, weight, targets, bias = _inputs(33, 16, 517, torch.float32, scale=1.0 if offset else 2500.0)
    bias = (bias.detach() + offset).requires_grad_(True)
    assert (hidden @ weight.T + bias).abs().max() > 1e4 / 2
    g_lp, g_ent = torch.randn(33), torch.randn(33)
    ours = _value_and_grads(fused_linear_logprob, [hidden, weight, bias], targets, g_lp, g_ent)
    eager = _value_and_grads(_eager_fp32, [hidden, weight, bias], targets, g_lp, g_ent)
    leaves = [x.detach().double().requires_grad_(True) for x in (hidden, weight, bias)]
    ref = _value_and_grads(reference_fused_linear_logprob, leaves, targets, g_lp.double(), g_ent.double())
    for name, o, e, r in zip(("logp", "entropy", "grad hidden", "grad weight", "grad bias"), ours, eager, ref):
        assert torch.isfinite(o).all(), name
        assert _relative_error(o, r) <= 1.5 * _relative_error(e, r) + 1e-6, name


def test_leading_dims_keep_shape_and_match_reference(row_path):
    hidden, weight, targets, bias = _inputs(3 * 11, 24, 300, torch.float32)
    hidden = hidden.detach().reshape(3, 11, 24).requires_grad_(True)
    _check_against_reference(hidden, weight, targets.reshape(3, 11), bias, torch.float32)


def test_ignored_rows_give_zero_and_no_gradient(row_path):
    hidden, weight, targets, bias = _inputs(20, 24, 300, torch.float32)
    targets[:] = -100
    logp, entropy = fused_linear_logprob(hidden, weight, targets, bias, return_entropy=True)
    assert torch.equal(logp, torch.zeros(20)) and torch.equal(entropy, torch.zeros(20))
    (logp * torch.randn(20) + entropy * torch.randn(20)).sum().backward()
    for t in (hidden, weight, bias):
        assert torch.equal(t.grad, torch.zeros_like(t))


def test_no_grad_runs_only_the_forward_and_equals_grad_mode(monkeypatch):
    hidden, weight, targets, bias = _inputs(30, 24, 300, torch.float32)
    lp1, ent1 = fused_linear_logprob(hidden, weight, targets, bias, return_entropy=True)
    assert lp1.grad_fn is not None

    def refuse(*args, **kwargs):
        raise AssertionError("the no-grad path must not build an autograd node or run a backward")

    module = importlib.import_module("hotloop.kernels.fused_linear_logprob")
    monkeypatch.setattr(FusedLinearLogprobFunction, "apply", refuse)
    monkeypatch.setattr(module, "logprob_bwd", refuse)
    with torch.no_grad():
        lp0, ent0 = fused_linear_logprob(hidden, weight, targets, bias, return_entropy=True)
    assert lp0.grad_fn is None
    assert torch.equal(lp0, lp1.detach()) and torch.equal(ent0, ent1.detach())


def test_grad_mode_saves_per_token_statistics_not_logits():
    hidden, weight, targets, bias = _inputs(30, 24, 300, torch.float32, ignored=0.0)
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        fused_linear_logprob(hidden, weight, targets, bias, return_entropy=True)
    assert packed and all(t.numel() <= max(hidden.numel(), weight.numel()) for t in packed)  # no [N, V] saved


def test_ignored_rows_cost_no_matmul_work_and_padded_equals_packed(row_path, monkeypatch):
    """A padded batch sends only its active rows to the kernel; values and grads equal the packed batch's."""
    module = importlib.import_module("hotloop.kernels.fused_linear_logprob")
    seen_rows = []
    real_fwd = module.logprob_fwd
    monkeypatch.setattr(module, "logprob_fwd", lambda h, *a, **k: seen_rows.append(h.shape[0]) or real_fwd(h, *a, **k))
    hidden, weight, targets, bias = _inputs(40, 24, 300, torch.float32, ignored=0.4)
    active = targets != -100
    g = torch.randn(40)
    padded = fused_linear_logprob(hidden, weight, targets, bias)
    padded_grads = torch.autograd.grad((padded * g).sum(), (hidden, weight, bias))
    packed_hidden = hidden.detach()[active].requires_grad_(True)
    packed = fused_linear_logprob(packed_hidden, weight, targets[active], bias)
    packed_grads = torch.autograd.grad((packed * g[active]).sum(), (packed_hidden, weight, bias))
    assert seen_rows == [int(active.sum())] * 2
    assert torch.equal(padded[~active], torch.zeros(int((~active).sum())))
    assert torch.equal(padded_grads[0][~active], torch.zeros_like(padded_grads[0][~active]))
    assert_close(padded[active], packed.double(), torch.float32, "logp")
    assert_close(padded_grads[0][active], packed_grads[0].double(), torch.float32, "grad hidden")
    for name, a, b in zip(("weight", "bias"), padded_grads[1:], packed_grads[1:]):
        assert_close(a, b.double(), torch.float32, f"grad {name}")


def test_ignore_index_inside_the_vocabulary_is_honoured(row_path):
    hidden, weight, targets, bias = _inputs(25, 24, 300, torch.float32, ignored=0.0)
    targets[::3] = 7
    _check_against_reference(hidden, weight, targets, bias, torch.float32, ignore_index=7)


def test_peak_extra_memory_is_a_few_tiles_not_the_logits(row_path, monkeypatch):
    """fwd+bwd at N=1024, V=32000 with 4 MiB tiles: beyond the gradients, a few tiles (< 1/5 of the [N, V] logits)."""
    tile_bytes = 4 << 20
    monkeypatch.setenv("HOTLOOP_BLOCK_BYTES", str(tile_bytes))
    n, d, v = 1024, 32, 32000
    hidden, weight, targets, _ = _inputs(n, d, v, torch.float32, bias=False, ignored=0.0)
    g = torch.randn(n)

    def fwd_bwd():
        torch.autograd.grad((fused_linear_logprob(hidden, weight, targets) * g).sum(), (hidden, weight))

    extra = _cpu_peak_extra_bytes(fwd_bwd) - (hidden.numel() + weight.numel()) * 4
    assert extra <= 6 * tile_bytes < n * v * 4 / 5, f"{extra / 2**20:.1f} MiB"


def test_two_runs_are_bit_identical(row_path, monkeypatch):
    monkeypatch.setenv("HOTLOOP_BLOCK_BYTES", "20000")
    hidden, weight, targets, bias = _inputs(40, 24, 301, torch.float32)
    g = torch.randn(40)
    runs = []
    for _ in range(2):
        logp = fused_linear_logprob(hidden, weight, targets, bias)
        runs.append((logp, *torch.autograd.grad((logp * g).sum(), (hidden, weight, bias))))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("row_groups", [None, "groups"])
def test_fwd_bwd_with_token_grad_equals_fwd_then_bwd(row_groups, dtype, row_path, monkeypatch):
    monkeypatch.setenv("HOTLOOP_BLOCK_BYTES", "30000")  # several chunks
    hidden, weight, targets, bias = (x.detach() for x in _inputs(50, 24, 301, dtype))
    coef_lp, coef_ent = torch.randn(50), torch.randn(50)
    groups = list(torch.randperm(50).split([7, 13, 1, 20, 9])) if row_groups else None
    calls = []

    def token_grad(rows, logp, entropy):  # depends on the group's log-probs, as the GRPO-family losses do
        calls.append(rows.clone())
        return coef_lp[rows] * logp.detach().tanh(), coef_ent[rows]

    opts = dict(temperature=0.7, ignore_index=-100)
    stats, *grads = logprob_fwd_bwd(
        hidden, weight, targets, bias, with_entropy=True, token_grad=token_grad, row_groups=groups, **opts
    )
    ref = logprob_fwd(hidden, weight, targets, bias, with_entropy=True, **opts)
    ref_grads = logprob_bwd(
        hidden, weight, targets, bias, ref, coef_lp * ref.logp.tanh(), coef_ent, needs_grad=(True, True, True), **opts
    )
    assert_close(stats.logp, ref.logp.double(), torch.float32, "logp")
    assert_close(stats.entropy, ref.entropy.double(), torch.float32, "entropy")
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert g.dtype == dtype
        assert_close(g, r.double(), dtype, f"grad {name}")
    assert torch.equal(torch.cat(calls).sort().values, torch.arange(50))
    if groups:  # every group handed to token_grad whole
        for group in groups:
            assert any(set(group.tolist()) <= set(c.tolist()) for c in calls)


def test_empty_input_returns_empty_and_backward_runs():
    hidden, weight, _, bias = _inputs(1, 24, 300, torch.float32)
    hidden = torch.randn(0, 24, requires_grad=True)
    logp, entropy = fused_linear_logprob(hidden, weight, torch.empty(0, dtype=torch.int64), bias, return_entropy=True)
    assert logp.shape == entropy.shape == (0,)
    (logp.sum() + entropy.sum()).backward()
    assert hidden.grad.shape == (0, 24) and torch.equal(weight.grad, torch.zeros_like(weight))


def test_module_matches_function():
    hidden, weight, targets, bias = _inputs(12, 24, 300, torch.float32)
    module = FusedLinearLogprob(temperature=0.7, return_entropy=True)
    out = module(hidden, weight, targets, bias)
    ref = fused_linear_logprob(hidden, weight, targets, bias, temperature=0.7, return_entropy=True)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))


@pytest.mark.parametrize(
    "change, error, name",
    [
        (lambda a: {**a, "hidden": [[0.0] * 8] * 6}, TypeError, "hidden"),
        (lambda a: {**a, "weight": None}, TypeError, "weight"),
        (lambda a: {**a, "targets": [0] * 6}, TypeError, "targets"),
        (lambda a: {**a, "bias": [0.0] * 50}, TypeError, "bias"),
        (lambda a: {**a, "hidden": torch.randint(0, 5, (6, 8))}, TypeError, "hidden"),
        (lambda a: {**a, "weight": a["weight"].double()}, TypeError, "weight"),
        (lambda a: {**a, "weight": torch.randn(50, 9)}, ValueError, "weight"),
        (lambda a: {**a, "targets": a["targets"].int()}, TypeError, "targets"),
        (lambda a: {**a, "targets": a["targets"][:5]}, ValueError, "targets"),
        (lambda a: {**a, "targets": torch.full((6,), 50)}, ValueError, "targets"),
        (lambda a: {**a, "targets": torch.full((6,), -1)}, ValueError, "targets"),
        (lambda a: {**a, "bias": torch.randn(49)}, ValueError, "bias"),
        (lambda a: {**a, "bias": torch.randn(50).double()}, TypeError, "bias"),
        (lambda a: {**a, "temperature": 0.0}, ValueError, "temperature"),
        (lambda a: {**a, "temperature": -1.0}, ValueError, "temperature"),
    ],
)
def test_invalid_arguments_raise_naming_the_argument(change, error, name):
    args = {
        "hidden": torch.randn(6, 8),
        "weight": torch.randn(50, 8),
        "targets": torch.randint(0, 50, (6,)),
        "bias": torch.randn(50),
        "temperature": 1.0,
    }
    args = change(args)
    with pytest.raises(error, match=name):
        fused_linear_logprob(
            args["hidden"], args["weight"], args["targets"], args["bias"], temperature=args["temperature"]
        )


@pytest.mark.interpreter
def test_triton_backend_dispatch_matches_reference_and_fwd_bwd(monkeypatch):
    """HOTLOOP_BACKEND=triton routes logprob_fwd/bwd (and so fwd_bwd) to the Triton launchers."""
    monkeypatch.setenv("HOTLOOP_BACKEND", "triton")
    hidden, weight, targets, bias = _inputs(19, 24, 150, torch.float32)
    _check_against_reference(hidden, weight, targets, bias, torch.float32, temperature=0.7)
    coef = torch.randn(19)
    groups = list(torch.randperm(19).split([5, 14]))
    stats, gh, gw, gb = logprob_fwd_bwd(
        hidden.detach(),
        weight.detach(),
        targets,
        bias.detach(),
        temperature=0.7,
        ignore_index=-100,
        with_entropy=True,
        row_groups=groups,
        token_grad=lambda rows, logp, entropy: (coef[rows], None),
    )
    leaves = [x.detach().double().requires_grad_(True) for x in (hidden, weight, bias)]
    ref_lp = reference_fused_linear_logprob(leaves[0], leaves[1], targets, leaves[2], temperature=0.7)
    ref_grads = torch.autograd.grad((ref_lp * coef.double()).sum(), leaves)
    assert_close(stats.logp, ref_lp, torch.float32, "logp")
    for name, g, r in zip(("hidden", "weight", "bias"), (gh, gw, gb), ref_grads):
        assert_close(g, r, torch.float32, f"grad {name}")


def test_triton_backend_on_cpu_tensors_without_the_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("HOTLOOP_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    hidden, weight, targets, _ = _inputs(4, 8, 50, torch.float32, bias=False)
    with pytest.raises(RuntimeError, match="HOTLOOP_BACKEND=triton needs CUDA tensors or TRITON_INTERPRET=1"):
        fused_linear_logprob(hidden, weight, targets)
