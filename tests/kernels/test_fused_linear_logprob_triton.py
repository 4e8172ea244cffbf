"""Triton fused linear log-prob kernels, run under TRITON_INTERPRET=1 on CPU tensors.

Compared with a float64 materialized computation (log_softmax, gather, entropy, autograd). bf16:
the interpreter cannot run a bf16 ``tl.dot`` (it matmuls the raw uint16 bits), so the kernels cast
bf16 operands to fp32 there (exact); these tests therefore check the kernel logic and the bf16
rounding of outputs and of the backward's logit-gradient buffer, not the GPU's bf16 tensor-core path.
"""

import importlib

import pytest
import torch

from hotloop.kernels import _triton_utils
from hotloop.kernels._fused_linear_logprob_triton import triton_logprob_bwd, triton_logprob_fwd
from tests.helpers import assert_close, relative_error

pytestmark = pytest.mark.interpreter

IGNORE = -100
ALL_GRADS = (True, True, True)


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch, nan_empty):
    """Triton kernels (interpreted), with every ``torch.empty`` buffer poisoned (NaN) so unwritten outputs fail."""
    monkeypatch.setenv("HOTLOOP_BACKEND", "triton")


def _inputs(n, d, v, dtype, *, bias=True, ignored=(), scale=1.0):
    hidden = (torch.randn(n, d) * scale).to(dtype)
    weight = torch.randn(v, d).to(dtype)
    b = torch.randn(v).to(dtype) if bias else None
    targets = torch.randint(0, v, (n,))
    targets[list(ignored)] = IGNORE
    return hidden, weight, targets, b


def _materialized(hidden, weight, bias, targets, temperature):
    """logp, entropy, lse from the full [N, V] logits, in the dtype of the inputs."""
    logits = (hidden @ weight.T + (bias if bias is not None else 0.0)) / temperature
    log_probs = torch.log_softmax(logits, dim=-1)
    keep = targets != IGNORE
    logp = torch.where(keep, log_probs.gather(1, targets.clamp_min(0)[:, None])[:, 0], 0.0)
    entropy = torch.where(keep, -(log_probs.exp() * log_probs).sum(-1), 0.0)
    return {"logp": logp, "entropy": entropy, "lse": torch.logsumexp(logits, dim=-1)}


def _reference(hidden, weight, targets, bias, temperature, grad_logp=None, grad_entropy=None):
    """float64 logp, entropy, lse and (if upstream grads are given) grads of Σ g_lp·logp + g_ent·entropy."""
    h = hidden.double().requires_grad_()
    w = weight.double().requires_grad_()
    b = bias.double().requires_grad_() if bias is not None else None
    out = _materialized(h, w, b, targets, temperature)
    if grad_logp is not None:
        objective = (grad_logp.double() * out["logp"]).sum()
        if grad_entropy is not None:
            objective = objective + (grad_entropy.double() * out["entropy"]).sum()
        objective.backward()
        out.update(grad_hidden=h.grad, grad_weight=w.grad, grad_bias=b.grad if b is not None else None)
    return out


def _run(hidden, weight, targets, bias, *, temperature=0.7, entropy_grad=True, vocab_chunk=None):
    n = hidden.shape[0]
    grad_logp = torch.randn(n)
    grad_entropy = torch.randn(n) if entropy_grad else None
    stats = triton_logprob_fwd(
        hidden, weight, targets, bias, temperature=temperature, ignore_index=IGNORE, with_entropy=True
    )
    grads = triton_logprob_bwd(
        hidden,
        weight,
        targets,
        bias,
        stats,
        grad_logp,
        grad_entropy,
        temperature=temperature,
        ignore_index=IGNORE,
        needs_grad=ALL_GRADS,
        vocab_chunk=vocab_chunk,
    )
    ref = _reference(hidden, weight, targets, bias, temperature, grad_logp, grad_entropy)
    ref["upstream"] = (grad_logp, grad_entropy)
    return stats, grads, ref


