"""Direct preference optimisation across the offline → online spectrum, and IPO.

DPO (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290) fits a policy π to preference pairs
(y_w ≻ y_l) against a frozen reference π_ref:

    L = − log σ(β [(log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))])

(IPO, Azar et al. 2023, replaces it by the squared distance of the margin from 1/(2β); the other
``loss_type`` values of :func:`hotloop.kernels.losses.dpo.dpo_loss` work the same way). Where the
pairs come from is what separates the variants (Tang et al. 2024; Lanchantin et al. 2025):

- :class:`OnlineDPO`: each step samples n completions per prompt from the sampler and pairs the
  best with the worst by reward (for 0/1 verifiable rewards: a correct with an incorrect one);
  groups whose rewards are all equal carry no preference and are skipped (counted by reason; with few
  correct samples ``pair_fallback`` and ``hard_prompt_samples`` keep the step fed without ever pairing
  two prompts' completions: :mod:`hotloop.algorithms.pairing`). With the loop's
  ``sync_every = 1`` this is online DPO, with ``s > 1`` semi-online (the sampler lags by up to
  ``s − 1`` optimizer steps), with ``s = ∞`` offline-on-policy-at-start. The algorithm itself never
  sees ``s``: the loop decides which weights the sampler holds.
- :class:`OfflineDPO`: a fixed preference set, built once (from the initial policy's samples with
  :meth:`OfflineDPO.from_policy`, or from a JSONL file of ``{"prompt", "chosen", "rejected"}``
  texts with :meth:`OfflineDPO.from_file`), replayed for the prompts the loop draws. Because the
  set is fixed, its reference log-probs are computed once (on the first loss call) and cached.

The pairs themselves (:class:`PreferencePair`, reading a pairs file, packing rows) are
:mod:`hotloop.algorithms.preference_data`'s.

Cost per pair: one policy forward+backward, plus one reference forward over both sequences (online;
offline only once per stored pair); the log-probs come from the fused linear log-prob kernel, so
no ``[tokens, V]`` logits are stored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from hotloop.algorithms.base import BuildContext, check_scored, group_by_prompt, sampler_version
from hotloop.algorithms.logprobs import sequence_logprobs
from hotloop.algorithms.pairing import PAIR_FALLBACKS, resample_tied, skip_reasons
from hotloop.algorithms.preference_data import PairBatch, PreferencePair, pair_batch, preference_pairs, read_pairs
from hotloop.kernels.losses.dpo import LOSS_TYPES, DPOOptions, dpo_loss
from hotloop.kernels.losses.output import LossOutput
from hotloop.runtime.engine import Completion, SamplingParams
from hotloop.runtime.micro_batches import SplitRule

_REFERENCE_CHUNK_PAIRS = 64
"""Stored pairs per reference forward when the reference log-probs of a fixed set are cached."""


@dataclass(frozen=True, kw_only=True)
class DPOConfig:
    """Settings of the DPO family (online, semi-online and offline alike); the loss options' defaults, meanings and
    checks are :class:`~hotloop.kernels.losses.dpo.DPOOptions`' (:meth:`loss_options`)."""

    beta: float = DPOOptions.beta
    """``DPOOptions.beta``: inverse temperature β of the implicit reward β log(π/π_ref)."""
    loss_type: str = DPOOptions.loss_type
    """``DPOOptions.loss_type``: one of ``hotloop.kernels.losses.dpo.LOSS_TYPES`` ("sigmoid" = DPO, "ipo", ...)."""
    label_smoothing: float = DPOOptions.label_smoothing
    """``DPOOptions.label_smoothing``: probability that a preference label is flipped (conservative DPO)."""
    length_normalize: bool | None = DPOOptions.length_normalize
    """``DPOOptions.length_normalize``: divide each sequence log-prob by its completion length (None: ipo only)."""
    samples_per_prompt: int = 8
    """Completions sampled per prompt to pick pairs from."""
    pairs_per_prompt: int = 1
    """Pairs taken from one prompt's samples: the i-th best with the i-th worst, while rewards differ."""
    pair_fallback: str = "none"
    """When correct samples are few: "none" = i-th best with i-th worst only; "reuse" = a sample may serve in
    several pairs of its prompt (:func:`hotloop.algorithms.pairing.contrast_pairs`)."""
    hard_prompt_samples: int = 0
    """More samples drawn for each prompt whose samples all tie, before pairing (online only); 0 = none."""
    pairs_file: str | None = None
    """Offline DPO only: JSONL of {"prompt", "chosen", "rejected"} texts to train on; None = pairs from the
    initial policy's samples of the task's prompts."""

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:  # "orpo" is the fused loss's, not a pairwise dpo_loss type
            raise ValueError(f"loss_type: expected one of {LOSS_TYPES}, got {self.loss_type!r}")
        self.loss_options()  # checks every loss option (DPOOptions' rules)
        if not isinstance(self.samples_per_prompt, int) or self.samples_per_prompt < 2:
            raise ValueError(f"samples_per_prompt: expected an int >= 2, got {self.samples_per_prompt!r}")
        if not isinstance(self.pairs_per_prompt, int) or not 1 <= self.pairs_per_prompt <= self.samples_per_prompt // 2:
            raise ValueError(
                f"pairs_per_prompt: expected an int in [1, samples_per_prompt // 2 = "
                f"{self.samples_per_prompt // 2}], got {self.pairs_per_prompt!r}"
            )
        if self.pair_fallback not in PAIR_FALLBACKS:
            raise ValueError(f"pair_fallback: expected one of {PAIR_FALLBACKS}, got {self.pair_fallback!r}")
        if not isinstance(self.hard_prompt_samples, int) or self.hard_prompt_samples < 0:
            raise ValueError(f"hard_prompt_samples: expected an int >= 0, got {self.hard_prompt_samples!r}")
        if self.pairs_file is not None and (not isinstance(self.pairs_file, str) or not self.pairs_file):
            raise ValueError(f"pairs_file: expected None or a path, got {self.pairs_file!r}")

    def loss_options(self) -> DPOOptions:
        """The kernel's options for this config (the others at ``DPOOptions``' defaults)."""
        return DPOOptions(
            beta=self.beta,
            loss_type=self.loss_type,
            label_smoothing=self.label_smoothing,
            length_normalize=self.length_normalize,
        )


