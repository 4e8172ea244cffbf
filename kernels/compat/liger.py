"""Drop-in replacements for Liger-Kernel 0.8.5's chunked losses, backed by hotloop's fused linear losses.

Migration is one import::

    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss        # before
    from hotloop.kernels.compat.liger import LigerFusedLinearDPOLoss     # after

Each class keeps Liger's name, constructor arguments (names, order, defaults), attributes, forward arguments
(Liger's orders: ``(lin_weight, _input, target, bias, ...)`` for DPO, CPO, ORPO, SimPO; ``(_input, lin_weight,
...)`` for KTO and GRPO; student then teacher for JSD) and return structure: ``(loss, (aux, ...))`` with the aux
tensors in Liger's order, or JSD's ``loss`` / ``(loss, soft_loss, hard_loss)``. The math runs in
``fused_linear_{dpo,kto,grpo,kl,sft}`` (this file only maps arguments and assembles outputs):

- DPO, CPO, SimPO, ORPO → ``fused_linear_dpo_loss`` (``reference_free`` without a reference, ``length_normalize`` =
  ``average_log_prob``, ``nll_coef`` = ``alpha``, ``loss_type="orpo"``): 3 matmuls (2·N_a·V·D FLOPs each) with the
  ``"grouped"`` strategy (what ``"auto"`` picks unless one pair's ``[2T, V]`` fp32 block exceeds 1/8 of the available
  memory), 4 with ``"two_pass"``, + 1 for a reference head (on CUDA one more each: the Triton backward recomputes
  the logits). The classes add no matmul and no ``[N, V]``- or ``[V, D]``-sized pass over the direct call: the
  logits means cost ``N·D + V·D``;
- KTO → ``fused_linear_kto_loss`` (as DPO); GRPO → ``fused_linear_grpo_loss`` (3, CUDA 4; + 1 for a reference head);
- JSD → ``fused_linear_kl`` (Liger's β = 0 is ``"reverse_kl"``, β = 1 ``"kl"``, else ``"jsd"``; 4 matmuls, CUDA 6,
  ``"jsd"`` 8) plus ``fused_linear_sft_loss`` for the hard loss (3 more over the student, CUDA 4). Liger: 3 per
  loss, + 1 for a reference.

``chosen/rejected_logits_mean`` (and KTO's ``*_logits_sum``) are sums of the logits over all positions (padding
included, as Liger) without forming them: ``Σ_{i,v} (h_i·w_v + b_v) = (Σ_i h_i)·(Σ_v w_v) + n·Σ_v b_v``.

Differences from Liger, all deliberate:

- ``compiled`` and ``chunk_size`` are accepted and ignored: nothing is compiled (no warm-up); chunks are chosen by
  memory (``docs/fused-losses.md``). No host sync in backward (Liger compares ``grad_output`` with 1.0).
- DPO: ``loss_type="ipo"`` works (length-averaged log-ratios as TRL's IPO, whatever ``average_log_prob``; Liger
  raises NotImplementedError);
  ``label_smoothing`` is applied to ``"sigmoid"`` (cDPO; Liger ignores it there).
- Cached reference log-probs (Liger recomputes the reference head every step): DPO ``ref_chosen_logps``,
  ``ref_rejected_logps`` ``[B]`` and KTO ``ref_logps`` ``[B]`` keyword arguments, in the form the class returns
  (sums, or per-token means with ``average_log_prob``); GRPO already takes ``ref_per_token_logps``.
- GRPO: ``kl_estimator="k1" | "k2" | "k3"`` (Liger: k3 only). Without a reference (``use_ref_model=False``) there is
  no KL term (Liger compares the policy with itself: k3 = 0, gradient 0) and the KL output is 0. ``dr_grpo``
  without ``max_completion_length`` uses T. Token-level ``luspo`` ignores padding; ``vespo``'s sampler term covers
  completion tokens only; the ``dapo`` normalizer does no hidden all-reduce (pass ``num_items_in_batch``)
  (``losses/grpo.py``). ``vllm_is_ratio`` with ``old_per_token_logps=None`` costs one forward-only pass (the old
  log-probs are needed to express the ratio as sampler log-probs).
- KTO: ``kl`` must be a scalar (a float or one-element tensor).
- ORPO with ``compute_nll_loss=False`` or ``nll_target``: the NLL on ``target`` is taken out (and the one on
  ``nll_target`` added) by ``fused_linear_sft_loss`` on the chosen half, 3 matmuls over those rows each.
- Empty sequences (all targets ignored) count as length 1 where Liger divides 0 by 0.
"""

