"""Correctness of the token-level loss kernels (``kernels/losses/_*_triton.py``) against float64.

Each loss is called twice through its public function on the same random inputs: float32 on the device (the
Triton kernel) and float64 (the PyTorch formula; float64 never takes the kernel). The loss and its gradients
(log-probs; entropy where it is an input) are compared. Rows are longer than one ``BLOCK_T`` block on the GPU
(T = 6000 > 4096) and some rows are empty.
"""

from __future__ import annotations

import torch

from hotloop.kernels.losses import grpo as grpo_mod
from hotloop.kernels.losses.grpo import grpo_loss
from hotloop.kernels.losses.kl_penalty import kl_penalty
from hotloop.kernels.losses.policy_gradient import policy_gradient_loss

from . import _reference
from ._report import Check

SCALAR_TOL = 1e-4  # a mean over ~10^5 fp32 terms: its last digits follow the summation order
GRAD_TOL = 1e-5


def _inputs(b: int, t: int, device):
    logp = -torch.rand(b, t, device=device) * 3
    old = logp + 0.1 * torch.randn(b, t, device=device)
    mask = torch.rand(b, t, device=device) < 0.8
    mask[min(2, b - 1)] = False  # an empty row
    return dict(
        logp=logp,
        old=old,
        ref=logp + 0.2 * torch.randn(b, t, device=device),
        mask=mask,
        adv=torch.randn(b, device=device),
        sampler=old + 0.2 * torch.randn(b, t, device=device),
        entropy=1 + torch.rand(b, t, device=device),
    )


def _leaf(x: torch.Tensor, dtype) -> torch.Tensor:
    return x.detach().to(dtype).requires_grad_()


def _run_both(fn, data, grad_keys=("logp",)) -> list[tuple[str, float, float]]:
    """[(what, error, tol)] of fn(float32 inputs) vs fn(float64 inputs): the loss, then each gradient."""
    results = {}
    for dtype in (torch.float32, torch.float64):
        leaves = {k: _leaf(data[k], dtype) for k in grad_keys}
        consts = {k: v.to(dtype) if v.is_floating_point() else v for k, v in data.items() if k not in grad_keys}
        loss = fn(**leaves, **consts)
        grads = torch.autograd.grad(loss, [leaves[k] for k in grad_keys])
        results[dtype] = (loss, grads)
    (loss32, grads32), (loss64, grads64) = results[torch.float32], results[torch.float64]
    err = abs(loss32.item() - loss64.item()) / max(abs(loss64.item()), 1e-2)
    out = [("loss", err, SCALAR_TOL)]
    return out + [
        (f"d/d {k}", _reference.relative_error(g, r), GRAD_TOL) for k, g, r in zip(grad_keys, grads32, grads64)
    ]


def check_losses(b: int, t: int, device) -> list[Check]:
    data = _inputs(b, t, device)
    cases = []
    for k, loss_type in enumerate(grpo_mod.LOSS_TYPES):
        est = ("k1", "k2", "k3")[k % 3]
        kw = dict(
            beta=0.08,
            kl_estimator=est,
            loss_type=loss_type,
            sampler_is_cap=1.4,
            entropy_coef=0.02,
            epsilon_high=1.25 if loss_type == "cispo" else 0.28,
            use_bias_correction_kl=est == "k2",
            delta=1.15 if loss_type in grpo_mod.CLIPPED and est == "k3" else None,
            max_completion_length=t,
        )

        def grpo(logp, entropy, old, ref, mask, adv, sampler, kw=kw):
            return grpo_loss(
                logp, adv, mask, old_logp=old, ref_logp=ref, sampler_logp=sampler, entropy=entropy, **kw
            ).loss

        cases.append((f"grpo_loss {loss_type} kl={est}", grpo, ("logp", "entropy")))
    for est in ("k1", "k2", "k3"):
        cases.append(
            (
                f"kl_penalty {est}",
                lambda logp, ref, mask, est=est, **_: kl_penalty(logp, mask, ref_logp=ref, kl_estimator=est),
                ("logp",),
            )
        )
    for norm in ("token", "sequence"):
        cases.append(
            (
                f"policy_gradient_loss {norm}",
                lambda logp, adv, mask, norm=norm, **_: policy_gradient_loss(logp, adv, mask, normalize=norm).loss,
                ("logp",),
            )
        )
    checks = []
    for name, fn, keys in cases:
        for what, err, tol in _run_both(fn, data, keys):
            checks.append(Check("losses", f"B={b} T={t} {name}: {what}", err, tol))
    return checks
