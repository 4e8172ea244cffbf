"""The value every loss on log-probs returns: a scalar loss and detached scalar metrics.

Metric names follow TRL's logs (``rewards/chosen``, ``rewards/margins``, ``clip_ratio/low_mean``,
``kl``, ...) so dashboards built for TRL read hotloop's runs unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class LossOutput:
    """A scalar ``loss`` (differentiable) and ``metrics`` (detached 0-d tensors, no host sync)."""

    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)