from __future__ import annotations

from dataclasses import asdict

import torch
from torch import Tensor, nn

from hotloop._errors import check_choice, expected, require

from .._fused_linear_common import forward_stats, make_layout
from ..fused_linear_dpo import fused_linear_dpo_loss
from ..fused_linear_grpo import fused_linear_grpo_loss
from ..fused_linear_kl import fused_linear_kl
from ..fused_linear_kto import fused_linear_kto_loss
from ..fused_linear_sft import fused_linear_sft_loss
from ..losses.dpo import LOSS_TYPES as DPO_LOSS_TYPES
from ..losses.dpo import DPOOptions
from ..losses.grpo import GRPOOptions


def _logits_sums(hidden: Tensor, weight: Tensor, bias: Tensor | None, groups: Tensor) -> Tensor:
    """``[G]`` sums of ``hidden @ weight.T + bias`` over every position of each group's sequences and every column.

    ``hidden [B, T, D]``; ``groups [G, B]`` 0/1 membership. Costs ``B·T·D + V·D``, no logits.
    """
    per_seq = hidden.detach().float().sum(1) @ weight.detach().float().sum(0)  # [B]
    sums = groups.float() @ per_seq
    if bias is not None:
        sums = sums + groups.float().sum(1) * hidden.shape[1] * bias.detach().float().sum()
    return sums


def _forward_logps(hidden, weight, bias, targets, *, mask=None, temperature=1.0, ignore_index=-100):
    """Forward-only log-probs of the active tokens: ``(layout, logp [N_a])`` (reference heads, old log-probs)."""
    layout = make_layout(
        hidden, weight, targets, bias, mask=mask, cu_seqlens=None, temperature=temperature, ignore_index=ignore_index
    )
    return layout, forward_stats(
        layout, weight, bias, temperature=temperature, ignore_index=ignore_index, with_entropy=False
    ).logp


def _preference(
    lin_weight, _input, target, bias, *, ref_logps, beta, average, nll, ignore_index, **fused
) -> tuple[Tensor, tuple]:
    """``fused_linear_dpo_loss`` on Liger's ``[2B, T, D]`` batch → its output and Liger's aux tuple ``(chosen_logps,
    rejected_logps, chosen_logits_mean, rejected_logits_mean, nll_loss, chosen_rewards, rejected_rewards)``.

    ``ref_logps``: ``[2B]`` reference sequence sums or None. ``average``: per-token means (Liger's
    ``average_log_prob``). ``nll``: report the chosen NLL (else 0). ``fused``: the remaining fused-loss options.
    """
    out = fused_linear_dpo_loss(
        _input, lin_weight, target, bias, ref_logps=ref_logps, beta=beta, ignore_index=ignore_index, **fused
    )
    half = target.shape[0] // 2
    lengths = (target != ignore_index).sum(-1).float()
    scale = lengths.clamp_min(1.0) if average else torch.ones_like(lengths)
    logps = out.seq_logps / scale
    rewards = (beta * (logps if ref_logps is None else logps - ref_logps / scale)).float()
    nll_loss = -out.seq_logps[:half].sum() / lengths[:half].sum().clamp_min(1.0) if nll else logps.new_zeros(())
    chosen = torch.arange(2 * half, device=target.device) < half
    means = _logits_sums(_input, lin_weight, bias, torch.stack((chosen, ~chosen)))
    means = means / (half * target.shape[1] * lin_weight.shape[0])
    return out, (logps[:half], logps[half:], means[0], means[1], nll_loss, rewards[:half], rewards[half:])