def _check(stats, grads, ref, dtype):
    for name, stat_dtype in (("logp", torch.float32), ("entropy", torch.float32), ("lse", torch.float64)):
        out = getattr(stats, name)
        assert out.dtype == stat_dtype, name
        assert_close(out, ref[name], dtype, name)
    for name, grad in zip(("grad_hidden", "grad_weight", "grad_bias"), grads):
        if ref[name] is None:
            assert grad is None
            continue
        assert grad.dtype == dtype, f"{name} dtype {grad.dtype}"
        assert_close(grad, ref[name], dtype, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_forward_and_backward_match_float64_over_several_vocab_chunks(dtype, bias):
    # V = 257 is not a multiple of any tile, D = 37 not of BLOCK_D; chunk 64 gives 5 chunks, the last ragged.
    inputs = _inputs(37, 37, 257, dtype, bias=bias, ignored=(3, 20))
    stats, grads, ref = _run(*inputs, vocab_chunk=64)
    _check(stats, grads, ref, dtype)


def test_bf16_errors_no_worse_than_eager_bf16():
    hidden, weight, targets, bias = _inputs(48, 40, 300, torch.bfloat16, ignored=(7,))
    stats, grads, ref = _run(hidden, weight, targets, bias, vocab_chunk=96)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    eager = _materialized(*leaves, targets, 0.7)  # every op in bf16: the CCE / FlashAttention yardstick
    grad_logp, grad_entropy = ref["upstream"]
    ((grad_logp * eager["logp"]).sum() + (grad_entropy * eager["entropy"]).sum()).backward()
    for name, ours, theirs in [
        ("logp", stats.logp, eager["logp"]),
        ("entropy", stats.entropy, eager["entropy"]),
        *zip(("grad_hidden", "grad_weight", "grad_bias"), grads, (t.grad for t in leaves)),
    ]:
        assert relative_error(ours, ref[name]) <= 2 * relative_error(theirs, ref[name]), name


def test_backward_without_entropy_gradient_matches_float64():
    inputs = _inputs(29, 24, 131, torch.float32, ignored=(0,))
    stats, grads, ref = _run(*inputs, entropy_grad=False)
    _check(stats, grads, ref, torch.float32)


def test_single_row_matches_float64():
    stats, grads, ref = _run(*_inputs(1, 37, 257, torch.float32))
    _check(stats, grads, ref, torch.float32)


def test_all_rows_ignored_give_zero_outputs_and_gradients():
    hidden, weight, targets, bias = _inputs(19, 16, 70, torch.float32, ignored=range(19))
    stats, grads, ref = _run(hidden, weight, targets, bias, vocab_chunk=32)
    assert torch.equal(stats.logp, torch.zeros(19)) and torch.equal(stats.entropy, torch.zeros(19))
    assert_close(stats.lse, ref["lse"], torch.float32, "lse")  # lse stays defined for ignored rows
    for grad in grads:
        assert torch.count_nonzero(grad) == 0


def test_logits_offset_by_1e4_lose_only_the_fp32_rounding_of_the_logits():
    # z ≈ 1.4e4 + O(10): fp32 holds z to ulp ≈ 1e-3, so logp and entropy can be no better than a few
    # ulps absolute, and p_j (hence the gradients) a few ulps relative. No NaN / inf from exp().
    hidden, weight, targets, bias = _inputs(33, 37, 257, torch.float32, ignored=(5,))
    stats, grads, ref = _run(hidden, weight, targets, bias + 1e4)
    fp32_limit = 8 * torch.finfo(torch.float32).eps * ref["lse"].abs().max().item()
    assert_close(stats.lse, ref["lse"], torch.float32, "lse")
    for name in ("logp", "entropy"):
        assert (getattr(stats, name).double() - ref[name]).abs().max() < fp32_limit, name
    for name, grad in zip(("grad_hidden", "grad_weight", "grad_bias"), grads):
        assert relative_error(grad, ref[name]) < fp32_limit, name


def test_logits_of_magnitude_1e4_stay_finite_and_accurate():
    hidden, weight, targets, bias = _inputs(33, 37, 257, torch.float32, bias=False, scale=300.0)
    stats, grads, ref = _run(hidden, weight, targets, bias)
    assert ref["lse"].abs().max() > 1e3
    for out in (stats.logp, stats.entropy, stats.lse, *grads[:2]):
        assert torch.isfinite(out).all()
    for name in ("logp", "lse"):
        assert_close(getattr(stats, name), ref[name], torch.float32, name)
    # near one-hot rows: the entropy is ~0, so compare it absolutely (in nats)
    assert (stats.entropy.double() - ref["entropy"]).abs().max() < 1e-3
    assert_close(grads[1], ref["grad_weight"], torch.float32, "grad_weight")


def test_results_are_bit_identical_run_to_run():
    hidden, weight, targets, bias = _inputs(40, 33, 200, torch.float32, ignored=(1,))
    grad_logp, grad_entropy = torch.randn(40), torch.randn(40)
    runs = []
    for _ in range(2):
        stats = triton_logprob_fwd(
            hidden, weight, targets, bias, temperature=0.7, ignore_index=IGNORE, with_entropy=True
        )
        grads = triton_logprob_bwd(
            hidden,
            weight,
            targets,
            bias,
            stats,
            grad_logp,
            grad_entropy,
            temperature=0.7,
            ignore_index=IGNORE,
            needs_grad=ALL_GRADS,
            vocab_chunk=64,
        )
        runs.append((stats.logp, stats.entropy, stats.lse, *grads))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_forward_without_entropy_and_partial_needs_grad():
    hidden, weight, targets, bias = _inputs(17, 20, 90, torch.float32)
    stats = triton_logprob_fwd(hidden, weight, targets, bias, temperature=1.3, ignore_index=IGNORE, with_entropy=False)
    assert stats.entropy is None
    grad_logp = torch.randn(17)
    ref = _reference(hidden, weight, targets, bias, 1.3, grad_logp)
    assert_close(stats.logp, ref["logp"], torch.float32, "logp")
    grad_h, grad_w, grad_b = triton_logprob_bwd(
        hidden,
        weight,
        targets,
        bias,
        stats,
        grad_logp,
        None,
        temperature=1.3,
        ignore_index=IGNORE,
        needs_grad=(False, True, False),
    )
    assert grad_h is None and grad_b is None
    assert_close(grad_w, ref["grad_weight"], torch.float32, "grad_weight")


@pytest.mark.parametrize("vocab", [1, 100, 5000, 151_936])
@pytest.mark.parametrize("rows", [1, 8192, 1 << 20])
def test_vocab_chunk_is_an_eighth_of_the_vocabulary_within_the_budget_and_one_tile_at_least(vocab, rows):
    budget = 64 << 20
    chunk = _triton_utils.vocab_chunk(vocab, 128, rows=rows, itemsize=2, budget_bytes=budget)
    assert chunk % 128 == 0 and chunk >= 128
    assert chunk <= max(vocab / 8, 128)
    assert rows * chunk * 2 <= budget or chunk == 128
    assert _triton_utils.vocab_chunk(vocab, 128, rows=rows, itemsize=2, budget_bytes=None) >= chunk  # V/8 alone


@pytest.mark.parametrize("row_blocks,tiles", [(1, 1), (3, 9), (2, 1000)])
def test_vocab_splits_cover_every_tile_and_none_is_empty(row_blocks, tiles):
    splits, per_split = _triton_utils.vocab_splits(torch.device("cpu"), row_blocks, tiles)
    assert splits >= 1 and (splits - 1) * per_split < tiles <= splits * per_split


def test_public_function_on_triton_matches_torch_backend(monkeypatch):
    module = importlib.import_module("hotloop.kernels.fused_linear_logprob")
    hidden, weight, targets, bias = _inputs(21, 24, 150, torch.float32, ignored=(4,))
    hidden, targets = hidden.view(3, 7, 24), targets.view(3, 7)
    grad_logp, grad_entropy = torch.randn(3, 7), torch.randn(3, 7)
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("HOTLOOP_BACKEND", backend)
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        logp, entropy = module.fused_linear_logprob(
            *leaves[:2], targets, leaves[2], temperature=0.7, ignore_index=IGNORE, return_entropy=True
        )
        ((grad_logp * logp).sum() + (grad_entropy * entropy).sum()).backward()
        results[backend] = [logp, entropy, *(t.grad for t in leaves)]
    for name, ours, theirs in zip(
        ("logp", "entropy", "grad_hidden", "grad_weight", "grad_bias"), results["triton"], results["torch"]
    ):
        assert_close(ours, theirs, torch.float32, name)
