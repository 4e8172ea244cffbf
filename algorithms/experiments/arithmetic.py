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

The runner (:func:`run_grid`, :func:`run_one`), the entries, table and plots are shared with
``real-arithmetic`` (:mod:`hotloop.algorithms.experiments.real_arithmetic`), which names its own
:class:`Baseline` (the initial policy instead of the SFT one).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import tempfile
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from hotloop.algorithms.base import BuildContext
from hotloop.algorithms.config import ALGORITHMS, RunConfig
from hotloop.algorithms.experiments import report
from hotloop.algorithms.loader import load_config
from hotloop.algorithms.run import Setup, build_setup, engine_options, make_evaluate, probe_logprobs, sampling_params
from hotloop.runtime.engine_factory import make_engine
from hotloop.runtime.loop import OnlineLoop
from hotloop.runtime.trainer import Trainer, make_reference

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


@dataclass(frozen=True)
class Baseline:
    """The policy every run starts from, as the outputs name it."""

    key: str
    """summary.json field prefix: ``"sft"`` → ``sft_accuracy``."""
    name: str
    """In sentences and legends: "SFT policy"."""
    symbol: str
    """In the KL label: "π_SFT"."""


SFT = Baseline("sft", "SFT policy", "π_SFT")


def variants(semi_online_syncs: tuple[int, ...]) -> list[tuple[str, str, int | float]]:
    """(label, registered algorithm, s): offline DPO (s = ∞), semi-online DPO at each s, online DPO and GRPO (s = 1)."""
    semi = [("semi-online DPO", "online-dpo", s) for s in semi_online_syncs]
    return [("offline DPO", "online-dpo", math.inf), *semi, ("online DPO", "online-dpo", 1), ("GRPO", "grpo", 1)]


@dataclass
class ArithmeticRun:
    """What one arithmetic run measured (accuracy and KL after the last step)."""

    accuracy: float
    kl: float
    curve: list[tuple[int, float, float]]
    optimizer_steps: int
    syncs: int
    wall_seconds: float
    """The loop's phases (sync, sampling, scoring, batching, training); evaluation excluded."""
    phase_seconds: dict[str, float]


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


def run_one(setup: Setup, run: RunConfig, *, out_dir: str) -> ArithmeticRun:
    """Train a copy of the setup's policy with ``run``'s algorithm and engine through ``OnlineLoop``; evaluate on
    held-out problems."""
    model = copy.deepcopy(setup.model)
    reference = make_reference(model)
    tok = setup.tokenizer
    trainer = Trainer(model, run.trainer, reference=reference)
    engine = make_engine(
        model, kind=run.engine.kind, pad_token_id=tok.pad_id, eos_token_id=tok.eos_id, **engine_options(run)
    )
    sampling = sampling_params(run.sampling, tok)
    section, factory = ALGORITHMS[run.algorithm]
    context = BuildContext(
        pad_token_id=tok.pad_id,
        engine=engine,
        problems=setup.train,
        tokenizer=tok,
        reward_fn=setup.reward_fn,
        sampling=sampling,
    )
    evaluate = make_evaluate(setup, run, reference)
    loop = OnlineLoop(
        dataclasses.replace(run.loop, out_dir=out_dir),
        trainer=trainer,
        engine=engine,
        algorithm=factory(getattr(run, section), context),
        reward_fn=setup.reward_fn,
        problems=setup.train,
        tokenizer=tok,
        sampling=sampling,
        evaluate=evaluate,
        progress=False,
        logprob_fn=probe_logprobs(tok.pad_id),
    )
    try:
        result = loop.run()
    finally:
        if hasattr(engine, "shutdown"):  # a serving engine (vLLM) holds process-wide state until shut down
            engine.shutdown()
    curve = [(r["step"] + 1, r["eval/accuracy"], r["eval/kl"]) for r in result.records if "eval/accuracy" in r]
    period = run.loop.sync_period
    return ArithmeticRun(
        accuracy=curve[-1][1],
        kl=curve[-1][2],
        curve=curve,
        optimizer_steps=trainer.version,
        syncs=0 if period is None else math.ceil(run.loop.steps / period),
        wall_seconds=sum(result.phase_seconds.values()),
        phase_seconds=result.phase_seconds,
    )


def run_grid(
    seeds: list[int],
    variants: list[tuple[str, str, int | float]],
    make_config,
    *,
    setup_seed,
    desc: str,
    progress: bool,
) -> tuple[dict, dict[int, float]]:
    """Every variant × seed through :func:`run_one`, equal loop steps.

    ``make_config(algorithm, s, seed)`` is a run's ``RunConfig``; the runs of ``seed`` start from the setup
    (policy, problems, reward) built from ``make_config("online-dpo", 1, setup_seed(seed))``, built once per
    setup seed. Returns the runs by (label, s, seed) and each seed's initial held-out greedy accuracy.
    """
    runs, setups, initial = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix=f"hotloop-{desc}-") as tmp:
        bar = tqdm(total=len(seeds) * len(variants), desc=desc, disable=not progress)
        for seed in seeds:
            key = setup_seed(seed)
            if key not in setups:
                setup_config = make_config("online-dpo", 1, key)
                setups[key] = build_setup(setup_config, progress=progress)
                initial[key] = make_evaluate(setups[key], setup_config, None)(setups[key].model)["accuracy"]
            for label, name, s in variants:
                bar.set_postfix_str(f"seed {seed}: {label} s={sync_label(s)}")
                runs[label, s, seed] = run_one(
                    setups[key], make_config(name, s, seed), out_dir=f"{tmp}/{name}-{s}-{seed}"
                )
                bar.update(1)
        bar.close()
    return runs, {seed: initial[setup_seed(seed)] for seed in seeds}


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


