"""Fused linear GRPO family (GRPO, BNPO, Dr. GRPO, DAPO, CISPO, SAPO, LUSPO, VESPO; token- or sequence-level
importance sampling as GSPO) from hidden states and the LM head, without ``[N, V]`` logits.

The math is :func:`~.losses.grpo.grpo_loss` (see its docstring for every loss type and option). Its gradient
with respect to each token's ``logp`` (and ``entropy``) depends only on that token's row, or, for
``importance_sampling_level="sequence"`` and ``vespo``, on its whole sequence; so it is known as soon as the
log-probs of a chunk of rows are. Following the recipe of ``losses/grpo.py``, the reduction ``weights`` are computed
once for the whole batch (``loss_weights``), and each chunk of ``logprob_fwd_bwd`` calls ``grpo_per_token`` on
``logp.detach().requires_grad_()`` and takes ``autograd.grad(Σ per_token_loss · weights)`` as its token gradient:

- token level: any chunk of rows; each row is a ``[1, 1]`` "sequence" with its sequence's advantage;
- sequence level / vespo: row groups are whole sequences; each chunk is laid out ``[k, T]``.

Three matmuls in all on the PyTorch path (``6·N_a·V·D`` FLOPs: logits, grad_W, grad_H from one stored chunk); on
CUDA ``fused_linear_logprob._fwd_bwd_triton`` stores no logits, so it runs the forward and a backward that recomputes
them: four (``8·N_a·V·D``). Plus ``2·N_a·V·D_ref`` with a reference head; ``2·N_a·V·D`` under ``torch.no_grad()``.
Loss value and metrics come from one ``grpo_loss`` call on the ``[B, T]`` log-probs.
Memory: the gradients ``[N, D] + [V, D] (+ [V])`` held until backward, one logits block, a few ``[B, T]`` floats.

Layout: padded ``hidden [B, T, D]`` + ``mask [B, T]`` or packed ``hidden [N, D]`` + ``cu_seqlens [B + 1]``
(``_fused_linear_common``); per-token inputs (``old_logp``, ``ref_logp``, ``sampler_logp``) have ``targets``' shape
and are read at active tokens only (as if 0 elsewhere: vespo's sampler term, which Liger sums over all T columns,
then covers the completion tokens only, and padded and packed layouts agree).
For dr_grpo pass ``max_completion_length``: its default is ``T`` (the padded length, or the longest packed sequence).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from hotloop._errors import require

from ._fused_linear_common import (
    Layout,
    attach_grads,
    check_fused_args,
    check_reference,
    forward_stats,
    grads_needed,
    make_layout,
    reference_head_logp,
    reference_padded,
)
from .fused_linear_logprob import logprob_fwd_bwd, reference_fused_linear_logprob
from .losses._checks import check_tensor
from .losses.grpo import GRPOOptions, grpo_loss, grpo_per_token, loss_weights
from .losses.output import LossOutput


@dataclass(frozen=True, kw_only=True)
class _TokenGrad:
    """``token_grad`` for ``logprob_fwd_bwd``: d(Σ weights · grpo_per_token) / d(logp, entropy) of a chunk of rows."""

    layout: Layout
    advantages: Tensor  # [B] float32
    weights: Tensor  # [B, T] float32 reduction weights of the whole batch
    old: Tensor | None  # [N_a] per-token constants, or None
    ref: Tensor | None
    sampler: Tensor | None
    whole_rows: bool  # sequence-level ratio or vespo: chunks hold whole sequences, laid out [k, T]
    options: GRPOOptions

    def _chunk(self, rows: Tensor) -> tuple[Tensor, Tensor, tuple[int, int], Tensor, Tensor]:
        """(local row, column, [k, width] shape, advantages [k], weights [k, width]) of a chunk's tokens."""
        seq = self.layout.seq_ids[rows]
        pos = self.layout.positions[rows]
        if self.whole_rows:
            units, local = torch.unique(seq, return_inverse=True)
            return local, pos, (units.numel(), self.layout.max_len), self.advantages[units], self.weights[units]
        local = torch.arange(rows.numel(), device=rows.device)  # every token its own [1, 1] "sequence"
        return local, torch.zeros_like(pos), (rows.numel(), 1), self.advantages[seq], self.weights[seq, pos, None]

    def __call__(self, rows: Tensor, logp: Tensor, entropy: Tensor | None):
        local, pos, shape, adv, weights = self._chunk(rows)

        def pad(values):  # [R] chunk values (or None) -> [k, width] float32, 0 elsewhere
            if values is None:
                return None
            values = values.detach().float()
            return values.new_zeros(shape).index_put_((local, pos), values)

        def take(values):
            return None if values is None else pad(values[rows])

        with_ent = entropy is not None and self.options.entropy_coef != 0.0
        lp = pad(logp).requires_grad_(True)
        ent = None if entropy is None else pad(entropy).requires_grad_(with_ent)
        m = pad(torch.ones(rows.numel(), device=rows.device))
        with torch.enable_grad():
            per_token, _ = grpo_per_token(
                lp,
                adv,
                m,
                old_logp=take(self.old),
                ref_logp=take(self.ref),
                sampler_logp=take(self.sampler),
                entropy=ent,
                options=self.options,
            )
            grads = torch.autograd.grad((per_token * weights * m).sum(), (lp, ent) if with_ent else (lp,))
        return grads[0][local, pos], (grads[1][local, pos] if with_ent else None)


