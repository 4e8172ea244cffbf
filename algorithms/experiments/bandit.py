"""Experiment ``bandit``: on-policy sampling and negative gradients on Tajwar et al.'s bandit.

Claim (Tajwar et al. 2024, https://arxiv.org/abs/2404.14367): when the reward's peak lies where the
reference policy puts little mass (R1, peak at action 70), methods that sample on-policy and push
down dispreferred samples (online DPO / IPO) reach it, while offline training on π_ref's samples
and methods without a negative gradient (rejection sampling / Best-of-N SFT) lag; when the peak
sits at π_ref's mode (R2) every method does about equally well.

Setting: the tabular policy of :mod:`.tabular`, initialised to ``log π_ref``, trained by hotloop's
own ``OnlineLoop`` / ``Trainer`` / algorithm classes (:mod:`.bandit_loop`): ``dpo`` and ``ipo`` are
``OnlineDPO`` (best vs worst of each prompt's samples) with ``loss_type`` sigmoid / ipo,
``rejection-sampling`` is the registered Best-of-N SFT algorithm; each at sync period
``s ∈ {1, 10, 100, ∞}`` with the same steps, samples, optimizer and learning rate. ``s = ∞`` keeps
sampling π_ref (an unlimited offline data set of π_ref's samples). Metric: exact expected reward and
KL(π ‖ π_ref) after the last step (and every ``eval_every`` steps for the curves).
"""

from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from hotloop.algorithms.experiments import report, tabular
from hotloop.algorithms.experiments.bandit_loop import (
    BANDIT_ALGORITHMS,
    BanditConfig,
    available_algorithms,
    run_bandit,
    sync_label,
)

SYNC_PERIODS = (1, 10, 100, math.inf)
TARGET_REWARD = 0.9
"""The tables report the first evaluated step at which the expected reward reaches this."""


def run(seeds: list[int], *, progress: bool = True, config: BanditConfig | None = None) -> report.Report:
    """Every available algorithm × s ∈ {1, 10, 100, ∞} × reward R1, R2 × seed, with one shared budget."""
    config = config or BanditConfig()
    algorithms = available_algorithms()
    grid = [
        (reward, name, s, seed)
        for reward in tabular.REWARD_PEAKS
        for name in algorithms
        for s in SYNC_PERIODS
        for seed in seeds
    ]
    t0, runs = time.perf_counter(), {}
    for reward, name, s, seed in tqdm(grid, desc="bandit", disable=not progress):
        runs[reward, name, s, seed] = run_bandit(name, reward=reward, sync_every=s, seed=seed, config=config)
    entries = [
        report.entry(
            "bandit",
            name,
            f"{reward} s={sync_label(s)}",
            seed,
            "expected_reward",
            r.reward,
            r.kl,
            reward=reward,
            sync_every=sync_label(s),
            syncs=r.syncs,
            wall_seconds=r.wall_seconds,
            steps_to_target=next((step for step, value, _ in r.curve if value >= TARGET_REWARD), None),
        )
        for (reward, name, s, seed), r in runs.items()
    ]
    return report.Report(
        experiment="bandit",
        entries=entries,
        markdown=_markdown(entries, config, algorithms),
        targets=_targets(entries, seeds),
        seconds=time.perf_counter() - t0,
        plots={
            "curves": lambda: _curves_figure(runs, algorithms, seeds),
            "policies": lambda: _policies_figure(runs, seeds[0]),
        },
        headline=lambda ax: _headline(ax, entries, algorithms),
    )


def _markdown(entries: list[dict], config: BanditConfig, algorithms: tuple[str, ...]) -> str:
    rows = []
    for name in algorithms:
        for s in SYNC_PERIODS:
            cells = [name, sync_label(s)]
            for reward in tabular.REWARD_PEAKS:
                found = report.select(entries, algorithm=name, reward=reward, sync_every=sync_label(s))
                reached = [e["steps_to_target"] for e in found if e["steps_to_target"] is not None]
                steps = f"{report.fmt(reached, 0)} ({len(reached)}/{len(found)})" if reached else f"— (0/{len(found)})"
                cells += [report.fmt(e["value"] for e in found), report.fmt((e["kl"] for e in found), 2), steps]
            rows.append(cells)
    text = report.table(
        ["algorithm", "s"]
        + [
            f"{reward} {column}"
            for reward in tabular.REWARD_PEAKS
            for column in ("expected reward", "KL(π‖π_ref)", f"steps to {TARGET_REWARD}")
        ],
        rows,
    )
    ref = tabular.reference_probs()
    start = {k: tabular.expected_reward(ref, tabular.reward_table(k)) for k in tabular.REWARD_PEAKS}
    missing = [a for a in BANDIT_ALGORITHMS if a not in algorithms]
    notes = (
        f"\nExact expected reward Σ π(a) R(a) and KL after {config.steps} loop steps (mean [min – max] over "
        f"seeds); steps to {TARGET_REWARD}: first evaluation (every {config.eval_every} steps) at or above "
        f"{TARGET_REWARD} (seeds that got there); π_ref scores R1 {start['R1']:.3f}, R2 {start['R2']:.3f}. "
        f"Budget for every cell: "
        f"{config.prompts_per_step} groups × {config.samples_per_prompt} samples per step, AdamW lr "
        f"{config.lr}, DPO β {config.dpo_beta}, IPO β {config.ipo_beta}. s = inf samples π_ref throughout.\n"
    )
    if missing:
        notes += f"\nNot run: {', '.join(missing)} (not registered in hotloop.algorithms.config.ALGORITHMS).\n"
    return text + notes