class LigerFusedLinearDPOLoss(nn.Module):
    """Liger's DPO (every loss type, plus ``ipo``); extra keyword: ``strategy``; forward: cached ``ref_*_logps``."""

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        alpha: float = 1.0,
        compute_nll_loss: bool = False,
        compiled: bool = True,
        use_ref_model: bool = True,
        average_log_prob: bool = False,
        chunk_size: int = 1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        discopop_tau: float = 0.05,
        *,
        strategy: str = "auto",
    ):
        super().__init__()
        check_choice("loss_type", loss_type, DPO_LOSS_TYPES)  # Liger's DPO class has no "orpo"
        DPOOptions(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, discopop_tau=discopop_tau)
        self.ignore_index = ignore_index
        self.beta = beta
        self.alpha = alpha
        self.compute_nll_loss = compute_nll_loss
        self.compiled = compiled
        self.use_ref_model = use_ref_model
        self.average_log_prob = average_log_prob
        self.chunk_size = chunk_size
        self.loss_type = loss_type
        self.label_smoothing = label_smoothing
        self.discopop_tau = discopop_tau
        self.strategy = strategy

    def forward(
        self,
        lin_weight,
        _input,
        target,
        bias=None,
        ref_input=None,
        ref_weight=None,
        ref_bias=None,
        *,
        ref_chosen_logps=None,
        ref_rejected_logps=None,
    ):
        ref = self._reference(target, ref_input, ref_weight, ref_bias, ref_chosen_logps, ref_rejected_logps)
        out, aux = _preference(
            lin_weight,
            _input,
            target,
            bias,
            ref_logps=ref,
            beta=self.beta,
            average=self.average_log_prob,
            nll=self.compute_nll_loss,
            ignore_index=self.ignore_index,
            loss_type=self.loss_type,
            label_smoothing=self.label_smoothing,
            discopop_tau=self.discopop_tau,
            reference_free=ref is None,
            length_normalize=self.average_log_prob or None,
            strategy=self.strategy,
            nll_coef=self.alpha if self.compute_nll_loss else 0.0,
        )
        return out.loss, aux

    def _reference(self, target, ref_input, ref_weight, ref_bias, ref_chosen, ref_rejected) -> Tensor | None:
        """``[2B]`` reference sequence sums: cached (means scaled back to sums), from the reference head, or None."""
        cached = ref_chosen is not None or ref_rejected is not None
        if not self.use_ref_model:  # Liger ignores ref_input here too
            if cached:
                raise ValueError(
                    expected("ref_chosen_logps, ref_rejected_logps", "None with use_ref_model=False", "tensors")
                )
            return None
        if cached:
            if ref_chosen is None or ref_rejected is None:
                raise ValueError(expected("ref_chosen_logps, ref_rejected_logps", "both or neither", "only one"))
            ref = torch.cat((ref_chosen, ref_rejected)).detach().double()
            lengths = (target != self.ignore_index).sum(-1).float().clamp_min(1.0)
            return ref * lengths if self.average_log_prob else ref
        if ref_input is None or ref_weight is None:
            raise ValueError(
                expected(
                    "ref_input, ref_weight",
                    "tensors with use_ref_model=True (or ref_chosen_logps + ref_rejected_logps)",
                    "None",
                )
            )
        layout, logp = _forward_logps(ref_input, ref_weight, ref_bias, target, ignore_index=self.ignore_index)
        return layout.seq_sum(logp)


