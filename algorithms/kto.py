"""KTO on binary labels of sampled completions: no pairs needed, every sample is one example.

KTO (Ethayarajh et al. 2024, https://arxiv.org/abs/2402.01306) labels each completion desirable
or undesirable; here a completion is desirable when its reward exceeds ``threshold`` (for 0/1
verifiable rewards with the default 0.5: when it is correct). With ``ρ = log π(y|x) − log π_ref(y|x)``
and a reference point ``z₀``,

    L = mean_i  λ_D · (1 − σ(β(ρ_i − z₀)))   (desirable)
                λ_U · (1 − σ(β(z₀ − ρ_i)))   (undesirable)

computed by :func:`hotloop.kernels.losses.kto.kto_loss`. ``reference_point="mismatched"`` estimates
``z₀ ≈ KL(π ‖ π_ref)`` as TRL does, from mismatched pairs: row ``i``'s prompt with the completion
of row ``(i + G) mod B`` (the same sample slot of the next prompt's group, G = samples_per_prompt),
``z₀ = max(mean(log π − log π_ref), 0)``, detached (:func:`~hotloop.kernels.losses.kto.kto_kl_estimate`;
with a single prompt per step the shift wraps around to the rows themselves);
``"zero"`` uses ``z₀ = 0`` (Liger's default) and skips those rows.

Unlike pairwise DPO, groups whose samples are all right (or all wrong) still train: their rows
are pushed up (or down) relative to ``z₀``. Cost: one policy forward + backward and one reference
forward over the B = P·G rows; with mismatched rows, one more policy and reference forward
(no grad) over B rows.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from hotloop.algorithms.base import Batch, BuildContext, grouped_rewards, pack_rows, sampler_version
from hotloop.algorithms.logprobs import sequence_logprobs
from hotloop.kernels.losses.kto import KTOOptions, kto_kl_estimate, kto_loss
from hotloop.kernels.losses.output import LossOutput
from hotloop.runtime.engine import Completion
from hotloop.runtime.micro_batches import SplitRule

REFERENCE_POINTS = ("mismatched", "zero")


@dataclass(frozen=True, kw_only=True)
class KTOConfig:
    """Settings of KTO on sampled completions; the loss options' defaults, meanings and checks are
    :class:`~hotloop.kernels.losses.kto.KTOOptions`' (:meth:`loss_options`)."""

    beta: float = KTOOptions.beta
    """``KTOOptions.beta``: inverse temperature β of the implicit reward β · (log π − log π_ref)."""
    samples_per_prompt: int = 8
    """Completions sampled (and labelled) per prompt."""
    threshold: float = 0.5
    """A completion is desirable when its reward is > threshold."""
    desirable_weight: float = KTOOptions.desirable_weight
    """``KTOOptions.desirable_weight``: λ_D, weight of the desirable examples' loss."""
    undesirable_weight: float = KTOOptions.undesirable_weight
    """``KTOOptions.undesirable_weight``: λ_U, weight of the undesirable examples' loss."""
    reference_point: str = "mismatched"
    """z₀: "mismatched" (KL estimate from mismatched prompt/completion pairs, as TRL) or "zero"."""

    def __post_init__(self) -> None:
        if not isinstance(self.samples_per_prompt, int) or self.samples_per_prompt < 1:
            raise ValueError(f"samples_per_prompt: expected an int >= 1, got {self.samples_per_prompt!r}")
        if not isinstance(self.threshold, (int, float)) or not math.isfinite(self.threshold):
            raise ValueError(f"threshold: expected a finite float, got {self.threshold!r}")
        if self.reference_point not in REFERENCE_POINTS:
            raise ValueError(f"reference_point: expected one of {REFERENCE_POINTS}, got {self.reference_point!r}")
        self.loss_options()  # checks every loss option (KTOOptions' rules)

    def loss_options(self) -> KTOOptions:
        """The kernel's options for this config (``length_normalize`` at ``KTOOptions``' default)."""
        return KTOOptions(
            beta=self.beta, desirable_weight=self.desirable_weight, undesirable_weight=self.undesirable_weight
        )


