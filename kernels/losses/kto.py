"""KTO (Ethayarajh et al. 2024, https://arxiv.org/abs/2402.01306) on sequence log-probs of unpaired samples.

With ``ρ = logp − ref_logp`` and the reference point ``z₀`` (a detached estimate of KL(π ‖ π_ref)):

    desirable   (label True):  λ_D · (1 − σ(β(ρ − z₀)))
    undesirable (label False): λ_U · (1 − σ(β(z₀ − ρ)))

averaged over all ``B`` samples, as TRL's ``KTOTrainer`` (``nanmean`` of the concatenated weighted losses)
and Liger 0.8.5 ``LigerFusedLinearKTOFunction.preference_loss_fn`` (sum / B, no weights: λ_D = λ_U = 1).

With ``length_normalize`` both log-probs are divided by the completion lengths first (``ρ = (logp − ref_logp) / |y|``,
Liger's ``average_log_prob``). ``reference_point=None`` uses ``z₀ = 0``, like Liger's ``kl=None``. TRL estimates ``z₀``
from mismatched
(prompt, completion) pairs of the batch: :func:`kto_kl_estimate` computes that estimate,
``mean(logp_mismatch − ref_logp_mismatch)`` clamped at 0 and detached (TRL also all-gathers it across
ranks before averaging; do that before calling when training data-parallel).
"""

from __future__ import annotations

import torch
from torch import Tensor

from hotloop._errors import expected

from ..options import KTOOptions
from ._checks import check_aux, check_tensor, mean_or_zero
from .output import LossOutput

__all__ = ["KTOOptions", "kto_kl_estimate", "kto_loss"]


def kto_kl_estimate(kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """TRL's KTO reference point from mismatched pairs: ``max(mean(kl_logps − ref_kl_logps), 0)``, detached.

    Args:
        kl_logps, ref_kl_logps: ``[M]`` policy / reference sequence log-probs of mismatched completions.

    Returns:
        0-d tensor.
    """
    check_tensor("kl_logps", kl_logps, ndim=1)
    check_tensor("ref_kl_logps", ref_kl_logps, tuple(kl_logps.shape))
    return (kl_logps - ref_kl_logps).mean().clamp_min(0).detach()


def kto_loss(
    logps: Tensor,
    labels: Tensor,
    *,
    ref_logps: Tensor,
    lengths: Tensor | None = None,
    reference_point: Tensor | float | None = None,
    beta: float = KTOOptions.beta,
    desirable_weight: float = KTOOptions.desirable_weight,
    undesirable_weight: float = KTOOptions.undesirable_weight,
    length_normalize: bool = KTOOptions.length_normalize,
) -> LossOutput:
    """KTO loss averaged over ``B`` samples.

    Args:
        logps: ``[B]`` policy sequence log-probs.  labels: ``[B]`` bool, True for desirable completions.
        ref_logps: ``[B]`` reference sequence log-probs.
        lengths: ``[B]`` completion token counts (needed with ``length_normalize``).
        reference_point: ``z₀`` (0-d tensor or float, treated as a constant); None means 0.
        beta, desirable_weight, undesirable_weight, length_normalize: the fields of :class:`KTOOptions`.

    Returns:
        ``LossOutput``; metrics ``kl``, ``rewards/{chosen,rejected}_sum``, ``logps/{chosen,rejected}_sum`` (of the
        means with ``length_normalize``), ``count/{chosen,rejected}`` as TRL logs them.
    """
    o = KTOOptions.pick(locals())  # first: locals() are the arguments
    check_tensor("logps", logps, ndim=1)
    check_aux(
        "logps",
        logps,
        logps=(logps, "float"),
        ref_logps=(ref_logps, "float"),
        labels=(labels, "bool"),
        lengths=(lengths, "mask"),
    )
    check_tensor("ref_logps", ref_logps, tuple(logps.shape))
    check_tensor("labels", labels, tuple(logps.shape))
    if o.length_normalize:
        if lengths is None:
            raise ValueError(expected("lengths", "[B] completion token counts (length_normalize=True)", None))
        check_tensor("lengths", lengths, tuple(logps.shape))
        scale = lengths.to(logps.dtype).clamp_min(1.0)
        logps = logps / scale
        ref_logps = ref_logps / scale
    z0 = 0.0 if reference_point is None else reference_point
    z0 = z0.detach() if isinstance(z0, Tensor) else z0
    rho = logps - ref_logps
    sign = torch.full_like(rho, -1.0).masked_fill(labels, 1.0)
    weight = torch.full_like(rho, o.undesirable_weight).masked_fill(labels, o.desirable_weight)
    loss = mean_or_zero(weight * (1 - torch.sigmoid(o.beta * (rho - z0) * sign)))
    with torch.no_grad():
        rewards = o.beta * rho
        lf = labels.to(rho.dtype)
        metrics = {
            "kl": torch.as_tensor(z0, dtype=torch.float32, device=logps.device),
            "rewards/chosen_sum": (rewards * lf).sum(),
            "rewards/rejected_sum": (rewards * (1 - lf)).sum(),
            "logps/chosen_sum": (logps * lf).sum(),
            "logps/rejected_sum": (logps * (1 - lf)).sum(),
            "count/chosen": lf.sum(),
            "count/rejected": (1 - lf).sum(),
        }
    return LossOutput(loss, metrics)
