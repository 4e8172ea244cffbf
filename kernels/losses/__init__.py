"""Losses on log-probs: pure functions of tensors and floats returning :class:`LossOutput`."""

from .advantages import group_advantages, rloo_advantages
from .dpo import DPOOptions, dpo_loss, orpo_loss
from .grpo import GRPOOptions, grpo_loss, grpo_per_token, loss_weights
from .kl_penalty import kl_penalty, kl_per_token
from .kto import KTOOptions, kto_kl_estimate, kto_loss
from .output import LossOutput
from .policy_gradient import policy_gradient_loss
from .segments import segment_sum
from .sft import sft_loss

__all__ = [
    "DPOOptions",
    "GRPOOptions",
    "KTOOptions",
    "LossOutput",
    "dpo_loss",
    "group_advantages",
    "grpo_loss",
    "grpo_per_token",
    "kl_penalty",
    "kl_per_token",
    "kto_kl_estimate",
    "kto_loss",
    "loss_weights",
    "orpo_loss",
    "policy_gradient_loss",
    "rloo_advantages",
    "segment_sum",
    "sft_loss",
]
