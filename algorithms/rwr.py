"""Reward-weighted regression: SFT on every sample, weighted by its exponentiated reward.

RWR (Peters & Schaal 2007, "Reinforcement learning by reward-weighted regression", ICML)
maximises the likelihood of each sample in proportion to ``exp(r / τ)``. The weights are a
softmax of the rewards over each prompt's group (``normalize_over = "group"``: only how a sample
compares with its siblings counts) or over the whole batch (``"batch"``: a group with no good
sample gets little weight), scaled so that they average 1:

    w_i = N · exp(r_i / τ) / Σ_{j ∈ set(i)} exp(r_j / τ)      N = |set(i)| (G, or P·G)
    L   = Σ_i w_i Σ_t −log π(y_{i,t} | x, y_{i,<t}) / Z          (:func:`hotloop.kernels.losses.sft.sft_loss`)

so ``τ → ∞`` gives plain SFT on the samples and ``τ → 0`` Best-of-N (rejection sampling with
``top_k=1``). Weights are constants: the loss is a weighted log-likelihood, with no reference
model and no negative gradient. Every sample trains, so a group whose rewards are all equal is
imitated uniformly (self-distillation). Cost: one policy forward + backward over all P·G rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from hotloop.algorithms.base import BuildContext, completion_rows, grouped_rewards, sampler_version
from hotloop.algorithms.rejection_sampling import (
    NORMALIZE,
    WeightedSFTBatch,
    weighted_sft_loss,
    weighted_sft_split_rule,
)
from hotloop.kernels.losses.output import LossOutput
from hotloop.runtime.engine import Completion
from hotloop.runtime.micro_batches import SplitRule

NORMALIZE_OVER = ("group", "batch")


@dataclass(frozen=True, kw_only=True)
class RWRConfig:
    """Settings of reward-weighted regression."""

    samples_per_prompt: int = 8
    """G: completions sampled per prompt."""
    tau: float = 0.1
    """Temperature τ of the weights exp(r / τ): small = close to Best-of-N, large = close to plain SFT."""
    normalize_over: str = "group"
    """Softmax the weights over each prompt's samples ("group") or over the whole batch ("batch")."""
    normalize: str = "token"
    """"token": mean over all tokens; "sequence": mean over rows of each row's token mean."""

    def __post_init__(self) -> None:
        if not isinstance(self.samples_per_prompt, int) or self.samples_per_prompt < 1:
            raise ValueError(f"samples_per_prompt: expected an int >= 1, got {self.samples_per_prompt!r}")
        if not isinstance(self.tau, (int, float)) or not (math.isfinite(self.tau) and self.tau > 0):
            raise ValueError(f"tau: expected a finite float > 0, got {self.tau!r}")
        if self.normalize_over not in NORMALIZE_OVER:
            raise ValueError(f"normalize_over: expected one of {NORMALIZE_OVER}, got {self.normalize_over!r}")
        if self.normalize not in NORMALIZE:
            raise ValueError(f"normalize: expected one of {NORMALIZE}, got {self.normalize!r}")


def rwr_weights(rewards: torch.Tensor, tau: float, normalize_over: str) -> torch.Tensor:
    """[P·G] weights ``N · softmax(r / τ)`` over each group (``"group"``) or all samples (``"batch"``).

    Args:
        rewards: [P, G] float rewards.
    """
    scaled = rewards.double() / tau
    if normalize_over == "batch":
        scaled = scaled.reshape(1, -1)
    weights = torch.softmax(scaled, dim=1) * scaled.shape[1]
    return weights.reshape(-1).float()


class RWR:
    """SFT on all samples weighted by the softmax of their rewards."""

    needs_reference = False

    def __init__(self, config: RWRConfig, *, pad_token_id: int) -> None:
        if not isinstance(config, RWRConfig):
            raise TypeError(f"config: expected RWRConfig, got {type(config).__name__}")
        if not isinstance(pad_token_id, int) or pad_token_id < 0:
            raise ValueError(f"pad_token_id: expected an int >= 0, got {pad_token_id!r}")
        self.config, self.pad_token_id = config, pad_token_id
        self.samples_per_prompt = config.samples_per_prompt

    @classmethod
    def from_config(cls, config: RWRConfig, context: BuildContext) -> RWR:
        """Factory for the config registry."""
        return cls(config, pad_token_id=context.pad_token_id)

    def build_batch(
        self, problems: list, prompt_ids: list[list[int]], completions: list[Completion], rewards: torch.Tensor
    ) -> WeightedSFTBatch:
        """Every sample, in sampling order, with its weight."""
        grouped = grouped_rewards(completions, rewards, len(prompt_ids), self.samples_per_prompt)
        input_ids, attention_mask, completion_mask = completion_rows(
            prompt_ids, completions, list(range(len(completions))), self.pad_token_id
        )
        return WeightedSFTBatch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            completion_mask=completion_mask,
            rewards=grouped.reshape(-1),
            sampler_version=sampler_version(completions),
            weights=rwr_weights(grouped, self.config.tau, self.config.normalize_over),
        )

    def loss(self, policy: nn.Module, batch: WeightedSFTBatch, *, reference: nn.Module | None) -> LossOutput:
        """Weighted negative log-likelihood of every sample (``reference`` is not used)."""
        return weighted_sft_loss(policy, batch, self.config.normalize)

    def prompt_pool(self, problems: list) -> list:
        """The problems the loop draws prompts from: the run's training problems."""
        return problems

    def split_rule(self) -> SplitRule:
        return weighted_sft_split_rule(self.config.normalize)