@dataclass(frozen=True, kw_only=True)
class StoredPairBatch(PairBatch):
    """A :class:`PairBatch` of pairs from a fixed set, which knows where each row is stored."""

    stored_row: torch.Tensor
    """[B] int64: row r is ``2i`` (chosen) or ``2i + 1`` (rejected) of stored pair i (:attr:`OfflineDPO.stored`);
    per row, so micro batches that slice rows keep it aligned."""


class _DPOLoss:
    """The loss shared by every DPO variant: sequence log-probs of both rows → ``dpo_loss``."""

    needs_reference = True

    def __init__(self, config: DPOConfig, *, pad_token_id: int) -> None:
        if not isinstance(config, DPOConfig):
            raise TypeError(f"config: expected DPOConfig, got {type(config).__name__}")
        if not isinstance(pad_token_id, int) or pad_token_id < 0:
            raise ValueError(f"pad_token_id: expected an int >= 0, got {pad_token_id!r}")
        self.config, self.pad_token_id = config, pad_token_id

    def prompt_pool(self, problems: list) -> list:
        """The problems the loop draws prompts from: the run's training problems."""
        return problems

    def split_rule(self) -> SplitRule:
        """Mean over pairs; pair p is rows (2p, 2p + 1), indexed by ``chosen`` / ``rejected``."""
        return SplitRule(unit_rows=2, normalizer="rows", row_index_fields=("chosen", "rejected"))

    def loss(self, policy: nn.Module, batch: PairBatch, *, reference: nn.Module | None) -> LossOutput:
        """DPO-family loss of ``batch``; metrics add ``kl`` = Σ (log π − log π_ref) / completion tokens over every
        row (per token; the rows are chosen/rejected picks, so the on-policy estimate is the loop's ``eval/kl``)."""
        if reference is None:
            raise ValueError("reference: expected the frozen reference model, got None")
        batch = batch.to(next(policy.parameters()).device)
        logps = sequence_logprobs(policy, batch.input_ids, batch.attention_mask, batch.completion_mask)
        ref_logps = self.reference_logps(reference, batch).to(logps.device)
        lengths = batch.completion_mask.sum(-1)
        c, r, cfg = batch.chosen, batch.rejected, self.config
        out = dpo_loss(
            logps[c],
            logps[r],
            ref_chosen_logps=ref_logps[c],
            ref_rejected_logps=ref_logps[r],
            chosen_lengths=lengths[c],
            rejected_lengths=lengths[r],
            **asdict(cfg.loss_options()),
        )
        metrics = dict(out.metrics)
        # per token over every completion token of the batch (both sides of each pair), not a per-pair mean
        metrics["kl"] = (logps.detach() - ref_logps).sum() / lengths.sum().clamp_min(1)
        metrics["pairs"] = torch.tensor(float(c.numel()))
        return LossOutput(loss=out.loss, metrics=metrics)

    @torch.no_grad()
    def reference_logps(self, reference: nn.Module, batch: PairBatch) -> torch.Tensor:
        """[B] float32 log π_ref of every row of ``batch`` (a fresh reference forward)."""
        return sequence_logprobs(reference, batch.input_ids, batch.attention_mask, batch.completion_mask)


