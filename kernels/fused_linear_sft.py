"""Fused linear (reward-weighted) SFT from hidden states and the LM head, without ``[N, V]`` logits.

``loss = Σ_b w_b Σ_t m_bt · (−logp_bt) / Z`` (:func:`~.losses.sft.sft_loss`; ``w_b = 1`` for plain SFT). Per-sequence
weights ``w [B]`` serve rejection sampling / Best-of-N / RAFT / ReST (``w ∈ {0, 1}``) and reward-weighted regression
(``w_b = exp(r_b / τ)``, normalized by the caller); ``normalize="token"`` (``Z = Σ m``) or ``"sequence"``.

The loss is linear in ``logp``, so its per-token upstream gradient is the gradient of ``sft_loss`` itself (autograd
at ``logp = 0`` on the ``[B, T]`` mask) and is known before any matmul: ``logprob_fwd_bwd`` computes
log-probs and all gradients in one pass: three matmuls on the PyTorch path (``6·N_a·V·D`` FLOPs), four on CUDA
(``_fwd_bwd_triton``: forward, then a backward that recomputes the logits; ``8·N_a·V·D``); ``2·N_a·V·D`` under
``torch.no_grad()``. Loss value and metrics come from one ``sft_loss`` call on the ``[B, T]`` log-probs.
Memory: the gradients ``[N, D] + [V, D] (+ [V])`` held until backward, one logits block, a few ``[B, T]`` floats.

Layout: padded ``hidden [B, T, D]`` + ``mask [B, T]`` or packed ``hidden [N, D]`` + ``cu_seqlens [B + 1]``
(``_fused_linear_common``). With neither a mask nor ignored targets every token counts.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._fused_linear_common import (
    attach_grads,
    check_fused_args,
    forward_stats,
    grads_needed,
    make_layout,
    reference_padded,
)
from .fused_linear_logprob import logprob_fwd_bwd, reference_fused_linear_logprob
from .losses._checks import check_choice, check_tensor
from .losses.output import LossOutput
from .losses.sft import sft_loss


def fused_linear_sft_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None = None,
    *,
    mask: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    weights: Tensor | None = None,
    normalize: str = "token",
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> LossOutput:
    """Negative log-likelihood of the targets, optionally weighted per sequence.

    Args:
        hidden: ``[B, T, D]`` (padded) or ``[N, D]`` (packed with ``cu_seqlens``).
        weight: ``[V, D]``, hidden's dtype.  bias: ``[V]`` or None.
        targets: ``[B, T]`` / ``[N]`` int64 next-token ids (``ignore_index``: not trained on).
        mask: ``[B, T]`` / ``[N]`` bool or 0/1 loss mask, or None.  cu_seqlens: ``[B + 1]`` int32/int64 (packed).
        weights: ``[B]`` per-sequence weights (constants), or None.  normalize: ``"token"`` or ``"sequence"``.
        temperature: logits are divided by it.

    Returns:
        ``LossOutput``; metrics ``nll`` (unweighted token mean), ``entropy`` (token mean) and ``num_tokens`` (the
        tokens counted in this batch; TRL's ``num_tokens`` is the running total of attention-mask tokens, prompts
        included, which the trainer accumulates).
    """
    check_choice("normalize", normalize, ("token", "sequence"))
    check_fused_args(hidden, weight, targets, bias, mask, cu_seqlens, weights=(weights, "float"))
    layout = make_layout(
        hidden,
        weight,
        targets,
        bias,
        mask=mask,
        cu_seqlens=cu_seqlens,
        temperature=temperature,
        ignore_index=ignore_index,
    )
    if weights is not None:
        check_tensor("weights", weights, (layout.num_seqs,))
        weights = weights.detach().float()
    opts = dict(temperature=float(temperature), ignore_index=int(ignore_index), with_entropy=True)
    m = layout.padded_mask()
    needs = grads_needed(hidden, weight, bias)
    if any(needs):
        zero = torch.zeros_like(m, requires_grad=True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(sft_loss(zero, m, weights=weights, normalize=normalize).loss, zero)
        token = grad[layout.seq_ids, layout.positions]
        stats, *grads = logprob_fwd_bwd(
            layout.hidden,
            weight.detach(),
            layout.targets,
            None if bias is None else bias.detach(),
            token_grad=lambda rows, *_: (token[rows], None),
            needs_grad=needs,
            **opts,
        )
    else:
        stats = forward_stats(layout, weight, bias, **opts)
    with torch.no_grad():
        out = sft_loss(layout.to_padded(stats.logp), m, weights=weights, normalize=normalize)
        out.metrics["entropy"] = stats.entropy.sum() / max(stats.entropy.numel(), 1)
    loss = attach_grads(out.loss, layout, hidden, weight, bias, grads) if any(needs) else out.loss
    return LossOutput(loss, out.metrics)


class FusedLinearSFTLoss(nn.Module):
    """Module form of :func:`fused_linear_sft_loss`: options at construction, tensors in ``forward``."""

    def __init__(self, *, normalize: str = "token", temperature: float = 1.0, ignore_index: int = -100):
        super().__init__()
        check_choice("normalize", normalize, ("token", "sequence"))
        self.options = dict(normalize=normalize, temperature=temperature, ignore_index=ignore_index)

    def forward(self, hidden, weight, targets, bias=None, *, mask=None, cu_seqlens=None, weights=None) -> LossOutput:
        return fused_linear_sft_loss(
            hidden, weight, targets, bias, mask=mask, cu_seqlens=cu_seqlens, weights=weights, **self.options
        )


def reference_fused_linear_sft_loss(
    hidden,
    weight,
    targets,
    bias=None,
    *,
    mask=None,
    cu_seqlens=None,
    weights=None,
    normalize="token",
    temperature=1.0,
    ignore_index=-100,
) -> LossOutput:
    """Float64 reference: materialized logits → log_softmax / entropy → ``sft_loss`` on ``[B, T]`` (autograd)."""
    h_pad, t_pad, m = reference_padded(hidden.double(), targets, mask, cu_seqlens, ignore_index)
    b64 = None if bias is None else bias.double()
    logp, entropy = reference_fused_linear_logprob(
        h_pad, weight.double(), t_pad, b64, temperature=temperature, ignore_index=ignore_index, return_entropy=True
    )
    out = sft_loss(logp, m, weights=None if weights is None else weights.double(), normalize=normalize)
    out.metrics["entropy"] = (entropy.detach() * m).sum() / m.sum().clamp_min(1.0)
    return out
