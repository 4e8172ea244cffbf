"""What every alignment algorithm is to the online loop: scored samples → a batch → a loss.

The loop (``hotloop.runtime.loop.OnlineLoop``) owns *when* things happen (sampling, syncing the
sampler every ``s`` steps, checkpoints); an algorithm owns only *what* is learned from a group of
scored samples, in two steps that are tested on their own:

    batch = algorithm.build_batch(problems, prompt_ids, completions, rewards)   # bookkeeping, no model
    out   = algorithm.loss(policy, batch, reference=reference)                  # LossOutput(loss, metrics)

``completions`` come prompt-major from the engine (``samples_per_prompt`` per prompt); ``rewards``
is float32 ``[len(completions)]``. ``build_batch`` returns None when the samples carry no learning
signal (for DPO: no group with two different rewards), and the loop then skips the optimizer step.
Every :class:`Batch` records the weight version of the sampler that produced its rows, so the
loop can log the staleness ``trainer.version − sampler_version`` of what it trains on.

Sequences are stored right-padded as ``bos · prompt · completion · pad`` with two masks:
``attention_mask`` (real tokens) and ``completion_mask`` (tokens the loss is about).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from hotloop.kernels.losses.output import LossOutput
from hotloop.runtime.engine import Completion


@dataclass(frozen=True, kw_only=True)
class Batch:
    """Rows to train on; algorithms subclass it to add their own fields (pair indices, weights, ...)."""

    input_ids: torch.Tensor
    """[R, L] int64, right-padded ``prompt · completion``."""
    attention_mask: torch.Tensor
    """[R, L] int64, 1 on real tokens."""
    completion_mask: torch.Tensor
    """[R, L] int64, 1 on completion tokens (the ones a loss reads)."""
    rewards: torch.Tensor
    """[R] float32, the reward of each row's completion."""
    sampler_version: int
    """Weight version of the engine that sampled the rows (for offline data: the version it was built at)."""

    @property
    def rows(self) -> int:
        """Number of sequences R."""
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> Batch:
        """The same batch with every tensor field on ``device``."""
        moved = {f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        return dataclasses.replace(self, **moved)


@runtime_checkable
class Algorithm(Protocol):
    """Turns scored samples into a batch and a batch into a loss.

    Call order, once per loop step::

        completions = engine.generate(prompt_ids, SamplingParams(n=algorithm.samples_per_prompt, ...))
        rewards = reward_fn(problems_per_completion, texts)
        batch = algorithm.build_batch(problems, prompt_ids, completions, rewards)   # may be None
        trainer.step(lambda model, b: algorithm.loss(model, b, reference=reference), [batch])
    """

    samples_per_prompt: int
    """Completions the loop samples per prompt (0: the algorithm brings its own data, nothing is sampled)."""
    needs_reference: bool
    """Whether ``loss`` reads a frozen reference model."""

    def build_batch(self, problems: list, prompt_ids: list[list[int]], completions: list[Completion],
                    rewards: torch.Tensor) -> Batch | None:
        """Rows to train on from ``len(problems) * samples_per_prompt`` scored completions, or None."""
        ...

    def loss(self, policy: nn.Module, batch: Batch, *, reference: nn.Module | None) -> LossOutput:
        """Scalar loss (differentiable in ``policy``) and detached metrics for ``batch``."""
        ...


@dataclass(frozen=True, kw_only=True)
class BuildContext:
    """What an algorithm factory may need besides its own config section."""

    pad_token_id: int
    engine: object
    """The run's ``RolloutEngine`` (offline algorithms sample their fixed data set with it once)."""
    problems: list
    """Training problems (objects with ``.prompt``)."""
    tokenizer: object
    """``encode(text) -> ids``, ``decode(ids) -> text``."""
    reward_fn: Callable
    sampling: object
    """``SamplingParams`` of the run."""


def pack_rows(prompts: list[list[int]], completions: list[list[int]], pad_token_id: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad ``prompt · completion`` rows.

    Returns:
        input_ids, attention_mask, completion_mask: each [R, L] int64, L = longest row.
    """
    if len(prompts) != len(completions) or not prompts:
        raise ValueError(f"completions: expected one per prompt and at least one row, got "
                         f"{len(completions)} completions for {len(prompts)} prompts")
    width = max(len(p) + len(c) for p, c in zip(prompts, completions))
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    completion_mask = torch.zeros_like(input_ids)
    for r, (p, c) in enumerate(zip(prompts, completions)):
        input_ids[r, : len(p) + len(c)] = torch.tensor(list(p) + list(c), dtype=torch.long)
        attention_mask[r, : len(p) + len(c)] = 1
        completion_mask[r, len(p) : len(p) + len(c)] = 1
    return input_ids, attention_mask, completion_mask


def group_by_prompt(completions: list[Completion], num_prompts: int) -> list[list[int]]:
    """Indices into ``completions`` of each prompt's samples, in sampling order."""
    groups: list[list[int]] = [[] for _ in range(num_prompts)]
    for i, completion in enumerate(completions):
        if not 0 <= completion.prompt_index < num_prompts:
            raise ValueError(f"completions[{i}].prompt_index: expected in [0, {num_prompts}), "
                             f"got {completion.prompt_index}")
        groups[completion.prompt_index].append(i)
    return groups


def sampler_version(completions: list[Completion]) -> int:
    """The oldest weight version among ``completions`` (what staleness is measured against)."""
    return min(c.weight_version for c in completions)


def check_scored(completions: list[Completion], rewards: torch.Tensor) -> None:
    """Raise unless ``rewards`` is a 1-D tensor with one entry per completion."""
    if not isinstance(rewards, torch.Tensor) or rewards.shape != (len(completions),):
        seen = tuple(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards).__name__
        raise ValueError(f"rewards: expected a tensor of shape ({len(completions)},), got {seen}")