class OnlineDPO(_DPOLoss):
    """DPO on pairs picked from fresh samples: best vs worst reward of each prompt's n completions (with the
    fallbacks of :mod:`hotloop.algorithms.pairing`; ``engine``, ``reward_fn``, ``decode`` and ``sampling`` are
    needed only for ``hard_prompt_samples > 0``). ``last_batch_metrics`` holds the last step's pair counts."""

    def __init__(
        self,
        config: DPOConfig,
        *,
        pad_token_id: int,
        engine=None,
        reward_fn: Callable | None = None,
        decode: Callable | None = None,
        sampling: SamplingParams | None = None,
    ) -> None:
        super().__init__(config, pad_token_id=pad_token_id)
        if config.hard_prompt_samples and None in (engine, reward_fn, decode, sampling):
            raise ValueError(
                "engine: hard_prompt_samples > 0 needs an engine, reward_fn, decode and sampling, got None"
            )
        self.samples_per_prompt = config.samples_per_prompt
        self.engine, self.reward_fn, self.decode, self.sampling = engine, reward_fn, decode, sampling
        self.last_batch_metrics: dict[str, float] = {}

    @classmethod
    def from_config(cls, config: DPOConfig, context: BuildContext) -> OnlineDPO:
        """Factory for the config registry."""
        return cls(
            config,
            pad_token_id=context.pad_token_id,
            engine=context.engine,
            reward_fn=context.reward_fn,
            decode=context.tokenizer.decode,
            sampling=context.sampling,
        )

    def build_batch(
        self, problems: list, prompt_ids: list[list[int]], completions: list[Completion], rewards: torch.Tensor
    ) -> PairBatch | None:
        """Pairs from every group with a reward contrast (after resampling hard prompts); None when none has one."""
        check_scored(completions, rewards)
        completions, rewards, resampled = resample_tied(self, problems, prompt_ids, completions, rewards)
        groups = group_by_prompt(completions, len(prompt_ids))
        self.last_batch_metrics = {**skip_reasons(rewards, groups), "pairs/resampled_prompts": float(resampled)}
        pairs = preference_pairs(
            prompt_ids, completions, rewards, self.config.pairs_per_prompt, self.config.pair_fallback
        )
        if not pairs:
            return None
        return pair_batch(pairs, self.pad_token_id, sampler_version(completions))


