"""Direct preference optimisation across the offline → online spectrum, and IPO.

DPO (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290) fits a policy π to preference pairs
(y_w ≻ y_l) against a frozen reference π_ref:

    L = − log σ(β [(log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))])

(IPO, Azar et al. 2023, replaces it by the squared distance of the margin from 1/(2β); the other
``loss_type`` values of :func:`hotloop.kernels.losses.dpo.dpo_loss` work the same way). Where the
pairs come from is what separates the variants (Tang et al. 2024; Lanchantin et al. 2025):

- :class:`OnlineDPO`: each step samples n completions per prompt from the sampler and pairs the
  best with the worst by reward (for 0/1 verifiable rewards: a correct with an incorrect one);
  groups whose rewards are all equal carry no preference and are skipped. With the loop's
  ``sync_every = 1`` this is online DPO, with ``s > 1`` semi-online (the sampler lags by up to
  ``s − 1`` optimizer steps), with ``s = ∞`` offline-on-policy-at-start. The algorithm itself never
  sees ``s``: the loop decides which weights the sampler holds.
- :class:`OfflineDPO`: a fixed preference set, built once (from the initial policy's samples with
  :meth:`OfflineDPO.from_policy`, or from a data set), replayed for the prompts the loop draws.

Cost per pair: one policy forward+backward and one reference forward over both sequences; the
log-probs come from the fused linear log-prob kernel, so no ``[tokens, V]`` logits are stored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from hotloop.algorithms.base import Batch, BuildContext, check_scored, group_by_prompt, pack_rows, sampler_version
from hotloop.algorithms.logprobs import sequence_logprobs
from hotloop.kernels.losses.dpo import LOSS_TYPES, dpo_loss
from hotloop.kernels.losses.output import LossOutput
from hotloop.runtime.engine import Completion, SamplingParams



@dataclass(frozen=True, kw_only=True)
class DPOConfig:
    """Settings of the DPO family (online, semi-online and offline alike)."""

    beta: float = 0.1
    """Inverse temperature β of the implicit reward β log(π/π_ref)."""
    loss_type: str = "sigmoid"
    """Pairwise loss, one of ``hotloop.kernels.losses.dpo.LOSS_TYPES``: "sigmoid" (DPO), "ipo", "hinge", ..."""
    label_smoothing: float = 0.0
    """Probability that a preference label is flipped (conservative DPO); 0 = off."""
    length_normalize: bool = False
    """Divide each sequence log-prob by its completion length (SimPO/IPO-style) before the margin."""
    samples_per_prompt: int = 8
    """Completions sampled per prompt to pick pairs from."""
    pairs_per_prompt: int = 1
    """Pairs taken from one prompt's samples: the i-th best with the i-th worst, while rewards differ."""

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ValueError(f"beta: expected a float > 0, got {self.beta!r}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type: expected one of {LOSS_TYPES}, got {self.loss_type!r}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing: expected a float in [0, 0.5), got {self.label_smoothing!r}")
        if not isinstance(self.samples_per_prompt, int) or self.samples_per_prompt < 2:
            raise ValueError(f"samples_per_prompt: expected an int >= 2, got {self.samples_per_prompt!r}")
        if not isinstance(self.pairs_per_prompt, int) or not 1 <= self.pairs_per_prompt <= self.samples_per_prompt // 2:
            raise ValueError(f"pairs_per_prompt: expected an int in [1, samples_per_prompt // 2 = "
                             f"{self.samples_per_prompt // 2}], got {self.pairs_per_prompt!r}")


@dataclass(frozen=True, kw_only=True)
class PairBatch(Batch):
    """Rows ``[c_0, r_0, c_1, r_1, ...]``: pair p is (chosen row 2p, rejected row 2p + 1)."""

    chosen: torch.Tensor
    """[P] int64 row index of each pair's preferred completion."""
    rejected: torch.Tensor
    """[P] int64 row index of each pair's dispreferred completion."""


