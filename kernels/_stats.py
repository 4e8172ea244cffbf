"""Per-row results that the kernels' forward passes hand to the fused losses: :class:`TokenStats` (log-prob,
entropy, logsumexp of one head) and :class:`KLStats` (divergence of two heads).

Their own module so that the PyTorch paths (``fused_linear_logprob``, ``fused_linear_kl``) and the Triton paths
(``_fused_linear_logprob_triton``, ``_fused_linear_kl_triton``) import them without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class TokenStats:
    """Per-row [N] results of the log-prob forward: float32, but lse float64."""

    logp: Tensor  # log p(target); 0 where ignored
    entropy: Tensor | None  # entropy of the full distribution; 0 where ignored; None if not asked
    lse: Tensor  # float64: logsumexp of the temperature-scaled logits (the backward splits it into fp32 hi + lo)


@dataclass
class KLStats:
    """Per-row float32 [N] results of the KL forward, for the rows it was given (the counted ones)."""

    divergence: Tensor  # the selected divergence
    kl: Tensor  # KL(π ‖ π_ref)
    entropy: Tensor  # entropy of π