class OfflineDPO(_DPOLoss):
    """DPO on a fixed preference set: each step trains on the stored pairs of the prompts drawn.

    The set's reference log-probs are computed once per reference model, on the first ``loss``
    call, and read from that cache afterwards (:meth:`reference_logps`).
    """

    samples_per_prompt = 0

    def __init__(
        self, config: DPOConfig, *, pad_token_id: int, pairs: list[PreferencePair], problems: list, version: int = 0
    ) -> None:
        super().__init__(config, pad_token_id=pad_token_id)
        if not pairs:
            raise ValueError("pairs: expected at least one preference pair, got none")
        self.version, self.problems = version, problems
        self.pairs: dict[tuple[int, ...], list[PreferencePair]] = {}
        for pair in pairs:
            self.pairs.setdefault(tuple(pair.prompt_ids), []).append(pair)
        # identical pairs share one slot of the reference cache
        self.stored: list[PreferencePair] = list(dict.fromkeys(pairs))
        self._slot = {pair: i for i, pair in enumerate(self.stored)}
        self._reference: nn.Module | None = None
        self._reference_cache: torch.Tensor | None = None

    @classmethod
    def from_policy(
        cls,
        config: DPOConfig,
        *,
        pad_token_id: int,
        engine,
        problems: list,
        prompt_ids: list[list[int]],
        reward_fn: Callable,
        decode: Callable[[list[int]], str],
        sampling: SamplingParams,
    ) -> OfflineDPO:
        """Build the set once from ``engine``'s samples (``config.samples_per_prompt`` per prompt)."""
        completions = engine.generate(prompt_ids, dataclasses.replace(sampling, n=config.samples_per_prompt))
        rewards = reward_fn([problems[c.prompt_index] for c in completions], [decode(c.token_ids) for c in completions])
        pairs = preference_pairs(prompt_ids, completions, rewards, config.pairs_per_prompt)
        if not pairs:
            raise ValueError("problems: the policy's samples show no reward contrast on any prompt")
        return cls(config, pad_token_id=pad_token_id, pairs=pairs, problems=problems, version=engine.weight_version)

    @classmethod
    def from_file(
        cls,
        config: DPOConfig,
        *,
        path: str | Path,
        pad_token_id: int,
        encode: Callable[[str], list[int]],
        eos_token_id: int,
    ) -> OfflineDPO:
        """Read the set from a JSONL file of PAIR_KEYS texts (see :func:`read_pairs`); its prompts are the pool."""
        problems, pairs = read_pairs(path, encode, eos_token_id)
        return cls(config, pad_token_id=pad_token_id, pairs=pairs, problems=problems)

    @classmethod
    def from_config(cls, config: DPOConfig, context: BuildContext) -> OfflineDPO:
        """Factory for the config registry: pairs from ``config.pairs_file``, else from the engine's samples of
        every training prompt."""
        tok = context.tokenizer
        if config.pairs_file is not None:
            eos = getattr(tok, "eos_id", None)
            if eos is None:
                raise ValueError(
                    f"tokenizer: pairs from {config.pairs_file} need an eos id to end completions, "
                    f"got {type(tok).__name__} without one"
                )
            return cls.from_file(
                config, path=config.pairs_file, pad_token_id=context.pad_token_id, encode=tok.encode, eos_token_id=eos
            )
        return cls.from_policy(
            config,
            pad_token_id=context.pad_token_id,
            engine=context.engine,
            problems=context.problems,
            prompt_ids=[tok.encode(p.prompt) for p in context.problems],
            reward_fn=context.reward_fn,
            decode=tok.decode,
            sampling=context.sampling,
        )

    def prompt_pool(self, problems: list) -> list:
        """The set's own prompts: a pairs file's, or the problems the set was sampled from."""
        return self.problems

    def build_batch(
        self, problems: list, prompt_ids: list[list[int]], completions: list[Completion], rewards: torch.Tensor
    ) -> StoredPairBatch | None:
        """Every stored pair of the drawn prompts (``completions`` is empty); None when none is stored."""
        chosen = [p for ids in prompt_ids for p in self.pairs.get(tuple(ids), [])]
        if not chosen:
            return None
        batch = pair_batch(chosen, self.pad_token_id, self.version)
        rows = [2 * self._slot[p] + side for p in chosen for side in (0, 1)]  # pair_batch's interleaved layout
        return StoredPairBatch(
            **{f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)},
            stored_row=torch.tensor(rows, dtype=torch.long),
        )

    def prompts(self) -> list[tuple[int, ...]]:
        """Prompt token ids that have stored pairs."""
        return list(self.pairs)

    def reference_logps(self, reference: nn.Module, batch: StoredPairBatch) -> torch.Tensor:
        """[B] float32 log π_ref of ``batch``'s rows, from the cache of the whole set for ``reference``."""
        if self._reference is not reference:
            self._reference_cache = self.reference_logps_of_set(reference)
            self._reference = reference
        return self._reference_cache[batch.stored_row.to(self._reference_cache.device)]

    @torch.no_grad()
    def reference_logps_of_set(self, reference: nn.Module) -> torch.Tensor:
        """[2S] float32 log π_ref of every stored pair's chosen (2i) and rejected (2i + 1), one forward per chunk."""
        device = next(reference.parameters()).device
        out = []
        for start in range(0, len(self.stored), _REFERENCE_CHUNK_PAIRS):
            batch = pair_batch(self.stored[start : start + _REFERENCE_CHUNK_PAIRS], self.pad_token_id, self.version).to(
                device
            )
            out.append(super().reference_logps(reference, batch))
        return torch.cat(out)
