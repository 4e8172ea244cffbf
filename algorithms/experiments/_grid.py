"""The runner, entries, table and plots shared by ``arithmetic`` and ``real-arithmetic``.

A grid is every (label, registered algorithm, s) variant × seed (:func:`variants`), each run through
:func:`run_one` (hotloop's ``OnlineLoop`` on a copy of the setup's policy) with equal loop steps
(:func:`run_grid`); :func:`grid_entries`, :func:`summary_table`, :func:`curves_figure` and
:func:`headline` turn the runs into the experiment's outputs, naming the starting policy by its
:class:`Baseline` (the SFT policy in ``arithmetic``, the initial one in ``real-arithmetic``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import tempfile
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from hotloop.algorithms.base import BuildContext
from hotloop.algorithms.config import ALGORITHMS, RunConfig
from hotloop.algorithms.experiments import report
from hotloop.algorithms.run import Setup, build_setup, engine_options, make_evaluate, probe_logprobs, sampling_params
from hotloop.runtime.engine_factory import make_engine
from hotloop.runtime.loop import OnlineLoop
from hotloop.runtime.trainer import Trainer, make_reference


@dataclass(frozen=True)
class Baseline:
    """The policy every run starts from, as the outputs name it."""

    key: str
    """summary.json field prefix: ``"sft"`` → ``sft_accuracy``."""
    name: str
    """In sentences and legends: "SFT policy"."""
    symbol: str
    """In the KL label: "π_SFT"."""


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
