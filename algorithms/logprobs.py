"""Per-token and per-sequence log-probs of given token ids, without materialising the logits.

For a causal LM with backbone ``f`` and LM head ``W`` (``[V, D]``, optional bias ``b``):

    h = f(input_ids)                                   [B, L, D]
    logp[b, t] = log softmax((W h[b, t] + b) / T)[input_ids[b, t + 1]]     t < L − 1

computed by :func:`hotloop.kernels.fused_linear_logprob.fused_linear_logprob`, which streams the
vocabulary and never stores the ``[B·L, V]`` logits (memory ``O(B·L·D)`` instead of ``O(B·L·V)``).
Positions are ``cumsum(attention_mask) − 1``, so left- and right-padded rows both see the
positions they would see alone (the rollout engine uses the same rule); padded targets are
ignored and get log-prob 0. With a ``completion_mask`` the prompt targets are ignored too: the
backbone still runs on every position (the completion attends to the prompt), but the fused
kernel drops those rows before any LM-head matmul, so the head costs only the completion tokens
(forward and backward). The same function serves the policy (with grad), the frozen reference
(under ``torch.no_grad``) and the "sampler log-probs equal a fresh forward" check.
"""

from __future__ import annotations

import torch
from torch import nn

from hotloop.kernels.fused_linear_logprob import fused_linear_logprob

IGNORE_INDEX = -100


def _backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The decoder stack (returns ``last_hidden_state``) and the output projection of a causal LM."""
    get_decoder = getattr(model, "get_decoder", None)
    backbone = get_decoder() if callable(get_decoder) else getattr(model, "model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if backbone is None or backbone is model or head is None:
        raise TypeError(
            f"model: expected a causal LM with a decoder (get_decoder() or .model) and an "
            f"output embedding (get_output_embeddings()), got {type(model).__name__}"
        )
    return backbone, head


def token_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    completion_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Log-prob of every next token under ``model`` at ``temperature``.

    Args:
        model: a causal LM (``transformers`` ``*ForCausalLM`` or the same layout).
        input_ids: [B, L] int64.
        attention_mask: [B, L] 0/1 (or bool); 0 marks padding (left or right).
        temperature: T > 0 dividing the logits.
        completion_mask: [B, L] 0/1 (aligned with ``input_ids``) or None; when given, only the tokens it
            marks get a log-prob, and only their rows cost LM-head work.
    Returns:
        [B, L − 1] float32: ``logp[b, t] = log p(input_ids[b, t + 1] | input_ids[b, :t + 1])``,
        0 where ``attention_mask[b, t + 1] == 0`` (or ``completion_mask[b, t + 1] == 0``).
    """
    if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape:
        raise ValueError(
            f"input_ids, attention_mask: expected equal [B, L] shapes, got "
            f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}"
        )
    if completion_mask is not None and completion_mask.shape != input_ids.shape:
        raise ValueError(
            f"completion_mask: expected shape {tuple(input_ids.shape)}, got {tuple(completion_mask.shape)}"
        )
    if input_ids.shape[1] < 2:
        raise ValueError(f"input_ids: expected at least 2 tokens per row, got shape {tuple(input_ids.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature: expected a float > 0, got {temperature!r}")
    backbone, head = _backbone_and_head(model)
    mask = attention_mask.long()
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    hidden = backbone(input_ids=input_ids, attention_mask=mask, position_ids=positions).last_hidden_state
    B, L = input_ids.shape
    counted = mask[:, 1:] != 0
    if completion_mask is not None:
        counted = counted & (completion_mask[:, 1:] != 0)
    targets = input_ids[:, 1:].masked_fill(~counted, IGNORE_INDEX).reshape(-1)
    hidden = hidden[:, :-1].reshape(B * (L - 1), hidden.shape[-1])
    logp = fused_linear_logprob(
        hidden,
        head.weight,
        targets,
        getattr(head, "bias", None),
        temperature=float(temperature),
        ignore_index=IGNORE_INDEX,
    )
    return logp.view(B, L - 1)


def sequence_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Sum of the completion tokens' log-probs per row (the LM head runs on the completion rows only).

    Args:
        input_ids, attention_mask: [B, L] as for :func:`token_logprobs`.
        completion_mask: [B, L] 0/1, 1 on the completion tokens (aligned with ``input_ids``).
    Returns:
        [B] float32.
    """
    logp = token_logprobs(model, input_ids, attention_mask, temperature=temperature, completion_mask=completion_mask)
    return logp.sum(-1)
