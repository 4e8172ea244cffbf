"""The online loop: sample → score → build batch → train, re-syncing the sampler every ``s`` steps.

One loop covers the offline → online spectrum (Lanchantin et al. 2025, "Bridging offline and
online RL for LLMs"): ``sync_every = s`` optimizer steps between weight syncs, with ``s = 1`` fully
online, ``1 < s < ∞`` semi-online and ``s = None`` (or ``math.inf``) offline (the sampler keeps
the initial weights). Step ``t`` syncs when ``t % s == 0``, so the staleness of what step ``t``
trains on, ``trainer.version − sampler version``, follows ``t mod s`` (0 for ``s = 1``, ``t`` for
``s = ∞``), and is logged on every step.

Where the sampler's weights live, how a sync happens and how it is proved is the sync policy's
business (:mod:`hotloop.runtime.sync_policy`); the loop only asks it at every step. With ``s = 1``
a ``TorchEngine`` on the trainer's own module is zero-copy (a sync is a version bump); with
``s > 1`` or offline the policy gives it a stale copy bound to the sync buckets (a sync is one
memcpy per tensor); any other engine gets the packed buckets at every sync. The schedule comes from
``LoopConfig`` alone: build the engine on the trainer's module (``make_engine``) and pass
``sync_every`` once, here. Each sync is timed as ``time/sync`` and its proof (fingerprints, probe
log-probs) as ``time/check``.

Gradient accumulation. With ``TrainerConfig.grad_accum_steps = k > 1`` each batch is cut into up to
k micro batches of whole units (pairs, groups) weighted by their share of the loss normaliser
(``hotloop.runtime.micro_batches.split_batch``), so the step's gradient is that of the whole batch; an
algorithm whose loss couples the whole batch is refused when the loop is built.

Exact resume. Every source of randomness is a function of ``(seed, step)``: the prompts drawn
(``random.Random``) and the sampler's generator (``SamplingParams.seed``), so a run resumed from a
checkpoint takes the same next step as an uninterrupted one. One atomic checkpoint (model,
reference, optimizer, scheduler, loop state and, unless zero-copy, the sampler's weights as
``engine.safetensors``: the sync buckets or the engine's own module) is written every
``checkpoint_every`` steps (0: never periodically), after the last step (unless ``final_checkpoint``
says otherwise) and when SIGINT/SIGTERM arrives (after the step in flight finishes; a second Ctrl-C
aborts at once); a SIGKILL loses at most the steps since the last one.

Several ranks (``dist``, under torchrun). Each rank samples and scores its share of the step's prompts
with its own engine, every rank gets all scored samples and builds the same batch, and trains on its
whole units with the loss scaled so that N ranks take the step one rank takes
(:mod:`hotloop.runtime.distributed`); syncs gather the FSDP2 shards bucket by bucket into each engine
(:mod:`hotloop.runtime.distributed_sync`); rank 0 writes ``metrics.jsonl`` and checkpoints are
distributed ones (:mod:`hotloop.runtime.distributed_checkpoint`), which a run on any world size resumes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from hotloop.runtime import distributed, distributed_checkpoint
from hotloop.runtime.checkpoint import latest_checkpoint
from hotloop.runtime.distributed_sync import ShardedGather
from hotloop.runtime.engine import SamplingParams
from hotloop.runtime.guards import check_rewards, repair_metrics
from hotloop.runtime.loop_config import LoopConfig
from hotloop.runtime.micro_batches import micro_batch_rule, split_batch
from hotloop.runtime.rollout_metrics import rollout_metrics
from hotloop.runtime.sync_policy import LogprobFn, SyncPolicy, forward_logprobs

PHASES = ("sync", "check", "sampling", "scoring", "batching", "training")
_ENGINE = "engine"
_METRICS_FILE = "metrics.jsonl"


@dataclass
class LoopResult:
    """What ``OnlineLoop.run`` did: steps finished, whether it was interrupted, the time it took."""

    next_step: int
    interrupted: bool
    wall_seconds: float
    phase_seconds: dict[str, float]
    records: list[dict]


class OnlineLoop:
    """Sample → score → build batch → train, syncing the sampler every ``config.sync_every`` steps.

    Args:
        config: schedule, output directory and seed.
        trainer: ``hotloop.runtime.trainer.Trainer`` (its ``reference`` feeds the algorithm's loss).
        engine: a ``RolloutEngine``, e.g. ``make_engine(trainer.model, ...)``; the sync policy gives an engine
            on the trainer's own module a stale copy when ``sync_every != 1``.
        algorithm: ``hotloop.algorithms.base.Algorithm``.
        reward_fn: ``RewardFn`` (problems, texts) -> [n] float32.
        problems: training pool (objects with ``.prompt``); each step draws ``prompts_per_step`` of them.
        tokenizer: ``encode(text) -> ids`` (with bos) and ``decode(ids) -> text`` (stops at eos).
        sampling: temperature / top-p / top-k / max_new_tokens (``n`` and ``seed`` are set per step).
        evaluate: optional ``evaluate(model) -> {name: float}`` run on the trainer's model.
        progress: show a tqdm bar with a live postfix.
        logprob_fn: trainer-side log-probs of the proof on every sync (default: a plain forward).
        dist: under torchrun, the process group (``hotloop.runtime.distributed``): the trainer's model and reference
            are FSDP2-sharded, the engine samples from its own plain module; None on one process.
    """

    def __init__(
        self,
        config: LoopConfig,
        *,
        trainer,
        engine,
        algorithm,
        reward_fn: Callable,
        problems: list,
        tokenizer,
        sampling: SamplingParams,
        evaluate: Callable[[nn.Module], dict] | None = None,
        progress: bool = True,
        logprob_fn: LogprobFn | None = None,
        dist: distributed.DistContext | None = None,
    ) -> None:
        if not isinstance(config, LoopConfig):
            raise TypeError(f"config: expected LoopConfig, got {type(config).__name__}")
        k = trainer.config.grad_accum_steps
        try:
            self.split_rule = micro_batch_rule(algorithm) if k > 1 else None
        except ValueError as error:
            raise ValueError(f"grad_accum_steps: expected 1, got {k}: {error}") from None
        if algorithm.needs_reference and trainer.reference is None:
            raise ValueError(f"trainer: {type(algorithm).__name__} needs a reference model, got trainer.reference=None")
        if algorithm.samples_per_prompt and len(problems) < config.prompts_per_step:
            raise ValueError(
                f"problems: expected at least prompts_per_step={config.prompts_per_step}, got {len(problems)}"
            )
        self.config, self.trainer, self.engine, self.algorithm = config, trainer, engine, algorithm
        self.reward_fn, self.problems, self.tokenizer, self.sampling = reward_fn, problems, tokenizer, sampling
        self.evaluate, self.dist = evaluate, dist
        self.main = dist is None or dist.is_main
        self.progress = progress and self.main
        probe = [tokenizer.encode(p.prompt) for p in problems[: config.sync.probe_prompts]]
        gather = None
        if dist is not None:
            self.split_rule = distributed.check_loop(dist, algorithm, config.prompts_per_step)
            gather = ShardedGather(trainer.model, dist, bucket_mb=config.sync.bucket_mb)
            logprob_fn = distributed.unsharded_logprobs(logprob_fn or forward_logprobs)
        self.sync = SyncPolicy(
            config.sync,
            config.sync_period,
            model=trainer.model,
            engine=engine,
            probe_prompts=probe,
            logprob_fn=logprob_fn,
            gather=gather,
        )
        self.zero_copy = self.sync.zero_copy
        self.out_dir = Path(config.out_dir)
        self._stop = False

    def run(self, *, resume: bool = False) -> LoopResult:
        """Run (or, with ``resume``, continue from the latest checkpoint in ``out_dir``) to ``config.steps``."""
        start = self._resume() if resume else 0
        if start == 0:
            self.sync.pin_offline()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.main:
            repair_metrics(self.out_dir / _METRICS_FILE, start)
        records, t0, step = [], time.perf_counter(), start
        bar = tqdm(total=self.config.steps, initial=start, desc="online loop", disable=not self.progress)
        metrics_file = self.out_dir / _METRICS_FILE if self.main else os.devnull  # one writer: rank 0
        with self._stop_on_signals(), bar, open(metrics_file, "a") as log:
            while step < self.config.steps and not self._stop:
                with distributed.stop_on_peer_failure(self.dist, f"loop step {step}"):
                    record = self.step(step)
                step += 1
                if self._due(step, self.config.eval_every) or step == self.config.steps:
                    record.update(self._evaluate())
                log.write(json.dumps(record) + "\n")
                log.flush()
                records.append(record)
                bar.update(1)
                bar.set_postfix_str(_postfix(record))
                final = step == self.config.steps and self.config.writes_final_checkpoint
                if self._due(step, self.config.checkpoint_every) or final or self._stop:
                    self.checkpoint(step)
        phases = {p: sum(r.get(f"time/{p}", 0.0) for r in records) for p in PHASES}
        return LoopResult(
            next_step=step,
            interrupted=step < self.config.steps,
            records=records,
            wall_seconds=time.perf_counter() - t0,
            phase_seconds=phases,
        )

    def step(self, step: int) -> dict:
        """One loop step; returns its metrics record."""
        synced = self.sync.due(step)
        times = {"sync": self.sync.sync(self.trainer.version)} if synced else {}
        problems = self._draw(step)
        prompt_ids = [self.tokenizer.encode(p.prompt) for p in problems]
        mine = distributed.share(len(problems), self.dist)  # this rank's prompts (all of them on one process)
        completions, rewards = [], torch.zeros(0)
        if self.algorithm.samples_per_prompt:
            with _timed(times, "sampling"):
                self.engine.wake()
                sampling = dataclasses.replace(
                    self.sampling, n=self.algorithm.samples_per_prompt, seed=self.config.seed * 1_000_003 + step
                )
                completions = self.engine.generate([prompt_ids[i] for i in mine], sampling)
            with _timed(times, "scoring"):
                texts = [self.tokenizer.decode(c.token_ids) for c in completions]
                rewards = self.reward_fn([problems[mine.start + c.prompt_index] for c in completions], texts)
                check_rewards(rewards, texts, self.reward_fn, step=step)
        local = completions
        if self.dist is not None:
            completions, rewards = distributed.gather_scored(completions, rewards, mine.start, self.dist)
        skip = self.trainer.guard_inputs({"reward": rewards}, label=f"loop step {step}")
        if synced and self.config.sync.check:
            with _timed(times, "check"):
                distributed.agree(
                    self.dist,
                    lambda: self._check(local, [prompt_ids[i] for i in mine]),
                    f"sync check of loop step {step}",
                )
        with _timed(times, "batching"):
            batch = None if skip else self.algorithm.build_batch(problems, prompt_ids, completions, rewards)
        record = {
            "step": step,
            "version": self.trainer.version,
            "sampler_version": self.engine.weight_version,
            "staleness": self.trainer.version - (batch.sampler_version if batch else self.engine.weight_version),
            **_reward_metrics(rewards),
            **rollout_metrics(completions, self.reward_fn, self.algorithm),
        }
        with _timed(times, "training"):
            if self.config.sleep_between_phases:
                self.engine.sleep()
            if batch is not None:
                record.update(self._train(batch))
        record.update(skip or {})
        record.update({f"time/{name}": seconds for name, seconds in times.items()})
        record["skipped"] = batch is None
        return record

    def _check(self, completions: list, prompt_ids: list[list[int]]) -> None:
        """Prove the sync just made: engine and samples carry the trainer's version, and the step's first samples
        (or the greedy probe when it sampled nothing) have the trainer's log-probs."""
        version = self.trainer.version
        stamped = sorted({self.engine.weight_version, *(c.weight_version for c in completions)})
        if stamped != [version]:
            raise RuntimeError(
                f"sync check v{version}: engine and samples carry weight versions {stamped}, expected "
                f"[{version}]: the sync did not give the engine the trainer's version"
            )
        rows = completions[: self.config.sync.probe_prompts]
        self.sync.verify(version, [prompt_ids[c.prompt_index] for c in rows], rows, self.sampling.logprob_temperature)

    def checkpoint(self, next_step: int) -> Path:
        """Write one atomic checkpoint (sampler weights included) from which ``run(resume=True)`` continues;
        on several ranks a distributed one (``hotloop.runtime.distributed_checkpoint``)."""
        state = {
            "next_step": next_step,
            "engine_version": self.engine.weight_version,
            "config": dataclasses.asdict(self.config),
        }
        if self.dist is not None:
            return distributed_checkpoint.save(
                self.out_dir, self.trainer, state, self.dist, extra=self._engine_models()
            )
        return self.trainer.save(self.out_dir, state, extra_models=self._engine_models())

    def _train(self, batch) -> dict:
        """One optimizer step on ``batch``, cut into micro batches when ``grad_accum_steps > 1``; skipped by the
        trainer when the loss or the gradient norm is non-finite."""
        k = self.trainer.config.grad_accum_steps
        parts = split_batch(batch, k, self.split_rule) if self.split_rule is not None else [(batch, 1.0)]
        reference = self.trainer.reference
        if self.dist is not None:
            loss_fn = lambda model, b: self.algorithm.loss(model, b, reference=reference)  # noqa: E731
            return distributed.train_step(self.trainer, loss_fn, batch, self.split_rule, self.dist)
        return self.trainer.step(
            lambda model, b: self.algorithm.loss(model, b, reference=reference),
            [b for b, _ in parts],
            weights=[w for _, w in parts],
        )

    def _resume(self) -> int:
        """Load the latest checkpoint of ``out_dir`` into trainer and sampler; the step to continue at."""
        kind, path = distributed_checkpoint.newest(self.out_dir, latest_checkpoint(self.out_dir), self.dist)
        if path is None:
            return 0
        if kind == "dist":  # any world size, one process included, loads a distributed checkpoint
            state = distributed_checkpoint.load(path, self.trainer, extra=self._engine_models())
        else:
            state = self.trainer.load(path, extra_models=self._engine_models())
        self.sync.restore(int(state["engine_version"]))
        return int(state["next_step"])

    def _engine_models(self) -> dict:
        """``extra_models`` of a checkpoint: the sampler's weights unless it shares the trainer's."""
        held = self.sync.checkpoint_state()
        return {} if held is None else {_ENGINE: held}

    def _draw(self, step: int) -> list:
        """The prompts of ``step``: a function of (seed, step) only, so resumed runs draw the same ones."""
        rng = random.Random(f"hotloop-loop:{self.config.seed}:{step}")
        return rng.sample(self.problems, min(self.config.prompts_per_step, len(self.problems)))

    def _evaluate(self) -> dict:
        if self.evaluate is None:
            return {}
        t0 = time.perf_counter()
        out = {f"eval/{k}": float(v) for k, v in self.evaluate(self.trainer.model).items()}
        return {**out, "time/eval": time.perf_counter() - t0}

    @staticmethod
    def _due(step: int, every: int) -> bool:
        return every > 0 and step % every == 0

    @contextlib.contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """SIGINT/SIGTERM finish the step in flight, checkpoint and return; a second SIGINT aborts."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum, frame):
            if self._stop and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._stop = True

        previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


@contextlib.contextmanager
def _timed(times: dict[str, float], name: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        times[name] = times.get(name, 0.0) + time.perf_counter() - t0


def _reward_metrics(rewards: torch.Tensor) -> dict[str, float]:
    """Mean reward and, for 0/1 rewards, the fraction of correct samples."""
    if rewards.numel() == 0:
        return {}
    out = {"reward": rewards.float().mean().item()}
    if bool(((rewards == 0) | (rewards == 1)).all()):
        out["accuracy"] = out["reward"]
    return out


def _postfix(record: dict) -> str:
    parts = [
        f"{name}={record[key]:.3f}"
        for name, key in (("r", "reward"), ("kl", "kl"), ("acc", "eval/accuracy"))
        if key in record
    ]
    parts += [
        f"{p[:5]}={record[f'time/{p}']:.2f}s"
        for p in ("sampling", "training", "sync", "check")
        if f"time/{p}" in record
    ]
    return " ".join(parts)
