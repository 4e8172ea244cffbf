"""A tiny Llama (real ``transformers`` code, random weights) for the built-in tasks.

Defaults: D = 64, 2 layers, 4 query heads sharing 2 key/value heads (GQA), MLP width 128,
64 positions: about 74k parameters including ``2 · V · D`` for the untied embedding and head, so a
full SFT run, a rollout and a DPO step all take milliseconds on one CPU core. The head is
untied because the fused log-prob kernels take the ``lm_head`` weight as its own tensor.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hotloop.algorithms.tasks.tokenizer import CharTokenizer


def tiny_llama_config(
    vocab_size: int,
    *,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    max_position: int = 64,
) -> LlamaConfig:
    """A float32 ``LlamaConfig`` with the special ids of :class:`CharTokenizer` and an untied head."""
    for name, value in (
        ("vocab_size", vocab_size),
        ("hidden_size", hidden_size),
        ("layers", layers),
        ("heads", heads),
        ("kv_heads", kv_heads),
        ("intermediate", intermediate),
        ("max_position", max_position),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if hidden_size % heads or heads % kv_heads:
        raise ValueError(
            f"heads, kv_heads: expected heads | hidden_size and kv_heads | heads, "
            f"got hidden_size={hidden_size}, heads={heads}, kv_heads={kv_heads}"
        )
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_position,
        pad_token_id=CharTokenizer.pad_id,
        bos_token_id=CharTokenizer.bos_id,
        eos_token_id=CharTokenizer.eos_id,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
        dtype="float32",
    )


def build_tiny_model(config: LlamaConfig, seed: int = 0) -> LlamaForCausalLM:
    """A freshly initialised float32 ``LlamaForCausalLM``; the same seed gives the same weights.

    The global torch RNG is left as it was.
    """
    if not isinstance(config, LlamaConfig):
        raise TypeError(f"config: expected a transformers.LlamaConfig, got {type(config).__name__}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(torch.float32)