def _sequence_groups(layout: Layout, whole_rows: bool) -> list[Tensor] | None:
    """Active rows of each sequence (row groups that keep sequences whole); None when any chunk will do."""
    if not whole_rows:
        return None
    order = torch.argsort(layout.seq_ids, stable=True)
    return list(order.split(torch.bincount(layout.seq_ids, minlength=layout.num_seqs).tolist()))


def _stats_and_grads(layout: Layout, weight, bias, token_grad: _TokenGrad, needs, lp_opts: dict):
    """Token stats (with entropy) and, when any input needs one, the gradients from the fused pass."""
    if not any(needs):
        return forward_stats(layout, weight, bias, with_entropy=True, **lp_opts), None
    stats, *grads = logprob_fwd_bwd(
        layout.hidden,
        weight.detach(),
        layout.targets,
        None if bias is None else bias.detach(),
        with_entropy=True,
        token_grad=token_grad,
        row_groups=_sequence_groups(layout, token_grad.whole_rows),
        needs_grad=needs,
        **lp_opts,
    )
    return stats, grads


def _per_token_input(layout: Layout, name: str, values: Tensor | None) -> Tensor | None:
    if values is None:
        return None
    check_tensor(name, values, layout.token_shape)
    return layout.take(values)


def fused_linear_grpo_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None = None,
    *,
    advantages: Tensor,
    mask: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    old_logp: Tensor | None = None,
    ref_logp: Tensor | None = None,
    ref_hidden: Tensor | None = None,
    ref_weight: Tensor | None = None,
    ref_bias: Tensor | None = None,
    sampler_logp: Tensor | None = None,
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
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> LossOutput:
    """GRPO-family loss of ``B`` sampled completions from hidden states and the LM head.

    Args:
        hidden: ``[B, T, D]`` (padded) or ``[N, D]`` (packed with ``cu_seqlens``).
        weight: ``[V, D]``, hidden's dtype.  bias: ``[V]`` or None.
        targets: ``[B, T]`` / ``[N]`` int64 sampled token ids (``ignore_index``: not in the completion).
        advantages: ``[B]``.  mask: ``[B, T]`` / ``[N]`` bool or 0/1 completion mask, or None.
        cu_seqlens: ``[B + 1]`` int32/int64 (packed).
        old_logp, sampler_logp: per-token (``targets``' shape) log-probs of the sampling policy and of the
            inference engine, or None (on-policy / no sampler correction).
        ref_logp: per-token reference log-probs, or the reference head ``ref_hidden`` (hidden's layout,
            ``[..., D_ref]``), ``ref_weight [V, D_ref]``, ``ref_bias`` (run without grad); needed iff ``beta != 0``.
        max_completion_length, num_items_in_batch: as :func:`~hotloop.kernels.losses.grpo.grpo_loss`.
        beta, kl_estimator, epsilon_low, epsilon_high, delta, loss_type, importance_sampling_level, sampler_is_cap,
            entropy_coef, sapo_temperature_pos, sapo_temperature_neg, vespo_shape, use_bias_correction_kl: the
            fields of :class:`~hotloop.kernels.losses.grpo.GRPOOptions`.
        temperature: logits are divided by it (use the sampling temperature).

    Returns:
        ``LossOutput``; metrics ``clip_ratio/{low,high,region}_mean``, ``entropy``, and ``kl`` when ``beta != 0``
        (masked token means).
    """
    options = GRPOOptions.pick(locals())  # first: locals() are the arguments
    lp_opts = dict(temperature=float(temperature), ignore_index=int(ignore_index))
    head = (ref_hidden, ref_weight, ref_bias)
    per_token = dict(old_logp=old_logp, ref_logp=ref_logp, sampler_logp=sampler_logp)
    layout = _checked_layout(hidden, weight, targets, bias, advantages, mask, cu_seqlens, per_token, head, lp_opts)
    check_reference("ref_logp", ref_logp, *head, needed=options.beta != 0.0, why=f"beta={options.beta}")
    cap = options.sampler_is_cap
    require(cap is None or sampler_logp is not None, "sampler_logp", f"log-probs (sampler_is_cap={cap})", None)
    tokens = {name: _per_token_input(layout, name, values) for name, values in per_token.items()}
    if ref_hidden is not None:
        tokens["ref_logp"] = reference_head_logp(layout, *head, **lp_opts)
    totals = dict(max_completion_length=max_completion_length, num_items_in_batch=num_items_in_batch)
    return _fused_loss(layout, (hidden, weight, bias), advantages.detach().float(), tokens, options, totals, lp_opts)


