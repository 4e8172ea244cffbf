"""Checks of an LM head's inputs, shared by every fused entry point: the policy head (``hidden``, ``weight``,
``targets``, ``bias``, ``temperature``) and a second head laid out like it (``fused_linear_kl``'s reference).

``ValueError`` / ``TypeError`` naming the argument, the value seen and the value expected (``hotloop._errors``).
``check_head_inputs`` reads one host scalar (whether any target lies outside ``[0, V)``).
"""

from __future__ import annotations

import torch

from hotloop._errors import expected, require

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""The dtypes a head may have (its logits are computed in float32)."""


def check_head_inputs(hidden, weight, targets, bias, temperature, ignore_index) -> None:
    """ValueError/TypeError naming the argument, the value seen and the value expected."""
    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets), ("bias", bias)):
        if not isinstance(t, torch.Tensor) and not (name == "bias" and t is None):
            raise TypeError(expected(name, "a torch.Tensor" + (" or None" if name == "bias" else ""), type(t).__name__))
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(expected("hidden", "float32, bfloat16 or float16", hidden.dtype))
    if hidden.dim() < 1:
        raise ValueError(expected("hidden", "shape [..., D]", "a 0-d tensor"))
    if weight.dtype != hidden.dtype:
        raise TypeError(expected("weight", f"hidden's dtype {hidden.dtype}", weight.dtype))
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        want = f"shape [V >= 1, D={hidden.shape[-1]}] (D = hidden's last dim)"
        raise ValueError(expected("weight", want, tuple(weight.shape)))
    if targets.dtype != torch.int64:
        raise TypeError(expected("targets", "int64", targets.dtype))
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(
            expected("targets", f"hidden's leading shape {tuple(hidden.shape[:-1])}", tuple(targets.shape))
        )
    if bias is not None and bias.dtype != hidden.dtype:
        raise TypeError(expected("bias", f"hidden's dtype {hidden.dtype}", bias.dtype))
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(expected("bias", f"shape ({weight.shape[0]},) (V)", tuple(bias.shape)))
    for name, t in (("weight", weight), ("targets", targets), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(expected(name, f"hidden's device {hidden.device}", t.device))
    if not (float(temperature) > 0.0 and float(temperature) < float("inf")):
        raise ValueError(expected("temperature", "a finite number > 0", temperature))
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= weight.shape[0]))
    if bool(bad.any()):
        want = f"values in [0, {weight.shape[0]}) or ignore_index={ignore_index}"
        raise ValueError(expected("targets", want, targets[bad][0].item()))


def check_reference_like_hidden(hidden, ref_hidden, ref_weight, ref_bias, v: int) -> None:
    """ValueError/TypeError naming the reference argument, the value seen and the value expected."""
    dtype = ref_hidden.dtype
    d_ref = ref_hidden.shape[-1]
    require(dtype in FLOAT_DTYPES, "ref_hidden", "float32, bfloat16 or float16", dtype, TypeError)
    same_lead = ref_hidden.dim() == hidden.dim() and ref_hidden.shape[:-1] == hidden.shape[:-1]
    require(
        same_lead, "ref_hidden", f"hidden's leading shape {tuple(hidden.shape[:-1])} + [D_ref]", tuple(ref_hidden.shape)
    )
    require(ref_weight.dtype == dtype, "ref_weight", f"ref_hidden's dtype {dtype}", ref_weight.dtype, TypeError)
    require(
        ref_weight.shape == (v, d_ref),
        "ref_weight",
        f"shape [V={v}, D_ref={d_ref}] (V = weight's rows)",
        tuple(ref_weight.shape),
    )
    if ref_bias is not None:
        require(ref_bias.dtype == dtype, "ref_bias", f"ref_hidden's dtype {dtype}", ref_bias.dtype, TypeError)
        require(ref_bias.shape == (v,), "ref_bias", f"shape ({v},) (V)", tuple(ref_bias.shape))
    for name, t in (("ref_hidden", ref_hidden), ("ref_weight", ref_weight), ("ref_bias", ref_bias)):
        if t is not None:
            require(t.device == hidden.device, name, f"hidden's device {hidden.device}", t.device)
