"""Pairwise preference losses on sequence log-probs: DPO and its variants, SimPO, CPO, RPO, ORPO.

Inputs are per-pair sequence log-probs ``[B]`` (sums over completion tokens) of the policy and, unless
``reference_free``, of the reference. With ``ρ_c = logp_c − ref_c``, ``ρ_r = logp_r − ref_r`` (divided by the
completion lengths when length-normalized) and ``z = β(ρ_c − ρ_r) − γ``, the per-pair losses are those of
Liger-Kernel 0.8.5 ``LigerFusedLinearDPOFunction.preference_loss_fn`` (and TRL's ``DPOTrainer``):

- ``sigmoid`` (DPO, https://arxiv.org/abs/2305.18290): ``−(1−ε) logσ(z) − ε logσ(−z)`` (cDPO smoothing ε;
  Liger 0.8.5's DPO ignores ε here, TRL and Liger's CPO/SimPO apply it — we apply it);
- ``hinge`` (SLiC): ``relu(1 − z)``;  ``ipo`` (https://arxiv.org/abs/2310.12036): ``(ρ_c − ρ_r − 1/(2β))²``;
  length-averaged log-ratios by default (TRL's IPO; lengths required), the paper's sums with
  ``length_normalize=False`` (Liger lacks ipo);
- ``exo_pair`` (https://arxiv.org/abs/2402.00856): ``σ(z)(logσ(z) − log(1−ε)) + σ(−z)(logσ(−z) − log ε)``, ε > 0;
- ``nca_pair``: ``−logσ(βρ_c) − ½logσ(−βρ_c) − ½logσ(−βρ_r)``;
- ``robust``: ``[−(1−ε)logσ(z) + ε logσ(−z)] / (1 − 2ε)``, 0 ≤ ε < ½;
- ``bco_pair``: ``−logσ(βρ_c) − logσ(−βρ_r)``;  ``sppo_hard``: ``(ρ_c − 1/(2β))² + (ρ_r + 1/(2β))²``;
- ``apo_zero``: ``1 − σ(βρ_c) + σ(βρ_r)``;  ``apo_down``: ``σ(βρ_c) + 1 − σ(z)``
  (https://arxiv.org/abs/2408.06266);
- ``discopop`` (https://arxiv.org/abs/2406.08414): ``−logσ(z)(1 − σ(z/τ)) + exp(−z) σ(z/τ)``.

Every type needs the reference log-probs unless ``reference_free=True`` (then ``ref = 0``, as Liger's
default ``ref=None``). SimPO (https://arxiv.org/abs/2405.14734) = ``reference_free, length_normalize,
gamma``; CPO (https://arxiv.org/abs/2401.08417) = ``reference_free`` sigmoid plus ``nll_loss`` with
``nll_coef``; RPO (https://arxiv.org/abs/2404.19733) = any type plus ``nll_coef · mean(nll_loss)``.
The loss is the mean over pairs (Liger divides the sum by ``B``). bf16/fp16 inputs are computed in float32.
Eager PyTorch on every device: the inputs are ``[B]``-sized, so a fused kernel would save nothing but launches.
Memory: a few ``[B]`` temporaries.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from hotloop._errors import expected, require

from ..options import DPO_LOSS_TYPES as LOSS_TYPES
from ..options import DPOOptions
from ._checks import check_aux, check_tensor, mean_or_zero
from .output import LossOutput

__all__ = ["LOSS_TYPES", "DPOOptions", "dpo_loss", "orpo_loss"]


def _log_sigmoid(x: Tensor) -> Tensor:
    """log σ(x) as −softplus(−x): ATen's CPU ``log_sigmoid`` splits even a [B] tensor across threads (grain size 1),
    and waking the sleeping OpenMP pool after the big GEMMs costs milliseconds on a busy machine."""
    return -F.softplus(-x)


def _pair_losses(rho_c: Tensor, rho_r: Tensor, loss_type: str, beta: float, eps: float, gamma: float, tau: float):
    z = beta * (rho_c - rho_r) - gamma
    if loss_type == "sigmoid":
        return -(1 - eps) * _log_sigmoid(z) - eps * _log_sigmoid(-z)
    if loss_type == "hinge":
        return torch.relu(1 - z)
    if loss_type == "ipo":
        return (rho_c - rho_r - 1 / (2 * beta)) ** 2
    if loss_type == "exo_pair":
        log_pw = math.log1p(-eps)
        log_pl = math.log(eps)
        return torch.sigmoid(z) * (_log_sigmoid(z) - log_pw) + torch.sigmoid(-z) * (_log_sigmoid(-z) - log_pl)
    if loss_type == "nca_pair":
        wc = beta * rho_c
        wr = beta * rho_r
        return -_log_sigmoid(wc) - 0.5 * _log_sigmoid(-wc) - 0.5 * _log_sigmoid(-wr)
    if loss_type == "robust":
        return (-(1 - eps) * _log_sigmoid(z) + eps * _log_sigmoid(-z)) / (1 - 2 * eps)
    if loss_type == "bco_pair":
        return -_log_sigmoid(beta * rho_c) - _log_sigmoid(-beta * rho_r)
    if loss_type == "sppo_hard":
        return (rho_c - 0.5 / beta) ** 2 + (rho_r + 0.5 / beta) ** 2
    if loss_type == "apo_zero":
        return 1 - torch.sigmoid(beta * rho_c) + torch.sigmoid(beta * rho_r)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * rho_c) + 1 - torch.sigmoid(z)
    mod = torch.sigmoid(z / tau)  # discopop
    return -_log_sigmoid(z) * (1 - mod) + torch.exp(-z) * mod


def _upcast(*tensors: Tensor | None) -> list[Tensor | None]:
    """The tensors in float32 (float64 when any is float64): ``[B]``-sized math costs nothing at full precision."""
    dt = torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32
    return [None if t is None else t.to(dt) for t in tensors]


def _check_pairs(names: tuple[str, ...], tensors: tuple, n: int) -> None:
    for name, t in zip(names, tensors):
        if t is not None:
            check_tensor(name, t, (n,))


def dpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    *,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    nll_loss: Tensor | None = None,
    beta: float = DPOOptions.beta,
    loss_type: str = DPOOptions.loss_type,
    label_smoothing: float = DPOOptions.label_smoothing,
    length_normalize: bool | None = DPOOptions.length_normalize,
    gamma: float = DPOOptions.gamma,
    nll_coef: float = DPOOptions.nll_coef,
    reference_free: bool = DPOOptions.reference_free,
    discopop_tau: float = DPOOptions.discopop_tau,
) -> LossOutput:
    """DPO-family loss averaged over ``B`` pairs.

    Args:
        chosen_logps, rejected_logps: ``[B]`` policy sequence log-probs (sums over completion tokens).
        ref_chosen_logps, ref_rejected_logps: ``[B]`` reference log-probs; required unless ``reference_free``.
        chosen_lengths, rejected_lengths: ``[B]`` completion token counts (for length normalization and ipo).
        nll_loss: ``[B]`` or 0-d NLL of the chosen completions (RPO/CPO); its mean times ``nll_coef`` is added.
        beta, loss_type, label_smoothing, length_normalize, gamma, nll_coef, reference_free, discopop_tau: the
            fields of :class:`DPOOptions` (``loss_type="orpo"``: use :func:`orpo_loss`).

    Returns:
        ``LossOutput``; metrics ``rewards/{chosen,rejected,margins,accuracies}``, ``logps/{chosen,rejected}``
        (and ``nll_loss`` when given).
    """
    o = DPOOptions.pick(locals())  # first: locals() are the arguments
    require(o.loss_type != "orpo", "loss_type", f"one of {LOSS_TYPES} (ORPO: orpo_loss)", repr(o.loss_type))
    refs = (ref_chosen_logps, ref_rejected_logps)
    lengths = (chosen_lengths, rejected_lengths)
    _check_pair_inputs(chosen_logps, rejected_logps, refs, lengths, o)
    chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, nll_loss = _upcast(
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, nll_loss
    )
    rho_c = chosen_logps if o.reference_free else chosen_logps - ref_chosen_logps
    rho_r = rejected_logps if o.reference_free else rejected_logps - ref_rejected_logps
    if o.normalizes_length():
        rho_c = rho_c / chosen_lengths.to(rho_c.dtype).clamp_min(1.0)
        rho_r = rho_r / rejected_lengths.to(rho_r.dtype).clamp_min(1.0)
    losses = _pair_losses(rho_c, rho_r, o.loss_type, o.beta, o.label_smoothing, o.gamma, o.discopop_tau)
    loss = mean_or_zero(losses)
    if nll_loss is not None:
        loss = loss + o.nll_coef * mean_or_zero(nll_loss)
    return LossOutput(loss, _pair_metrics(o.beta * rho_c, o.beta * rho_r, chosen_logps, rejected_logps, nll_loss))


def _check_pair_inputs(chosen_logps, rejected_logps, refs: tuple, lengths: tuple, o: DPOOptions) -> None:
    """Devices, dtypes and ``[B]`` shapes of :func:`dpo_loss`'s tensors, and what its options need of them."""
    check_tensor("chosen_logps", chosen_logps, ndim=1)
    check_aux(
        "chosen_logps",
        chosen_logps,
        chosen_logps=(chosen_logps, "float"),
        rejected_logps=(rejected_logps, "float"),
        ref_chosen_logps=(refs[0], "float"),
        ref_rejected_logps=(refs[1], "float"),
        chosen_lengths=(lengths[0], "mask"),
        rejected_lengths=(lengths[1], "mask"),
    )
    names = ("rejected_logps", "ref_chosen_logps", "ref_rejected_logps", "chosen_lengths", "rejected_lengths")
    _check_pairs(names, (rejected_logps, *refs, *lengths), chosen_logps.shape[0])
    if o.normalizes_length() and None in lengths:
        raise ValueError(
            expected(
                "chosen_lengths, rejected_lengths",
                f"[B] completion token counts (length normalization, loss_type={o.loss_type!r})",
                "None",
            )
        )
    if o.reference_free and any(r is not None for r in refs):
        raise ValueError(expected("ref_chosen_logps, ref_rejected_logps", "None with reference_free=True", "tensors"))
    if not o.reference_free and any(r is None for r in refs):
        raise ValueError(
            expected(
                "ref_chosen_logps, ref_rejected_logps",
                f"[B] reference log-probs for loss_type={o.loss_type!r} (or reference_free=True)",
                "None",
            )
        )


