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

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._fused_linear_common import (
    STRATEGIES, attach_grads, check_reference, float32_output, forward_stats, grads_needed, logit_sums, make_layout,
    reference_head_logp, reference_logit_sums, reference_padded, sequence_loss_grads, sequence_strategy,
)  # fmt: skip
from .fused_linear_logprob import reference_fused_linear_logprob
from .losses import dpo as _dpo
from .losses._checks import check_aux, check_choice, check_tensor
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
    loss_type: str
    beta: float
    nll_coef: float
    options: dict  # the remaining keyword options of dpo_loss

    @classmethod
    def of(cls, layout, ref: Tensor | None, **fields) -> _PairLoss:
        """The pair loss of a checked 2B-sequence layout (lengths and NLL scale from its active tokens)."""
        lengths = layout.seq_sum(torch.ones_like(layout.seq_ids, dtype=torch.float32))
        num_pairs = layout.num_seqs // 2
        nll_scale = num_pairs / max(float(lengths[:num_pairs].sum()), 1.0)
        return cls(ref=ref, lengths=lengths, nll_scale=nll_scale, **fields)

    def __call__(self, seq_logps: Tensor, pairs: Tensor) -> LossOutput:
        num_pairs = self.lengths.numel() // 2
        s_c, s_r = seq_logps[:, 0], seq_logps[:, 1]
        lengths = dict(chosen_lengths=self.lengths[pairs], rejected_lengths=self.lengths[pairs + num_pairs])
        nll = -s_c * self.nll_scale
        if self.loss_type == "orpo":
            return _dpo.orpo_loss(s_c, s_r, beta=self.beta, nll_loss=nll, **lengths)
        refs = (None, None) if self.ref is None else (self.ref[pairs], self.ref[pairs + num_pairs])
        return _dpo.dpo_loss(s_c, s_r, *refs, beta=self.beta, loss_type=self.loss_type, **lengths,
                             nll_loss=nll if self.nll_coef != 0 else None, nll_coef=self.nll_coef,
                             reference_free=self.ref is None, **self.options)  # fmt: skip


