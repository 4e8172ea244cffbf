"""GRPO and its variants (Dr. GRPO, DAPO, BNPO, GSPO, CISPO, RLOO baselines) on groups of samples.

GRPO (Shao et al. 2024, https://arxiv.org/abs/2402.03300) samples G completions ``y_1..y_G`` per
prompt, scores them (``r_i``) and weights each one's tokens by a group-relative advantage:

    A_i = (r_i − mean_g r) / (std_g r + ε)         advantage="group_std"   (GRPO)
    A_i =  r_i − mean_g r                          advantage="group_mean"  (Dr. GRPO, arXiv 2503.20783)
    A_i =  r_i − mean_{j≠i} r_j                    advantage="rloo"        (RLOO, arXiv 2402.14740)

    w_{i,t} = π_θ(y_{i,t} | ·) / π_old(y_{i,t} | ·)   (token level; "sequence": GSPO's per-row geometric mean)
    L = Σ_{i,t} c_{i,t} · [−min(w A_i, clip(w, 1 − ε_low, 1 + ε_high) A_i) + β · KL_t(π_θ ‖ π_ref)]

with ``c`` the reduction weights of ``loss_type`` and every variant's per-token term as in
:func:`hotloop.kernels.losses.grpo.grpo_loss` (grpo, dapo, dr_grpo, bnpo, cispo, sapo, luspo, vespo;
KL estimator k1/k2/k3). All log-probs are taken at the sampling temperature ``T``.

**π_old is the sampler.** The loop takes one optimizer step per batch, so the policy that
generated a batch is the engine's weight version, and its per-token log-probs are exactly
``Completion.logprobs`` (``log_softmax(logits / T)`` before top-p/top-k, the quantity the
trainer recomputes). With ``sync_every = 1`` the sampler *is* the trainer's module: ``w = 1`` up to
kernel rounding, the clip never fires and the loss is the on-policy policy gradient. With ``s > 1``
the sampler lags by up to ``s − 1`` optimizer steps; its log-probs are then the *behaviour*
policy's, ``w = π_θ / π_behaviour`` corrects for the staleness (off-policy importance sampling)
and the clip bounds how far one stale batch moves the policy. ``old_logp="policy"`` sets
``π_old = sg(π_θ)`` instead (``w ≡ 1``: staleness ignored), for comparison.

Groups whose rewards are all equal have zero advantage and give no policy gradient;
``drop_uniform_groups`` removes their rows before the forward pass (DAPO's dynamic-sampling
filter, without resampling), and a step with no contrast at all is skipped (``None``).
Cost: one policy forward + backward over the kept rows through the fused log-prob kernel (no
``[N, V]`` logits), one reference forward when ``β ≠ 0``; batching is two tensor scatters.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from hotloop.algorithms.base import Batch, BuildContext, completion_rows, grouped_rewards, sampler_version, token_values
from hotloop.algorithms.logprobs import token_logprobs
from hotloop.kernels.losses.advantages import group_advantages, rloo_advantages
from hotloop.kernels.losses.grpo import GRPOOptions, grpo_loss
from hotloop.kernels.losses.output import LossOutput
from hotloop.runtime.engine import Completion
from hotloop.runtime.micro_batches import SplitRule

ADVANTAGES = ("group_std", "group_mean", "rloo")
OLD_LOGP = ("sampler", "policy")


@dataclass(frozen=True, kw_only=True)
class GRPOConfig:
    """Settings of the GRPO family; the loss options' defaults, meanings and checks are
    :class:`~hotloop.kernels.losses.grpo.GRPOOptions`' (:meth:`loss_options`)."""

    samples_per_prompt: int = 8
    """G: completions sampled per prompt (one group)."""
    advantage: str = "group_std"
    """One of ADVANTAGES: "group_std" (GRPO), "group_mean" (Dr. GRPO, no std scaling), "rloo" (leave-one-out)."""
    loss_type: str = GRPOOptions.loss_type
    """``GRPOOptions.loss_type``: per-token loss and reduction."""
    epsilon_low: float = GRPOOptions.epsilon_low
    """``GRPOOptions.epsilon_low``: lower clip range."""
    epsilon_high: float = GRPOOptions.epsilon_high
    """``GRPOOptions.epsilon_high``: upper clip range (DAPO: 0.28; cispo: the absolute cap)."""
    delta: float | None = GRPOOptions.delta
    """``GRPOOptions.delta``: two-sided clip of the ratio (INTELLECT-2); None = off."""
    importance_sampling_level: str = GRPOOptions.importance_sampling_level
    """``GRPOOptions.importance_sampling_level``: "token" (GRPO) or "sequence" (GSPO)."""
    beta: float = GRPOOptions.beta
    """``GRPOOptions.beta``: KL(π ‖ π_ref) penalty coefficient; 0 = no penalty and no reference forward."""
    kl_estimator: str = GRPOOptions.kl_estimator
    """``GRPOOptions.kl_estimator``: "k1", "k2" or "k3"."""
    old_logp: str = "sampler"
    """π_old: "sampler" (Completion.logprobs, the behaviour policy) or "policy" (sg(π_θ): ratio 1)."""
    drop_uniform_groups: bool = True
    """Leave out the rows of groups whose rewards are all equal (zero advantage) before the forward pass."""

    def __post_init__(self) -> None:
        for name, allowed in (("advantage", ADVANTAGES), ("old_logp", OLD_LOGP)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: expected one of {allowed}, got {getattr(self, name)!r}")
        if not isinstance(self.samples_per_prompt, int) or self.samples_per_prompt < 2:
            raise ValueError(f"samples_per_prompt: expected an int >= 2, got {self.samples_per_prompt!r}")
        self.loss_options()  # checks every loss option (GRPOOptions' rules)

    def loss_options(self) -> GRPOOptions:
        """The kernel's options for this config (the others at ``GRPOOptions``' defaults)."""
        return GRPOOptions(
            loss_type=self.loss_type,
            epsilon_low=self.epsilon_low,
            epsilon_high=self.epsilon_high,
            delta=self.delta,
            importance_sampling_level=self.importance_sampling_level,
            beta=self.beta,
            kl_estimator=self.kl_estimator,
        )


@dataclass(frozen=True, kw_only=True)
class GRPOBatch(Batch):
    """Rows of the groups with a reward contrast, each with its advantage and its sampler log-probs."""

    advantages: torch.Tensor
    """[B] float32 group-relative advantage of each row."""
    old_logp: torch.Tensor
    """[B, T − 1] float32 sampler log-prob of each completion token (aligned with ``token_logprobs``), 0 elsewhere."""


def advantages(rewards: torch.Tensor, kind: str) -> torch.Tensor:
    """[P·G] advantages of grouped rewards [P, G] (see the module docstring for ``kind``)."""
    if kind == "rloo":
        return rloo_advantages(rewards, rewards.shape[1])
    return group_advantages(rewards, rewards.shape[1], scale="std" if kind == "group_std" else "none")


class GRPO:
    """Group-relative policy optimisation; the variant is picked by ``GRPOConfig``."""

    def __init__(
        self,
        config: GRPOConfig,
        *,
        pad_token_id: int,
        temperature: float = 1.0,
        max_completion_length: int | None = None,
    ) -> None:
        if not isinstance(config, GRPOConfig):
            raise TypeError(f"config: expected GRPOConfig, got {type(config).__name__}")
        if not isinstance(pad_token_id, int) or pad_token_id < 0:
            raise ValueError(f"pad_token_id: expected an int >= 0, got {pad_token_id!r}")
        self.config, self.pad_token_id, self.temperature = config, pad_token_id, float(temperature)
        self.max_completion_length = max_completion_length
        self.samples_per_prompt = config.samples_per_prompt
        self.needs_reference = config.beta != 0

    @classmethod
    def from_config(cls, config: GRPOConfig, context: BuildContext) -> GRPO:
        """Factory for the config registry: log-probs at the run's sampling temperature (1 when greedy)."""
        sampling = context.sampling
        return cls(
            config,
            pad_token_id=context.pad_token_id,
            temperature=sampling.logprob_temperature,
            max_completion_length=sampling.max_new_tokens,
        )

    def build_batch(
        self, problems: list, prompt_ids: list[list[int]], completions: list[Completion], rewards: torch.Tensor
    ) -> GRPOBatch | None:
        """Rows with their advantages and sampler log-probs; None when no group has a reward contrast."""
        grouped = grouped_rewards(completions, rewards, len(prompt_ids), self.samples_per_prompt)
        contrast = (grouped != grouped[:, :1]).any(dim=1)
        keep = contrast if self.config.drop_uniform_groups else torch.ones_like(contrast)
        if not bool(keep.any()) or not (bool(contrast.any()) or self.needs_reference):
            return None
        rows = keep.repeat_interleave(self.samples_per_prompt).nonzero().squeeze(1)
        row_list = rows.tolist()
        input_ids, attention_mask, completion_mask = completion_rows(
            prompt_ids, completions, row_list, self.pad_token_id
        )
        old = token_values(completion_mask, [completions[i].logprobs for i in row_list])
        return GRPOBatch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            completion_mask=completion_mask,
            rewards=grouped.reshape(-1)[rows],
            sampler_version=sampler_version(completions),
            advantages=advantages(grouped, self.config.advantage)[rows],
            old_logp=old,
        )

    def prompt_pool(self, problems: list) -> list:
        """The problems the loop draws prompts from: the run's training problems."""
        return problems

    def split_rule(self) -> SplitRule:
        """Whole groups; N counts completion tokens for the token-mean losses, rows otherwise (``losses.grpo``)."""
        per_token = self.config.loss_type in ("bnpo", "dapo", "cispo", "vespo")
        return SplitRule(unit_rows=self.samples_per_prompt, normalizer="tokens" if per_token else "rows")

    def loss(self, policy: nn.Module, batch: GRPOBatch, *, reference: nn.Module | None) -> LossOutput:
        """GRPO-family loss of ``batch``; metrics add ``ratio`` (token mean of π_θ/π_sampler) and ``rows``."""
        cfg = self.config
        if self.needs_reference and reference is None:
            raise ValueError(f"reference: beta={cfg.beta} needs the frozen reference model, got None")
        batch = batch.to(next(policy.parameters()).device)
        args = (batch.input_ids, batch.attention_mask)
        opts = dict(temperature=self.temperature, completion_mask=batch.completion_mask)  # prompts: no head work
        logp = token_logprobs(policy, *args, **opts)
        ref = None
        if self.needs_reference:
            with torch.no_grad():
                ref = token_logprobs(reference, *args, **opts)
        mask = batch.completion_mask[:, 1:]
        old = batch.old_logp if cfg.old_logp == "sampler" else None
        out = grpo_loss(
            logp,
            batch.advantages,
            mask,
            old_logp=old,
            ref_logp=ref,
            max_completion_length=self.max_completion_length,
            **asdict(cfg.loss_options()),
        )
        metrics = dict(out.metrics)
        with torch.no_grad():
            m = mask.to(logp.dtype)
            metrics["ratio"] = ((logp.detach() - batch.old_logp).exp() * m).sum() / m.sum().clamp_min(1.0)
        metrics["rows"] = torch.tensor(float(batch.rows))
        return LossOutput(loss=out.loss, metrics=metrics)
