"""Group-relative advantages for GRPO and RLOO, vectorized over groups (no Python loop over samples).

Rewards come in groups of ``G`` samples of the same prompt, laid out contiguously (``[B*G]`` or ``[B, G]``).

- GRPO (Shao et al. 2024, https://arxiv.org/abs/2402.03300): ``A_i = (r_i − mean_g) / (std_g + eps)``,
  ``std_g`` the unbiased standard deviation of the group (as TRL's ``std(dim=1)``); ``scale="none"`` keeps
  ``r_i − mean_g`` (Dr. GRPO, https://arxiv.org/abs/2503.20783).
- RLOO (Ahmadian et al. 2024, https://arxiv.org/abs/2402.14740): ``A_i = r_i − mean_{j≠i} r_j
  = G/(G−1) · (r_i − mean_g)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hotloop._errors import expected

from ._checks import check_choice


def _grouped(rewards: Tensor, group_size: int, min_size: int) -> Tensor:
    if not isinstance(group_size, int) or group_size < min_size:
        raise ValueError(expected("group_size", f"an int >= {min_size}", repr(group_size)))
    shape_ok = rewards.dim() in (1, 2) and rewards.numel() % group_size == 0
    if not shape_ok or (rewards.dim() == 2 and rewards.shape[1] != group_size):
        want = f"[B*G] or [B, G] with G = group_size = {group_size}"
        raise ValueError(expected("rewards", want, f"shape {tuple(rewards.shape)}"))
    return rewards.reshape(-1, group_size)


def _shifted(r: Tensor) -> Tensor:
    """``r`` minus each group's first reward: same centred values and std, but a group of equal rewards becomes
    exact zeros (their float mean can be an ulp off the common value, and ulp / (std ≈ ulp + eps) is not small)."""
    return r - r[:, :1]


def group_advantages(rewards: Tensor, group_size: int, *, scale: str = "std", eps: float = 1e-6) -> Tensor:
    """GRPO advantages: rewards centred (and scaled by the std) within each group.

    Args:
        rewards: ``[B*G]`` or ``[B, G]`` float rewards, groups contiguous.
        group_size: ``G`` (≥ 2 with ``scale="std"``, ≥ 1 otherwise).
        scale: ``"std"`` divides by ``std_g + eps``; ``"none"`` only centres.
        eps: added to the group std.

    Returns:
        ``[B*G]`` advantages in ``rewards``' dtype.
    """
    check_choice("scale", scale, ("std", "none"))
    r = _shifted(_grouped(rewards, group_size, 2 if scale == "std" else 1))
    adv = r - r.mean(dim=1, keepdim=True)
    if scale == "std":
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    return adv.reshape(-1)


def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """RLOO advantages: each reward minus the mean of the other ``G − 1`` rewards of its group.

    Args:
        rewards: ``[B*G]`` or ``[B, G]`` float rewards, groups contiguous.
        group_size: ``G`` ≥ 2.

    Returns:
        ``[B*G]`` advantages.
    """
    r = _shifted(_grouped(rewards, group_size, 2))
    return (r - r.mean(dim=1, keepdim=True)).reshape(-1) * (group_size / (group_size - 1))


def reference_group_advantages(rewards: Tensor, group_size: int, scale: str, eps: float) -> Tensor:
    """Float64 reference: one group at a time."""
    out = []
    for g in rewards.double().reshape(-1, group_size):
        a = g - g.mean()
        out.append(a / (g.std() + eps) if scale == "std" else a)
    return torch.cat(out)


def reference_rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """Float64 reference: leave-one-out baselines written out per sample."""
    r = rewards.double().reshape(-1, group_size)
    base = (r.sum(dim=1, keepdim=True) - r) / (group_size - 1)
    return (r - base).reshape(-1)