@dataclass(frozen=True, kw_only=True)
class KTOBatch(Batch):
    """One row per sample with its label, plus the mismatched rows that estimate z₀ (or None)."""

    labels: torch.Tensor
    """[B] bool, True for desirable completions."""
    kl_input_ids: torch.Tensor | None = None
    """[B, T'] int64 mismatched rows (row i's prompt · row (i + G) mod B's completion), or None for z₀ = 0."""
    kl_attention_mask: torch.Tensor | None = None
    """[B, T'] int64 attention mask of the mismatched rows."""
    kl_completion_mask: torch.Tensor | None = None
    """[B, T'] int64 completion mask of the mismatched rows."""


class KTO:
    """Kahneman-Tversky optimisation on thresholded rewards of fresh samples."""

    needs_reference = True

    def __init__(self, config: KTOConfig, *, pad_token_id: int) -> None:
        if not isinstance(config, KTOConfig):
            raise TypeError(f"config: expected KTOConfig, got {type(config).__name__}")
        if not isinstance(pad_token_id, int) or pad_token_id < 0:
            raise ValueError(f"pad_token_id: expected an int >= 0, got {pad_token_id!r}")
        self.config, self.pad_token_id = config, pad_token_id
        self.samples_per_prompt = config.samples_per_prompt

    @classmethod
    def from_config(cls, config: KTOConfig, context: BuildContext) -> KTO:
        """Factory for the config registry."""
        return cls(config, pad_token_id=context.pad_token_id)

    def build_batch(
        self, problems: list, prompt_ids: list[list[int]], completions: list[Completion], rewards: torch.Tensor
    ) -> KTOBatch:
        """Every sample with its label (reward > threshold) and, for z₀, the mismatched rows."""
        flat = grouped_rewards(completions, rewards, len(prompt_ids), self.samples_per_prompt).reshape(-1)
        prompts = [prompt_ids[c.prompt_index] for c in completions]
        tokens = [c.token_ids for c in completions]
        input_ids, attention_mask, completion_mask = pack_rows(prompts, tokens, self.pad_token_id)
        kl = {}
        if self.config.reference_point == "mismatched":
            shift = self.samples_per_prompt
            names = ("kl_input_ids", "kl_attention_mask", "kl_completion_mask")
            kl = dict(zip(names, pack_rows(prompts, tokens[shift:] + tokens[:shift], self.pad_token_id)))
        return KTOBatch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            completion_mask=completion_mask,
            rewards=flat,
            sampler_version=sampler_version(completions),
            labels=flat > self.config.threshold,
            **kl,
        )

    def prompt_pool(self, problems: list) -> list:
        """The problems the loop draws prompts from: the run's training problems."""
        return problems

    def split_rule(self) -> SplitRule:
        """Whole groups, mean over rows; refused with the mismatched reference point (z0 couples the batch)."""
        if self.config.reference_point == "mismatched":
            raise ValueError(
                f"{type(self).__name__}: reference_point='mismatched' makes z0 a mean over the whole "
                f"batch, so micro batches would change the loss; expected reference_point='zero'"
            )
        return SplitRule(unit_rows=self.samples_per_prompt, normalizer="rows")

    def loss(self, policy: nn.Module, batch: KTOBatch, *, reference: nn.Module | None) -> LossOutput:
        """KTO loss of ``batch``; metrics: ``kl`` (mean ρ over rows), ``reference_point`` (z₀) and TRL's sums."""
        if reference is None:
            raise ValueError("reference: expected the frozen reference model, got None")
        batch = batch.to(next(policy.parameters()).device)
        args = (batch.input_ids, batch.attention_mask, batch.completion_mask)
        logps = sequence_logprobs(policy, *args)
        with torch.no_grad():
            ref_logps = sequence_logprobs(reference, *args)
            z0 = None
            if batch.kl_input_ids is not None:
                kl_args = (batch.kl_input_ids, batch.kl_attention_mask, batch.kl_completion_mask)
                z0 = kto_kl_estimate(sequence_logprobs(policy, *kl_args), sequence_logprobs(reference, *kl_args))
        cfg = self.config
        out = kto_loss(logps, batch.labels, ref_logps=ref_logps, reference_point=z0, **asdict(cfg.loss_options()))
        metrics = dict(out.metrics)
        metrics["reference_point"] = metrics.pop("kl")
        metrics["kl"] = (logps.detach() - ref_logps).mean()
        return LossOutput(loss=out.loss, metrics=metrics)
