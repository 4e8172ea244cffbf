"""Experiment ``arithmetic``: offline, semi-online and online DPO and GRPO from the demo's SFT policy.

Claim (Lanchantin et al. 2025, "Bridging offline and online reinforcement learning for LLMs",
https://arxiv.org/abs/2506.21495, verifiable math): from the same seed model, offline DPO gains
least (Math500 47.4 → 53.7), semi-online DPO syncing every s steps nearly matches online
(57.2–58.9), and online DPO (58.7) and GRPO (58.1) gain most.

Setting: the demo's task and model (2-digit addition, the tiny Llama SFT-warm-started on a teacher
that drops carries, cached in ``~/.cache/hotloop`` by ``algorithms/run.py``'s ``build_setup``),
the exact-match verifier, and the demo's run settings (the ``presets.demo()`` preset: prompts and samples
per step, AdamW, sampling at T = 1) for every algorithm, with the same number of loop steps:

- offline DPO: ``online-dpo`` with ``s = ∞`` (the sampler keeps the SFT weights: fresh pairs from
  the SFT policy every step, an unlimited offline data set);
- semi-online DPO: every ``s`` in :attr:`ArithmeticConfig.semi_online_syncs`; the target "within 5
  points of online" is checked for each ``s`` that syncs every few percent (``s ≤ 5%`` of the steps);
- online DPO: ``s = 1``;  GRPO: ``grpo`` (its registered defaults) with ``s = 1``.

Metric: greedy exact match on held-out problems (the task's test split, never trained on), the
sampled KL(π ‖ π_SFT) per sequence (``run.make_evaluate``), optimizer steps taken (a step with no
reward contrast is skipped) and the loop's wall time. Seeds vary the RL runs (prompt draws and
sampling); the SFT policy is the one of ``warm_start_seed`` for every seed (None: one per seed).

The runner (:func:`run_grid`, :func:`run_one`), the entries, table and plots are in
:mod:`hotloop.algorithms.experiments._grid`, shared with ``real-arithmetic``
(:mod:`hotloop.algorithms.experiments.real_arithmetic`), which names its own :class:`Baseline`
(the initial policy instead of the SFT one).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from hotloop.algorithms.config import ALGORITHMS, RunConfig
from hotloop.algorithms.experiments import report
from hotloop.algorithms.experiments._grid import (
    Baseline,
    curves_figure,
    grid_entries,
    headline,
    run_grid,
    summary_table,
    variants,
)
from hotloop.algorithms.loader import load_config

FEW_PERCENT = 5.0
"""A semi-online run "syncs every few percent of the run" when s ≤ this share (%) of the loop steps."""


@dataclass(frozen=True, kw_only=True)
class ArithmeticConfig:
    """The arithmetic comparison's schedule (everything else is the demo preset's)."""

    steps: int = 80
    """Loop steps of every run."""
    semi_online_syncs: tuple[int, ...] = (2, 4, 8, 16)
    """s of the semi-online DPO runs (2.5%, 5%, 10% and 20% of the default 80 steps)."""
    eval_every: int = 10
    """Steps between held-out evaluations (the curves)."""
    eval_problems: int = 500
    """Held-out problems for greedy accuracy."""
    warm_start_seed: int | None = 0
    """Seed of the SFT warm start shared by every seed; None = each seed warm-starts its own (slow when uncached)."""
    overrides: tuple[str, ...] = ()
    """``key.sub=value`` overrides of the demo preset (e.g. ``"trainer.lr=3e-4"``)."""

    def __post_init__(self) -> None:
        for name in ("steps", "eval_every", "eval_problems"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {getattr(self, name)!r}")
        if not all(isinstance(s, int) and s > 1 for s in self.semi_online_syncs):
            raise ValueError(f"semi_online_syncs: expected ints > 1, got {self.semi_online_syncs!r}")

    def variants(self) -> list[tuple[str, str, int | float]]:
        """(label, registered algorithm, s) of every run."""
        return variants(self.semi_online_syncs)


CONFIG = ArithmeticConfig
"""The config class ``hotloop compare arithmetic --set FIELD=VALUE`` sets."""


SFT = Baseline("sft", "SFT policy", "π_SFT")


def run_config(config: ArithmeticConfig, *, algorithm: str, sync_every: int | float, seed: int) -> RunConfig:
    """The demo preset's ``RunConfig`` with this run's algorithm, s, seed and schedule."""
    s = ".inf" if sync_every == math.inf else sync_every
    return load_config(
        None,
        [
            *config.overrides,
            f"algorithm={algorithm}",
            f"loop.steps={config.steps}",
            f"loop.sync_every={s}",
            f"loop.seed={seed}",
            f"loop.eval_every={config.eval_every}",
            f"task.eval_problems={config.eval_problems}",
        ],
        preset="demo",
    )


def run(seeds: list[int], *, progress: bool = True, config: ArithmeticConfig | None = None) -> report.Report:
    """Every variant × seed from the SFT policy, equal loop steps; held-out greedy accuracy and KL."""
    config = config or ArithmeticConfig()
    missing = sorted({name for _, name, _ in config.variants()} - set(ALGORITHMS))
    variants = [v for v in config.variants() if v[1] in ALGORITHMS]
    t0 = time.perf_counter()
    with report.one_thread():
        runs, sft = run_grid(
            seeds,
            variants,
            lambda name, s, seed: run_config(config, algorithm=name, sync_every=s, seed=seed),
            setup_seed=lambda seed: seed if config.warm_start_seed is None else config.warm_start_seed,
            desc="arithmetic",
            progress=progress,
        )
    entries = grid_entries("arithmetic", runs, sft, variants, loop_steps=config.steps, baseline=SFT)
    return report.Report(
        experiment="arithmetic",
        entries=entries,
        markdown=_markdown(entries, config, sft, missing),
        targets=_targets(entries, seeds, config, missing),
        seconds=time.perf_counter() - t0,
        plots={"curves": lambda: curves_figure(runs, sft, variants, seeds, title="arithmetic", baseline=SFT)},
        headline=lambda ax: headline(ax, entries, variants, seeds, title="arithmetic", baseline=SFT),
    )


def _markdown(entries: list[dict], config: ArithmeticConfig, sft: dict, missing: list[str]) -> str:
    text = summary_table(entries, SFT)
    run = run_config(config, algorithm="online-dpo", sync_every=1, seed=0)
    text += (
        f"\nSFT policy: {report.fmt(sft.values(), 1, 100)}% greedy exact match on {config.eval_problems} held-out "
        f"2-digit additions (warm start seed {config.warm_start_seed}). Every run: {config.steps} loop steps × "
        f"{run.loop.prompts_per_step} prompts × {run.dpo.samples_per_prompt} samples (GRPO: "
        f"{run.grpo.samples_per_prompt}), AdamW lr {run.trainer.lr}, sampling T = {run.sampling.temperature}; "
        f"DPO β {run.dpo.beta}, {run.dpo.pairs_per_prompt} best-vs-worst pairs per prompt; GRPO: the registered "
        f"defaults ({run.grpo.loss_type} loss, {run.grpo.advantage} advantages, β {run.grpo.beta}). KL: sampled "
        f"estimate per sequence on the held-out prompts. The targets use the final accuracy; the last 3 evaluations "
        f"(every {config.eval_every} steps) show how much it fluctuates. Wall time: the loop only (sampling, "
        f"scoring, batching, training, sync), on one intra-op thread; evaluation excluded.\n"
    )
    if missing:
        text += f"\nNot run: {', '.join(missing)} (not registered in hotloop.algorithms.config.ALGORITHMS).\n"
    return text


def _targets(
    entries: list[dict], seeds: list[int], config: ArithmeticConfig, missing: list[str]
) -> list[report.Target]:
    def acc(label, s, seed):
        found = report.select(entries, algorithm=label, sync_every=s, seed=seed)
        return 100 * found[0]["value"] if found else math.nan

    def gains(label):
        return [e["gain_points"] for e in entries if e["algorithm"] == label]

    targets = []
    for label in ("online DPO", "GRPO"):
        found = gains(label)
        targets.append(
            report.Target(
                f"{label} gains ≥ 40 points over the SFT policy",
                bool(found) and min(found) >= 40,
                f"min gain {min(found):.1f} points" if found else f"not run ({missing})",
            )
        )
    for s in config.semi_online_syncs:
        share = 100 * s / config.steps
        if share > FEW_PERCENT:
            continue
        gaps = [acc("online DPO", "1", seed) - acc("semi-online DPO", str(s), seed) for seed in seeds]
        targets.append(
            report.Target(
                f"semi-online DPO (s = {s}, a sync every {share:.1f}% of the run) within 5 points of online DPO",
                max(gaps) <= 5,
                "online − semi-online per seed: " + ", ".join(f"{g:+.1f}" for g in gaps),
            )
        )
    trails = [acc("online DPO", "1", seed) - acc("offline DPO", "inf", seed) for seed in seeds]
    targets.append(
        report.Target(
            "offline DPO trails online DPO by ≥ 30 points",
            min(trails) >= 30,
            "online − offline per seed: " + ", ".join(f"{g:+.1f}" for g in trails),
        )
    )
    return targets
