"""REINFORCE / RLOO policy-gradient loss on per-token log-probs.

``loss_t = −A · logp_t`` over completion tokens, with ``A`` per sequence (``[B]``, e.g. from
:func:`~hotloop.kernels.losses.advantages.rloo_advantages`) or per token (``[B, T]``). Reductions:

- ``normalize="token"``: ``Σ_{b,t} m·loss / max(Σ m, 1)`` (every token weighs the same);
- ``normalize="sequence"``: ``(1/B) Σ_b Σ_t m·loss / max(|y_b|, 1)`` (every sequence weighs the same).

Williams 1992 (REINFORCE); Ahmadian et al. 2024 (RLOO, https://arxiv.org/abs/2402.14740).
On CUDA the loss, its metrics' sums and d loss/d logp come from one Triton kernel (``_policy_gradient_triton``, shared
with :mod:`.sft`); elsewhere torch ops. bf16/fp16 inputs are computed in float32. Memory: a few ``[B, T]`` temporaries.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hotloop._errors import expected

from .._dispatch import use_triton
from ._checks import as_mask, check_aux, check_choice, check_mask, check_tensor
from .output import LossOutput
from .segments import unpack


def masked_reduce(per_token: Tensor, m: Tensor, normalize: str) -> Tensor:
    """Token- or sequence-normalized masked mean of a ``[B, T]`` tensor (0 for empty masks)."""
    if normalize == "token":
        return (per_token * m).sum() / m.sum().clamp_min(1.0)
    return ((per_token * m).sum(-1) / m.sum(-1).clamp_min(1.0)).mean()


def compute_dtype(logp: Tensor) -> torch.dtype:
    """float64 stays; every other float dtype is computed in float32."""
    return torch.float64 if logp.dtype == torch.float64 else torch.float32


def linear_token_loss(logp: Tensor, coef: Tensor | None, mask: Tensor, normalize: str) -> tuple[Tensor, Tensor]:
    """``(loss, sums [4])`` of ``Σ_b c_b Σ_t m·(−coef·logp)``, coef ``[B]``, ``[B, T]`` or None (= 1); inputs checked.

    ``sums``: detached ``Σ m·coef·logp``, ``Σ m``, ``Σ m·logp``, ``Σ m·coef``. One Triton kernel on CUDA
    (``_policy_gradient_triton``), torch elsewhere; float32 (float64 stays).
    """
    if use_triton(logp.device) and logp.dtype != torch.float64:
        from ._policy_gradient_triton import LinearTokenLossFunction

        loss, rows = LinearTokenLossFunction.apply(logp, coef, as_mask(mask, logp), normalize)
        return loss, rows.sum(0)
    dt = compute_dtype(logp)
    lp = logp.to(dt)
    m = as_mask(mask, logp).to(dt)
    c = torch.ones((), dtype=dt, device=lp.device) if coef is None else coef.detach().to(dt)
    c = c.unsqueeze(-1) if c.dim() == 1 else c
    loss = masked_reduce(-c * lp, m, normalize)
    with torch.no_grad():
        sums = torch.stack(((c * lp * m).sum(), m.sum(), (lp * m).sum(), (c.expand_as(m) * m).sum()))
    return loss, sums


def policy_gradient_loss(
    logp: Tensor, advantages: Tensor, mask: Tensor, *, normalize: str = "token", cu_seqlens: Tensor | None = None
) -> LossOutput:
    """REINFORCE loss ``−A·logp`` over masked tokens.

    Args:
        logp: ``[B, T]`` policy log-probs of the sampled tokens.
        advantages: ``[B]`` (per sequence) or ``[B, T]`` (per token); treated as constants.
        mask: ``[B, T]`` bool or 0/1 completion mask.
        normalize: ``"token"`` or ``"sequence"``.
        cu_seqlens: ``[B + 1]`` int32/int64 boundaries of a packed batch (``logp``, ``mask``: ``[N]``; ``advantages``
            ``[B]`` per sequence or ``[N]`` per token, read per sequence when N = B), or None.

    Returns:
        ``LossOutput`` (float32 loss; float64 for float64 input) with metrics ``advantages/mean`` and ``logps/mean``
        (token means).
    """
    check_choice("normalize", normalize, ("token", "sequence"))
    check_aux(
        "logp",
        logp,
        logp=(logp, "float"),
        advantages=(advantages, "float"),
        mask=(mask, "mask"),
        cu_seqlens=(cu_seqlens, "mask"),
    )
    if cu_seqlens is not None:
        per_token = tuple(advantages.shape) != (cu_seqlens.numel() - 1,)
        logp, mask, token_adv = unpack(
            cu_seqlens, ("logp", "mask", "advantages"), logp, mask, advantages if per_token else None
        )
        advantages = token_adv if per_token else advantages
    check_tensor("logp", logp, ndim=2)
    if tuple(advantages.shape) not in (tuple(logp.shape[:1]), tuple(logp.shape)):
        raise ValueError(expected("advantages", f"[B] or [B, T] = {tuple(logp.shape)}", tuple(advantages.shape)))
    check_mask(mask, logp)
    loss, sums = linear_token_loss(logp, advantages, mask, normalize)
    n = sums[1].clamp_min(1.0)
    return LossOutput(loss, {"advantages/mean": sums[3] / n, "logps/mean": sums[2] / n})


def reference_policy_gradient_loss(logp: Tensor, advantages: Tensor, mask: Tensor, normalize: str) -> Tensor:
    """Float64 reference, one sequence at a time."""
    lp = logp.double()
    m = (mask != 0).double()
    adv = advantages.double()
    adv = adv[:, None].expand_as(lp) if adv.dim() == 1 else adv
    rows = [(-adv[b] * lp[b] * m[b]).sum() for b in range(lp.shape[0])]
    if normalize == "token":
        return sum(rows) / max(m.sum().item(), 1.0)
    return sum(r / max(m[b].sum().item(), 1.0) for b, r in enumerate(rows)) / lp.shape[0]
