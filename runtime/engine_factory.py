"""Build a rollout engine by kind: ``torch`` (default), ``vllm`` or ``sglang``, always on the trainer's module.

The engine is built on the module the trainer updates; how it then receives weights (zero-copy at
``s = 1``, a stale copy bound to the sync buckets, buckets sent at every sync) is decided once by
the online loop's sync policy (``hotloop.runtime.sync_policy``) from ``LoopConfig.sync_every``, so
``sync_every`` is never passed here. The serving engines are imported only when asked for; a
missing package raises ``ImportError`` with its install hint.
"""

from __future__ import annotations

from torch import nn

from hotloop.runtime.torch_engine import TorchEngine

ENGINE_KINDS = ("torch", "vllm", "sglang")
INSTALL_HINTS = {"vllm": 'pip install "hotloop[vllm]"', "sglang": 'pip install "hotloop[sglang]"'}


def make_engine(model: nn.Module, *, kind: str = "torch", pad_token_id: int, eos_token_id: int | None, **engine_kwargs):
    """A ``RolloutEngine`` of ``kind`` for the trainer's ``model``.

    Args:
        model: the trainer's module (a ``TorchEngine`` samples from it; vLLM / SGLang load it).
        kind: "torch", "vllm" or "sglang".
        pad_token_id, eos_token_id: the tokenizer's pad and end-of-sequence ids.
        **engine_kwargs: the engine's own options (``TorchEngine``: max_batch_size, seed, device;
            ``VLLMEngine``: model_dir, dtype, seed, LLM options; ``SGLangEngine``: model_dir (its model_path),
            deterministic, mem_fraction_static, ...).
    """
    if kind == "torch":
        return TorchEngine(model, pad_token_id=pad_token_id, eos_token_id=eos_token_id, **engine_kwargs)
    if kind not in ENGINE_KINDS:
        raise ValueError(f"kind: expected one of {ENGINE_KINDS}, got {kind!r}")
    try:
        if kind == "vllm":
            VLLMEngine = _import("hotloop.runtime.vllm_engine", "VLLMEngine")
            return VLLMEngine(model, pad_token_id=pad_token_id, eos_token_id=eos_token_id, **engine_kwargs)
        SGLangEngine = _import("hotloop.runtime.sglang_engine", "SGLangEngine")
        engine_kwargs.pop("max_batch_size", None)  # SGLang schedules its own batches
        return SGLangEngine(engine_kwargs.pop("model_dir"), model=model, **engine_kwargs)
    except ImportError as error:
        if INSTALL_HINTS[kind] in str(error):
            raise
        raise ImportError(
            f"engine.kind={kind!r} needs the {kind} package ({error}); install it with {INSTALL_HINTS[kind]}"
        ) from error


def _import(module: str, name: str):
    import importlib

    return getattr(importlib.import_module(module), name)