class LigerFusedLinearCPOLoss(nn.Module):
    """Liger's CPO: reference-free sigmoid (+ label smoothing) plus ``alpha`` × NLL; extra keyword: ``strategy``."""

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        alpha: float = 1.0,
        label_smoothing: float = 0.0,
        compute_nll_loss: bool = True,
        compiled: bool = True,
        average_log_prob: bool = False,
        chunk_size: int = 1,
        *,
        strategy: str = "auto",
    ):
        super().__init__()
        DPOOptions(beta=beta, label_smoothing=label_smoothing)
        self.ignore_index = ignore_index
        self.beta = beta
        self.alpha = alpha
        self.label_smoothing = label_smoothing
        self.compute_nll_loss = compute_nll_loss
        self.compiled = compiled
        self.average_log_prob = average_log_prob
        self.chunk_size = chunk_size
        self.strategy = strategy

    def forward(self, lin_weight, _input, target, bias=None):
        out, aux = _preference(
            lin_weight,
            _input,
            target,
            bias,
            ref_logps=None,
            beta=self.beta,
            average=self.average_log_prob,
            nll=self.compute_nll_loss,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            reference_free=True,
            length_normalize=self.average_log_prob,
            strategy=self.strategy,
            nll_coef=self.alpha if self.compute_nll_loss else 0.0,
        )
        return out.loss, aux


class LigerFusedLinearSimPOLoss(nn.Module):
    """Liger's SimPO: length-normalized, reference-free sigmoid with margin ``gamma``; extra keyword: ``strategy``."""

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        alpha: float = 1.0,
        label_smoothing: float = 0.0,
        compute_nll_loss: bool = True,
        compiled: bool = True,
        gamma: float = 0.5,
        chunk_size: int = 1,
        *,
        strategy: str = "auto",
    ):
        super().__init__()
        DPOOptions(beta=beta, label_smoothing=label_smoothing, gamma=gamma)
        self.ignore_index = ignore_index
        self.beta = beta
        self.alpha = alpha
        self.label_smoothing = label_smoothing
        self.compute_nll_loss = compute_nll_loss
        self.compiled = compiled
        self.gamma = gamma
        self.chunk_size = chunk_size
        self.strategy = strategy

    def forward(self, lin_weight, _input, target, bias=None):
        out, aux = _preference(
            lin_weight,
            _input,
            target,
            bias,
            ref_logps=None,
            beta=self.beta,
            average=True,
            nll=self.compute_nll_loss,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            gamma=self.gamma,
            reference_free=True,
            length_normalize=True,
            strategy=self.strategy,
            nll_coef=self.alpha if self.compute_nll_loss else 0.0,
        )
        return out.loss, aux


class LigerFusedLinearORPOLoss(nn.Module):
    """Liger's ORPO: NLL − β·mean logσ(log odds ratio); aux adds ``log_odds_ratio``, ``log_odds_chosen``."""

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        compute_nll_loss: bool = True,
        compiled: bool = True,
        chunk_size: int = 1,
        *,
        strategy: str = "auto",
    ):
        super().__init__()
        self.ignore_index = ignore_index
        self.beta = beta
        self.compute_nll_loss = compute_nll_loss
        self.compiled = compiled
        self.chunk_size = chunk_size
        self.strategy = strategy

    def forward(self, lin_weight, _input, target, bias=None, nll_target=None):
        own_nll = self.compute_nll_loss and nll_target is None  # the fused ORPO's NLL term is on ``target``
        out, aux = _preference(
            lin_weight,
            _input,
            target,
            bias,
            ref_logps=None,
            beta=self.beta,
            average=True,
            nll=own_nll,
            ignore_index=self.ignore_index,
            loss_type="orpo",
            strategy=self.strategy,
        )
        loss = out.loss
        half = target.shape[0] // 2
        if not own_nll:
            sft = dict(ignore_index=self.ignore_index)
            loss = loss - fused_linear_sft_loss(_input[:half], lin_weight, target[:half], bias, **sft).loss
            if self.compute_nll_loss:
                nll = fused_linear_sft_loss(_input[:half], lin_weight, nll_target[:half], bias, **sft).loss
                loss = loss + nll
                aux = (*aux[:4], nll.detach(), *aux[5:])
        return loss, (*aux, out.metrics["log_odds_ratio"], out.metrics["log_odds_chosen"])