@torch.no_grad()
def _pair_metrics(rw_c: Tensor, rw_r: Tensor, logp_c: Tensor, logp_r: Tensor, nll: Tensor | None) -> dict:
    out = {
        "rewards/chosen": mean_or_zero(rw_c),
        "rewards/rejected": mean_or_zero(rw_r),
        "rewards/margins": mean_or_zero(rw_c - rw_r),
        "rewards/accuracies": mean_or_zero((rw_c > rw_r).float()),
        "logps/chosen": mean_or_zero(logp_c),
        "logps/rejected": mean_or_zero(logp_r),
    }
    if nll is not None:
        out["nll_loss"] = mean_or_zero(nll)
    return {k: v.detach() for k, v in out.items()}


def orpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    *,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    nll_loss: Tensor,
    beta: float = DPOOptions.beta,
) -> LossOutput:
    """ORPO (https://arxiv.org/abs/2403.07691): ``mean(nll) − β · mean logσ(log odds_c − log odds_r)``.

    ``log odds(y) = p̄ − log(1 − exp(p̄))`` with ``p̄`` the average token log-prob (``logps / lengths``), as Liger's
    ``LigerFusedLinearORPOFunction`` and TRL's ``ORPOTrainer``.

    Args:
        chosen_logps, rejected_logps: ``[B]`` summed log-probs.
        chosen_lengths, rejected_lengths: ``[B]`` completion token counts.
        nll_loss: ``[B]`` or 0-d NLL of the chosen completions.
        beta: weight λ of the odds-ratio term (:class:`DPOOptions` ``beta``, checked there).

    Returns:
        ``LossOutput``; metrics as :func:`dpo_loss` plus ``log_odds_ratio``, ``log_odds_chosen``, ``nll_loss``.
    """
    DPOOptions(beta=beta, loss_type="orpo")
    check_tensor("chosen_logps", chosen_logps, ndim=1)
    names = ("rejected_logps", "chosen_lengths", "rejected_lengths")
    _check_pairs(names, (rejected_logps, chosen_lengths, rejected_lengths), chosen_logps.shape[0])
    chosen_logps, rejected_logps, nll_loss = _upcast(chosen_logps, rejected_logps, nll_loss)
    avg_c = chosen_logps / chosen_lengths.to(chosen_logps.dtype).clamp_min(1.0)
    avg_r = rejected_logps / rejected_lengths.to(rejected_logps.dtype).clamp_min(1.0)
    log_odds = (avg_c - avg_r) - (torch.log1p(-torch.exp(avg_c)) - torch.log1p(-torch.exp(avg_r)))
    ratio = _log_sigmoid(log_odds)
    loss = nll_loss.mean() - beta * ratio.mean()
    metrics = _pair_metrics(beta * avg_c, beta * avg_r, chosen_logps, rejected_logps, nll_loss)
    metrics["log_odds_ratio"] = ratio.detach().mean()
    metrics["log_odds_chosen"] = log_odds.detach().mean()
    return LossOutput(loss, metrics)