def _targets(entries: list[dict], seeds: list[int]) -> list[report.Target]:
    def final(reward, s, seed):
        return report.select(entries, algorithm="dpo", reward=reward, sync_every=s, seed=seed)[0]["value"]

    online = [final("R1", "1", seed) for seed in seeds]
    offline = [final("R1", "inf", seed) for seed in seeds]
    ratios = []
    for seed in seeds:
        gap1 = final("R1", "1", seed) - final("R1", "inf", seed)
        gap2 = final("R2", "1", seed) - final("R2", "inf", seed)
        ratios.append(gap1 / gap2 if gap2 > 0 else math.inf)
    return [
        report.Target(
            "R1: online DPO (s = 1) reaches ≥ 0.95 expected reward",
            min(online) >= 0.95,
            f"min over seeds {min(online):.3f}",
        ),
        report.Target(
            "R1: offline DPO (s = ∞) stays ≤ 0.80", max(offline) <= 0.80, f"max over seeds {max(offline):.3f}"
        ),
        report.Target(
            "DPO online − offline gap on R1 ≥ 3× the gap on R2",
            min(ratios) >= 3,
            "ratios per seed " + ", ".join(f"{r:.1f}" for r in ratios),
        ),
    ]


def _curves_figure(runs: dict, algorithms: tuple[str, ...], seeds: list[int]):
    plt = report.pyplot()
    rewards = list(tabular.REWARD_PEAKS)
    figure, axes = plt.subplots(
        len(rewards),
        len(algorithms),
        figsize=(4.2 * len(algorithms), 3.2 * len(rewards)),
        squeeze=False,
        sharex=True,
        sharey=True,
    )
    for i, reward in enumerate(rewards):
        for j, name in enumerate(algorithms):
            ax = axes[i][j]
            for s in SYNC_PERIODS:
                curves = [runs[reward, name, s, seed].curve for seed in seeds]
                steps = [c[0] for c in curves[0]]
                values = torch.tensor([[c[1] for c in curve] for curve in curves])
                (line,) = ax.plot(steps, values.mean(0).tolist(), label=f"s = {sync_label(s)}")
                ax.fill_between(
                    steps,
                    values.min(0).values.tolist(),
                    values.max(0).values.tolist(),
                    alpha=0.2,
                    color=line.get_color(),
                )
            ax.set(title=f"{name}, {reward}", xlabel="step", ylabel="expected reward", ylim=(0, 1.02))
    axes[0][0].legend()
    return figure


def _policies_figure(runs: dict, seed: int):
    plt = report.pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    actions = range(tabular.NUM_ACTIONS)
    ref = tabular.reference_probs()
    for ax, reward in zip(axes, tabular.REWARD_PEAKS):
        ax.bar(actions, ref.tolist(), color="0.7", label="π_ref")
        for s in (1, math.inf):
            probs = torch.softmax(runs[reward, "dpo", s, seed].weights.double(), 0)
            ax.plot(actions, probs.tolist(), label=f"DPO s = {sync_label(s)}")
        ax.set(
            title=f"{reward}: final policies (seed {seed})",
            xlabel="action",
            ylabel="probability",
            yscale="log",
            ylim=(1e-4, 1.05),
        )
        ax.legend(fontsize=7, loc="upper left")
        twin = ax.twinx()
        twin.plot(actions, tabular.reward_table(reward).tolist(), "k--", linewidth=0.8)
        twin.set(ylabel=f"{reward}(a) (dashed)", ylim=(0, 1.05))
    return figure


def _headline(ax, entries: list[dict], algorithms: tuple[str, ...]) -> None:
    xs = range(len(SYNC_PERIODS))
    for name in algorithms:
        for reward, style in (("R1", "-o"), ("R2", "--s")):
            means = [
                report.stats(
                    e["value"] for e in report.select(entries, algorithm=name, reward=reward, sync_every=sync_label(s))
                )[0]
                for s in SYNC_PERIODS
            ]
            ax.plot(xs, means, style, label=f"{name} {reward}")
    ax.set_xticks(list(xs), [sync_label(s) for s in SYNC_PERIODS])
    ax.set(title="bandit: final expected reward", xlabel="sync period s", ylabel="expected reward", ylim=(0, 1.02))
    ax.legend(fontsize=6)