class LigerFusedLinearKTOLoss(nn.Module):
    """Liger's KTO; extra keyword: ``strategy``; forward: cached ``ref_logps [B]``."""

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        compiled: bool = True,
        use_ref_model: bool = False,
        average_log_prob: bool = False,
        chunk_size: int = 1,
        *,
        strategy: str = "auto",
    ):
        super().__init__()
        self.ignore_index = ignore_index
        self.beta = beta
        self.compiled = compiled
        self.use_ref_model = use_ref_model
        self.average_log_prob = average_log_prob
        self.chunk_size = chunk_size
        self.strategy = strategy

    def forward(
        self,
        _input,
        lin_weight,
        target,
        bias=None,
        preference_labels=None,
        ref_input=None,
        ref_weight=None,
        ref_bias=None,
        kl=None,
        *,
        ref_logps=None,
    ):
        if preference_labels is None:
            raise ValueError(expected("preference_labels", "[B] bool (True = desirable)", None))
        z0 = None if kl is None else torch.as_tensor(kl, dtype=torch.float32)
        if z0 is not None and z0.numel() != 1:
            raise ValueError(expected("kl", "a float or a one-element tensor", f"shape {tuple(z0.shape)}"))
        if ref_logps is not None and not self.use_ref_model:
            raise ValueError(expected("ref_logps", "None with use_ref_model=False", "a tensor"))
        reference = dict(ref_logps=torch.zeros(target.shape[0], device=target.device))  # Liger: no model, ref = 0
        if self.use_ref_model and ref_logps is not None:  # in the form forward returns: means with average_log_prob
            lengths = (target != self.ignore_index).sum(-1).float().clamp_min(1.0)
            reference = dict(ref_logps=ref_logps.detach().float() * lengths if self.average_log_prob else ref_logps)
        elif self.use_ref_model:
            reference = dict(ref_hidden=ref_input, ref_weight=ref_weight, ref_bias=ref_bias)
        out = fused_linear_kto_loss(
            _input,
            lin_weight,
            target,
            bias,
            labels=preference_labels,
            beta=self.beta,
            reference_point=None if z0 is None else z0.reshape(()),
            length_normalize=self.average_log_prob,
            ignore_index=self.ignore_index,
            strategy=self.strategy,
            **reference,
        )
        m = out.metrics
        sums = _logits_sums(_input, lin_weight, bias, torch.stack((preference_labels, ~preference_labels)))
        return out.loss, (
            m["logps/chosen_sum"],
            m["logps/rejected_sum"],
            sums[0],
            sums[1],
            m["rewards/chosen_sum"],
            m["rewards/rejected_sum"],
        )


def _token_ratio(ratio: Tensor, mask: Tensor, loss_type: str) -> Tensor:
    """Liger's ``vllm_is_ratio`` (``[B]``, ``[B, 1]`` or ``[B, T]``) as a float32 ``[B, T]`` per-token ratio.

    A per-sequence ratio multiplies every token's loss, except for vespo, which sums log ratios into its sequence
    weight: there it goes on the first completion token (ratio 1 elsewhere).
    """
    b, t = mask.shape
    if ratio.dim() not in (1, 2) or ratio.shape[0] != b or (ratio.dim() == 2 and ratio.shape[1] not in (1, t)):
        raise ValueError(expected("vllm_is_ratio", f"[{b}], [{b}, 1] or [{b}, {t}]", tuple(ratio.shape)))
    ratio = ratio.detach().float().reshape(b, -1)
    if ratio.shape[1] == t:
        return ratio
    if loss_type != "vespo":
        return ratio.expand(b, t)
    first = mask.float().argmax(1)
    return torch.ones(b, t, device=ratio.device).index_put_((torch.arange(b, device=ratio.device), first), ratio[:, 0])


