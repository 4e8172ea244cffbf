"""Rejection sampling / Best-of-N fine-tuning (RAFT, ReST): SFT on the best of n samples per prompt.

Each step samples G completions per prompt, keeps some of them and minimises their negative
log-likelihood (:func:`hotloop.kernels.losses.sft.sft_loss`, at temperature 1: the model's own
distribution, whatever the sampling temperature):

    keep(i) = rank_g(r_i) < top_k  and  r_i ≥ min_reward          (either filter may be off)
    L = Σ_{kept i} Σ_t −log π(y_{i,t} | x, y_{i,<t}) / Z          (Z: kept tokens, or rows × length)

- RAFT / Best-of-N (Dong et al. 2023, https://arxiv.org/abs/2304.06767): ``top_k=1`` (the best
  sample of each prompt, ties broken by sampling order);
- ReST's improve step (Gulcehre et al. 2023, https://arxiv.org/abs/2308.08998): ``top_k=None`` and
  a reward threshold ``min_reward``; for 0/1 verifiable rewards ``min_reward=1`` keeps every
  correct sample (expert iteration / STaR).

No reference model and no negative gradient: rejected samples are simply not trained on, which
is what separates this family from DPO/GRPO (Tajwar et al. 2024). A step where nothing is kept is
skipped. Cost: one policy forward + backward over the kept rows.

:class:`WeightedSFTBatch` and :func:`weighted_sft_loss` are shared with reward-weighted regression
(:mod:`hotloop.algorithms.rwr`), which keeps every sample with a soft weight instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from hotloop.algorithms.base import Batch, BuildContext, completion_rows, grouped_rewards, sampler_version
from hotloop.algorithms.logprobs import token_logprobs
from hotloop.kernels.losses.output import LossOutput
from hotloop.kernels.losses.sft import sft_loss
from hotloop.runtime.engine import Completion
from hotloop.runtime.micro_batches import SplitRule

NORMALIZE = ("token", "sequence")


@dataclass(frozen=True, kw_only=True)
class RejectionSamplingConfig:
    """Which samples to keep and how their likelihood is averaged."""

    samples_per_prompt: int = 8
    """N: completions sampled per prompt."""
    top_k: int | None = 1
    """Keep the k best samples of each prompt (ties: sampling order); None = no rank filter."""
    min_reward: float | None = None
    """Keep only samples with reward >= min_reward; None = no threshold."""
    normalize: str = "token"
    """"token": mean over all kept tokens; "sequence": mean over rows of each row's token mean."""

    def __post_init__(self) -> None:
        if not isinstance(self.samples_per_prompt, int) or self.samples_per_prompt < 1:
            raise ValueError(f"samples_per_prompt: expected an int >= 1, got {self.samples_per_prompt!r}")
        top_k_ok = isinstance(self.top_k, int) and 1 <= self.top_k <= self.samples_per_prompt
        if self.top_k is not None and not top_k_ok:
            raise ValueError(
                f"top_k: expected None or an int in [1, samples_per_prompt = {self.samples_per_prompt}], "
                f"got {self.top_k!r}"
            )
        if self.min_reward is not None and (
            not isinstance(self.min_reward, (int, float)) or not math.isfinite(self.min_reward)
        ):
            raise ValueError(f"min_reward: expected None or a finite float, got {self.min_reward!r}")
        if self.top_k is None and self.min_reward is None:
            raise ValueError("top_k, min_reward: expected at least one filter (both None would keep every sample)")
        if self.normalize not in NORMALIZE:
            raise ValueError(f"normalize: expected one of {NORMALIZE}, got {self.normalize!r}")


@dataclass(frozen=True, kw_only=True)
class WeightedSFTBatch(Batch):
    """Rows to imitate, each with a constant weight on its negative log-likelihood."""

    weights: torch.Tensor
    """[R] float32 per-row weight (1 for every kept row in rejection sampling)."""


def weighted_sft_split_rule(normalize: str) -> SplitRule:
    """Rows are independent (their weights are constants fixed by ``build_batch``); N counts rows or tokens."""
    return SplitRule(unit_rows=1, normalizer="tokens" if normalize == "token" else "rows")


def weighted_sft_loss(policy: nn.Module, batch: WeightedSFTBatch, normalize: str) -> LossOutput:
    """``sft_loss`` of the batch's completion tokens with its row weights; metrics add ``rows``."""
    batch = batch.to(next(policy.parameters()).device)
    logp = token_logprobs(policy, batch.input_ids, batch.attention_mask, completion_mask=batch.completion_mask)
    out = sft_loss(logp, batch.completion_mask[:, 1:], weights=batch.weights, normalize=normalize)
    return LossOutput(loss=out.loss, metrics={**out.metrics, "rows": torch.tensor(float(batch.rows))})


def kept_rows(rewards: torch.Tensor, top_k: int | None, min_reward: float | None) -> torch.Tensor:
    """Flat indices (prompt-major, best first within a prompt) of the samples both filters keep.

    Args:
        rewards: [P, G] float rewards.
    Returns:
        [K] int64 indices into the flattened [P·G] samples.
    """
    P, G = rewards.shape
    order = torch.sort(rewards, dim=1, descending=True, stable=True).indices
    keep = torch.ones_like(order, dtype=torch.bool)
    if top_k is not None:
        keep[:, top_k:] = False
    if min_reward is not None:
        keep &= rewards.gather(1, order) >= min_reward
    return (order + G * torch.arange(P)[:, None])[keep]


class RejectionSampling:
    """SFT on the best samples of each prompt (RAFT / Best-of-N / ReST)."""

    needs_reference = False

    def __init__(self, config: RejectionSamplingConfig, *, pad_token_id: int) -> None:
        if not isinstance(config, RejectionSamplingConfig):
            raise TypeError(f"config: expected RejectionSamplingConfig, got {type(config).__name__}")
        if not isinstance(pad_token_id, int) or pad_token_id < 0:
            raise ValueError(f"pad_token_id: expected an int >= 0, got {pad_token_id!r}")
        self.config, self.pad_token_id = config, pad_token_id
        self.samples_per_prompt = config.samples_per_prompt

    @classmethod
    def from_config(cls, config: RejectionSamplingConfig, context: BuildContext) -> RejectionSampling:
        """Factory for the config registry."""
        return cls(config, pad_token_id=context.pad_token_id)

    def build_batch(
        self, problems: list, prompt_ids: list[list[int]], completions: list[Completion], rewards: torch.Tensor
    ) -> WeightedSFTBatch | None:
        """The kept samples with weight 1; None when no sample passes the filters."""
        grouped = grouped_rewards(completions, rewards, len(prompt_ids), self.samples_per_prompt)
        rows = kept_rows(grouped, self.config.top_k, self.config.min_reward)
        if rows.numel() == 0:
            return None
        input_ids, attention_mask, completion_mask = completion_rows(
            prompt_ids, completions, rows.tolist(), self.pad_token_id
        )
        return WeightedSFTBatch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            completion_mask=completion_mask,
            rewards=grouped.reshape(-1)[rows],
            sampler_version=sampler_version(completions),
            weights=torch.ones(rows.numel()),
        )

    def loss(self, policy: nn.Module, batch: WeightedSFTBatch, *, reference: nn.Module | None) -> LossOutput:
        """Negative log-likelihood of the kept completions (``reference`` is not used)."""
        return weighted_sft_loss(policy, batch, self.config.normalize)

    def prompt_pool(self, problems: list) -> list:
        """The problems the loop draws prompts from: the run's training problems."""
        return problems

    def split_rule(self) -> SplitRule:
        return weighted_sft_split_rule(self.config.normalize)
