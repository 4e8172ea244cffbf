"""GRPO-family clipped policy losses on per-token log-probs (GRPO, DAPO, Dr. GRPO, BNPO, GSPO, CISPO, SAPO, LUSPO, VESPO).

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
Reductions, as weights on the ``[B, T]`` per-token loss (``loss = Σ weights · per_token_loss``):
grpo/sapo ``m/(B·max(|y_b|,1))``; bnpo ``m/max(Σm,1)``; dr_grpo ``m/(B·max_completion_length)`` (None → T);
dapo/cispo/vespo ``m/max(num_items_in_batch or Σm, 1)``; luspo ``m/B``.

These are Liger-Kernel 0.8.5's ``LigerFusedLinearGRPOFunction.ppo_loss_fn`` definitions, with three deliberate
differences: luspo masks padding and divides by ``B`` (TRL 1.16; Liger's token-level luspo sums padded tokens and
divides by ``B·T`` — equal for sequence-level luspo without KL, TRL's recommended setup); the KL estimator is
selectable; no ``torch.distributed`` all-reduce hides inside the dapo normalizer (pass ``num_items_in_batch``).
``old_logp``, ``ref_logp``, ``sampler_logp`` and ``advantages`` are constants; gradients flow to ``logp`` and
``entropy``. bf16/fp16 inputs are computed in float32.

CUDA path: ``_grpo_triton`` computes loss and d loss/d logp in one pass for token-level clipped-family losses
without bias-corrected KL; other settings (sequence level, cispo, sapo, vespo) run the torch code below.
Memory: a few ``[B, T]`` float32 temporaries.

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

from .._dispatch import use_triton
from ._checks import as_mask, check_choice, check_tensor
from .kl_penalty import ESTIMATORS, _kl
from .output import LossOutput

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")


class _Terms(NamedTuple):
    per_token_loss: Tensor  # [B, T]
    is_low: Tensor  # [B, T] bool
    is_high: Tensor  # [B, T] bool
    kl: Tensor | None  # [B, T]


def loss_weights(m: Tensor, loss_type: str, *, max_completion_length: int | None = None, num_items_in_batch=None) -> Tensor:
    """``[B, T]`` weights with ``loss = Σ weights · per_token_loss`` for ``loss_type`` (constants)."""
    b, t = m.shape
    if loss_type in ("grpo", "sapo"):
        return m / (m.sum(-1, keepdim=True).clamp_min(1.0) * b)
    if loss_type == "bnpo":
        return m / m.sum().clamp_min(1.0)
    if loss_type == "dr_grpo":
        return m / (b * (t if max_completion_length is None else max_completion_length))
    if loss_type == "luspo":
        return m / b
    total = m.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, dtype=m.dtype, device=m.device)
    return m / total.clamp_min(1.0)


def _pick(cond: Tensor, if_true: float, if_false: float, like: Tensor) -> Tensor:
    """``if_true`` where ``cond`` else ``if_false``, in ``like``'s dtype (``torch.where`` on floats rounds to float32)."""
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
    lo, hi = 1 - eps_low, 1 + eps_high
    w1 = w if delta is None else w.clamp(max=delta)
    return -torch.minimum(w1 * a, w.clamp(lo, hi) * a), w < lo, w > hi


