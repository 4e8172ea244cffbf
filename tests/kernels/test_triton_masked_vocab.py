"""Triton log-prob and KL kernels with a bias of −inf that masks whole vocabulary tiles, under TRITON_INTERPRET=1.

A −inf bias (vocabulary padding, banned tokens) makes whole [BLOCK_N, BLOCK_V] tiles −inf, and with three vocab
splits of two 32-wide tiles the first split sees nothing but −inf. The masked columns have p = 0 and must add
0·log 0 = 0 to the entropy and divergences and get a zero gradient. The float64 reference is the textbook
computation on the unmasked columns alone (the masked ones removed from the head), so it has no −inf in it; its
gradients are scattered back with zeros at the masked vocabulary rows.
"""

import pytest
import torch

from hotloop.kernels._fused_linear_kl_triton import triton_kl_fwd_bwd
from hotloop.kernels._fused_linear_logprob_triton import triton_logprob_bwd, triton_logprob_fwd
from hotloop.kernels.fused_linear_kl import KLOptions, reference_fused_linear_kl
from hotloop.kernels.fused_linear_logprob import fused_linear_logprob, reference_fused_linear_logprob
from tests.helpers import assert_close

pytestmark = pytest.mark.interpreter

IGNORE = -100
N, D, V = 20, 16, 192  # six 32-wide tiles: splits of two tiles each (interpreter tiles 16×32×16)


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch, nan_empty):
    monkeypatch.setenv("HOTLOOP_BACKEND", "triton")


def _masked_bias(dtype):
    """[V] bias: −inf on tiles 0–1 (the whole first split), tile 4 and a few scattered columns."""
    bias = torch.randn(V)
    keep = torch.ones(V, dtype=torch.bool)
    keep[:64] = False
    keep[128:160] = False
    keep[[70, 71, 100, 191]] = False
    return bias.masked_fill(~keep, float("-inf")).to(dtype), keep


def _scatter(grad_kept, keep):
    """A gradient over the kept vocabulary rows, back to [V, ...] with zeros at the masked ones."""
    full = torch.zeros(V, *grad_kept.shape[1:], dtype=grad_kept.dtype)
    full[keep] = grad_kept
    return full


def _logprob_reference(hidden, weight, bias, keep, targets, grad_logp, grad_entropy):
    leaves = [t.double().requires_grad_() for t in (hidden, weight[keep], bias[keep])]
    remap = torch.cumsum(keep, 0) - 1
    kept_targets = torch.where(targets == IGNORE, IGNORE, remap[targets.clamp_min(0)])
    logp, entropy = reference_fused_linear_logprob(
        *leaves[:2], kept_targets, leaves[2], temperature=0.7, return_entropy=True
    )
    objective = (grad_logp.double() * logp).sum()
    if grad_entropy is not None:
        objective = objective + (grad_entropy.double() * entropy).sum()
    g_h, g_w, g_b = torch.autograd.grad(objective, leaves)
    return logp, entropy, (g_h, _scatter(g_w, keep), _scatter(g_b, keep))


@pytest.mark.parametrize("entropy_grad", [True, False], ids=["entropy", "no_entropy"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprob_with_masked_tiles_matches_float64_on_the_unmasked_vocabulary(dtype, entropy_grad):
    hidden, weight = torch.randn(N, D).to(dtype), torch.randn(V, D).to(dtype)
    bias, keep = _masked_bias(dtype)
    targets = keep.nonzero()[:, 0][torch.randint(0, int(keep.sum()), (N,))]
    targets[[2, 11]] = IGNORE
    grad_logp, grad_entropy = torch.randn(N), torch.randn(N) if entropy_grad else None
    stats = triton_logprob_fwd(hidden, weight, targets, bias, temperature=0.7, ignore_index=IGNORE, with_entropy=True)
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
        needs_grad=(True, True, True),
        vocab_chunk=64,
    )
    logp, entropy, ref_grads = _logprob_reference(hidden, weight, bias, keep, targets, grad_logp, grad_entropy)
    assert_close(stats.logp, logp, dtype, "logp")
    assert_close(stats.entropy, entropy, dtype, "entropy")
    for name, g, r in zip(("grad_hidden", "grad_weight", "grad_bias"), grads, ref_grads):
        assert_close(g, r, dtype, name)
        assert name == "grad_hidden" or torch.count_nonzero(g[~keep]) == 0, name


def test_logprob_with_masked_tiles_matches_the_torch_backend(monkeypatch):
    hidden, weight = torch.randn(N, D), torch.randn(V, D)
    bias, keep = _masked_bias(torch.float32)
    targets = keep.nonzero()[:, 0][torch.randint(0, int(keep.sum()), (N,))]
    grad_logp, grad_entropy = torch.randn(N), torch.randn(N)
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("HOTLOOP_BACKEND", backend)
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        logp, entropy = fused_linear_logprob(
            *leaves[:2], targets, leaves[2], temperature=0.7, ignore_index=IGNORE, return_entropy=True
        )
        ((grad_logp * logp).sum() + (grad_entropy * entropy).sum()).backward()
        results[backend] = [logp, entropy, *(t.grad for t in leaves)]
    for name, ours, theirs in zip(
        ("logp", "entropy", "grad_hidden", "grad_weight", "grad_bias"), results["triton"], results["torch"]
    ):
        assert torch.isfinite(theirs).all() and torch.isfinite(ours).all(), name
        assert_close(ours, theirs.double(), torch.float32, name)


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
def test_kl_with_the_same_masked_tiles_in_both_heads_matches_float64_on_the_unmasked_vocabulary(divergence):
    hidden, weight, ref_hidden, ref_weight = torch.randn(N, D), torch.randn(V, D), torch.randn(N, 8), torch.randn(V, 8)
    bias, keep = _masked_bias(torch.float32)
    ref_bias = torch.randn(V).masked_fill(~keep, float("-inf"))
    row_weight = torch.randn(N)
    stats, *grads = triton_kl_fwd_bwd(
        hidden,
        weight,
        bias,
        ref_hidden,
        ref_weight,
        ref_bias,
        row_weight,
        options=KLOptions(divergence=divergence, beta=0.3),
        temperature=0.7,
        needs_grad=(True, True, True),
        vocab_chunk=64,
    )
    leaves = [t.double().requires_grad_() for t in (hidden, weight[keep], bias[keep])]
    kw = dict(
        ref_hidden=ref_hidden,
        ref_weight=ref_weight[keep],
        ref_bias=ref_bias[keep],
        beta=0.3,
        temperature=0.7,
        normalize="sum",
    )
    targets = torch.zeros(N, dtype=torch.int64)
    expect = {
        d: reference_fused_linear_kl(*leaves[:2], targets, leaves[2], **kw, divergence=d).per_token
        for d in ("kl", divergence)
    }
    _, entropy = reference_fused_linear_logprob(*leaves[:2], targets, leaves[2], temperature=0.7, return_entropy=True)
    g_h, g_w, g_b = torch.autograd.grad((expect[divergence] * row_weight.double()).sum(), leaves)
    for name, out, ref in (
        ("divergence", stats.divergence, expect[divergence]),
        ("kl", stats.kl, expect["kl"]),
        ("entropy", stats.entropy, entropy),
    ):
        assert_close(out, ref, torch.float32, name)
    for name, g, r in zip(
        ("grad_hidden", "grad_weight", "grad_bias"), grads, (g_h, _scatter(g_w, keep), _scatter(g_b, keep))
    ):
        assert_close(g, r, torch.float32, name)
