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

Micro batches (gradient accumulation): each algorithm's ``split_rule()`` returns a
:class:`hotloop.runtime.micro_batches.SplitRule` (what a unit is, what the loss's normaliser counts), or
raises when its loss couples a whole batch (KTO's mismatched reference point).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from hotloop.kernels.losses.output import LossOutput
from hotloop.runtime.engine import Completion
from hotloop.runtime.micro_batches import SplitRule


@dataclass(frozen=True, kw_only=True)
class Batch:
    """Rows to train on; algorithms subclass it to add their own fields (pair indices, weights, ...)."""

    input_ids: torch.Tensor
    """[B, T] int64, right-padded ``prompt · completion``."""
    attention_mask: torch.Tensor
    """[B, T] int64, 1 on real tokens."""
    completion_mask: torch.Tensor
    """[B, T] int64, 1 on completion tokens (the ones a loss reads)."""
    rewards: torch.Tensor
    """[B] float32, the reward of each row's completion."""
    sampler_version: int
    """Weight version of the engine that sampled the rows (for offline data: the version it was built at)."""

    @property
    def rows(self) -> int:
        """Number of sequences B."""
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> Batch:
        """The same batch with every tensor field on ``device``."""
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **moved)


@runtime_checkable
class Algorithm(Protocol):
    """Turns scored samples into a batch and a batch into a loss.

    Call order, once per loop step::

        completions = engine.generate(prompt_ids, SamplingParams(n=algorithm.samples_per_prompt, ...))
        rewards = reward_fn(problems_per_completion, texts)
        batch = algorithm.build_batch(problems, prompt_ids, completions, rewards)   # may be None
        parts = split_batch(batch, k, algorithm.split_rule()) if k > 1 else [(batch, 1.0)]
        trainer.step(lambda model, b: algorithm.loss(model, b, reference=reference),
                     [b for b, _ in parts], weights=[w for _, w in parts])   # k = grad_accum_steps
    """

    samples_per_prompt: int
    """Completions the loop samples per prompt (0: the algorithm brings its own data, nothing is sampled)."""
    needs_reference: bool
    """Whether ``loss`` reads a frozen reference model."""

    def build_batch(
        self, problems: list, prompt_ids: list[list[int]], completions: list[Completion], rewards: torch.Tensor
    ) -> Batch | None:
        """Rows to train on from ``len(problems) * samples_per_prompt`` scored completions, or None."""
        ...

    def loss(self, policy: nn.Module, batch: Batch, *, reference: nn.Module | None) -> LossOutput:
        """Scalar loss (differentiable in ``policy``) and detached metrics for ``batch``."""
        ...

    def prompt_pool(self, problems: list) -> list:
        """The problems the loop draws its prompts from, given the run's training ``problems`` (an offline set read
        from a file brings its own)."""
        ...

    def split_rule(self) -> SplitRule:
        """How batches split into micro batches (gradient accumulation); ValueError if they cannot."""
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


def pack_rows(
    prompts: list[list[int]], completions: list[list[int]], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad ``prompt · completion`` rows.

    One flat tensor of every token is scattered through the attention mask (row-major, so each
    row's tokens land in order): two small tensors per call instead of one per row.

    Returns:
        input_ids, attention_mask, completion_mask: each [B, T] int64, T = longest row.
    """
    if len(prompts) != len(completions) or not prompts:
        raise ValueError(
            f"completions: expected one per prompt and at least one row, got "
            f"{len(completions)} completions for {len(prompts)} prompts"
        )
    prompt_lengths = torch.tensor([len(p) for p in prompts])
    lengths = prompt_lengths + torch.tensor([len(c) for c in completions])
    positions = torch.arange(int(lengths.max()))
    attention_mask = positions < lengths[:, None]
    flat = torch.tensor(list(chain.from_iterable(chain(p, c) for p, c in zip(prompts, completions))), dtype=torch.long)
    input_ids = torch.full(attention_mask.shape, pad_token_id, dtype=torch.long)
    input_ids[attention_mask] = flat
    completion_mask = attention_mask & (positions >= prompt_lengths[:, None])
    return input_ids, attention_mask.long(), completion_mask.long()


def completion_rows(
    prompt_ids: list[list[int]], completions: list[Completion], rows: list[int], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`pack_rows` of ``completions[i]`` after its prompt, for each ``i`` in ``rows`` (in that order)."""
    picked = [completions[i] for i in rows]
    return pack_rows([prompt_ids[c.prompt_index] for c in picked], [c.token_ids for c in picked], pad_token_id)


def token_values(completion_mask: torch.Tensor, values: list[list[float]]) -> torch.Tensor:
    """Per-token values of the completions laid out like ``token_logprobs``' output.

    Args:
        completion_mask: [B, T] 0/1 from :func:`pack_rows`.
        values: B lists, ``values[r][j]`` belonging to completion token ``j`` of row ``r``
            (e.g. ``Completion.logprobs``).
    Returns:
        [B, T − 1] float32: ``values[r][j]`` at column ``t`` where ``input_ids[r, t + 1]`` is that
        token (the column whose log-prob predicts it), 0 elsewhere.
    """
    target = completion_mask[:, 1:].bool()
    flat = torch.tensor(list(chain.from_iterable(values)), dtype=torch.float32)
    if flat.numel() != int(target.sum()):
        raise ValueError(
            f"values: expected one value per completion token ({int(target.sum())} in all), got {flat.numel()}"
        )
    out = torch.zeros(target.shape, dtype=torch.float32)
    out[target] = flat
    return out


def grouped_rewards(
    completions: list[Completion], rewards: torch.Tensor, num_prompts: int, group_size: int
) -> torch.Tensor:
    """``rewards`` as [P, G] float32 after checking the engine's prompt-major layout (G samples per prompt)."""
    check_scored(completions, rewards)
    expected = [p for p in range(num_prompts) for _ in range(group_size)]
    if [c.prompt_index for c in completions] != expected:
        raise ValueError(
            f"completions: expected {group_size} per prompt for {num_prompts} prompts, prompt-major "
            f"(prompt_index 0 x{group_size}, 1 x{group_size}, ...), got prompt indices "
            f"{[c.prompt_index for c in completions][: 2 * group_size]}..."
        )
    return rewards.float().view(num_prompts, group_size)


def group_by_prompt(completions: list[Completion], num_prompts: int) -> list[list[int]]:
    """Indices into ``completions`` of each prompt's samples, in sampling order."""
    groups: list[list[int]] = [[] for _ in range(num_prompts)]
    for i, completion in enumerate(completions):
        if not 0 <= completion.prompt_index < num_prompts:
            raise ValueError(
                f"completions[{i}].prompt_index: expected in [0, {num_prompts}), got {completion.prompt_index}"
            )
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