@dataclass(frozen=True)
class PreferencePair:
    """One stored preference: token ids of the prompt and of the two completions (eos included)."""

    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    chosen_reward: float = 1.0
    rejected_reward: float = 0.0


def best_worst_pairs(rewards: torch.Tensor, groups: list[list[int]], pairs_per_group: int) -> list[tuple[int, int]]:
    """(chosen, rejected) indices: in each group the i-th best with the i-th worst, while they differ.

    Ties keep sampling order, so the result is deterministic; groups with one reward value give none.
    """
    values, pairs = rewards.tolist(), []  # one host copy, not one per element
    for group in groups:
        order = sorted(group, key=lambda i: -values[i])
        for i in range(min(pairs_per_group, len(order) // 2)):
            best, worst = order[i], order[-1 - i]
            if values[best] > values[worst]:
                pairs.append((best, worst))
    return pairs


def preference_pairs(prompt_ids: list[list[int]], completions: list[Completion], rewards: torch.Tensor,
                     pairs_per_prompt: int) -> list[PreferencePair]:
    """Best-vs-worst pairs of each prompt's scored samples (see :func:`best_worst_pairs`)."""
    check_scored(completions, rewards)
    groups = group_by_prompt(completions, len(prompt_ids))
    return [PreferencePair(tuple(prompt_ids[completions[w].prompt_index]), tuple(completions[w].token_ids),
                           tuple(completions[l].token_ids), float(rewards[w]), float(rewards[l]))
            for w, l in best_worst_pairs(rewards, groups, pairs_per_prompt)]


def pair_batch(pairs: list[PreferencePair], pad_token_id: int, version: int) -> PairBatch:
    """Pack preference pairs into interleaved chosen/rejected rows."""
    prompts = [list(p.prompt_ids) for p in pairs for _ in range(2)]
    completions = [list(ids) for p in pairs for ids in (p.chosen_ids, p.rejected_ids)]
    input_ids, attention_mask, completion_mask = pack_rows(prompts, completions, pad_token_id)
    rewards = torch.tensor([r for p in pairs for r in (p.chosen_reward, p.rejected_reward)], dtype=torch.float32)
    P = len(pairs)
    return PairBatch(input_ids=input_ids, attention_mask=attention_mask, completion_mask=completion_mask,
                     rewards=rewards, sampler_version=version,
                     chosen=torch.arange(0, 2 * P, 2), rejected=torch.arange(1, 2 * P, 2))


class _DPOLoss:
    """The loss shared by every DPO variant: sequence log-probs of both rows → ``dpo_loss``."""

    needs_reference = True

    def __init__(self, config: DPOConfig, *, pad_token_id: int) -> None:
        if not isinstance(config, DPOConfig):
            raise TypeError(f"config: expected DPOConfig, got {type(config).__name__}")
        if not isinstance(pad_token_id, int) or pad_token_id < 0:
            raise ValueError(f"pad_token_id: expected an int >= 0, got {pad_token_id!r}")
        self.config, self.pad_token_id = config, pad_token_id

    def loss(self, policy: nn.Module, batch: PairBatch, *, reference: nn.Module | None) -> LossOutput:
        """DPO-family loss of ``batch``; metrics add ``kl`` = mean over rows of log π − log π_ref."""
        if reference is None:
            raise ValueError("reference: expected the frozen reference model, got None")
        args = (batch.input_ids, batch.attention_mask, batch.completion_mask)
        logps = sequence_logprobs(policy, *args)
        with torch.no_grad():
            ref_logps = sequence_logprobs(reference, *args)
        lengths = batch.completion_mask.sum(-1)
        c, r, cfg = batch.chosen, batch.rejected, self.config
        out = dpo_loss(logps[c], logps[r], ref_logps[c], ref_logps[r], beta=cfg.beta, loss_type=cfg.loss_type,
                       label_smoothing=cfg.label_smoothing, chosen_lengths=lengths[c],
                       rejected_lengths=lengths[r], length_normalize=cfg.length_normalize)
        metrics = dict(out.metrics)
        metrics["kl"] = (logps.detach() - ref_logps).mean()
        metrics["pairs"] = torch.tensor(float(c.numel()))
        return LossOutput(loss=out.loss, metrics=metrics)


class OnlineDPO(_DPOLoss):
    """DPO on pairs picked from fresh samples: best vs worst reward of each prompt's n completions."""

    def __init__(self, config: DPOConfig, *, pad_token_id: int) -> None:
        super().__init__(config, pad_token_id=pad_token_id)
        self.samples_per_prompt = config.samples_per_prompt

    @classmethod
    def from_config(cls, config: DPOConfig, context: BuildContext) -> OnlineDPO:
        """Factory for the config registry."""
        return cls(config, pad_token_id=context.pad_token_id)

    def build_batch(self, problems: list, prompt_ids: list[list[int]], completions: list[Completion],
                    rewards: torch.Tensor) -> PairBatch | None:
        """Pairs from every group with a reward contrast; None when no group has one."""
        pairs = preference_pairs(prompt_ids, completions, rewards, self.config.pairs_per_prompt)
        if not pairs:
            return None
        return pair_batch(pairs, self.pad_token_id, sampler_version(completions))


class OfflineDPO(_DPOLoss):
    """DPO on a fixed preference set: each step trains on the stored pairs of the prompts drawn."""

    samples_per_prompt = 0

    def __init__(self, config: DPOConfig, *, pad_token_id: int, pairs: list[PreferencePair], version: int = 0) -> None:
        super().__init__(config, pad_token_id=pad_token_id)
        if not pairs:
            raise ValueError("pairs: expected at least one preference pair, got none")
        self.version = version
        self.pairs: dict[tuple[int, ...], list[PreferencePair]] = {}
        for pair in pairs:
            self.pairs.setdefault(tuple(pair.prompt_ids), []).append(pair)

    @classmethod
    def from_policy(cls, config: DPOConfig, *, pad_token_id: int, engine, problems: list,
                    prompt_ids: list[list[int]], reward_fn: Callable, decode: Callable[[list[int]], str],
                    sampling: SamplingParams) -> OfflineDPO:
        """Build the set once from ``engine``'s samples (``config.samples_per_prompt`` per prompt)."""
        completions = engine.generate(prompt_ids, dataclasses.replace(sampling, n=config.samples_per_prompt))
        rewards = reward_fn([problems[c.prompt_index] for c in completions], [decode(c.token_ids) for c in completions])
        pairs = preference_pairs(prompt_ids, completions, rewards, config.pairs_per_prompt)
        if not pairs:
            raise ValueError("problems: the policy's samples show no reward contrast on any prompt")
        return cls(config, pad_token_id=pad_token_id, pairs=pairs, version=engine.weight_version)

    @classmethod
    def from_config(cls, config: DPOConfig, context: BuildContext) -> OfflineDPO:
        """Factory for the config registry: pairs from the engine's samples of every training prompt."""
        tok = context.tokenizer
        return cls.from_policy(config, pad_token_id=context.pad_token_id, engine=context.engine,
                               problems=context.problems, prompt_ids=[tok.encode(p.prompt) for p in context.problems],
                               reward_fn=context.reward_fn, decode=tok.decode, sampling=context.sampling)

    def build_batch(self, problems: list, prompt_ids: list[list[int]], completions: list[Completion],
                    rewards: torch.Tensor) -> PairBatch | None:
        """The stored pairs of the drawn prompts (``completions`` is empty); None when none is stored."""
        chosen = [p for ids in prompt_ids for p in self.pairs.get(tuple(ids), [])[: self.config.pairs_per_prompt]]
        return pair_batch(chosen, self.pad_token_id, self.version) if chosen else None

    def prompts(self) -> list[tuple[int, ...]]:
        """Prompt token ids that have stored pairs (the pool an offline run should draw from)."""
        return list(self.pairs)
