"""Liger-Kernel 0.8.5's GRPO family and JSD distillation as drop-ins over hotloop's fused losses.

Re-exported by :mod:`hotloop.kernels.compat.liger`, whose docstring lists what is kept (Liger's signatures, aux
tuples) and the deliberate differences.
"""

from __future__ import annotations

from dataclasses import asdict

import torch
from torch import Tensor, nn

from hotloop._errors import expected, require

from ..fused_linear_grpo import fused_linear_grpo_loss
from ..fused_linear_kl import fused_linear_kl
from ..fused_linear_sft import fused_linear_sft_loss
from ..options import GRPOOptions
from ._liger_preference import _forward_logps


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
