"""GRPO-family clipped policy losses on per-token log-probs (GRPO, DAPO, Dr. GRPO, BNPO, GSPO, CISPO, SAPO, LUSPO,
VESPO).

Per token, with ``w = exp(logp − old_logp)`` (token level) or ``exp(mean_t m·(logp − old_logp))`` per
sequence (``importance_sampling_level="sequence"``, GSPO https://arxiv.org/abs/2507.18071) and advantage ``A``:

- clipped family (grpo, bnpo, dr_grpo, dapo, luspo): ``−min(min(w, δ)·A, clip(w, 1−ε_low, 1+ε_high)·A)``
  (``δ``: INTELLECT-2 two-sided clip, https://arxiv.org/abs/2505.07291, None = off);
- cispo (MiniMax-M1): ``−sg(min(w, ε_high))·A·logp`` (``epsilon_high`` is the absolute cap here);
- sapo (https://arxiv.org/abs/2511.20347): ``−A·σ(τ(w − 1))·4/τ``, ``τ = τ_pos`` if ``A > 0`` else ``τ_neg``;
- vespo: ``−sg(φ)·A·logp`` with Liger/TRL's ``get_gamma_weights`` (its ±20 and log 1e-8 clamps included).

Then ``× ρ_s`` (sampler correction, ``ρ_s = min(exp(old_logp − sampler_logp), cap)`` detached, TIS,
https://fengyao.notion.site/off-policy-rl; folded into φ for vespo), ``+ β·KL`` (``kl_estimator`` k1/k2/k3 from
:mod:`.kl_penalty`, Liger uses k3; ``× w`` with ``use_bias_correction_kl``), ``− entropy_coef·entropy``.
Reductions, as weights ``m · c_b`` on the ``[B, T]`` per-token loss (``loss = Σ weights · per_token_loss``,
``c_b`` from :func:`row_scale`):
grpo/sapo ``m/(B·max(|y_b|,1))``; bnpo ``m/max(Σm,1)``; dr_grpo ``m/(B·max_completion_length)`` (None → T);
dapo/cispo/vespo ``m/max(num_items_in_batch or Σm, 1)``; luspo ``m/B``.

These are Liger-Kernel 0.8.5's ``LigerFusedLinearGRPOFunction.ppo_loss_fn`` definitions, with three deliberate
differences: luspo masks padding and divides by ``B`` (TRL 1.16; Liger's token-level luspo sums padded tokens and
divides by ``B·T`` — equal for sequence-level luspo without KL, TRL's recommended setup); the KL estimator is
selectable; no ``torch.distributed`` all-reduce hides inside the dapo normalizer (pass ``num_items_in_batch``).
``old_logp``, ``ref_logp``, ``sampler_logp`` and ``advantages`` are constants; gradients flow to ``logp`` and
``entropy``. bf16/fp16 inputs are computed in float32.

CUDA path: at ``importance_sampling_level="token"`` every loss type and option (δ, sampler ratio and cap, k1/k2/k3,
bias-corrected KL, entropy bonus) runs as one Triton kernel (``_grpo_triton``) that computes the loss row sums, the
metrics' sums and d loss/d logp in one pass; sequence level (GSPO) and float64 inputs run the torch code below.
Memory: torch path a few ``[B, T]`` float32 temporaries; kernel one float32 ``[B, T]`` gradient.

Fused-linear use (``kernels/fused_linear_grpo.py``): :func:`grpo_per_token` returns ``(per_token_loss, weights)``
for a group of rows; ``weights`` depend only on the mask, so the fused module computes them once for the whole
batch, then per row group calls ``grpo_per_token`` on ``logp.detach().requires_grad_()`` (and entropy likewise),
and takes ``torch.autograd.grad((per_token_loss * weights).sum(), (logp, entropy))`` as ``token_grad``.
Sequence-level ratios and vespo couple the tokens of a row: their row groups must hold whole rows.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from hotloop._errors import expected

from .._dispatch import use_triton
from ..options import CLIPPED, GRPOOptions
from ..options import GRPO_LOSS_TYPES as LOSS_TYPES
from ._checks import as_mask, check_aux, check_choice, check_mask, check_tensor
from .kl_penalty import _kl
from .output import LossOutput
from .segments import unpack

__all__ = ["CLIPPED", "LOSS_TYPES", "GRPOOptions", "grpo_loss", "grpo_per_token", "loss_weights", "row_scale"]


class _Terms(NamedTuple):
    per_token_loss: Tensor  # [B, T]
    is_low: Tensor  # [B, T] bool
    is_high: Tensor  # [B, T] bool
    kl: Tensor | None  # [B, T]


def row_scale(
    counts: Tensor, loss_type: str, t: int, *, max_completion_length: int | None = None, num_items_in_batch=None
) -> Tensor:
    """``[B]`` per-row factors ``c_b`` with ``weights = m · c_b`` for ``loss_type`` (constants; module docstring).

    Args:
        counts: ``[B]`` float ``Σ_t m`` per row.  loss_type: one of ``LOSS_TYPES``.  t: the padded length T.
        max_completion_length: dr_grpo's constant (None → T).  num_items_in_batch: dapo/cispo/vespo normalizer.
    """
    check_choice("loss_type", loss_type, LOSS_TYPES)
    b = counts.shape[0]
    if loss_type in ("grpo", "sapo"):
        return 1.0 / (counts.clamp_min(1.0) * b)
    if loss_type == "dr_grpo":
        return torch.full_like(counts, 1.0 / (b * (t if max_completion_length is None else max_completion_length)))
    if loss_type == "luspo":
        return torch.full_like(counts, 1.0 / b)
    if loss_type == "bnpo" or num_items_in_batch is None:
        total = counts.sum()
    else:
        total = torch.as_tensor(num_items_in_batch, dtype=counts.dtype, device=counts.device)
    return (1.0 / total.clamp_min(1.0)).expand(b)


def loss_weights(
    m: Tensor, loss_type: str, *, max_completion_length: int | None = None, num_items_in_batch=None
) -> Tensor:
    """``[B, T]`` weights ``m · row_scale`` with ``loss = Σ weights · per_token_loss`` for ``loss_type`` (constants).

    Args:
        m: ``[B, T]`` float mask.  loss_type: one of ``LOSS_TYPES``.
        max_completion_length: dr_grpo's constant (None → T).  num_items_in_batch: dapo/cispo/vespo normalizer.
    """
    scale = row_scale(
        m.sum(-1),
        loss_type,
        m.shape[1],
        max_completion_length=max_completion_length,
        num_items_in_batch=num_items_in_batch,
    )
    return m * scale.unsqueeze(-1)


def _pick(cond: Tensor, if_true: float, if_false: float, like: Tensor) -> Tensor:
    """``if_true`` where ``cond`` else ``if_false``, in ``like``'s dtype (``torch.where`` on floats: float32)."""
    return torch.full_like(like, if_false).masked_fill(cond, if_true)