def _terms(logp, old, adv, m, *, ref, beta, kl_estimator, eps_low, eps_high, delta, loss_type, level,
           is_ratio, entropy, entropy_coef, sapo_t, vespo_shape, bias_kl) -> _Terms:  # fmt: skip
    log_ratio = logp - old
    if level == "sequence":
        log_w = ((log_ratio * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp_min(1.0)).expand_as(logp)
    else:
        log_w = log_ratio
    if loss_type == "vespo":
        phi = _gamma_weights(adv, log_ratio.detach(), m, is_ratio, vespo_shape)
        ptl = -phi * adv.unsqueeze(-1) * logp
        no = torch.zeros_like(logp, dtype=torch.bool)
        low, high = no, no
    else:
        ptl, low, high = _policy_term(logp, log_w, adv, loss_type, eps_low, eps_high, delta, sapo_t)
        if is_ratio is not None:
            ptl = ptl * is_ratio
    kl = None
    if beta != 0.0:
        kl = _kl(logp, ref, kl_estimator)
        kl = kl * log_w.exp() if bias_kl else kl
        ptl = ptl + beta * kl
    if entropy is not None and entropy_coef != 0.0:
        ptl = ptl - entropy_coef * entropy
    return _Terms(ptl, low & (adv.unsqueeze(-1) < 0), high & (adv.unsqueeze(-1) > 0), kl)


def _validate(logp, old_logp, advantages, mask, ref_logp, sampler_logp, entropy, o: dict) -> None:
    check_tensor("logp", logp, ndim=2)
    shape = tuple(logp.shape)
    check_tensor("advantages", advantages, shape[:1])
    check_tensor("mask", mask, shape)
    for name, t in (("old_logp", old_logp), ("ref_logp", ref_logp), ("sampler_logp", sampler_logp), ("entropy", entropy)):
        if t is not None:
            check_tensor(name, t, shape)
    check_choice("loss_type", o["loss_type"], LOSS_TYPES)
    check_choice("kl_estimator", o["kl_estimator"], ESTIMATORS)
    check_choice("importance_sampling_level", o["level"], ("token", "sequence"))
    if o["beta"] != 0.0 and ref_logp is None:
        raise ValueError(f"beta={o['beta']} needs ref_logp [B, T], got None")
    if o["level"] == "sequence" and o["loss_type"] in ("cispo", "sapo", "vespo"):
        raise ValueError(f"importance_sampling_level='sequence' is not defined for loss_type={o['loss_type']!r}")
    if o["delta"] is not None and (o["loss_type"] not in CLIPPED or o["delta"] <= 0):
        raise ValueError(f"delta must be > 0 and needs a clipped loss_type {CLIPPED}, got {o['delta']} / {o['loss_type']!r}")
    if min(o["sapo_t"]) <= 0:
        raise ValueError(f"sapo temperatures must be > 0, got {o['sapo_t']}")
    if o["cap"] is not None and (sampler_logp is None or o["cap"] <= 0):
        raise ValueError(f"sampler_is_cap must be > 0 and needs sampler_logp, got {o['cap']} / {type(sampler_logp).__name__}")


def _prepare(logp, old_logp, advantages, mask, ref_logp, sampler_logp, entropy, o: dict):
    """Validated float32 (or float64) inputs; constants detached; the sampler IS ratio."""
    _validate(logp, old_logp, advantages, mask, ref_logp, sampler_logp, entropy, o)
    dt = torch.float64 if logp.dtype == torch.float64 else torch.float32
    lp = logp.to(dt)
    old = lp.detach() if old_logp is None else old_logp.detach().to(dt)
    ref = None if ref_logp is None else ref_logp.detach().to(dt)
    is_ratio = None
    if sampler_logp is not None:
        is_ratio = (old - sampler_logp.detach().to(dt)).exp()
        is_ratio = is_ratio if o["cap"] is None else is_ratio.clamp(max=o["cap"])
    ent = None if entropy is None else entropy.to(dt)
    return lp, old, advantages.detach().to(dt), as_mask(mask, lp), ref, is_ratio, ent


_DEFAULTS = dict(beta=0.0, kl_estimator="k3", epsilon_low=0.2, epsilon_high=0.2, delta=None, loss_type="dapo",
                 importance_sampling_level="token", sampler_is_cap=None, entropy_coef=0.0, sapo_temperature_pos=1.0,
                 sapo_temperature_neg=1.05, vespo_shape=(2.0, 3.0, 3.0, 2.0), use_bias_correction_kl=False)  # fmt: skip


def _run_terms(lp, old, adv, m, ref, is_ratio, ent, kw: dict) -> _Terms:
    return _terms(
        lp, old, adv, m, ref=ref, beta=kw["beta"], kl_estimator=kw["kl_estimator"], eps_low=kw["epsilon_low"],
        eps_high=kw["epsilon_high"], delta=kw["delta"], loss_type=kw["loss_type"],
        level=kw["importance_sampling_level"], is_ratio=is_ratio, entropy=ent, entropy_coef=kw["entropy_coef"],
        sapo_t=(kw["sapo_temperature_pos"], kw["sapo_temperature_neg"]), vespo_shape=kw["vespo_shape"],
        bias_kl=kw["use_bias_correction_kl"],
    )  # fmt: skip


def _checked(logp, old_logp, advantages, mask, ref_logp, sampler_logp, entropy, kw: dict):
    unknown = set(kw) - set(_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown GRPO options {sorted(unknown)}; expected a subset of {sorted(_DEFAULTS)}")
    kw = {**_DEFAULTS, **kw}
    o = dict(loss_type=kw["loss_type"], kl_estimator=kw["kl_estimator"], level=kw["importance_sampling_level"],
             beta=kw["beta"], delta=kw["delta"], cap=kw["sampler_is_cap"],
             sapo_t=(kw["sapo_temperature_pos"], kw["sapo_temperature_neg"]))  # fmt: skip
    return kw, _prepare(logp, old_logp, advantages, mask, ref_logp, sampler_logp, entropy, o)


def grpo_per_token(
    logp: Tensor,
    old_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    ref_logp: Tensor | None = None,
    sampler_logp: Tensor | None = None,
    entropy: Tensor | None = None,
    max_completion_length: int | None = None,
    num_items_in_batch: int | Tensor | None = None,
    **options,
) -> tuple[Tensor, Tensor]:
    """Per-token GRPO-family loss and its reduction weights: ``loss = (per_token_loss * weights).sum()``.

    Args and keyword ``options`` as :func:`grpo_loss`. Always the torch path (differentiable by autograd in ``logp``/``entropy``).

    Returns:
        ``per_token_loss [B, T]`` (float32, or float64 for float64 input) and constant ``weights [B, T]``.
    """
    kw, (lp, old, adv, m, ref, is_ratio, ent) = _checked(
        logp, old_logp, advantages, mask, ref_logp, sampler_logp, entropy, options
    )
    weights = loss_weights(m, kw["loss_type"], max_completion_length=max_completion_length,
                           num_items_in_batch=num_items_in_batch)  # fmt: skip
    return _run_terms(lp, old, adv, m, ref, is_ratio, ent, kw).per_token_loss, weights


def _triton_ok(logp: Tensor, kw: dict) -> bool:
    return (
        kw["loss_type"] in CLIPPED and kw["importance_sampling_level"] == "token" and logp.dtype == torch.float32
        and not kw["use_bias_correction_kl"] and use_triton(logp.device)
    )  # fmt: skip


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    ref_logp: Tensor | None = None,
    sampler_logp: Tensor | None = None,
    entropy: Tensor | None = None,
    max_completion_length: int | None = None,
    num_items_in_batch: int | Tensor | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    delta: float | None = None,
    loss_type: str = "dapo",
    importance_sampling_level: str = "token",
    sampler_is_cap: float | None = None,
    entropy_coef: float = 0.0,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_shape: tuple[float, float, float, float] = (2.0, 3.0, 3.0, 2.0),
    use_bias_correction_kl: bool = False,
) -> LossOutput:
    """GRPO-family loss over a padded batch.

    Args:
        logp: ``[B, T]`` policy log-probs of the sampled tokens (differentiable).
        old_logp: ``[B, T]`` log-probs of the policy that sampled (None: ``logp.detach()``, on-policy).
        advantages: ``[B]``.  mask: ``[B, T]`` bool or 0/1 completion mask.
        ref_logp: ``[B, T]`` reference log-probs (needed when ``beta != 0``).
        sampler_logp: ``[B, T]`` log-probs reported by the inference engine (sampler correction), or None.
        entropy: ``[B, T]`` token entropies (metric; bonus with ``entropy_coef``), or None.
        max_completion_length: dr_grpo's constant (None → T).  num_items_in_batch: dapo/cispo/vespo normalizer.
        beta: KL weight.  kl_estimator: "k1" | "k2" | "k3".  epsilon_low, epsilon_high: clip range (cispo: cap).
        delta: two-sided clip (clipped family), or None.  loss_type: one of ``LOSS_TYPES``.
        importance_sampling_level: "token" | "sequence" (GSPO).  sampler_is_cap: TIS truncation, or None.
        entropy_coef: entropy bonus weight.  sapo_temperature_pos/neg: SAPO τ.
        vespo_shape: VESPO ``(k_pos, λ_pos, k_neg, λ_neg)``.  use_bias_correction_kl: KL × importance weight.

    Returns:
        ``LossOutput``; metrics ``clip_ratio/{low,high,region}_mean``, ``kl`` (when ``beta != 0``), ``entropy``
        (when given): masked token means.
    """
    options = dict(
        beta=beta, kl_estimator=kl_estimator, epsilon_low=epsilon_low, epsilon_high=epsilon_high, delta=delta,
        loss_type=loss_type, importance_sampling_level=importance_sampling_level, sampler_is_cap=sampler_is_cap,
        entropy_coef=entropy_coef, sapo_temperature_pos=sapo_temperature_pos,
        sapo_temperature_neg=sapo_temperature_neg, vespo_shape=vespo_shape, use_bias_correction_kl=use_bias_correction_kl,
    )  # fmt: skip
    kw, (lp, old, adv, m, ref, is_ratio, ent) = _checked(
        logp, old_logp, advantages, mask, ref_logp, sampler_logp, entropy, options
    )
    weights = loss_weights(m, kw["loss_type"], max_completion_length=max_completion_length,
                           num_items_in_batch=num_items_in_batch)  # fmt: skip
    n = m.sum().clamp_min(1.0)
    if _triton_ok(lp, kw):
        from ._grpo_triton import grpo_token_loss

        loss, low, high, kl_sum = grpo_token_loss(lp, old, adv, m, weights, ref, is_ratio, kw)
        if ent is not None and kw["entropy_coef"] != 0.0:
            loss = loss - kw["entropy_coef"] * (ent * weights).sum()
        low, high, kl = low / n, high / n, (None if kl_sum is None else kl_sum / n)
    else:
        t = _run_terms(lp, old, adv, m, ref, is_ratio, ent, kw)
        loss = (t.per_token_loss * weights).sum()
        with torch.no_grad():
            low, high = (t.is_low * m).sum() / n, (t.is_high * m).sum() / n
            kl = None if t.kl is None else (t.kl * m).sum() / n
    metrics = {"clip_ratio/low_mean": low, "clip_ratio/high_mean": high, "clip_ratio/region_mean": low + high}
    if kl is not None:
        metrics["kl"] = kl
    if ent is not None:
        metrics["entropy"] = (ent * m).sum() / n
    return LossOutput(loss, {k: v.detach() for k, v in metrics.items()})
