"""Fused linear DPO family from hidden states and the LM head, never storing ``[N, V]`` logits.

Covers every ``losses.dpo`` loss type (DPO sigmoid + cDPO smoothing, hinge, IPO, EXO, NCA, robust, BCO, SPPO,
APO, DiscoPOP), RPO's NLL term, the reference-free SimPO / CPO forms, length normalization, and ORPO
(``loss_type="orpo"``, https://arxiv.org/abs/2403.07691). The math lives in :func:`~.losses.dpo.dpo_loss` and
:func:`~.losses.dpo.orpo_loss`; this file only feeds them per-sequence log-probs and carries the gradients.

Batch: ``2B`` sequences, chosen first (sequences ``0 .. B−1``), then rejected (``B .. 2B−1``); pair b is
sequences ``(b, B + b)`` — the concatenated order of Liger's and TRL's trainers. Padded ``hidden [2B, T, D]`` with
``mask [2B, T]``, or packed ``hidden [N, D]`` with ``cu_seqlens [2B + 1]`` (``_fused_linear_common``).
``S_b = Σ_t logp_bt`` over active tokens, ``|y_b|`` their count. NLL term (RPO ``nll_coef``, CPO, ORPO): token
mean over all chosen tokens, ``−Σ logp / #chosen tokens`` (Liger, TRL), given to the functional loss as the
per-pair vector ``−S_c · B / #chosen tokens`` whose mean it is, so any subset of pairs has its exact share.

Reference: ``ref_logps [2B]`` per-sequence sums (same order; computed once per data set and cached), or a
reference head ``(ref_hidden, ref_weight, ref_bias)`` run forward-only, or none (``reference_free``, ORPO).

Gradients are computed in the forward (``strategy``; rule in ``_fused_linear_common``): ``"grouped"`` per pair,
three matmuls on the PyTorch path (four on Triton: forward + recomputing backward) and an fp32 ``[rows of a pair,
V]`` block on CPU; ``"two_pass"``, one matmul more at the usual block budget. Memory: the gradients
``[N, D] + [V, D] (+ [V])`` held until backward (as Liger), one logits block, ``[B]`` vectors. FLOPs (a matmul is
``2·N_a·V·D``): 3 grouped / 4 two-pass on CPU, 4 / 5 on Triton, ``+ 2·N_a·V·D_ref`` with a reference head;
``2·N_a·V·D`` under ``torch.no_grad()``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from hotloop._errors import expected

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
from .losses import dpo as _dpo
from .losses._checks import check_choice, check_tensor
from .losses.dpo import DPOOptions
from .losses.output import LossOutput

LOSS_TYPES = (*_dpo.LOSS_TYPES, "orpo")


@dataclass
class DPOOutput(LossOutput):
    """``LossOutput`` plus ``seq_logps``: the detached float32 ``[2B]`` policy sequence log-probs (chosen first)."""

    seq_logps: Tensor | None = None


@dataclass(frozen=True, kw_only=True)
class _PairLoss:
    """The functional DPO-family loss of a subset of pairs, from their sequence log-probs ``[k, 2]``."""

    ref: Tensor | None  # [2B] reference sequence log-probs, or None
    lengths: Tensor  # [2B] active tokens per sequence
    nll_scale: float  # B / #chosen tokens: per-pair NLL = −S_c · nll_scale
    options: DPOOptions

    @classmethod
    def of(cls, layout, ref: Tensor | None, options: DPOOptions) -> _PairLoss:
        """The pair loss of a checked 2B-sequence layout (lengths and NLL scale from its active tokens)."""
        lengths = layout.seq_sum(torch.ones_like(layout.seq_ids, dtype=torch.float32))
        num_pairs = layout.num_seqs // 2
        nll_scale = num_pairs / max(float(lengths[:num_pairs].sum()), 1.0)
        return cls(ref=ref, lengths=lengths, nll_scale=nll_scale, options=options)

    def __call__(self, seq_logps: Tensor, pairs: Tensor) -> LossOutput:
        num_pairs = self.lengths.numel() // 2
        s_c = seq_logps[:, 0]
        s_r = seq_logps[:, 1]
        lengths = dict(chosen_lengths=self.lengths[pairs], rejected_lengths=self.lengths[pairs + num_pairs])
        nll = -s_c * self.nll_scale
        o = self.options
        if o.loss_type == "orpo":
            return _dpo.orpo_loss(s_c, s_r, beta=o.beta, nll_loss=nll, **lengths)
        refs = {}
        if self.ref is not None:
            refs = dict(ref_chosen_logps=self.ref[pairs], ref_rejected_logps=self.ref[pairs + num_pairs])
        return _dpo.dpo_loss(s_c, s_r, **refs, **lengths, nll_loss=nll if o.nll_coef != 0 else None, **asdict(o))


def _check_batch(layout, options: DPOOptions, ref_logps, ref_hidden, ref_weight, ref_bias) -> None:
    if layout.num_seqs % 2:
        raise ValueError(expected("hidden", "2B sequences (B chosen, then B rejected)", f"{layout.num_seqs}"))
    free = options.reference_free or options.loss_type == "orpo"
    check_reference(
        "ref_logps",
        ref_logps,
        ref_hidden,
        ref_weight,
        ref_bias,
        needed=not free,
        why=f"loss_type={options.loss_type!r} with reference_free={options.reference_free}",
    )


def _reference_seq_logps(layout, ref_logps, ref_hidden, ref_weight, ref_bias, opts):
    if ref_hidden is not None:
        return layout.seq_sum(reference_head_logp(layout, ref_hidden, ref_weight, ref_bias, **opts))
    if ref_logps is not None:
        check_tensor("ref_logps", ref_logps, (layout.num_seqs,))
        return ref_logps.detach().double()
    return None


def _logit_means(sums: Tensor, lengths: Tensor) -> dict[str, Tensor]:
    """TRL's ``logits/{chosen,rejected}``: per-sequence logit sums ``[2B]`` → means over each half's active tokens."""
    half = lengths.numel() // 2
    means = sums.view(2, half).sum(1) / lengths.view(2, half).sum(1).clamp_min(1.0)
    return {"logits/chosen": means[0], "logits/rejected": means[1]}


def fused_linear_dpo_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None = None,
    *,
    mask: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    ref_logps: Tensor | None = None,
    ref_hidden: Tensor | None = None,
    ref_weight: Tensor | None = None,
    ref_bias: Tensor | None = None,
    beta: float = DPOOptions.beta,
    loss_type: str = DPOOptions.loss_type,
    label_smoothing: float = DPOOptions.label_smoothing,
    length_normalize: bool | None = DPOOptions.length_normalize,
    gamma: float = DPOOptions.gamma,
    nll_coef: float = DPOOptions.nll_coef,
    reference_free: bool = DPOOptions.reference_free,
    discopop_tau: float = DPOOptions.discopop_tau,
    temperature: float = 1.0,
    ignore_index: int = -100,
    strategy: str = "auto",
) -> DPOOutput:
    """DPO-family loss of ``B`` preference pairs from hidden states and the LM head.

    Args:
        hidden: ``[2B, T, D]`` (padded) or ``[N, D]`` (packed with ``cu_seqlens``); chosen sequences first.
        weight: ``[V, D]``, hidden's dtype (fp32 / bf16 / fp16).  bias: ``[V]`` or None.
        targets: ``[2B, T]`` / ``[N]`` int64 next-token ids; ``ignore_index`` marks tokens outside the completion.
        mask: ``[2B, T]`` / ``[N]`` bool or 0/1 completion mask (None: every token whose target is not ignored).
        cu_seqlens: ``[2B + 1]`` int32/int64 sequence boundaries of a packed batch.
        ref_logps: ``[2B]`` reference sequence log-probs.  ref_hidden, ref_weight, ref_bias: reference head
            (``ref_hidden`` in hidden's layout, ``[..., D_ref]``; ``ref_weight [V, D_ref]``), run without grad.
        beta, loss_type, label_smoothing, length_normalize, gamma, nll_coef, reference_free, discopop_tau: the
            fields of :class:`~hotloop.kernels.losses.dpo.DPOOptions`; ``loss_type="orpo"``: ORPO with λ = ``beta``
            (no reference, NLL weight 1).
        temperature: logits are divided by it.  strategy: ``"auto"`` | ``"grouped"`` | ``"two_pass"``.

    Returns:
        ``DPOOutput``: scalar loss (differentiable w.r.t. hidden, weight, bias), ``seq_logps`` (the ``[2B]`` sequence
        log-probs) and the metrics of the functional loss: ``rewards/{chosen,rejected,margins,accuracies}``,
        ``logps/{chosen,rejected}``, ``nll_loss`` (with an NLL term), ``log_odds_ratio``, ``log_odds_chosen`` (ORPO),
        plus TRL's ``logits/{chosen,rejected}`` (mean over active tokens and the vocabulary of logits / temperature,
        without forming them).
    """
    options = DPOOptions.pick(locals())  # first: locals() are the arguments
    check_choice("strategy", strategy, STRATEGIES)
    opts = dict(temperature=float(temperature), ignore_index=int(ignore_index))
    head = (ref_hidden, ref_weight, ref_bias)
    check_fused_args(hidden, weight, targets, bias, mask, cu_seqlens, head, ref_logps=(ref_logps, "float"))
    layout = make_layout(hidden, weight, targets, bias, mask=mask, cu_seqlens=cu_seqlens, **opts)
    _check_batch(layout, options, ref_logps, *head)
    pair_loss = _PairLoss.of(layout, _reference_seq_logps(layout, ref_logps, *head, opts), options)
    num_pairs = layout.num_seqs // 2
    pairs = torch.arange(num_pairs, device=layout.seq_ids.device)
    pair_loss(torch.zeros(num_pairs, 2, device=pairs.device), pairs)  # checks the lengths before any matmul
    needs = grads_needed(hidden, weight, bias)
    stats, grads = _stats_and_grads(layout, weight, bias, pair_loss, needs, strategy, opts)
    with torch.no_grad():
        seq_logps = layout.seq_sum(stats.logp)
        out = float32_output(pair_loss(seq_logps.double().view(2, num_pairs).T, pairs))
        out.metrics.update(_logit_means(logit_sums(layout, weight, bias, temperature), pair_loss.lengths))
    loss = attach_grads(out.loss, layout, hidden, weight, bias, grads) if any(needs) else out.loss
    return DPOOutput(loss, out.metrics, seq_logps=seq_logps.float())


def _stats_and_grads(layout, weight, bias, pair_loss: _PairLoss, needs, strategy: str, opts: dict):
    """Token stats and, when any input needs one, the gradients (pair b = sequences (b, B + b); ``strategy``)."""
    if not any(needs):
        return forward_stats(layout, weight, bias, with_entropy=False, **opts), None
    num_pairs = layout.num_seqs // 2
    pairs = torch.arange(num_pairs, device=layout.seq_ids.device)
    units = torch.stack((pairs, pairs + num_pairs), dim=1)

    def share(seq_logps, idx):  # the pairs' share of the mean over all B pairs
        return pair_loss(seq_logps, idx).loss * (idx.numel() / num_pairs)

    strategy = sequence_strategy(layout, weight, units, strategy)
    return sequence_loss_grads(
        layout, weight, bias, units=units, unit_loss=share, needs_grad=needs, strategy=strategy, **opts
    )


class FusedLinearDPOLoss(nn.Module):
    """Module form of :func:`fused_linear_dpo_loss`: loss options at construction, tensors in ``forward``.

    Constructor keywords: the fields of :class:`~hotloop.kernels.losses.dpo.DPOOptions` (checked now), plus
    ``temperature``, ``ignore_index`` and ``strategy`` (defaults as :func:`fused_linear_dpo_loss`).
    """

    def __init__(self, *, temperature: float = 1.0, ignore_index: int = -100, strategy: str = "auto", **options):
        super().__init__()
        check_choice("strategy", strategy, STRATEGIES)
        self.options = DPOOptions(**options)
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
        mask=None,
        cu_seqlens=None,
        ref_logps=None,
        ref_hidden=None,
        ref_weight=None,
        ref_bias=None,
    ) -> DPOOutput:
        return fused_linear_dpo_loss(
            hidden,
            weight,
            targets,
            bias,
            mask=mask,
            cu_seqlens=cu_seqlens,
            ref_logps=ref_logps,
            ref_hidden=ref_hidden,
            ref_weight=ref_weight,
            ref_bias=ref_bias,
            temperature=self.temperature,
            ignore_index=self.ignore_index,
            strategy=self.strategy,
            **asdict(self.options),
        )


def reference_fused_linear_dpo_loss(
    hidden,
    weight,
    targets,
    bias=None,
    *,
    mask=None,
    cu_seqlens=None,
    ref_logps=None,
    ref_hidden=None,
    ref_weight=None,
    ref_bias=None,
    beta=DPOOptions.beta,
    loss_type=DPOOptions.loss_type,
    nll_coef=DPOOptions.nll_coef,
    reference_free=DPOOptions.reference_free,
    temperature=1.0,
    ignore_index=-100,
    strategy="auto",
    **options,
) -> LossOutput:
    """Float64 reference: materialized logits → log_softmax → padded sums → the functional loss (autograd)."""

    def seq_logp(h, w, b):
        h_pad, t_pad, _ = reference_padded(h.double(), targets, mask, cu_seqlens, ignore_index)
        logp = reference_fused_linear_logprob(
            h_pad,
            w.double(),
            t_pad,
            None if b is None else b.double(),
            temperature=temperature,
            ignore_index=ignore_index,
        )
        return logp.sum(-1), logp

    seq, logp = seq_logp(hidden, weight, bias)
    m = reference_padded(hidden, targets, mask, cu_seqlens, ignore_index)[2].double()
    half = seq.shape[0] // 2
    lengths = m.sum(-1)
    nll = -logp[:half].sum() / m[:half].sum().clamp_min(1.0)
    kw = dict(chosen_lengths=lengths[:half], rejected_lengths=lengths[half:])
    if loss_type == "orpo":
        out = _dpo.orpo_loss(seq[:half], seq[half:], beta=beta, nll_loss=nll, **kw)
    else:
        refs = {}
        if not reference_free:
            ref = ref_logps.double() if ref_hidden is None else seq_logp(ref_hidden, ref_weight, ref_bias)[0].detach()
            refs = dict(ref_chosen_logps=ref[:half], ref_rejected_logps=ref[half:])
        out = _dpo.dpo_loss(
            seq[:half],
            seq[half:],
            **refs,
            beta=beta,
            loss_type=loss_type,
            nll_coef=nll_coef,
            nll_loss=nll if nll_coef != 0 else None,
            reference_free=reference_free,
            **kw,
            **options,
        )
    with torch.no_grad():
        sums = reference_logit_sums(hidden, weight, bias, targets, mask, cu_seqlens, ignore_index, temperature)
        out.metrics.update(_logit_means(sums, lengths))
    return out
