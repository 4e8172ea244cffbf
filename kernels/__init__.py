"""hotloop's kernels: fused linear log-prob and fused alignment losses that never store [N, V] logits.

Public API only. Fused losses and modules take ``(hidden, weight, targets, bias=None, *, ...)``: hidden states
and the LM head positionally, everything else by keyword (``docs/notation.md``); each loss family's options are
declared once, in ``GRPOOptions``, ``DPOOptions``, ``KTOOptions``, ``KLOptions``. Functional losses on log-probs
(for users who compute log-probs themselves) live in ``hotloop.kernels.losses`` and are re-exported here;
Liger-Kernel drop-ins in ``hotloop.kernels.compat.liger``. CUDA tensors run Triton kernels, CPU tensors the exact
chunked PyTorch path (``HOTLOOP_BACKEND`` overrides; see ``_dispatch``), whose tile buffers stay held per thread
between calls (``release_workspace()`` frees them; ``_workspace``).
"""

from ._workspace import release_workspace
from .fused_linear_dpo import FusedLinearDPOLoss, fused_linear_dpo_loss
from .fused_linear_grpo import FusedLinearGRPOLoss, fused_linear_grpo_loss
from .fused_linear_kl import FusedLinearKL, KLOptions, fused_linear_kl, reference_fused_linear_kl
from .fused_linear_kto import FusedLinearKTOLoss, fused_linear_kto_loss
from .fused_linear_logprob import FusedLinearLogprob, fused_linear_logprob, reference_fused_linear_logprob
from .fused_linear_sft import FusedLinearSFTLoss, fused_linear_sft_loss
from .losses import (
    DPOOptions,
    GRPOOptions,
    KTOOptions,
    LossOutput,
    dpo_loss,
    group_advantages,
    grpo_loss,
    kl_penalty,
    kto_loss,
    orpo_loss,
    policy_gradient_loss,
    rloo_advantages,
    segment_sum,
    sft_loss,
)

__all__ = [
    "FusedLinearLogprob",
    "fused_linear_logprob",
    "reference_fused_linear_logprob",
    "FusedLinearDPOLoss",
    "fused_linear_dpo_loss",
    "FusedLinearGRPOLoss",
    "fused_linear_grpo_loss",
    "FusedLinearKL",
    "KLOptions",
    "fused_linear_kl",
    "reference_fused_linear_kl",
    "FusedLinearKTOLoss",
    "fused_linear_kto_loss",
    "FusedLinearSFTLoss",
    "fused_linear_sft_loss",
    "DPOOptions",
    "GRPOOptions",
    "KTOOptions",
    "LossOutput",
    "dpo_loss",
    "group_advantages",
    "grpo_loss",
    "kl_penalty",
    "kto_loss",
    "orpo_loss",
    "policy_gradient_loss",
    "rloo_advantages",
    "segment_sum",
    "sft_loss",
    "release_workspace",
]
