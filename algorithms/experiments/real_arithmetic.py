"""Experiment ``real-arithmetic``: offline, semi-online and online DPO and GRPO on a real pretrained model.

The ``arithmetic`` experiment's comparison (Lanchantin et al. 2025, https://arxiv.org/abs/2506.21495:
offline DPO gains least, semi-online DPO nearly matches online, online DPO and GRPO gain most) on
SmolLM2-135M-Instruct (``hotloop fetch-model smollm2-135m-instruct``) and the built-in one-step
word problems scored by math-verify, through the same runner (:func:`_grid.run_grid`):

- offline DPO: ``online-dpo`` with ``s = ∞`` (the sampler keeps the initial weights: every step's
  pairs come from the initial model);
- semi-online DPO: every ``s`` in :attr:`RealArithmeticConfig.semi_online_syncs` (default 4);
- online DPO: ``s = 1``;  GRPO: ``grpo`` with ``s = 1``.

Every run is the ``smollm2`` preset with the settings of ``examples/smollm2-{online-dpo,grpo}.yaml``
(:data:`DPO_SETTINGS`, :data:`GRPO_SETTINGS`) and this config's schedule, from the same initial
model, problems and held-out split for every seed (the seed varies prompt draws and sampling).
Metric: greedy math-verify accuracy on held-out problems and the sampled KL(π ‖ π_0) per sequence.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

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
from hotloop.algorithms.presets import smollm2
from hotloop.runtime.engine_factory import ENGINE_KINDS

INITIAL = Baseline("initial", "initial policy", "π_0")
FETCH = "hotloop fetch-model smollm2-135m-instruct --out {path}"
SIMILAR_POINTS = 5.0
"""Semi-online DPO "≈" online DPO: final held-out accuracies within this many points."""
DPO_SETTINGS = ("dpo.beta=0.1", "dpo.pairs_per_prompt=2", "dpo.pair_fallback=reuse", "dpo.hard_prompt_samples=4")
"""examples/smollm2-online-dpo.yaml's ``dpo`` section (samples per prompt is the config's)."""
GRPO_SETTINGS = ("grpo.beta=0.0", "grpo.loss_type=dapo")
"""examples/smollm2-grpo.yaml's ``grpo`` section (samples per prompt is the config's)."""
_PRESET = smollm2()


@dataclass(frozen=True, kw_only=True)
class RealArithmeticConfig:
    """The real-model comparison's model, engine and schedule (everything else is the smollm2 preset's).

    Seeds are ``hotloop compare``'s ``--seeds``.
    """

    model_path: str = _PRESET.model.path
    """HF model directory (or .gguf file) of the initial policy; default: ``hotloop fetch-model``'s --out."""
    engine: str = "torch"
    """Rollout engine kind (``vllm`` in the vLLM venv, docs/vllm.md)."""
    steps: int = 20
    """Loop steps of every run."""
    semi_online_syncs: tuple[int, ...] = (4,)
    """s of the semi-online DPO runs."""
    prompts_per_step: int = _PRESET.loop.prompts_per_step
    samples_per_prompt: int = 8
    """Samples per prompt of DPO and GRPO alike (the examples')."""
    max_new_tokens: int = _PRESET.sampling.max_new_tokens
    eval_problems: int = _PRESET.task.eval_problems
    """Held-out problems for greedy accuracy (and the sampled KL)."""
    eval_every: int = 10
    """Steps between held-out evaluations (and one after the last step)."""
    threads: int = 0
    """torch intra-op threads of the runs; 0 = torch's default."""
    overrides: tuple[str, ...] = ()
    """``key.sub=value`` overrides of every run's config, applied last (e.g. ``"trainer.lr=3e-6"``)."""

    def __post_init__(self) -> None:
        for name in (
            "steps",
            "prompts_per_step",
            "samples_per_prompt",
            "max_new_tokens",
            "eval_problems",
            "eval_every",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        if not isinstance(self.threads, int) or self.threads < 0:
            raise ValueError(f"threads: expected an int >= 0 (0 = torch's default), got {self.threads!r}")
        if not self.semi_online_syncs or not all(isinstance(s, int) and s > 1 for s in self.semi_online_syncs):
            raise ValueError(
                f"semi_online_syncs: expected a non-empty tuple of ints > 1, got {self.semi_online_syncs!r}"
            )
        if self.engine not in ENGINE_KINDS:
            raise ValueError(f"engine: expected one of {ENGINE_KINDS}, got {self.engine!r}")
        if not isinstance(self.model_path, str) or not self.model_path:
            raise ValueError(f"model_path: expected a model directory or .gguf path, got {self.model_path!r}")


CONFIG = RealArithmeticConfig
"""The config class ``hotloop compare real-arithmetic --set FIELD=VALUE`` sets."""


def check_model(path: str) -> None:
    """ValueError with the fetch command when ``path`` is neither a model directory (config.json) nor a file."""
    where = Path(path).expanduser()
    if not ((where / "config.json").is_file() or (where.is_file() and where.suffix.lower() == ".gguf")):
        raise ValueError(
            f"model_path: expected a model directory with config.json (or a .gguf file), got {path!r} "
            f"(not found); fetch it with: {FETCH.format(path=path)}"
        )


def run_config(config: RealArithmeticConfig, *, algorithm: str, sync_every: int | float, seed: int) -> RunConfig:
    """The smollm2 preset's ``RunConfig`` with the examples' algorithm settings, this run's s and seed, and the
    config's model, engine and schedule."""
    s = ".inf" if sync_every == math.inf else sync_every
    section = "grpo" if algorithm == "grpo" else "dpo"
    settings = GRPO_SETTINGS if section == "grpo" else DPO_SETTINGS
    return load_config(
        None,
        [
            *settings,
            f"algorithm={algorithm}",
            f"model.path={config.model_path}",
            f"engine.kind={config.engine}",
            f"{section}.samples_per_prompt={config.samples_per_prompt}",
            f"sampling.max_new_tokens={config.max_new_tokens}",
            f"loop.prompts_per_step={config.prompts_per_step}",
            f"loop.steps={config.steps}",
            f"loop.sync_every={s}",
            f"loop.seed={seed}",
            f"loop.eval_every={config.eval_every}",
            "loop.checkpoint_every=0",
            "loop.final_checkpoint=false",
            f"task.eval_problems={config.eval_problems}",
            *config.overrides,
        ],
        preset="smollm2",
    )


def run(seeds: list[int], *, progress: bool = True, config: RealArithmeticConfig | None = None) -> report.Report:
    """Every variant × seed from the initial model, equal loop steps; held-out greedy accuracy and KL."""
    config = config or RealArithmeticConfig()
    check_model(config.model_path)
    grid = [v for v in variants(config.semi_online_syncs) if v[1] in ALGORITHMS]
    previous, t0 = torch.get_num_threads(), time.perf_counter()
    torch.set_num_threads(config.threads or previous)
    try:
        threads = torch.get_num_threads()
        runs, initial = run_grid(
            seeds,
            grid,
            lambda name, s, seed: run_config(config, algorithm=name, sync_every=s, seed=seed),
            setup_seed=lambda seed: 0,
            desc="real-arithmetic",
            progress=progress,
        )
    finally:
        torch.set_num_threads(previous)
    entries = grid_entries("real-arithmetic", runs, initial, grid, loop_steps=config.steps, baseline=INITIAL)
    return report.Report(
        experiment="real-arithmetic",
        entries=entries,
        markdown=_markdown(entries, config, initial, threads),
        targets=_targets(entries, seeds, config),
        seconds=time.perf_counter() - t0,
        intra_op_threads=threads,
        plots={"curves": lambda: curves_figure(runs, initial, grid, seeds, title="real-arithmetic", baseline=INITIAL)},
        headline=lambda ax: headline(ax, entries, grid, seeds, title="real-arithmetic", baseline=INITIAL),
    )


def _markdown(entries: list[dict], config: RealArithmeticConfig, initial: dict, threads: int) -> str:
    dpo = run_config(config, algorithm="online-dpo", sync_every=1, seed=0)
    grpo = run_config(config, algorithm="grpo", sync_every=1, seed=0).grpo
    return summary_table(entries, INITIAL) + (
        f"\nInitial policy ({config.model_path}): {report.fmt(initial.values(), 1, 100)}% greedy math-verify accuracy "
        f"on {config.eval_problems} held-out {dpo.task.word_steps}-step word problems (chat template "
        f"{'off' if dpo.prompt.chat_template is False else 'on'}). Every run: {config.steps} loop steps × "
        f"{config.prompts_per_step} prompts × {config.samples_per_prompt} samples, {config.max_new_tokens} new tokens, "
        f"{config.engine} engine, AdamW lr {dpo.trainer.lr}, sampling T = {dpo.sampling.temperature}; DPO β "
        f"{dpo.dpo.beta}, up to {dpo.dpo.pairs_per_prompt} pairs per prompt (fallback {dpo.dpo.pair_fallback}, "
        f"{dpo.dpo.hard_prompt_samples} more samples for a tied prompt); GRPO {grpo.loss_type} loss, "
        f"{grpo.advantage} advantages, β {grpo.beta}. Offline DPO samples from the initial weights throughout "
        f"(s = ∞). KL: sampled estimate per sequence on the held-out prompts. Wall time: the loop only (sampling, "
        f"scoring, batching, training, sync) on {threads} intra-op thread(s); evaluation excluded."
        + (f" Overrides: {', '.join(config.overrides)}." if config.overrides else "")
        + "\n"
    )


def _targets(entries: list[dict], seeds: list[int], config: RealArithmeticConfig) -> list[report.Target]:
    def acc(label: str, s: str, seed: int) -> float:
        found = report.select(entries, algorithm=label, sync_every=s, seed=seed)
        return 100 * found[0]["value"] if found else math.nan

    def per_seed(values: list[float]) -> str:
        return ", ".join(f"{v:+.1f}" for v in values)

    targets = []
    for s in config.semi_online_syncs:
        over = [acc("semi-online DPO", str(s), seed) - acc("offline DPO", "inf", seed) for seed in seeds]
        targets.append(
            report.Target(
                f"offline DPO < semi-online DPO (s = {s})",
                min(over) > 0,
                "semi-online − offline per seed: " + per_seed(over),
            )
        )
        gaps = [acc("online DPO", "1", seed) - acc("semi-online DPO", str(s), seed) for seed in seeds]
        targets.append(
            report.Target(
                f"semi-online DPO (s = {s}) ≈ online DPO (within {SIMILAR_POINTS:g} points)",
                max(abs(g) for g in gaps) <= SIMILAR_POINTS,
                "online − semi-online per seed: " + per_seed(gaps),
            )
        )
    trails = [acc("online DPO", "1", seed) - acc("offline DPO", "inf", seed) for seed in seeds]
    targets.append(
        report.Target("offline DPO < online DPO", min(trails) > 0, "online − offline per seed: " + per_seed(trails))
    )
    for label in ("online DPO", "GRPO"):
        gains = [e["gain_points"] for e in entries if e["algorithm"] == label]
        targets.append(
            report.Target(
                f"{label} gains over the initial policy",
                bool(gains) and min(gains) > 0,
                f"gain per seed (points): {per_seed(gains)}" if gains else "not run",
            )
        )
    return targets