class LigerFusedLinearGRPOLoss(nn.Module):
    """Liger's GRPO family; extra keyword: ``kl_estimator`` ("k1" | "k2" | "k3")."""

    def __init__(
        self,
        beta: float = 0.04,
        compiled: bool = True,
        use_ref_model: bool = True,
        chunk_size: int = 1,
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.2,
        loss_type: str = "dapo",
        max_completion_length: int | None = None,
        importance_sampling_level: str = "token",
        sapo_temperature_pos: float = 1.0,
        sapo_temperature_neg: float = 1.05,
        temperature: float = 1.0,
        delta: float | None = None,
        use_bias_correction_kl: bool = False,
        vespo_k_pos: float = 2.0,
        vespo_lambda_pos: float = 3.0,
        vespo_k_neg: float = 3.0,
        vespo_lambda_neg: float = 2.0,
        *,
        kl_estimator: str = "k3",
    ):
        super().__init__()
        self.beta = beta
        self.compiled = compiled
        self.use_ref_model = use_ref_model
        self.chunk_size = chunk_size
        self.epsilon_low = epsilon_low
        self.epsilon_high = epsilon_high
        self.loss_type = loss_type
        self.max_completion_length = max_completion_length
        self.importance_sampling_level = importance_sampling_level
        self.sapo_temperature_pos = sapo_temperature_pos
        self.sapo_temperature_neg = sapo_temperature_neg
        self.temperature = temperature
        self.delta = delta
        self.use_bias_correction_kl = use_bias_correction_kl
        self.vespo_k_pos = vespo_k_pos
        self.vespo_lambda_pos = vespo_lambda_pos
        self.vespo_k_neg = vespo_k_neg
        self.vespo_lambda_neg = vespo_lambda_neg
        self.kl_estimator = kl_estimator
        self._options(beta)  # checks every option now, as Liger's constructor does

    def _options(self, beta: float) -> dict:
        """The fused loss's keywords: the checked ``GRPOOptions`` fields, ``max_completion_length``, ``temperature``."""
        options = GRPOOptions(
            beta=beta,
            kl_estimator=self.kl_estimator,
            epsilon_low=self.epsilon_low,
            epsilon_high=self.epsilon_high,
            delta=self.delta,
            loss_type=self.loss_type,
            importance_sampling_level=self.importance_sampling_level,
            sapo_temperature_pos=self.sapo_temperature_pos,
            sapo_temperature_neg=self.sapo_temperature_neg,
            use_bias_correction_kl=self.use_bias_correction_kl,
            vespo_shape=(self.vespo_k_pos, self.vespo_lambda_pos, self.vespo_k_neg, self.vespo_lambda_neg),
        )
        return dict(asdict(options), max_completion_length=self.max_completion_length, temperature=self.temperature)

    def forward(
        self,
        _input,
        lin_weight,
        selected_token_ids,
        attention_mask,
        advantages,
        bias=None,
        ref_per_token_logps=None,
        old_per_token_logps=None,
        ref_input=None,
        ref_weight=None,
        ref_bias=None,
        vllm_is_ratio=None,
        num_items_in_batch=None,
    ):
        if self.use_ref_model and ref_per_token_logps is None and (ref_input is None or ref_weight is None):
            raise ValueError(
                expected("ref_per_token_logps", "a tensor with use_ref_model=True (or ref_input + ref_weight)", None)
            )
        reference = {}
        beta = self.beta if self.use_ref_model else 0.0
        if beta != 0.0 and ref_per_token_logps is not None:  # Liger prefers the cached log-probs too
            reference = dict(ref_logp=ref_per_token_logps)
        elif beta != 0.0:
            reference = dict(ref_hidden=ref_input, ref_weight=ref_weight, ref_bias=ref_bias)
        mask = attention_mask.bool()
        old = old_per_token_logps
        sampler = None
        if vllm_is_ratio is not None:
            if old is None:  # on-policy: the old log-probs are this forward's, needed before it
                layout, logp = _forward_logps(
                    _input, lin_weight, bias, selected_token_ids, mask=mask, temperature=self.temperature
                )
                old = layout.to_padded(logp)
            sampler = old.detach().float() - _token_ratio(vllm_is_ratio, mask, self.loss_type).log()
        out = fused_linear_grpo_loss(
            _input,
            lin_weight,
            selected_token_ids,
            bias,
            advantages=advantages,
            mask=mask,
            old_logp=old,
            sampler_logp=sampler,
            num_items_in_batch=num_items_in_batch,
            **reference,
            **self._options(beta),
        )
        metrics = (out.metrics["clip_ratio/region_mean"],)
        if self.beta != 0.0:
            metrics = (out.metrics.get("kl", out.loss.new_zeros(())), *metrics)
        return out.loss, metrics


