"""Liger-Kernel 0.8.5's preference losses (DPO, CPO, SimPO, ORPO, KTO) as drop-ins over hotloop's fused losses.

Re-exported by :mod:`hotloop.kernels.compat.liger`, whose docstring lists what is kept (Liger's signatures, aux
tuples) and the deliberate differences.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hotloop._errors import check_choice, expected

from .._fused_linear_common import forward_stats, make_layout
from ..fused_linear_dpo import fused_linear_dpo_loss
from ..fused_linear_kto import fused_linear_kto_loss
from ..fused_linear_sft import fused_linear_sft_loss
from ..options import DPO_LOSS_TYPES, DPOOptions


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
