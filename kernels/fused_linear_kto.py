"""Fused linear KTO (https://arxiv.org/abs/2402.01306) from hidden states and the LM head, without ``[N, V]`` logits.

Unpaired samples: ``B`` sequences with ``labels [B]`` (True = desirable). ``S_b = Σ_t logp_bt`` over active tokens,
then :func:`~.losses.kto.kto_loss` (``λ_D (1 − σ(β(ρ − z₀)))`` / ``λ_U (1 − σ(β(z₀ − ρ)))``, ``ρ = S − S_ref``, mean
over B; ``length_normalize``: ``ρ = (S − S_ref) / |y_b|``, Liger's ``average_log_prob``). The reference point ``z₀``
(``reference_point``) is a constant: TRL estimates it from mismatched
(prompt, completion) pairs; compute those sequence log-probs forward-only (``torch.no_grad()`` with this module's
layout, or ``fused_linear_logprob``) and pass :func:`~.losses.kto.kto_kl_estimate` of them.

Layout: padded ``hidden [B, T, D]`` + ``mask [B, T]`` or packed ``hidden [N, D]`` + ``cu_seqlens [B + 1]``
(``_fused_linear_common``). Reference: ``ref_logps [B]`` (cached per data set) or a reference head, forward-only.
Each sample's loss depends on its own ``S_b`` only, so the ``"grouped"`` strategy uses one row group per sequence
(three matmuls on the PyTorch path, four on Triton; an fp32 ``[T, V]`` block on CPU); ``"two_pass"`` takes one
matmul more at the usual block budget.
Memory and FLOPs as ``fused_linear_dpo``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from ._fused_linear_common import (
    STRATEGIES,
    attach_grads,
    check_fused_args,
    check_reference,
    float32_output,
    forward_stats,
    grads_needed,
    logit_sums,
    make_layout,
    reference_head_logp,
    reference_logit_sums,
    reference_padded,
    sequence_loss_grads,
    sequence_strategy,
)
from .fused_linear_logprob import reference_fused_linear_logprob
from .losses._checks import check_choice, check_tensor
from .losses.kto import KTOOptions, kto_loss
from .losses.output import LossOutput


def _logit_totals(sums: Tensor, labels: Tensor, vocab: int) -> dict[str, Tensor]:
    """``logits/{chosen,rejected}_sum``: Σ over the desirable / undesirable samples' active tokens and the vocabulary,
    from the per-sequence sums of vocabulary-mean logits ``[B]``."""
    return {"logits/chosen_sum": sums[labels].sum() * vocab, "logits/rejected_sum": sums[~labels].sum() * vocab}


def fused_linear_kto_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None = None,
    *,
    labels: Tensor,
    mask: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    ref_logps: Tensor | None = None,
    ref_hidden: Tensor | None = None,
    ref_weight: Tensor | None = None,
    ref_bias: Tensor | None = None,
    reference_point: Tensor | float | None = None,
    beta: float = KTOOptions.beta,
    desirable_weight: float = KTOOptions.desirable_weight,
    undesirable_weight: float = KTOOptions.undesirable_weight,
    length_normalize: bool = KTOOptions.length_normalize,
    temperature: float = 1.0,
    ignore_index: int = -100,
    strategy: str = "auto",
) -> LossOutput:
    """KTO loss of ``B`` unpaired samples from hidden states and the LM head.

    Args:
        hidden: ``[B, T, D]`` (padded) or ``[N, D]`` (packed with ``cu_seqlens``).
        weight: ``[V, D]``, hidden's dtype.  bias: ``[V]`` or None.
        targets: ``[B, T]`` / ``[N]`` int64 next-token ids (``ignore_index``: not in the completion).
        labels: ``[B]`` bool, True for desirable completions.
        mask: ``[B, T]`` / ``[N]`` bool or 0/1 completion mask, or None.  cu_seqlens: ``[B + 1]`` (packed).
        ref_logps: ``[B]`` reference sequence log-probs, or the reference head ``ref_hidden`` (hidden's layout,
            ``[..., D_ref]``), ``ref_weight [V, D_ref]``, ``ref_bias`` (run without grad).
        reference_point: ``z₀`` as :func:`~hotloop.kernels.losses.kto.kto_loss`.
        beta, desirable_weight, undesirable_weight, length_normalize: the fields of
            :class:`~hotloop.kernels.losses.kto.KTOOptions` (``ref_logps`` stay sums with ``length_normalize``).
        temperature: logits are divided by it.  strategy: ``"auto"`` | ``"grouped"`` | ``"two_pass"``.

    Returns:
        ``LossOutput`` with the metrics of ``kto_loss``: ``kl``, ``rewards/{chosen,rejected}_sum``,
        ``logps/{chosen,rejected}_sum``, ``count/{chosen,rejected}``; plus ``logits/{chosen,rejected}_sum``: Σ of
        logits / temperature over the samples' active tokens and the vocabulary (never formed; Liger sums every
        position, padding included; TRL 1.16's ``logits/chosen`` is this over V × the chosen completion tokens).
    """
    options = KTOOptions.pick(locals())  # first: locals() are the arguments
    check_choice("strategy", strategy, STRATEGIES)
    head = (ref_hidden, ref_weight, ref_bias)
    check_fused_args(hidden, weight, targets, bias, mask, cu_seqlens, head, labels=(labels, "bool"))
    opts = dict(temperature=float(temperature), ignore_index=int(ignore_index))
    layout = make_layout(hidden, weight, targets, bias, mask=mask, cu_seqlens=cu_seqlens, **opts)
    check_tensor("labels", labels, (layout.num_seqs,))
    check_reference("ref_logps", ref_logps, *head, needed=True, why="KTO")
    lengths = layout.seq_sum(torch.ones_like(layout.seq_ids, dtype=torch.float32))
    ref = _reference_seq_logps(layout, ref_logps, head, opts)
    sample_loss = _SampleLoss(labels=labels, ref=ref, lengths=lengths, reference_point=reference_point, options=options)
    samples = torch.arange(layout.num_seqs, device=ref.device)
    sample_loss(torch.zeros(layout.num_seqs, 1, device=ref.device), samples)  # checks z0 before any matmul
    needs = grads_needed(hidden, weight, bias)
    stats, grads = _stats_and_grads(layout, weight, bias, sample_loss, needs, strategy, opts)
    with torch.no_grad():
        out = float32_output(sample_loss(layout.seq_sum(stats.logp).double().unsqueeze(1), samples))
        out.metrics.update(_logit_totals(logit_sums(layout, weight, bias, temperature), labels, weight.shape[0]))
    loss = attach_grads(out.loss, layout, hidden, weight, bias, grads) if any(needs) else out.loss
    return LossOutput(loss, out.metrics)


@dataclass(frozen=True, kw_only=True)
class _SampleLoss:
    """``kto_loss`` of a subset of samples, from their sequence log-probs ``[k, 1]``."""

    labels: Tensor  # [B] bool
    ref: Tensor  # [B] reference sequence log-probs
    lengths: Tensor  # [B] active tokens per sequence
    reference_point: Tensor | float | None
    options: KTOOptions

    def __call__(self, seq_logps: Tensor, samples: Tensor) -> LossOutput:
        return kto_loss(
            seq_logps[:, 0],
            self.labels[samples],
            ref_logps=self.ref[samples],
            lengths=self.lengths[samples],
            reference_point=self.reference_point,
            **asdict(self.options),
        )


def _reference_seq_logps(layout, ref_logps, head: tuple, opts: dict) -> Tensor:
    """``[B]`` float64 reference sequence log-probs: from the reference head, or the checked ``ref_logps``."""
    if head[0] is not None:
        return layout.seq_sum(reference_head_logp(layout, *head, **opts))
    check_tensor("ref_logps", ref_logps, (layout.num_seqs,))
    return ref_logps.detach().double()


def _stats_and_grads(layout, weight, bias, sample_loss: _SampleLoss, needs, strategy: str, opts: dict):
    """Token stats and, when any input needs one, the gradients (one unit per sample; ``strategy``)."""
    if not any(needs):
        return forward_stats(layout, weight, bias, with_entropy=False, **opts), None
    b = layout.num_seqs
    units = torch.arange(b, device=layout.seq_ids.device).unsqueeze(1)

    def share(seq_logps, idx):  # the samples' share of the mean over all B samples
        return sample_loss(seq_logps, idx).loss * (idx.numel() / b)

    strategy = sequence_strategy(layout, weight, units, strategy)
    return sequence_loss_grads(
        layout, weight, bias, units=units, unit_loss=share, needs_grad=needs, strategy=strategy, **opts
    )


class FusedLinearKTOLoss(nn.Module):
    """Module form of :func:`fused_linear_kto_loss`: loss options at construction, tensors in ``forward``.

    Constructor keywords: the fields of :class:`~hotloop.kernels.losses.kto.KTOOptions` (checked now), plus
    ``temperature``, ``ignore_index`` and ``strategy`` (defaults as :func:`fused_linear_kto_loss`).
    """

    def __init__(self, *, temperature: float = 1.0, ignore_index: int = -100, strategy: str = "auto", **options):
        super().__init__()
        check_choice("strategy", strategy, STRATEGIES)
        self.options = KTOOptions(**options)
        self.temperature = temperature
        self.ignore_index = ignore_index
        self.strategy = strategy

    def forward(
        self,
        hidden,
        weight,
        targets,
        bias=None,
        *,
        labels,
        mask=None,
        cu_seqlens=None,
        ref_logps=None,
        ref_hidden=None,
        ref_weight=None,
        ref_bias=None,
        reference_point=None,
    ) -> LossOutput:
        return fused_linear_kto_loss(
            hidden,
            weight,
            targets,
            bias,
            labels=labels,
            mask=mask,
            cu_seqlens=cu_seqlens,
            ref_logps=ref_logps,
            ref_hidden=ref_hidden,
            ref_weight=ref_weight,
            ref_bias=ref_bias,
            reference_point=reference_point,
            temperature=self.temperature,
            ignore_index=self.ignore_index,
            strategy=self.strategy,
            **asdict(self.options),
        )


def reference_fused_linear_kto_loss(
    hidden,
    weight,
    targets,
    bias=None,
    *,
    labels,
    mask=None,
    cu_seqlens=None,
    ref_logps=None,
    ref_hidden=None,
    ref_weight=None,
    ref_bias=None,
    temperature=1.0,
    ignore_index=-100,
    strategy="auto",
    **options,
) -> LossOutput:
    """Float64 reference: materialized logits → log_softmax → padded sums → ``kto_loss`` (autograd)."""

    def seq_logp(h, w, b):
        h_pad, t_pad, _ = reference_padded(h.double(), targets, mask, cu_seqlens, ignore_index)
        b64 = None if b is None else b.double()
        logp = reference_fused_linear_logprob(
            h_pad, w.double(), t_pad, b64, temperature=temperature, ignore_index=ignore_index
        )
        return logp.sum(-1)

    ref = ref_logps.double() if ref_hidden is None else seq_logp(ref_hidden, ref_weight, ref_bias).detach()
    lengths = reference_padded(hidden, targets, mask, cu_seqlens, ignore_index)[2].sum(-1)
    out = kto_loss(seq_logp(hidden, weight, bias), labels, ref_logps=ref, lengths=lengths, **options)
    with torch.no_grad():
        sums = reference_logit_sums(hidden, weight, bias, targets, mask, cu_seqlens, ignore_index, temperature)
        out.metrics.update(_logit_totals(sums, labels, weight.shape[0]))
    return out
