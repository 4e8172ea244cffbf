"""GEMM FLOPs of the fused losses on the PyTorch path, counted exactly (a dispatch mode over mm/addmm): the compat
classes do the direct call's work and nothing more, and ``strategy="auto"`` takes the three-matmul path for pairs
taller than the row chunk (the compat DPO used to take four: issue 11)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hotloop.kernels import fused_linear_dpo_loss, fused_linear_grpo_loss
from hotloop.kernels._torch_tiles import block_rows
from hotloop.kernels.compat import liger as compat


class GemmFlops(TorchDispatchMode):
    """Sums 2·M·K·N over every mm / addmm / addmm_ dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm", "addmm_"):
            a, b = (args[0], args[1]) if name == "mm" else (args[1], args[2])
            self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        return func(*args, **(kwargs or {}))


def matmul_units(step, n, v, d) -> float:
    with GemmFlops() as count:
        step()
    return count.flops / (2 * n * v * d)


@pytest.fixture
def pairs(monkeypatch):
    monkeypatch.delenv("HOTLOOP_BLOCK_BYTES", raising=False)
    torch.manual_seed(0)
    s, d, v = 4, 4, 16384
    t_len = block_rows(1 << 20, v, torch.device("cpu")) // 2 + 8  # a pair (2T rows) is taller than the row chunk
    h = torch.randn(s, t_len, d, requires_grad=True)
    w = torch.randn(v, d, requires_grad=True)
    return h, w, torch.randint(0, v, (s, t_len)), torch.randn(s, t_len, d), torch.randn(v, d)


def test_auto_takes_three_matmuls_and_compat_adds_none(pairs):
    h, w, t, ref_h, ref_w = pairs
    n, v, d = t.numel(), w.shape[0], w.shape[1]
    units = {
        "direct, no ref": lambda: fused_linear_dpo_loss(h, w, t, reference_free=True).loss.backward(),
        "compat, no ref": lambda: compat.LigerFusedLinearDPOLoss(use_ref_model=False)(w, h, t)[0].backward(),
        "direct, head": lambda: fused_linear_dpo_loss(h, w, t, ref_hidden=ref_h, ref_weight=ref_w).loss.backward(),
        "compat, head": lambda: compat.LigerFusedLinearDPOLoss()(w, h, t, None, ref_h, ref_w)[0].backward(),
        "two_pass, head": lambda: fused_linear_dpo_loss(
            h, w, t, ref_hidden=ref_h, ref_weight=ref_w, strategy="two_pass"
        ).loss.backward(),
    }
    got = {name: matmul_units(step, n, v, d) for name, step in units.items()}
    metric = 1 / n  # the mean-logit metric's column sums of the head: one [1, V] @ [V, D] GEMM
    assert got == pytest.approx(
        {
            "direct, no ref": 3.0 + metric,
            "compat, no ref": 3.0 + metric,
            "direct, head": 4.0 + metric,
            "compat, head": 4.0 + metric,
            "two_pass, head": 5.0 + metric,
        },
        rel=1e-12,
    ), got


def test_grpo_takes_three_matmuls(pairs):
    h, w, t, _, _ = pairs
    mask = torch.ones(t.shape, dtype=torch.bool)
    old = torch.randn(t.shape) - 4.0

    def step():
        fused_linear_grpo_loss(h, w, t, advantages=torch.randn(t.shape[0]), mask=mask, old_logp=old).loss.backward()

    assert matmul_units(step, t.numel(), w.shape[0], w.shape[1]) == 3.0
