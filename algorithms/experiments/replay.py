"""Experiment ``replay``: an online run's samples, replayed offline, give the same parameters bit for bit.

An online (or semi-online) run is recorded by :class:`RecordingEngine`, which wraps the run's
sampler and keeps every ``generate`` call (prompts, sampling parameters, completions with their
weight versions) in order. A second run of the same algorithm from the same initial policy then
runs the real ``OnlineLoop`` *offline* (``s = ∞``: the sampler is never synced) on a
:class:`ReplayEngine` that serves the recorded calls in order and checks that each request matches
the recorded one. The loop, batching, loss, trainer and optimizer are the same code, so equal
parameters show that training is a deterministic function of the samples and their order (a batch
built from another step's samples, or a step trained twice, would break it). They do not show that
the recorded run synced correctly: a sampler that kept stale weights is recorded, and replayed,
as it was. The proof on every sync (``hotloop.runtime.sync_policy``, the loop's ``_check``) is
what catches that.

Checks per (algorithm, recorded s, seed): the final LM-head parameters are bit-identical (max
abs difference 0; the target is ≤ 1e-9), the per-step losses are equal, and the replayed run logs
the recorded run's staleness (step mod s). A control shows that the check can fail: a plain
offline run with its own π_ref sampler ends far from the online parameters.

Parameters are float32: the fused log-prob kernel computes in float32 (it takes no float64), so
equality is asked bit for bit rather than to 1e-9 in float64.
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
from dataclasses import dataclass

from tqdm.auto import tqdm

from hotloop.algorithms.experiments import bandit_loop, report
from hotloop.runtime.engine import Completion, SamplingParams
from hotloop.runtime.weight_sync import named_tensors

RECORDED_PERIODS = (1, 10)
TOLERANCE = 1e-9


@dataclass(frozen=True)
class Call:
    """One recorded ``generate`` call."""

    prompt_token_ids: tuple[tuple[int, ...], ...]
    sampling: SamplingParams
    completions: tuple[Completion, ...]


class RecordingEngine:
    """A ``RolloutEngine`` that forwards to ``inner`` and records every ``generate`` call in order.

    Weights are the inner engine's, so an engine on the trainer's own module stays zero-copy.
    """

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, []

    @property
    def weight_version(self) -> int:
        return self.inner.weight_version

    @property
    def local_model(self):
        return self.inner.local_model

    def shares_weights_with(self, module) -> bool:
        return self.inner.shares_weights_with(module)

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> list[Completion]:
        completions = self.inner.generate(prompt_token_ids, sampling)
        self.calls.append(Call(tuple(map(tuple, prompt_token_ids)), sampling, tuple(copy.deepcopy(completions))))
        return completions

    def sync_weights(self, version: int, weights=None) -> None:
        self.inner.sync_weights(version, weights)

    def adopt_model(self, model) -> None:
        self.inner.adopt_model(model)

    def sleep(self) -> None:
        self.inner.sleep()

    def wake(self) -> None:
        self.inner.wake()

    def flush_cache(self) -> None:
        self.inner.flush_cache()


class ReplayEngine:
    """A ``RolloutEngine`` that serves recorded ``generate`` calls in order instead of sampling.

    Args:
        model: the weights an offline engine holds (saved with checkpoints; never sampled from).
        calls: the recorded stream; each request must match its recorded prompts and sampling parameters.
    """

    def __init__(self, model, calls: list[Call]) -> None:
        self.model, self.calls, self.served, self._version = model, list(calls), 0, 0

    @property
    def weight_version(self) -> int:
        return self._version

    @property
    def local_model(self):
        """The weights an offline engine holds (checkpointed; never sampled from)."""
        return self.model

    def shares_weights_with(self, module) -> bool:
        """Never: a replay holds its own (offline) copy of the weights."""
        return False

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> list[Completion]:
        if self.served >= len(self.calls):
            raise ValueError(
                f"generate: the recorded stream has {len(self.calls)} calls; call {self.served + 1} has no recording"
            )
        call = self.calls[self.served]
        if tuple(map(tuple, prompt_token_ids)) != call.prompt_token_ids or sampling != call.sampling:
            raise ValueError(
                f"generate: call {self.served} asks for other prompts or sampling parameters than "
                f"were recorded ({sampling} vs {call.sampling})"
            )
        self.served += 1
        return list(copy.deepcopy(call.completions))

    def sync_weights(self, version: int, weights=None) -> None:
        if weights is not None:
            self.model.load_state_dict(dict(named_tensors(weights)), strict=True)
        self._version = version

    def sleep(self) -> None:
        """Nothing to free."""

    def wake(self) -> None:
        """Nothing to reacquire."""

    def flush_cache(self) -> None:
        """No cache."""


@dataclass
class ReplayResult:
    """A recorded run, its offline replay and the control."""

    online: bandit_loop.BanditRun
    replay: bandit_loop.BanditRun
    control: bandit_loop.BanditRun
    max_abs_diff: float
    losses_equal: bool
    staleness_equal: bool
    calls: int


def run_replay(
    algorithm: str, *, sync_every: int, seed: int, config: bandit_loop.BanditConfig, reward: str = "R1"
) -> ReplayResult:
    """Record ``algorithm`` at ``sync_every``, replay it offline, and run the plain offline control."""
    with tempfile.TemporaryDirectory(prefix="hotloop-replay-") as out:
        # no sync probe while recording: its greedy generate calls would enter the recorded stream
        loop = bandit_loop.build_loop(
            algorithm,
            reward=reward,
            sync_every=sync_every,
            seed=seed,
            config=config,
            out_dir=f"{out}/online",
            wrap_engine=RecordingEngine,
            check_sync=False,
        )
        online, calls = bandit_loop.run_loop(loop), loop.engine.calls
        loop = bandit_loop.build_loop(
            algorithm,
            reward=reward,
            sync_every=math.inf,
            seed=seed,
            config=config,
            out_dir=f"{out}/replay",
            wrap_engine=lambda engine: ReplayEngine(copy.deepcopy(engine.model), calls),
        )
        replay = bandit_loop.run_loop(loop)
        if loop.engine.served != len(calls):
            raise RuntimeError(f"replay: served {loop.engine.served} of {len(calls)} recorded calls")
        control = bandit_loop.run_bandit(algorithm, reward=reward, sync_every=math.inf, seed=seed, config=config)
    trained = [[r for r in run.records if not r["skipped"]] for run in (online, replay)]
    return ReplayResult(
        online=online,
        replay=replay,
        control=control,
        calls=len(calls),
        max_abs_diff=float((online.weights - replay.weights).abs().max()),
        losses_equal=[r["loss"] for r in trained[0]] == [r["loss"] for r in trained[1]],
        staleness_equal=[r["staleness"] for r in trained[0]] == [r["staleness"] for r in trained[1]],
    )


def run(seeds: list[int], *, progress: bool = True, config: bandit_loop.BanditConfig | None = None) -> report.Report:
    """Record → replay for every available bandit algorithm at s = 1 and 10, on R1."""
    config = config or bandit_loop.BanditConfig()
    grid = [(name, s, seed) for name in bandit_loop.available_algorithms() for s in RECORDED_PERIODS for seed in seeds]
    t0, results = time.perf_counter(), {}
    for name, s, seed in tqdm(grid, desc="replay", disable=not progress):
        results[name, s, seed] = run_replay(name, sync_every=s, seed=seed, config=config)
    entries = [
        report.entry(
            "replay",
            name,
            f"record s={s} -> replay s=inf",
            seed,
            "max_abs_param_diff",
            r.max_abs_diff,
            r.replay.kl,
            bit_identical=r.max_abs_diff == 0.0,
            losses_equal=r.losses_equal,
            staleness_equal=r.staleness_equal,
            recorded_calls=r.calls,
            online_reward=r.online.reward,
            replay_reward=r.replay.reward,
            control_max_abs_diff=float((r.online.weights - r.control.weights).abs().max()),
            control_reward=r.control.reward,
        )
        for (name, s, seed), r in results.items()
    ]
    worst = max(e["value"] for e in entries)
    same = all(e["losses_equal"] and e["staleness_equal"] for e in entries)
    targets = [
        report.Target(
            f"replayed parameters equal the recorded run's (≤ {TOLERANCE:g})",
            worst <= TOLERANCE,
            f"largest max |Δθ| {worst:.3g}; bit-identical in "
            f"{sum(e['bit_identical'] for e in entries)}/{len(entries)} runs; "
            f"per-step losses and staleness equal: {same}",
        )
    ]
    return report.Report(
        experiment="replay",
        entries=entries,
        markdown=_markdown(entries, config),
        targets=targets,
        seconds=time.perf_counter() - t0,
        headline=lambda ax: _headline(ax, entries),
    )


def _markdown(entries: list[dict], config: bandit_loop.BanditConfig) -> str:
    rows = []
    for name in dict.fromkeys(e["algorithm"] for e in entries):
        for s in RECORDED_PERIODS:
            found = report.select(entries, algorithm=name, setting=f"record s={s} -> replay s=inf")
            rows.append(
                [
                    name,
                    s,
                    f"{max(e['value'] for e in found):.3g}",
                    f"{sum(e['bit_identical'] for e in found)}/{len(found)}",
                    all(e["losses_equal"] and e["staleness_equal"] for e in found),
                    report.fmt(e["online_reward"] for e in found),
                    report.fmt(e["replay_reward"] for e in found),
                    f"{min(e['control_max_abs_diff'] for e in found):.3g}",
                ]
            )
    text = report.table(
        [
            "algorithm",
            "recorded s",
            "max abs Δθ",
            "bit-identical",
            "losses & staleness equal",
            "recorded run's R1 reward",
            "replay's R1 reward",
            "control: min max |Δθ|",
        ],
        rows,
    )
    return text + (
        f"\n{config.steps} steps on R1; Δθ = final LM-head logits (float32) of the replay minus the "
        "recorded run. Control: a plain offline run (s = ∞, own π_ref sampler) of the same algorithm "
        "and seed, to show the comparison can fail.\n"
    )


def _headline(ax, entries: list[dict]) -> None:
    cells = list(dict.fromkeys((e["algorithm"], e["setting"]) for e in entries))
    found = [report.select(entries, algorithm=name, setting=setting) for name, setting in cells]
    xs = range(len(cells))
    ax.bar(
        xs,
        [min(e["control_max_abs_diff"] for e in f) for f in found],
        color="0.7",
        label="control (offline run), min over seeds",
    )
    ax.bar(
        xs,
        [max(max(e["value"] for e in f), 1e-12) for f in found],
        color="tab:green",
        label="replay, max over seeds (1e-12 = exact 0)",
    )
    ax.set_xticks(
        list(xs),
        [f"{name.replace('rejection-sampling', 'best-of-n')}\n{setting.split()[1]}" for name, setting in cells],
        fontsize=6,
    )
    ax.set(yscale="log", title="replay: max |Δθ| vs the recorded run", ylabel="max abs difference")
    ax.legend(fontsize=7)
