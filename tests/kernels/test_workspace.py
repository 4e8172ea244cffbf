"""The scratch buffers kept between calls (``kernels/_workspace.py``): lent once at a time, reused, bounded, and
never a source of stale values (a poisoned held buffer changes no result)."""

import threading

import pytest
import torch

from hotloop.kernels import _workspace
from hotloop.kernels.fused_linear_kl import fused_linear_kl
from hotloop.kernels.fused_linear_logprob import fused_linear_logprob, reference_fused_linear_logprob

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def fresh_pool():
    _workspace.release_workspace()
    yield
    _workspace.release_workspace()


def test_reused_and_nested_lending_gives_distinct_buffers():
    with _workspace.workspace(100, CPU) as a:
        first = a.data_ptr()
        with _workspace.workspace(50, CPU) as b:
            assert b.data_ptr() != a.data_ptr()  # a is lent: the nested request gets its own
    with _workspace.workspace(80, CPU) as c:
        assert c.data_ptr() == first  # the larger of the two came back to the pool
    assert _workspace.held_bytes() == 100 * 4


def test_grows_and_respects_the_keep_limit(monkeypatch):
    with _workspace.workspace(10, CPU):
        pass
    with _workspace.workspace(1000, CPU) as big:
        assert big.numel() >= 1000
    assert _workspace.held_bytes() == 1000 * 4
    monkeypatch.setenv("HOTLOOP_WORKSPACE_BYTES", "1024")
    _workspace.release_workspace()
    with _workspace.workspace(1000, CPU):
        pass
    assert _workspace.held_bytes() == 0  # above the limit: freed after use


def test_each_thread_has_its_own_pool():
    with _workspace.workspace(64, CPU):
        pass
    seen = []
    worker = threading.Thread(target=lambda: seen.append(_workspace.held_bytes()))
    worker.start()
    worker.join()
    assert seen == [0] and _workspace.held_bytes() == 64 * 4


def _poison_pool():
    for buf in _workspace._pool().values():
        buf.fill_(float("nan"))


def test_poisoned_held_buffer_changes_no_logprob_or_gradient():
    torch.manual_seed(0)
    n, d, v = 37, 16, 300
    hidden = torch.randn(n, d, requires_grad=True)
    weight = torch.randn(v, d, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    up = torch.randn(n)
    ref = reference_fused_linear_logprob(hidden.double(), weight.double(), targets)
    ref_grads = torch.autograd.grad((ref * up.double()).sum(), (hidden, weight))
    for _ in range(2):  # the second call runs in the poisoned buffer the first left behind
        _poison_pool()
        logp = fused_linear_logprob(hidden, weight, targets)
        grads = torch.autograd.grad((logp * up).sum(), (hidden, weight))
        torch.testing.assert_close(logp.double(), ref, rtol=1e-5, atol=1e-5)
        for got, want in zip(grads, ref_grads):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert _workspace.held_bytes() > 0


def test_poisoned_held_buffer_changes_no_kl():
    torch.manual_seed(1)
    b, t, d, v = 3, 7, 8, 200
    hidden = torch.randn(b, t, d, requires_grad=True)
    weight = torch.randn(v, d, requires_grad=True)
    targets = torch.randint(0, v, (b, t))
    ref = dict(ref_hidden=torch.randn(b, t, d), ref_weight=torch.randn(v, d))
    first = fused_linear_kl(hidden, weight, targets, **ref)
    (grad_first,) = torch.autograd.grad(first.loss, (weight,))
    _poison_pool()
    again = fused_linear_kl(hidden, weight, targets, **ref)
    (grad_again,) = torch.autograd.grad(again.loss, (weight,))
    assert torch.equal(first.loss, again.loss) and torch.equal(grad_first, grad_again)
