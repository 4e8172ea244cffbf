"""KL penalty between the policy and a reference, from per-token log-probs.

With ``r = ref_logp - logp`` (log ratio of reference to policy at the sampled token):

- ``k1 = -r`` (= logp - ref_logp): unbiased, high variance, can be negative;
- ``k2 = r² / 2``: biased, low variance;
- ``k3 = exp(r) - r - 1``: unbiased and always ≥ 0 (Schulman, http://joschu.net/blog/kl-approx.html).

All three estimate KL(π ‖ π_ref) under samples from π. No clamps: verl's ±10/±20 clamps and slime's
``low_var_kl`` are not applied here (a caller who wants one clamps ``ref_logp - logp`` itself).
:func:`kl_penalty` runs as one Triton kernel on CUDA (``_kl_penalty_triton``: row sums and d/d logp in one pass);
elsewhere torch ops. ``ref_logp`` is a constant; bf16/fp16 inputs are computed in float32.
Memory: a few ``[B, T]`` temporaries (kernel: one float32 ``[B, T]`` gradient).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._dispatch import use_triton
from ..options import DEFAULT_KL_ESTIMATOR as DEFAULT_ESTIMATOR
from ..options import KL_ESTIMATORS as ESTIMATORS
from ._checks import as_mask, check_aux, check_choice, check_mask, check_tensor
from .segments import unpack

__all__ = ["DEFAULT_ESTIMATOR", "ESTIMATORS", "kl_penalty", "kl_per_token", "reference_kl_per_token"]


def kl_per_token(logp: Tensor, *, ref_logp: Tensor, kl_estimator: str = DEFAULT_ESTIMATOR) -> Tensor:
    """Per-token KL estimate.

    Args:
        logp: policy log-probs, any shape (e.g. ``[B, T]``).
        ref_logp: reference log-probs, same shape.
        kl_estimator: ``"k1"``, ``"k2"`` or ``"k3"``.

    Returns:
        Tensor of ``logp``'s shape.
    """
    check_choice("kl_estimator", kl_estimator, ESTIMATORS)
    check_tensor("ref_logp", ref_logp, tuple(logp.shape))
    return _kl(logp, ref_logp, kl_estimator)


def _kl(logp: Tensor, ref_logp: Tensor, kl_estimator: str) -> Tensor:
    r = ref_logp - logp
    if kl_estimator == "k1":
        return -r
    if kl_estimator == "k2":
        return 0.5 * r * r
    return r.exp() - r - 1.0


def kl_penalty(
    logp: Tensor,
    mask: Tensor,
    *,
    ref_logp: Tensor,
    kl_estimator: str = DEFAULT_ESTIMATOR,
    cu_seqlens: Tensor | None = None,
) -> Tensor:
    """Mean of the per-token KL estimate over masked tokens (0 when the mask is empty).

    Args:
        logp: ``[B, T]`` policy log-probs.
        mask: ``[B, T]`` bool or 0/1.
        ref_logp: ``[B, T]`` reference log-probs (a constant).
        kl_estimator: ``"k1"``, ``"k2"`` or ``"k3"``.
        cu_seqlens: ``[B + 1]`` int32/int64 boundaries of a packed batch (the three tensors ``[N]``), or None.

    Returns:
        0-d tensor (a penalty term, not a ``LossOutput``): float32, or float64 for float64 input.
    """
    check_choice("kl_estimator", kl_estimator, ESTIMATORS)
    check_aux(
        "logp",
        logp,
        logp=(logp, "float"),
        ref_logp=(ref_logp, "float"),
        mask=(mask, "mask"),
        cu_seqlens=(cu_seqlens, "mask"),
    )
    if cu_seqlens is not None:
        logp, ref_logp, mask = unpack(cu_seqlens, ("logp", "ref_logp", "mask"), logp, ref_logp, mask)
    check_tensor("logp", logp, ndim=2)
    check_tensor("ref_logp", ref_logp, tuple(logp.shape))
    check_mask(mask, logp)
    if use_triton(logp.device) and logp.dtype != torch.float64:
        from ._kl_penalty_triton import KLPenaltyFunction

        return KLPenaltyFunction.apply(logp, ref_logp, as_mask(mask, logp), kl_estimator)
    dt = torch.float64 if logp.dtype == torch.float64 else torch.float32
    kl = _kl(logp.to(dt), ref_logp.detach().to(dt), kl_estimator)
    m = as_mask(mask, kl)
    return (kl * m).sum() / m.sum().clamp_min(1.0)


def reference_kl_per_token(logp: Tensor, ref_logp: Tensor, kl_estimator: str) -> Tensor:
    """Float64 reference for :func:`kl_per_token`."""
    lp = logp.double()
    rf = ref_logp.double()
    return {"k1": lp - rf, "k2": 0.5 * (lp - rf) ** 2, "k3": (rf - lp).exp() - (rf - lp) - 1}[kl_estimator]
