"""hotloop's kernels: fused linear log-prob and fused alignment losses that never store [N, V] logits.

Public API only. Fused modules take hidden states and the LM head, ``(hidden, weight, targets, ...,
bias=None)``; functional losses on log-probs (for users who compute log-probs themselves) live in
``hotloop.kernels.losses`` and are re-exported here; Liger-Kernel drop-ins in
``hotloop.kernels.compat.liger``. CUDA tensors run Triton kernels, CPU tensors the exact chunked
PyTorch path (``HOTLOOP_BACKEND`` overrides; see ``_dispatch``).
"""

from .fused_linear_logprob import FusedLinearLogprob, fused_linear_logprob, reference_fused_linear_logprob
from .fused_linear_dpo import FusedLinearDPOLoss, fused_linear_dpo_loss
from .fused_linear_grpo import FusedLinearGRPOLoss, fused_linear_grpo_loss
from .fused_linear_kl import FusedLinearKL, fused_linear_kl, reference_fused_linear_kl
from .fused_linear_kto import FusedLinearKTOLoss, fused_linear_kto_loss
from .fused_linear_sft import FusedLinearSFTLoss, fused_linear_sft_loss
from .losses import (
    LossOutput, dpo_loss, group_advantages, grpo_loss, kl_penalty, kto_loss, orpo_loss, policy_gradient_loss,
    rloo_advantages, segment_sum, sft_loss,
)  # fmt: skip

__all__ = [
    "FusedLinearLogprob", "fused_linear_logprob", "reference_fused_linear_logprob",
    "FusedLinearDPOLoss", "fused_linear_dpo_loss",
    "FusedLinearGRPOLoss", "fused_linear_grpo_loss",
    "FusedLinearKL", "fused_linear_kl", "reference_fused_linear_kl",
    "FusedLinearKTOLoss", "fused_linear_kto_loss",
    "FusedLinearSFTLoss", "fused_linear_sft_loss",
    "LossOutput", "dpo_loss", "group_advantages", "grpo_loss", "kl_penalty", "kto_loss", "orpo_loss",
    "policy_gradient_loss", "rloo_advantages", "segment_sum", "sft_loss",
]
