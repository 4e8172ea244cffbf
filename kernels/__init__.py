""""""

from .fused_linear_logprob import FusedLinearLogprob, fused_linear_logprob, reference_fused_linear_logprob
from .fused_linear_dpo import FusedLinearDPOLoss, fused_linear_dpo_loss
from .fused_linear_grpo import FusedLinearGRPOLoss, fused_linear_grpo_loss
from .fused_linear_kl import FusedLinearKL, fused_linear_kl, reference_fused_linear_kl
from .fused_linear_kto import FusedLinearKTOLoss, fused_linear_kto_loss
from .fused_linear_sft import FusedLinearSFTLoss, fused_linear_sft_loss

__all__ = [
    "FusedLinearLogprob", "fused_linear_logprob", "reference_fused_linear_logprob",
    "FusedLinearDPOLoss", "fused_linear_dpo_loss",
    "FusedLinearGRPOLoss", "fused_linear_grpo_loss",
    "FusedLinearKL", "fused_linear_kl", "reference_fused_linear_kl",
    "FusedLinearKTOLoss", "fused_linear_kto_loss",
    "FusedLinearSFTLoss", "fused_linear_sft_loss",
]
