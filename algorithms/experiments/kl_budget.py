"""Experiment ``kl-budget``: online vs offline DPO and IPO on the bandit at equal KL(π ‖ π_ref).

Claim (Tang et al. 2024, "Understanding the performance gap between online and offline alignment
algorithms", https://arxiv.org/abs/2405.08448): at the same KL divergence from the reference (the
budget that keeps a policy close to the SFT model), online preference optimisation reaches a
higher reward than offline; the gap is not explained away by offline runs simply moving less.

Setting: the bandit of :mod:`.bandit` (same budget per run), DPO and IPO each at s = 1 (online)
and s = ∞ (offline: samples of π_ref), β ∈ :data:`BETAS`; every run is evaluated exactly every
``eval_every`` steps. For a KL budget K, a (loss, s, reward, seed) cell scores the best expected
reward over every β's trajectory (evaluated every 2 steps, linear in between) with KL(π ‖ π_ref) ≤ K
(the reward–KL frontier, as an early-stopping oracle would pick it). A budget beyond the largest KL
a cell reaches is marked "not reached" (its value is then the best of the whole run).
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch
from tqdm.auto import tqdm

from hotloop.algorithms.experiments import bandit_loop, report, tabular

BETAS = (0.03, 0.1, 0.3, 1.0)
BUDGETS = (0.25, 0.5, 1.0, 2.0, 3.0)
LOSSES = ("dpo", "ipo")
SETTINGS = (1, math.inf)


def frontier(trajectories: list[list[tuple[float, float]]], budget: float) -> tuple[float, float]:
    """(best reward, its KL) within KL ≤ ``budget`` over piecewise-linear trajectories [[(kl, reward), ...], ...].

    Between two evaluations a trajectory is linear in (KL, reward), so a budget crossed between them
    scores the interpolated reward at the budget (evaluations are discrete; fast runs cross more KL per step).
    """
    best = (-math.inf, 0.0)
    for points in trajectories:
        for (kl0, r0), (kl1, r1) in zip(points, points[1:] + [(math.inf, 0.0)]):
            if kl0 <= budget:
                best = max(best, (r0, kl0))
                if budget < kl1 < math.inf:
                    best = max(best, (r0 + (r1 - r0) * (budget - kl0) / (kl1 - kl0), budget))
    if best[0] == -math.inf:
        raise ValueError(f"budget: every trajectory starts above KL {budget}; expected one starting at π_ref (KL 0)")
    return best


def run(seeds: list[int], *, progress: bool = True, config: bandit_loop.BanditConfig | None = None) -> report.Report:
    """β sweep of DPO and IPO at s = 1 and ∞ on R1 and R2; the reward frontier at each KL budget."""
    config = dataclasses.replace(config or bandit_loop.BanditConfig(), eval_every=2)
    grid = [
        (reward, loss, s, beta, seed)
        for reward in tabular.REWARD_PEAKS
        for loss in LOSSES
        for s in SETTINGS
        for beta in BETAS
        for seed in seeds
    ]
    t0, points = time.perf_counter(), {}
    for reward, loss, s, beta, seed in tqdm(grid, desc="kl-budget", disable=not progress):
        result = bandit_loop.run_bandit(loss, reward=reward, sync_every=s, seed=seed, config=config, beta=beta)
        points.setdefault((reward, loss, s, seed), []).append([(kl, r) for _, r, kl in result.curve])
    entries = []
    for (reward, loss, s, seed), cell in points.items():
        reach = max(kl for trajectory in cell for kl, _ in trajectory)
        for budget in BUDGETS:
            value, kl = frontier(cell, budget)
            entries.append(
                report.entry(
                    "kl-budget",
                    loss,
                    f"{reward} s={bandit_loop.sync_label(s)} KL<={budget}",
                    seed,
                    "best_expected_reward_within_kl",
                    value,
                    kl,
                    reward=reward,
                    sync_every=bandit_loop.sync_label(s),
                    kl_budget=budget,
                    reached=reach >= budget,
                )
            )
    return report.Report(
        experiment="kl-budget",
        entries=entries,
        markdown=_markdown(entries, config),
        targets=_checks(entries, seeds),
        seconds=time.perf_counter() - t0,
        plots={"frontier": lambda: _frontier_figure(points, seeds)},
        headline=lambda ax: _draw_frontiers(ax, points, seeds, "R1"),
    )


def _markdown(entries: list[dict], config: bandit_loop.BanditConfig) -> str:
    rows = []
    for reward in tabular.REWARD_PEAKS:
        for loss in LOSSES:
            for s in SETTINGS:
                cells = [reward, loss, bandit_loop.sync_label(s)]
                for budget in BUDGETS:
                    found = report.select(
                        entries, algorithm=loss, reward=reward, sync_every=bandit_loop.sync_label(s), kl_budget=budget
                    )
                    text = report.fmt(e["value"] for e in found)
                    cells.append(text if all(e["reached"] for e in found) else f"{text} (KL not reached)")
                rows.append(cells)
    text = report.table(["reward", "loss", "s"] + [f"KL ≤ {b}" for b in BUDGETS], rows)
    return text + (
        f"\nBest exact expected reward among evaluated points (every {config.eval_every} steps of "
        f"{config.steps}, β ∈ {list(BETAS)}) whose KL(π‖π_ref) stays within the budget; mean [min – max] "
        f'over seeds. "KL not reached": some seed never moved that far from π_ref.\n'
    )


def _checks(entries: list[dict], seeds: list[int]) -> list[report.Target]:
    """Tang et al.'s claim per reward: online ≥ offline at every budget both reach, every seed, both losses."""
    checks = []
    for reward in tabular.REWARD_PEAKS:
        worst, where = math.inf, ""
        for loss in LOSSES:
            for budget in BUDGETS:
                for seed in seeds:
                    on, off = (
                        report.select(
                            entries, algorithm=loss, reward=reward, sync_every=s, kl_budget=budget, seed=seed
                        )[0]
                        for s in ("1", "inf")
                    )
                    if on["reached"] and off["reached"] and on["value"] - off["value"] < worst:
                        worst, where = on["value"] - off["value"], f"{loss}, KL ≤ {budget}, seed {seed}"
        checks.append(
            report.Target(
                f"{reward} (claim of Tang et al.): online ≥ offline reward at every KL budget both reach, DPO and IPO",
                worst >= 0,
                f"smallest online − offline difference {worst:+.3f} ({where})",
            )
        )
    return checks