def grid_entries(
    experiment: str, runs: dict, initial: dict[int, float], variants: list, *, loop_steps: int, baseline: Baseline
) -> list[dict]:
    """summary.json entries of :func:`run_grid`'s runs: final accuracy and KL, gain over the baseline, timings."""
    names = {(label, s): name for label, name, s in variants}
    return [
        report.entry(
            experiment,
            label,
            f"s={sync_label(s)}",
            seed,
            "heldout_greedy_accuracy",
            r.accuracy,
            r.kl,
            registered_algorithm=names[label, s],
            sync_every=sync_label(s),
            syncs=r.syncs,
            **{f"{baseline.key}_accuracy": initial[seed]},
            gain_points=100 * (r.accuracy - initial[seed]),
            accuracy_last3=sum(c[1] for c in r.curve[-3:]) / len(r.curve[-3:]),
            optimizer_steps=r.optimizer_steps,
            loop_steps=loop_steps,
            wall_seconds=r.wall_seconds,
            **{f"seconds_{p}": v for p, v in r.phase_seconds.items()},
        )
        for (label, s, seed), r in runs.items()
    ]


def sync_label(sync_every: int | float) -> str:
    """s as the outputs write it: "inf" for s = ∞."""
    return "inf" if sync_every == math.inf else str(sync_every)


def summary_table(entries: list[dict], baseline: Baseline) -> str:
    """One row per (algorithm, s): accuracy, mean of the last 3 evaluations, gain, KL, steps, wall time over seeds."""
    rows = []
    for label, s in dict.fromkeys((e["algorithm"], e["sync_every"]) for e in entries):
        found = report.select(entries, algorithm=label, sync_every=s)
        rows.append(
            [
                label,
                s,
                found[0]["syncs"],
                report.fmt((e["value"] for e in found), 1, 100),
                report.fmt((e["accuracy_last3"] for e in found), 1, 100),
                report.fmt((e["gain_points"] for e in found), 1),
                report.fmt((e["kl"] for e in found), 2),
                report.fmt((e["optimizer_steps"] for e in found), 0),
                report.fmt((e["wall_seconds"] for e in found), 1),
            ]
        )
    return report.table(
        [
            "algorithm",
            "s",
            "syncs",
            "held-out greedy accuracy (%)",
            "mean of the last 3 evaluations (%)",
            f"gain over the {baseline.name} (points)",
            f"KL(π‖{baseline.symbol})",
            "optimizer steps",
            "loop wall time (s)",
        ],
        rows,
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


def curves_figure(
    runs: dict, initial: dict[int, float], variants: list, seeds: list[int], *, title: str, baseline: Baseline
):
    """Held-out accuracy (mean, min–max band over seeds) and KL against the step, one line per variant."""
    plt = report.pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for label, _, s in variants:
        curves = [[(0, initial[seed], 0.0)] + runs[label, s, seed].curve for seed in seeds]
        steps = [c[0] for c in curves[0]]
        acc = torch.tensor([[100 * c[1] for c in curve] for curve in curves])
        kl = torch.tensor([[c[2] for c in curve] for curve in curves])
        (line,) = left.plot(steps, acc.mean(0).tolist(), marker="o", label=f"{label} (s = {sync_label(s)})")
        left.fill_between(
            steps, acc.min(0).values.tolist(), acc.max(0).values.tolist(), alpha=0.15, color=line.get_color()
        )
        right.plot(steps, kl.mean(0).tolist(), marker="o", color=line.get_color())
    left.set(xlabel="step", ylabel="held-out greedy accuracy (%)", title=f"{title}: accuracy", ylim=(0, 100))
    right.set(xlabel="step", ylabel=f"KL(π ‖ {baseline.symbol}) per sequence", title=f"KL from the {baseline.name}")
    left.legend(fontsize=7)
    return figure


def headline(ax, entries: list[dict], variants: list, seeds: list[int], *, title: str, baseline: Baseline) -> None:
    """Final held-out accuracy per variant (bars: mean, whiskers: min–max over seeds) and the baseline's."""
    labels, means, lows, highs = [], [], [], []
    for label, _, s in variants:
        found = report.select(entries, algorithm=label, sync_every=sync_label(s))
        mean, lo, hi = report.stats(100 * e["value"] for e in found)
        labels.append(f"{label.replace('semi-online', 'semi').replace(' DPO', chr(10) + 'DPO')}\ns = {sync_label(s)}")
        means, lows, highs = means + [mean], lows + [mean - lo], highs + [hi - mean]
    start = 100 * entries[0][f"{baseline.key}_accuracy"]
    ax.bar(range(len(labels)), means, yerr=[lows, highs], capsize=3, color="tab:blue")
    ax.axhline(start, color="k", linestyle="--", label=f"{baseline.name} {start:.1f}%")
    ax.set_xticks(range(len(labels)), labels, fontsize=6)
    ax.set(title=f"{title}: held-out accuracy ({len(seeds)} seeds)", ylabel="greedy accuracy (%)", ylim=(0, 100))
    ax.legend(fontsize=7)
