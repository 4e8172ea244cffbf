"""REINFORCE / RLOO policy-gradient loss on per-token log-probs.

``loss_t = −A · logp_t`` over completion tokens, with ``A`` per sequence (``[B]``, e.g. from
:func:`~hotloop.kernels.losses.advantages.rloo_advantages`) or per token (``[B, T]``). Reductions:

- ``normalize="token"``: ``Σ_{b,t} m·loss / max(Σ m, 1)`` (every token weighs the same);
- ``normalize="sequence"``: ``(1/B) Σ_b Σ_t m·loss / max(|y_b|, 1)`` (every sequence weighs the same).

Williams 1992 (REINFORCE); Ahmadian et al. 2024 (RLOO, https://arxiv.org/abs/2402.14740).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import as_mask, check_choice, check_tensor
from .output import LossOutput


def masked_reduce(per_token: Tensor, m: Tensor, normalize: str) -> Tensor:
    """Token- or sequence-normalized masked mean of a ``[B, T]`` tensor (0 for empty masks)."""
    if normalize == "token":
        return (per_token * m).sum() / m.sum().clamp_min(1.0)
    return ((per_token * m).sum(-1) / m.sum(-1).clamp_min(1.0)).mean()


def policy_gradient_loss(logp: Tensor, advantages: Tensor, mask: Tensor, *, normalize: str = "token") -> LossOutput:
    """REINFORCE loss ``−A·logp`` over masked tokens.

    Args:
        logp: ``[B, T]`` policy log-probs of the sampled tokens.
        advantages: ``[B]`` (per sequence) or ``[B, T]`` (per token); treated as constants.
        mask: ``[B, T]`` bool or 0/1 completion mask.
        normalize: ``"token"`` or ``"sequence"``.

    Returns:
        ``LossOutput`` with metrics ``advantages/mean`` and ``logps/mean`` (token means).
    """
    check_choice("normalize", normalize, ("token", "sequence"))
    check_tensor("logp", logp, ndim=2)
    if tuple(advantages.shape) not in (tuple(logp.shape[:1]), tuple(logp.shape)):
        raise ValueError(f"advantages must be [B] or [B, T] = {tuple(logp.shape)}, got {tuple(advantages.shape)}")
    m = as_mask(mask, logp)
    adv = advantages.detach().to(logp.dtype)
    adv = adv.unsqueeze(-1) if adv.dim() == 1 else adv
    loss = masked_reduce(-adv * logp, m, normalize)
    with torch.no_grad():
        n = m.sum().clamp_min(1.0)
        metrics = {"advantages/mean": (adv.expand_as(m) * m).sum() / n, "logps/mean": (logp * m).sum() / n}
    return LossOutput(loss, metrics)


def reference_policy_gradient_loss(logp: Tensor, advantages: Tensor, mask: Tensor, normalize: str) -> Tensor:
    """Float64 reference, one sequence at a time."""
    lp, m = logp.double(), mask.double()
    adv = advantages.double()
    adv = adv[:, None].expand_as(lp) if adv.dim() == 1 else adv
    rows = [(-adv[b] * lp[b] * m[b]).sum() for b in range(lp.shape[0])]
    if normalize == "token":
        return sum(rows) / max(m.sum().item(), 1.0)
    return sum(r / max(m[b].sum().item(), 1.0) for b, r in enumerate(rows)) / lp.shape[0]
