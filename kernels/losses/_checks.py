"""Argument checks shared by the public losses (ValueError naming argument, value seen, value expected)."""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor


def check_choice(name: str, value: str, choices: Iterable[str]) -> None:
    """Raise unless ``value`` is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_tensor(name: str, t: Tensor, shape: tuple[int, ...] | None = None, *, ndim: int | None = None) -> None:
    """Raise unless ``t`` is a tensor of the given ``shape`` (or number of dims)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")


def check_mask(mask: Tensor, like: Tensor, name: str = "mask") -> None:
    """Raise unless ``mask`` is a bool or real-number tensor of ``like``'s shape."""
    check_tensor(name, mask, tuple(like.shape))
    if mask.dtype.is_complex:
        raise TypeError(f"{name} must be bool or 0/1 numbers, got dtype {mask.dtype}")


def as_mask(mask: Tensor, like: Tensor, name: str = "mask") -> Tensor:
    """A bool or 0/1 ``mask`` with ``like``'s shape, as a float tensor in ``like``'s dtype."""
    check_mask(mask, like, name)
    return mask.to(like.dtype)