def _check_batch(layout, loss_type, nll_coef, reference_free, ref_logps, ref_hidden, ref_weight, ref_bias) -> None:
    if layout.num_seqs % 2:
        raise ValueError(f"a DPO batch needs 2B sequences (B chosen, then B rejected), got {layout.num_seqs}")
    if loss_type == "orpo" and (nll_coef != 0 or reference_free):
        raise ValueError(f"loss_type='orpo' has its own NLL term and no reference; got nll_coef={nll_coef}, "
                         f"reference_free={reference_free}")  # fmt: skip
    check_reference("ref_logps", ref_logps, ref_hidden, ref_weight, ref_bias,
                    needed=not (reference_free or loss_type == "orpo"),
                    why=f"loss_type={loss_type!r} with reference_free={reference_free}")  # fmt: skip


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
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    length_normalize: bool | None = None,
    gamma: float = 0.0,
    nll_coef: float = 0.0,
    reference_free: bool = False,
    discopop_tau: float = 0.05,
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
        beta, loss_type, label_smoothing, length_normalize, gamma, nll_coef, reference_free, discopop_tau:
            as :func:`~hotloop.kernels.losses.dpo.dpo_loss`; ``loss_type="orpo"``: ORPO with λ = ``beta``
            (no reference, NLL weight 1).
        temperature: logits are divided by it.  strategy: ``"auto"`` | ``"grouped"`` | ``"two_pass"``.

    Returns:
        ``LossOutput``: scalar loss (differentiable w.r.t. hidden, weight, bias) and the metrics of the functional
        loss: ``rewards/{chosen,rejected,margins,accuracies}``, ``logps/{chosen,rejected}``, ``nll_loss``
        (with an NLL term), ``log_odds_ratio``, ``log_odds_chosen`` (ORPO), plus TRL's ``logits/{chosen,rejected}``
        (mean over active tokens and the vocabulary of logits / temperature, without forming them); a
        ``DPOOutput`` whose ``seq_logps`` are the ``[2B]`` sequence log-probs behind them.
    """
    check_choice("loss_type", loss_type, LOSS_TYPES)
    check_choice("strategy", strategy, STRATEGIES)
    opts = dict(temperature=float(temperature), ignore_index=int(ignore_index))
    check_aux("hidden", hidden, weight=(weight, "float"), bias=(bias, "float"), targets=(targets, "int"),
              mask=(mask, "mask"), cu_seqlens=(cu_seqlens, "mask"), ref_logps=(ref_logps, "float"),
              ref_hidden=(ref_hidden, "float"), ref_weight=(ref_weight, "float"), ref_bias=(ref_bias, "float"))
    layout = make_layout(hidden, weight, targets, bias, mask=mask, cu_seqlens=cu_seqlens, **opts)
    _check_batch(layout, loss_type, nll_coef, reference_free, ref_logps, ref_hidden, ref_weight, ref_bias)
    options = {} if loss_type == "orpo" else dict(label_smoothing=label_smoothing, length_normalize=length_normalize,
                                                   gamma=gamma, discopop_tau=discopop_tau)  # fmt: skip
    pair_loss = _PairLoss.of(layout, _reference_seq_logps(layout, ref_logps, ref_hidden, ref_weight, ref_bias, opts),
                             loss_type=loss_type, beta=beta, nll_coef=nll_coef, options=options)  # fmt: skip
    num_pairs = layout.num_seqs // 2
    pairs = torch.arange(num_pairs, device=layout.seq_ids.device)
    pair_loss(torch.zeros(num_pairs, 2, device=pairs.device), pairs)  # checks every option before any matmul
    needs = grads_needed(hidden, weight, bias)
    if any(needs):
        units = torch.stack((pairs, pairs + num_pairs), dim=1)  # pair b = sequences (b, B + b)

        def share(seq_logps, idx):  # the pairs' share of the mean over all B pairs
            return pair_loss(seq_logps, idx).loss * (idx.numel() / num_pairs)

        stats, grads = sequence_loss_grads(layout, weight, bias, units=units, unit_loss=share, needs_grad=needs,
                                           strategy=sequence_strategy(layout, weight, units, strategy), **opts)
    else:
        stats = forward_stats(layout, weight, bias, with_entropy=False, **opts)
    with torch.no_grad():
        seq_logps = layout.seq_sum(stats.logp)
        out = float32_output(pair_loss(seq_logps.double().view(2, num_pairs).T, pairs))
        out.metrics.update(_logit_means(logit_sums(layout, weight, bias, temperature), pair_loss.lengths))
    loss = attach_grads(out.loss, layout, hidden, weight, bias, grads) if any(needs) else out.loss
    return DPOOutput(loss, out.metrics, seq_logps=seq_logps.float())


class FusedLinearDPOLoss(nn.Module):
    """Module form of :func:`fused_linear_dpo_loss`: loss options at construction, tensors in ``forward``."""

    def __init__(self, *, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 length_normalize: bool | None = None, gamma: float = 0.0, nll_coef: float = 0.0,
                 reference_free: bool = False, discopop_tau: float = 0.05, temperature: float = 1.0,
                 ignore_index: int = -100, strategy: str = "auto"):  # fmt: skip
        super().__init__()
        check_choice("loss_type", loss_type, LOSS_TYPES)
        check_choice("strategy", strategy, STRATEGIES)
        self.options = dict(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                            length_normalize=length_normalize, gamma=gamma, nll_coef=nll_coef,
                            reference_free=reference_free, discopop_tau=discopop_tau, temperature=temperature,
                            ignore_index=ignore_index, strategy=strategy)  # fmt: skip

    def forward(self, hidden, weight, targets, bias=None, *, mask=None, cu_seqlens=None, ref_logps=None,
                ref_hidden=None, ref_weight=None, ref_bias=None) -> DPOOutput:  # fmt: skip
        return fused_linear_dpo_loss(hidden, weight, targets, bias, mask=mask, cu_seqlens=cu_seqlens,
                                     ref_logps=ref_logps, ref_hidden=ref_hidden, ref_weight=ref_weight,
                                     ref_bias=ref_bias, **self.options)  # fmt: skip


def reference_fused_linear_dpo_loss(hidden, weight, targets, bias=None, *, mask=None, cu_seqlens=None, ref_logps=None,
                                    ref_hidden=None, ref_weight=None, ref_bias=None, beta=0.1, loss_type="sigmoid",
                                    nll_coef=0.0, reference_free=False, temperature=1.0, ignore_index=-100,
                                    strategy="auto", **options) -> LossOutput:  # fmt: skip
    """Float64 reference: materialized logits → log_softmax → padded sums → the functional loss (autograd)."""
    def seq_logp(h, w, b):
        h_pad, t_pad, _ = reference_padded(h.double(), targets, mask, cu_seqlens, ignore_index)
        logp = reference_fused_linear_logprob(h_pad, w.double(), t_pad, None if b is None else b.double(),
                                              temperature=temperature, ignore_index=ignore_index)  # fmt: skip
        return logp.sum(-1), logp

    seq, logp = seq_logp(hidden, weight, bias)
    m = reference_padded(hidden, targets, mask, cu_seqlens, ignore_index)[2].double()
    half, lengths = seq.shape[0] // 2, m.sum(-1)
    nll = -logp[:half].sum() / m[:half].sum().clamp_min(1.0)
    kw = dict(chosen_lengths=lengths[:half], rejected_lengths=lengths[half:])
    if loss_type == "orpo":
        out = _dpo.orpo_loss(seq[:half], seq[half:], beta=beta, nll_loss=nll, **kw)
    else:
        refs = (None, None)
        if not reference_free:
            ref = ref_logps.double() if ref_hidden is None else seq_logp(ref_hidden, ref_weight, ref_bias)[0].detach()
            refs = (ref[:half], ref[half:])
        out = _dpo.dpo_loss(seq[:half], seq[half:], *refs, beta=beta, loss_type=loss_type, nll_coef=nll_coef,
                            nll_loss=nll if nll_coef != 0 else None, reference_free=reference_free, **kw, **options)
    with torch.no_grad():
        sums = reference_logit_sums(hidden, weight, bias, targets, mask, cu_seqlens, ignore_index, temperature)
        out.metrics.update(_logit_means(sums, lengths))
    return out
