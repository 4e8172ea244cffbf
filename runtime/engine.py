"""The rollout-engine interface: sampling parameters, completions and the ``RolloutEngine`` protocol.

An engine turns prompts (token ids) into sampled completions with the *current* policy weights and
says which weight version produced each one. Two engines implement it: ``TorchEngine`` (samples
from an ``nn.Module``: the very one the trainer updates, so a weight sync is free, or its own copy)
and ``SGLangEngine`` (SGLang's offline engine colocated on the trainer's GPU, refit from tensors).

Zero-copy rule. ``engine.shares_weights_with(trainer.model)`` is True only when ``generate`` reads
the trainer's live parameters (a ``TorchEngine`` built on that module): a sync is then a version
bump, and the engine cannot lag behind the trainer. Every other engine holds its own weights and
receives them at each sync as ``(name, tensor)`` pairs — views into the flat buckets of the sync
protocol (``hotloop.runtime.weight_sync``). ``local_model`` is the in-process module holding the
weights ``generate`` uses, or None when they live elsewhere (SGLang's scheduler process; the loop
then checkpoints the sync buckets of the last version sent).

Sampler log-probs. ``Completion.logprobs[t]`` is ``log_softmax(logits / T)[token_t]``: the
log-probability of the sampled token under the temperature-scaled distribution *before* top-p /
top-k truncation (vLLM's "processed logprobs" with truncation left out). This is the quantity a
trainer recomputes with ``fused_linear_logprob(..., temperature=T)``, so the two can be compared
token for token (importance ratios, train/inference mismatch). With ``temperature == 0``
(greedy) the log-probs are those of the untempered distribution, ``log_softmax(logits)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import nn

from hotloop._errors import expected, require


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to sample completions; one object per ``generate`` call."""

    temperature: float = 1.0
    """Softmax temperature T; 0 means greedy (argmax)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p; 1 = off."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 = off."""
    max_new_tokens: int = 32
    """Upper bound on generated tokens per completion (finish_reason "length" when reached)."""
    stop_token_ids: tuple[int, ...] = ()
    """Tokens that end a completion (kept as its last token; finish_reason "stop")."""
    n: int = 1
    """Completions per prompt."""
    seed: int | None = None
    """Seed of the sampler's generator; None draws from the engine's own stream."""

    def __post_init__(self) -> None:
        checks = (
            (
                "temperature",
                self.temperature,
                _is_real(self.temperature) and self.temperature >= 0,
                "a finite float >= 0 (0 = greedy)",
            ),
            ("top_p", self.top_p, _is_real(self.top_p) and 0 < self.top_p <= 1, "a float in (0, 1]"),
            ("top_k", self.top_k, _is_int(self.top_k) and self.top_k >= 0, "an int >= 0"),
            (
                "max_new_tokens",
                self.max_new_tokens,
                _is_int(self.max_new_tokens) and self.max_new_tokens >= 1,
                "an int >= 1",
            ),
            ("n", self.n, _is_int(self.n) and self.n >= 1, "an int >= 1"),
            ("seed", self.seed, self.seed is None or _is_int(self.seed), "None or an int"),
            (
                "stop_token_ids",
                self.stop_token_ids,
                isinstance(self.stop_token_ids, tuple) and all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
                "a tuple of ints >= 0",
            ),
        )
        for name, value, ok, want in checks:
            require(ok, name, want, repr(value))

    @property
    def logprob_temperature(self) -> float:
        """T of the log-probs an engine reports (module docstring): ``temperature``, or 1 when greedy."""
        return self.temperature if self.temperature > 0 else 1.0


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(kw_only=True)
class Completion:
    """One sampled completion of one prompt."""

    prompt_index: int
    """Index of the prompt in the ``generate`` call's list."""
    token_ids: list[int]
    """Generated tokens (prompt excluded; a stop token, when hit, is the last one)."""
    logprobs: list[float]
    """Sampler log-prob of each generated token: log_softmax(logits / T), before top-p/top-k."""
    finish_reason: Literal["stop", "length"]
    """"stop": a stop token ended it; "length": max_new_tokens (or the context) ran out."""
    weight_version: int
    """Engine weight version (trainer optimizer steps) that produced it."""


@runtime_checkable
class RolloutEngine(Protocol):
    """Samples completions with the current policy; colocated with the trainer.

    Call order in an online loop::

        engine = TorchEngine(model, pad_token_id=..., eos_token_id=...)   # or SGLangEngine(...)
        for step in range(steps):
            engine.wake()                                   # no-op unless asleep
            completions = engine.generate(prompts, SamplingParams(temperature=1.0, n=4))
            engine.sleep()                                  # give the KV cache back to the trainer
            metrics = trainer.step(loss_fn, micro_batches)  # trainer.version += 1
            if engine.shares_weights_with(trainer.model):   # zero-copy: only the version
                engine.sync_weights(trainer.version)
            else:                                            # the engine holds its own weights
                plan.pack(trainer.model, buffers)            # hotloop.runtime.weight_sync.SyncPlan
                engine.sync_weights(trainer.version, plan.views(buffers))

    ``generate`` returns ``len(prompt_token_ids) * sampling.n`` completions, prompt-major: the n
    completions of prompt 0, then those of prompt 1, ...
    """

    @property
    def weight_version(self) -> int:
        """Version of the weights the next ``generate`` samples with."""
        ...

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> list[Completion]:
        """Sample ``sampling.n`` completions per prompt, prompt-major."""
        ...

    @property
    def local_model(self) -> nn.Module | None:
        """The in-process module whose weights ``generate`` uses, or None when they live in another process."""
        ...

    def shares_weights_with(self, module: nn.Module) -> bool:
        """True when ``generate`` reads ``module``'s live parameters (zero-copy; the engine cannot lag)."""
        ...

    def sync_weights(
        self, version: int, weights: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor] | None = None
    ) -> None:
        """Adopt the trainer's weights of ``version``.

        ``weights`` yields (name as in the trainer module's ``state_dict()``, tensor in the trainer's shape;
        possibly a view into a flat bucket, possibly another dtype — the engine casts) and may be a
        one-shot iterator. None = version bump only, valid for an engine sharing the trainer's module.
        On failure: raise, and leave ``weight_version`` unchanged. After success ``weight_version ==
        version`` and cached prefixes are dropped.
        """
        ...

    def sleep(self) -> None:
        """Free the engine's memory (KV cache; for SGLang also weights) so the trainer can use it."""
        ...

    def wake(self) -> None:
        """Reacquire what ``sleep`` freed; no-op when awake."""
        ...

    def flush_cache(self) -> None:
        """Drop cached prefixes / KV state (stale after a weight change)."""
        ...


def check_prompt_ids(prompts: list[list[int]], max_len: int | None = None) -> None:
    """Raise unless ``prompts`` is a non-empty list of non-empty token-id lists (each shorter than ``max_len``)."""
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(expected("prompt_token_ids", "a non-empty list of token-id lists", f"{prompts!r:.200}"))
    for i, p in enumerate(prompts):
        if not isinstance(p, (list, tuple)) or not p or not all(isinstance(t, int) and t >= 0 for t in p):
            raise ValueError(expected(f"prompt_token_ids[{i}]", "a non-empty list of ints >= 0", f"{p!r:.200}"))
        if max_len is not None and len(p) >= max_len:
            raise ValueError(expected(f"prompt_token_ids[{i}]", f"fewer than max_model_len = {max_len} tokens", len(p)))
