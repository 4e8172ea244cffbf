"""(Reward-weighted) supervised fine-tuning loss on per-token log-probs.

``loss = Σ_b w_b Σ_t m_bt · (−logp_bt) / Z``, ``w_b = 1`` for plain SFT. The same loss serves rejection
sampling / Best-of-N / RAFT (Dong et al. 2023, https://arxiv.org/abs/2304.06767) and ReST (Gulcehre et al. 2023,
https://arxiv.org/abs/2308.08998) with ``w ∈ {0, 1}`` (or the kept samples only), and reward-weighted
regression (Peters & Schaal 2007) with ``w_b = exp(r_b / τ)`` normalized by the caller.
``Z = max(Σ m, 1)`` for ``normalize="token"``; for ``"sequence"`` each row is divided by ``max(|y_b|, 1)`` and the
rows averaged over ``B``. Weights are treated as constants. On CUDA one Triton kernel computes the loss, the metrics'
sums and d loss/d logp (``_policy_gradient_triton``, with ``A = w``); bf16/fp16 inputs are computed in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_aux, check_choice, check_mask, check_tensor
from .output import LossOutput
from .policy_gradient import linear_token_loss
from .segments import unpack


def sft_loss(
    logp: Tensor,
    mask: Tensor,
    *,
    weights: Tensor | None = None,
    normalize: str = "token",
    cu_seqlens: Tensor | None = None,
) -> LossOutput:
    """Negative log-likelihood of the target tokens, optionally weighted per sequence.

    Args:
        logp: ``[B, T]`` log-probs of the target tokens.
        mask: ``[B, T]`` bool or 0/1.
        weights: ``[B]`` per-sequence weights (constants) or None.
        normalize: ``"token"`` or ``"sequence"``.
        cu_seqlens: ``[B + 1]`` int32/int64 boundaries of a packed batch (``logp``, ``mask``: ``[N]``), or None.

    Returns:
        ``LossOutput`` (float32 loss; float64 for float64 input) with metrics ``nll`` (unweighted token mean) and
        ``num_tokens`` (``Σ mask``).
    """
    check_choice("normalize", normalize, ("token", "sequence"))
    check_aux(
        "logp",
        logp,
        logp=(logp, "float"),
        mask=(mask, "mask"),
        weights=(weights, "float"),
        cu_seqlens=(cu_seqlens, "mask"),
    )
    if cu_seqlens is not None:
        logp, mask = unpack(cu_seqlens, ("logp", "mask"), logp, mask)
    check_tensor("logp", logp, ndim=2)
    check_mask(mask, logp)
    if weights is not None:
        check_tensor("weights", weights, tuple(logp.shape[:1]))
    loss, sums = linear_token_loss(logp, weights, mask, normalize)
    return LossOutput(loss, {"nll": -sums[2] / sums[1].clamp_min(1.0), "num_tokens": sums[1]})


def reference_sft_loss(logp: Tensor, mask: Tensor, weights: Tensor | None, normalize: str) -> Tensor:
    """Float64 reference, one sequence at a time."""
    lp = logp.double()
    m = (mask != 0).double()
    w = torch.ones(lp.shape[0], dtype=torch.float64) if weights is None else weights.double()
    rows = [w[b] * (-lp[b] * m[b]).sum() for b in range(lp.shape[0])]
    if normalize == "token":
        return sum(rows) / max(m.sum().item(), 1.0)
    return sum(r / max(m[b].sum().item(), 1.0) for b, r in enumerate(rows)) / lp.shape[0]