def _draw_frontiers(ax, points: dict, seeds: list[int], reward: str) -> None:
    grid = torch.linspace(0.01, max(BUDGETS) + 1, 81).tolist()
    for loss in LOSSES:
        for s, style in ((1, "-"), (math.inf, "--")):
            curves = torch.tensor([[frontier(points[reward, loss, s, seed], k)[0] for k in grid] for seed in seeds])
            ax.plot(grid, curves.mean(0).tolist(), style, label=f"{loss} s = {bandit_loop.sync_label(s)}")
    ax.set(
        title=f"{reward}: best reward within a KL budget",
        xlabel="KL(π ‖ π_ref) budget",
        ylabel="expected reward",
        ylim=(0, 1.02),
    )
    ax.legend(fontsize=7)


def _frontier_figure(points: dict, seeds: list[int]):
    plt = report.pyplot()
    rewards = list(tabular.REWARD_PEAKS)
    figure, axes = plt.subplots(1, len(rewards), figsize=(5 * len(rewards), 3.6), squeeze=False)
    for ax, reward in zip(axes[0], rewards):
        for loss, color in zip(LOSSES, ("tab:blue", "tab:orange")):
            for s, marker in ((1, "o"), (math.inf, "x")):
                kl, r = zip(*[p for seed in seeds for t in points[reward, loss, s, seed] for p in t])
                ax.scatter(kl, r, s=4, alpha=0.25, color=color, marker=marker)
        _draw_frontiers(ax, points, seeds, reward)
    return figure