def _checked_layout(hidden, weight, targets, bias, advantages, mask, cu_seqlens, per_token: dict, head: tuple, lp_opts):
    """The batch's layout, after checking every tensor argument (and what the options need) against it."""
    floats = {name: (values, "float") for name, values in {**per_token, "advantages": advantages}.items()}
    check_fused_args(hidden, weight, targets, bias, mask, cu_seqlens, head, **floats)
    layout = make_layout(hidden, weight, targets, bias, mask=mask, cu_seqlens=cu_seqlens, **lp_opts)
    check_tensor("advantages", advantages, (layout.num_seqs,))
    return layout


def _fused_loss(layout: Layout, head: tuple, adv: Tensor, tokens: dict, options: GRPOOptions, totals: dict, lp_opts):
    """Loss and metrics of the checked batch, with the gradients w.r.t. ``head = (hidden, weight, bias)`` attached.

    ``tokens``: ``old_logp``, ``ref_logp``, ``sampler_logp`` at the active rows (``[N_a]`` float32) or None.
    """
    hidden, weight, bias = head
    m = layout.padded_mask()
    whole_rows = options.importance_sampling_level == "sequence" or options.loss_type == "vespo"
    weights = loss_weights(m, options.loss_type, **totals)
    token_grad = _TokenGrad(
        layout=layout,
        advantages=adv,
        weights=weights,
        old=tokens["old_logp"],
        ref=tokens["ref_logp"],
        sampler=tokens["sampler_logp"],
        options=options,
        whole_rows=whole_rows,
    )
    needs = grads_needed(hidden, weight, bias)
    stats, grads = _stats_and_grads(layout, weight, bias, token_grad, needs, lp_opts)
    padded = {name: _padded(layout, values) for name, values in tokens.items()}
    with torch.no_grad():
        logp = _padded(layout, stats.logp)
        entropy = _padded(layout, stats.entropy)
        out = grpo_loss(logp, adv, m, entropy=entropy, **padded, **totals, **asdict(options))
    loss = attach_grads(out.loss, layout, hidden, weight, bias, grads) if any(needs) else out.loss
    return LossOutput(loss, out.metrics)


