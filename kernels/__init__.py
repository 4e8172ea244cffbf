""""""

from .fused_linear_logprob import FusedLinearLogprob, fused_linear_logprob, reference_fused_linear_logprob

__all__ = ["FusedLinearLogprob", "fused_linear_logprob", "reference_fused_linear_logprob"]