def _pad_vocab(weight: Tensor, bias: Tensor | None, v: int) -> tuple[Tensor, Tensor | None]:
    """The student head with zero rows up to the teacher's ``v`` (Liger pads the student logits with zeros)."""
    pad = v - weight.shape[0]
    if pad <= 0:
        return weight, bias
    bias = None if bias is None else torch.cat((bias, bias.new_zeros(pad)))
    return torch.cat((weight, weight.new_zeros(pad, weight.shape[1]))), bias


class LigerFusedLinearJSDLoss(nn.Module):
    """Liger's JSD distillation: ``weight_soft_loss`` × JSD_β(teacher, student) + ``weight_hard_loss`` × CE."""

    def __init__(
        self,
        weight_hard_loss: float = 0.5,
        weight_soft_loss: float = 0.5,
        beta: float = 0.5,
        ignore_index: int = -100,
        temperature: float = 1.0,
        compiled: bool = True,
        chunk_size: int = 1024,
        return_soft_hard_loss: bool = False,
    ):
        super().__init__()
        require(temperature != 0, "temperature", "a number != 0", temperature)
        require(0.0 <= beta <= 1.0, "beta", "a number in [0, 1]", beta)
        self.weight_hard_loss = weight_hard_loss
        self.weight_soft_loss = weight_soft_loss
        self.ignore_index = ignore_index
        self.return_soft_hard_loss = return_soft_hard_loss
        self.temperature = temperature
        self.compiled = compiled
        self.beta = beta
        self.chunk_size = chunk_size

    def forward(
        self,
        student_input,
        student_weight,
        teacher_input,
        teacher_weight,
        true_labels,
        student_bias=None,
        teacher_bias=None,
    ):
        # Liger takes [N, D] rows (any leading shape works): one padded sequence of N tokens here
        hidden = student_input.reshape(1, -1, student_input.shape[-1])
        labels = true_labels.reshape(1, -1)
        teacher = teacher_input.reshape(1, -1, teacher_input.shape[-1])
        divergence = {0.0: "reverse_kl", 1.0: "kl"}.get(float(self.beta), "jsd")
        weight, bias = _pad_vocab(student_weight, student_bias, teacher_weight.shape[0])
        soft = fused_linear_kl(
            hidden,
            weight,
            labels,
            bias,
            ref_hidden=teacher,
            ref_weight=teacher_weight,
            ref_bias=teacher_bias,
            divergence=divergence,
            beta=self.beta,
            temperature=self.temperature,
            ignore_index=self.ignore_index,
        ).loss
        hard = soft.new_zeros(())
        if self.weight_hard_loss != 0 or self.return_soft_hard_loss:  # CE at temperature 1, as Liger
            hard = fused_linear_sft_loss(
                hidden, student_weight, labels, student_bias, ignore_index=self.ignore_index
            ).loss
        loss = self.weight_soft_loss * soft + self.weight_hard_loss * hard
        return (loss, soft.detach(), hard.detach()) if self.return_soft_hard_loss else loss