def _gamma_weights(adv: Tensor, log_ratio: Tensor, m: Tensor, is_ratio: Tensor | None, shape: tuple) -> Tensor:
    """VESPO φ per sequence ``[B, 1]``, Liger 0.8.5 ``get_gamma_weights`` (clamps are part of its definition)."""
    k_pos, lam_pos, k_neg, lam_neg = shape
    low = math.log(1e-8)
    seq = (log_ratio.clamp(-20.0, 20.0) * m).sum(-1, keepdim=True)
    if is_ratio is not None:
        seq = seq + is_ratio.log().clamp(low, 20.0).sum(-1, keepdim=True)
    log_w = seq.clamp(low, 20.0)
    nonneg = adv.unsqueeze(-1) >= 0
    k = _pick(nonneg, k_pos, k_neg, seq)
    lam = _pick(nonneg, lam_pos, lam_neg, seq).clamp_min(1e-4)
    return torch.exp(lam + k * log_w - lam * log_w.exp()).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def _policy_term(logp, log_w, adv, loss_type, eps_low, eps_high, delta, sapo_t):
    """Per-token policy loss (before sampler correction / KL) and the low/high clip indicators."""
    a = adv.unsqueeze(-1)
    w = log_w.exp()
    no = torch.zeros_like(w, dtype=torch.bool)
    if loss_type == "cispo":
        return -w.clamp(max=eps_high).detach() * a * logp, no, w > eps_high
    if loss_type == "sapo":
        tau = _pick(a > 0, sapo_t[0], sapo_t[1], w)
        return -torch.sigmoid(tau * (w - 1)) * 4 / tau * a, no, no
    lo = 1 - eps_low
    hi = 1 + eps_high
    w1 = w if delta is None else w.clamp(max=delta)
    return -torch.minimum(w1 * a, w.clamp(lo, hi) * a), w < lo, w > hi


