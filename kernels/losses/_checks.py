"""Argument checks shared by the public losses and fused entry points: ValueError/TypeError worded by
``hotloop._errors.expected`` (``"<argument>: expected <what>, got <seen>"``), the wording of every layer.

Masks: a mask *selects* tokens. Any nonzero value (True, 1, 0.5, -2) includes the token with weight 1;
zero excludes it. The functional losses (``as_mask``) and the fused path (``make_layout``:
``mask.bool()``) agree; per-token weights belong in the advantages or ``weights``, not the mask.

Devices and dtypes: :func:`check_aux` is called once at every public entry point on the auxiliary
tensors (advantages, old/ref/sampler log-probs, masks, labels, lengths, cu_seqlens), so a CPU
``advantages`` beside CUDA hidden states fails here, naming the argument, not deep in a launcher."""

from __future__ import annotations

import torch
from torch import Tensor

from hotloop._errors import check_choice, expected

__all__ = ["as_mask", "check_aux", "check_choice", "check_mask", "check_tensor", "mean_or_zero"]


def check_tensor(name: str, t: Tensor, shape: tuple[int, ...] | None = None, *, ndim: int | None = None) -> None:
    """Raise unless ``t`` is a tensor of the given ``shape`` (or number of dims)."""
    if not isinstance(t, Tensor):
        raise TypeError(expected(name, "a torch.Tensor", type(t).__name__))
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(expected(name, f"shape {tuple(shape)}", tuple(t.shape)))
    if ndim is not None and t.dim() != ndim:
        raise ValueError(expected(name, f"{ndim} dims", f"shape {tuple(t.shape)}"))


def check_mask(mask: Tensor, like: Tensor, name: str = "mask") -> None:
    """Raise unless ``mask`` is a bool or real-number tensor of ``like``'s shape."""
    check_tensor(name, mask, tuple(like.shape))
    if mask.dtype.is_complex:
        raise TypeError(expected(name, "bool or 0/1 numbers", f"dtype {mask.dtype}"))


def as_mask(mask: Tensor, like: Tensor, name: str = "mask") -> Tensor:
    """``mask`` (``like``'s shape) as 1.0 where nonzero, 0.0 elsewhere, in ``like``'s dtype (module docstring)."""
    check_mask(mask, like, name)
    return (mask != 0).to(like.dtype)


_KINDS = {"float": "a floating-point", "int": "an integer", "mask": "a bool or real-number", "bool": "a bool"}


def _kind_ok(t: Tensor, kind: str) -> bool:
    if kind == "float":
        return t.is_floating_point()
    if kind == "int":
        return not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool
    if kind == "bool":
        return t.dtype == torch.bool
    return not t.is_complex()


def check_aux(like_name: str, like: Tensor, **tensors: tuple[Tensor | None, str]) -> None:
    """Raise unless each ``name=(tensor, kind)`` (tensor None: skipped) is a tensor on ``like``'s device whose
    dtype is of ``kind`` ("float", "int", "mask" or "bool")."""
    if not isinstance(like, Tensor):
        raise TypeError(expected(like_name, "a torch.Tensor", type(like).__name__))
    for name, (t, kind) in tensors.items():
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(expected(name, "a torch.Tensor", type(t).__name__))
        if t.device != like.device:
            raise ValueError(expected(name, f"{like_name}'s device {like.device}", t.device))
        if not _kind_ok(t, kind):
            raise TypeError(expected(name, f"{_KINDS[kind]} tensor", f"dtype {t.dtype}"))


def mean_or_zero(x: Tensor) -> Tensor:
    """Mean of ``x``; an empty ``x`` gives 0 (and a zero gradient), the documented loss of an empty batch."""
    return x.sum() / max(x.numel(), 1)