def _padded(layout: Layout, values: Tensor | None) -> Tensor | None:
    """``[N_a]`` values (or None) → ``[B, T]``, 0 at inactive tokens."""
    return None if values is None else layout.to_padded(values)


class FusedLinearGRPOLoss(nn.Module):
    """Module form of :func:`fused_linear_grpo_loss`: loss options at construction, tensors in ``forward``.

    Constructor keywords: the fields of :class:`~hotloop.kernels.losses.grpo.GRPOOptions` (checked now), plus
    ``max_completion_length``, ``temperature`` and ``ignore_index`` (defaults as :func:`fused_linear_grpo_loss`).
    """

    def __init__(
        self, *, max_completion_length: int | None = None, temperature: float = 1.0, ignore_index: int = -100, **options
    ):
        super().__init__()
        self.options = GRPOOptions(**options)
        self.max_completion_length = max_completion_length
        self.temperature = temperature
        self.ignore_index = ignore_index

    def forward(
        self,
        hidden,
        weight,
        targets,
        bias=None,
        *,
        advantages,
        mask=None,
        cu_seqlens=None,
        old_logp=None,
        ref_logp=None,
        ref_hidden=None,
        ref_weight=None,
        ref_bias=None,
        sampler_logp=None,
        num_items_in_batch=None,
    ) -> LossOutput:
        return fused_linear_grpo_loss(
            hidden,
            weight,
            targets,
            bias,
            advantages=advantages,
            mask=mask,
            cu_seqlens=cu_seqlens,
            old_logp=old_logp,
            ref_logp=ref_logp,
            ref_hidden=ref_hidden,
            ref_weight=ref_weight,
            ref_bias=ref_bias,
            sampler_logp=sampler_logp,
            num_items_in_batch=num_items_in_batch,
            max_completion_length=self.max_completion_length,
            temperature=self.temperature,
            ignore_index=self.ignore_index,
            **asdict(self.options),
        )


def reference_fused_linear_grpo_loss(
    hidden,
    weight,
    targets,
    bias=None,
    *,
    advantages,
    mask=None,
    cu_seqlens=None,
    old_logp=None,
    ref_logp=None,
    ref_hidden=None,
    ref_weight=None,
    ref_bias=None,
    sampler_logp=None,
    temperature=1.0,
    ignore_index=-100,
    **options,
) -> LossOutput:
    """Float64 reference: materialized logits → log_softmax / entropy → ``grpo_loss`` on ``[B, T]`` (autograd).

    Per-token inputs are set to 0 at inactive tokens, as the fused loss ignores them there.
    """
    m = reference_padded(hidden, targets, mask, cu_seqlens, ignore_index)[2]

    def padded(values):  # per-token input -> [B, T] float64, 0 at inactive tokens (packed: one slice per sequence)
        if values is None:
            return None
        out = reference_padded(values.double().unsqueeze(-1), targets, mask, cu_seqlens, ignore_index)[0]
        return out.squeeze(-1).masked_fill(~m, 0.0)

    def token_logp(h, w, b, entropy):
        h_pad, t_pad, _ = reference_padded(h.double(), targets, mask, cu_seqlens, ignore_index)
        return reference_fused_linear_logprob(
            h_pad,
            w.double(),
            t_pad,
            None if b is None else b.double(),
            temperature=temperature,
            ignore_index=ignore_index,
            return_entropy=entropy,
        )

    logp, entropy = token_logp(hidden, weight, bias, True)
    ref = padded(ref_logp) if ref_hidden is None else token_logp(ref_hidden, ref_weight, ref_bias, False).detach()
    return grpo_loss(
        logp,
        advantages.double(),
        m,
        old_logp=padded(old_logp),
        ref_logp=ref,
        sampler_logp=padded(sampler_logp),
        entropy=entropy,
        **options,
    )