def _terms(lp, old, adv, m, ref, is_ratio, ent, o: GRPOOptions) -> _Terms:
    log_ratio = lp - old
    if o.importance_sampling_level == "sequence":
        log_w = ((log_ratio * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp_min(1.0)).expand_as(lp)
    else:
        log_w = log_ratio
    if o.loss_type == "vespo":
        phi = _gamma_weights(adv, log_ratio.detach(), m, is_ratio, o.vespo_shape)
        ptl = -phi * adv.unsqueeze(-1) * lp
        low = torch.zeros_like(lp, dtype=torch.bool)
        high = low
    else:
        sapo_t = (o.sapo_temperature_pos, o.sapo_temperature_neg)
        ptl, low, high = _policy_term(lp, log_w, adv, o.loss_type, o.epsilon_low, o.epsilon_high, o.delta, sapo_t)
        if is_ratio is not None:
            ptl = ptl * is_ratio
    kl = None
    if o.beta != 0.0:
        kl = _kl(lp, ref, o.kl_estimator)
        kl = kl * log_w.exp() if o.use_bias_correction_kl else kl
        ptl = ptl + o.beta * kl
    if ent is not None and o.entropy_coef != 0.0:
        ptl = ptl - o.entropy_coef * ent
    return _Terms(ptl, low & (adv.unsqueeze(-1) < 0), high & (adv.unsqueeze(-1) > 0), kl)


def _check(logp, old_logp, advantages, mask, ref_logp, sampler_logp, entropy, o: GRPOOptions) -> None:
    """Shapes and the options' tensor requirements (ValueError naming the argument)."""
    check_tensor("logp", logp, ndim=2)
    check_aux(
        "logp",
        logp,
        logp=(logp, "float"),
        old_logp=(old_logp, "float"),
        advantages=(advantages, "float"),
        mask=(mask, "mask"),
        ref_logp=(ref_logp, "float"),
        sampler_logp=(sampler_logp, "float"),
        entropy=(entropy, "float"),
    )
    shape = tuple(logp.shape)
    check_tensor("advantages", advantages, shape[:1])
    check_mask(mask, logp)
    per_token = (("old_logp", old_logp), ("ref_logp", ref_logp), ("sampler_logp", sampler_logp), ("entropy", entropy))
    for name, t in per_token:
        if t is not None:
            check_tensor(name, t, shape)
    if o.beta != 0.0 and ref_logp is None:
        raise ValueError(expected("ref_logp", f"[B, T] reference log-probs (beta={o.beta})", None))
    if o.sampler_is_cap is not None and sampler_logp is None:
        raise ValueError(
            expected("sampler_logp", f"[B, T] sampler log-probs (sampler_is_cap={o.sampler_is_cap})", None)
        )


def _prepare(logp, old_logp, advantages, mask, ref_logp, sampler_logp, entropy, o: GRPOOptions):
    """Checked float32 (float64 stays) inputs; constants detached; the sampler IS ratio."""
    _check(logp, old_logp, advantages, mask, ref_logp, sampler_logp, entropy, o)
    dt = torch.float64 if logp.dtype == torch.float64 else torch.float32
    lp = logp.to(dt)
    old = lp.detach() if old_logp is None else old_logp.detach().to(dt)
    ref = None if ref_logp is None else ref_logp.detach().to(dt)
    is_ratio = None
    if sampler_logp is not None:
        is_ratio = (old - sampler_logp.detach().to(dt)).exp()
        is_ratio = is_ratio if o.sampler_is_cap is None else is_ratio.clamp(max=o.sampler_is_cap)
    ent = None if entropy is None else entropy.to(dt)
    return lp, old, advantages.detach().to(dt), as_mask(mask, lp), ref, is_ratio, ent


def grpo_per_token(
    logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    old_logp: Tensor | None = None,
    ref_logp: Tensor | None = None,
    sampler_logp: Tensor | None = None,
    entropy: Tensor | None = None,
    max_completion_length: int | None = None,
    num_items_in_batch: int | Tensor | None = None,
    options: GRPOOptions,
) -> tuple[Tensor, Tensor]:
    """Per-token GRPO-family loss and its reduction weights: ``loss = (per_token_loss * weights).sum()``.

    Args as :func:`grpo_loss`, its options as one :class:`GRPOOptions`. Always the torch path (autograd gives
    d/d``logp``, d/d``entropy``).

    Returns:
        ``per_token_loss [B, T]`` (float32, or float64 for float64 input) and constant ``weights [B, T]``.
    """
    o = options
    lp, old, adv, m, ref, is_ratio, ent = _prepare(logp, old_logp, advantages, mask, ref_logp, sampler_logp, entropy, o)
    weights = loss_weights(
        m, o.loss_type, max_completion_length=max_completion_length, num_items_in_batch=num_items_in_batch
    )
    return _terms(lp, old, adv, m, ref, is_ratio, ent, o).per_token_loss, weights


def _triton_ok(logp: Tensor, o: GRPOOptions) -> bool:
    return o.importance_sampling_level == "token" and logp.dtype != torch.float64 and use_triton(logp.device)


def grpo_loss(
    logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    old_logp: Tensor | None = None,
    ref_logp: Tensor | None = None,
    sampler_logp: Tensor | None = None,
    entropy: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    max_completion_length: int | None = None,
    num_items_in_batch: int | Tensor | None = None,
    beta: float = GRPOOptions.beta,
    kl_estimator: str = GRPOOptions.kl_estimator,
    epsilon_low: float = GRPOOptions.epsilon_low,
    epsilon_high: float = GRPOOptions.epsilon_high,
    delta: float | None = GRPOOptions.delta,
    loss_type: str = GRPOOptions.loss_type,
    importance_sampling_level: str = GRPOOptions.importance_sampling_level,
    sampler_is_cap: float | None = GRPOOptions.sampler_is_cap,
    entropy_coef: float = GRPOOptions.entropy_coef,
    sapo_temperature_pos: float = GRPOOptions.sapo_temperature_pos,
    sapo_temperature_neg: float = GRPOOptions.sapo_temperature_neg,
    vespo_shape: tuple[float, float, float, float] = GRPOOptions.vespo_shape,
    use_bias_correction_kl: bool = GRPOOptions.use_bias_correction_kl,
) -> LossOutput:
    """GRPO-family loss over a padded (or packed, with ``cu_seqlens``) batch.

    Args:
        logp: ``[B, T]`` policy log-probs of the sampled tokens (differentiable).
        advantages: ``[B]``.  mask: ``[B, T]`` bool or 0/1 completion mask.
        old_logp: ``[B, T]`` log-probs of the policy that sampled (None: ``logp.detach()``, on-policy).
        ref_logp: ``[B, T]`` reference log-probs (needed when ``beta != 0``).
        sampler_logp: ``[B, T]`` log-probs reported by the inference engine (sampler correction), or None.
        entropy: ``[B, T]`` token entropies (metric; bonus with ``entropy_coef``), or None.
        max_completion_length: dr_grpo's constant (None → T).  num_items_in_batch: dapo/cispo/vespo normalizer.
        beta, kl_estimator, epsilon_low, epsilon_high, delta, loss_type, importance_sampling_level, sampler_is_cap,
            entropy_coef, sapo_temperature_pos, sapo_temperature_neg, vespo_shape, use_bias_correction_kl: the
            fields of :class:`GRPOOptions` (defaults and rules there).
        cu_seqlens: ``[B + 1]`` int32/int64 boundaries of a packed batch: then ``logp``, ``mask`` and every per-token
            input are ``[N]``, padded to ``[B, T]`` by :func:`~.segments.unpack` (T = the longest sequence).

    Returns:
        ``LossOutput``; metrics ``clip_ratio/{low,high,region}_mean``, ``kl`` (when ``beta != 0``), ``entropy``
        (when given): masked token means.
    """
    o = GRPOOptions.pick(locals())  # first: locals() are the arguments
    if cu_seqlens is not None:
        names = ("logp", "old_logp", "mask", "ref_logp", "sampler_logp", "entropy")
        logp, old_logp, mask, ref_logp, sampler_logp, entropy = unpack(
            cu_seqlens, names, logp, old_logp, mask, ref_logp, sampler_logp, entropy
        )
    totals = dict(max_completion_length=max_completion_length, num_items_in_batch=num_items_in_batch)
    inputs = (logp, old_logp, advantages, mask, ref_logp, sampler_logp, entropy)
    run = _triton_loss if _triton_ok(logp, o) else _torch_loss
    loss, low, high, kl, ent = run(*inputs, o, totals)
    metrics = {"clip_ratio/low_mean": low, "clip_ratio/high_mean": high, "clip_ratio/region_mean": low + high}
    if o.beta != 0.0:
        metrics["kl"] = kl
    if entropy is not None:
        metrics["entropy"] = ent
    return LossOutput(loss, {k: v.detach() for k, v in metrics.items()})


def _triton_loss(logp, old_logp, advantages, mask, ref_logp, sampler_logp, entropy, o: GRPOOptions, totals: dict):
    """(loss, low, high, kl, entropy) token means from the one-pass Triton kernel (``_grpo_triton``)."""
    _check(logp, old_logp, advantages, mask, ref_logp, sampler_logp, entropy, o)
    from ._grpo_triton import GrpoTokenLossFunction

    def scale(counts):
        return row_scale(counts, o.loss_type, logp.shape[1], **totals)

    loss, sums = GrpoTokenLossFunction.apply(
        logp, entropy, old_logp, advantages, mask != 0, ref_logp, sampler_logp, o, scale
    )
    n = sums[0].clamp_min(1.0)
    return loss, sums[1] / n, sums[2] / n, sums[3] / n, sums[4] / n


def _torch_loss(logp, old_logp, advantages, mask, ref_logp, sampler_logp, entropy, o: GRPOOptions, totals: dict):
    """(loss, low, high, kl, entropy) token means from torch ops (kl / entropy None when not computed)."""
    lp, old, adv, m, ref, is_ratio, ent = _prepare(logp, old_logp, advantages, mask, ref_logp, sampler_logp, entropy, o)
    t = _terms(lp, old, adv, m, ref, is_ratio, ent, o)
    loss = (t.per_token_loss * loss_weights(m, o.loss_type, **totals)).sum()
    with torch.no_grad():
        n = m.sum().clamp_min(1.0)
        kl = None if t.kl is None else (t.kl * m).sum() / n
        ent_mean = None if ent is None else (ent * m).sum() / n
        return loss, (t.is_low * m).sum() / n, (t.is_high * m).sum() / n, kl, ent_mean
