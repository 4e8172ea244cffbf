"""The CPU bf16 → fp32 logits GEMM (``kernels/_bf16_gemm_ext.py``, ``csrc/bf16_gemm.cpp``) against float64: tile
tails, column offsets, strided operands, what it refuses, and the fused log-prob that runs on it at fp32 accuracy."""

import pytest
import torch

from hotloop.kernels import _bf16_gemm_ext as gemm
from hotloop.kernels import fused_linear_logprob, reference_fused_linear_logprob
from tests.helpers import assert_close, poison_

pytestmark = pytest.mark.skipif(
    gemm._kernel() is None, reason="no bf16 brgemm here (extension not built, or PyTorch/CPU lacks the kernel)"
)


def _head(v, d, scale=1.0):
    return (scale * torch.randn(v, d) * d**-0.5).bfloat16()


@pytest.mark.parametrize(
    ("rows", "v", "d"),
    [(1, 1, 2), (63, 255, 30), (65, 257, 64), (130, 1000, 576), (64, 256, 512)],
)
def test_logits_match_float64_product_of_the_bf16_operands(rows, v, d):
    hidden, weight = torch.randn(rows, d).bfloat16(), _head(v, d, scale=8.0)
    out = poison_(torch.empty(rows, v))
    with gemm.packed_head(weight) as head:
        gemm.logits_into(out, hidden, head, 0)
    assert_close(out, hidden.double() @ weight.double().T, torch.float32, "logits")


def test_column_slice_of_a_strided_output_from_strided_hidden_rows():
    rows, v, d, v0, cols = 70, 600, 48, 123, 300
    wide = torch.randn(rows, d + 10).bfloat16()
    hidden = wide[:, 3 : 3 + d]  # row stride d + 10, odd element offset
    weight = _head(v, d)
    buf = poison_(torch.empty(rows, cols + 17))
    with gemm.packed_head(weight) as head:
        gemm.logits_into(buf[:, 5 : 5 + cols], hidden, head, v0)
    ref = hidden.double() @ weight[v0 : v0 + cols].double().T
    assert_close(buf[:, 5 : 5 + cols], ref, torch.float32, "logits")
    assert buf[:, :5].isnan().all() and buf[:, 5 + cols :].isnan().all(), "wrote outside its columns"


def test_non_contiguous_weights_pack_as_their_copies():
    v, d, rows = 300, 40, 20
    transposed = _head(d, v).T  # [V, D] with column stride V
    odd_rows = _head(v, d + 1)[:, 1:]  # row stride D + 1: bf16 pairs not aligned
    hidden = torch.randn(rows, d).bfloat16()
    for view in (transposed, odd_rows):
        outs = []
        for w in (view, view.contiguous()):
            out = poison_(torch.empty(rows, v))
            with gemm.packed_head(w) as head:
                gemm.logits_into(out, hidden, head, 0)
            outs.append(out)
        assert torch.equal(*outs)


def test_usable_only_for_bf16_cpu_heads_with_even_width(monkeypatch):
    assert gemm.usable(_head(10, 8))
    assert not gemm.usable(torch.randn(10, 8))
    assert not gemm.usable(torch.randn(10, 8).half())
    assert not gemm.usable(_head(10, 7))
    monkeypatch.setenv("HOTLOOP_NATIVE", "0")
    assert not gemm.usable(_head(10, 8))


@pytest.mark.parametrize("bias", [False, True])
def test_fused_logprob_of_a_bf16_head_has_fp32_accuracy(bias, monkeypatch):
    """Per-token logp and entropy within fp32 tolerance of float64: a bf16-output GEMM (relative 2^-9 per logit)
    fails this; the gradients keep their bf16 operands (bf16 tolerance)."""
    monkeypatch.setenv("HOTLOOP_BACKEND", "torch")
    n, d, v = 150, 64, 3001
    hidden = torch.randn(n, d).bfloat16().requires_grad_(True)
    weight = _head(v, d, scale=6.0).requires_grad_(True)
    b = torch.randn(v).bfloat16().requires_grad_(True) if bias else None
    targets = torch.randint(0, v, (n,))
    targets[::7] = -100
    logp, entropy = fused_linear_logprob(hidden, weight, targets, b, return_entropy=True)
    leaves = [x.detach().double().requires_grad_(True) for x in (hidden, weight, b) if x is not None]
    ref_logp, ref_entropy = reference_fused_linear_logprob(
        leaves[0], leaves[1], targets, leaves[2] if bias else None, return_entropy=True
    )
    assert_close(logp, ref_logp, torch.float32, "logp")
    assert_close(entropy, ref_entropy, torch.float32, "entropy")
    g_lp, g_ent = torch.randn(n), torch.randn(n)
    inputs = [x for x in (hidden, weight, b) if x is not None]
    grads = torch.autograd.grad((logp * g_lp).sum() + (entropy * g_ent).sum(), inputs)
    ref_grads = torch.autograd.grad((ref_logp * g_lp).sum() + (ref_entropy * g_ent).sum(), leaves)
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert_close(g, r, torch.bfloat16, f"grad {name}")
