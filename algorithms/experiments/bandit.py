"""Experiment ``bandit``: on-policy sampling and negative gradients on Tajwar et al.'s bandit.

Claim (Tajwar et al. 2024, https://arxiv.org/abs/2404.14367): when the reward's peak lies where the
reference policy puts little mass (R1, peak at action 70), methods that sample on-policy and push
down dispreferred samples (online DPO / IPO) reach it, while offline training on π_ref's samples
and methods without a negative gradient (rejection sampling / Best-of-N SFT) lag; when the peak
sits at π_ref's mode (R2) every method does about equally well.

Setting: the tabular policy of :mod:`.tabular`, initialised to ``log π_ref``, trained by hotloop's
own ``OnlineLoop`` / ``Trainer`` / algorithm classes: ``dpo`` and ``ipo`` are ``OnlineDPO``
(best vs worst of each prompt's samples) with ``loss_type`` sigmoid / ipo, ``rejection-sampling``
is the registered Best-of-N SFT algorithm; each at sync period ``s ∈ {1, 10, 100, ∞}`` with the
same steps, samples, optimizer and learning rate. ``s = ∞`` keeps sampling π_ref (an unlimited
offline data set of π_ref's samples). Metric: exact expected reward and KL(π ‖ π_ref) after the
last step (and every ``eval_every`` steps for the curves).
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from hotloop.algorithms.base import BuildContext
from hotloop.algorithms.dpo import DPOConfig, OnlineDPO
from hotloop.algorithms.experiments import report, tabular
from hotloop.runtime.engine import SamplingParams
from hotloop.runtime.loop import OnlineLoop
from hotloop.runtime.loop_config import LoopConfig
from hotloop.runtime.sync_policy import SyncConfig
from hotloop.runtime.trainer import Trainer, TrainerConfig, make_reference

SYNC_PERIODS = (1, 10, 100, math.inf)
BANDIT_ALGORITHMS = ("dpo", "ipo", "rejection-sampling")
TARGET_REWARD = 0.9
"""The tables report the first evaluated step at which the expected reward reaches this."""
REJECTION_SAMPLING = "rejection-sampling"
"""Name of Best-of-N SFT in ``hotloop.algorithms.config.ALGORITHMS`` (its class lives in rejection_sampling.py)."""


@dataclass(frozen=True, kw_only=True)
class BanditConfig:
    """One budget shared by every algorithm and sync period of a bandit comparison."""

    steps: int = 300
    """Loop steps (optimizer steps) per run."""
    prompts_per_step: int = 8
    """Prompts per step; the bandit has one prompt, so this is the number of sample groups."""
    samples_per_prompt: int = 4
    """Actions sampled per group (DPO / IPO pair the best with the worst; Best-of-N keeps the best)."""
    lr: float = 0.05
    """AdamW learning rate on the logits (constant, no warm-up, no clipping)."""
    dpo_beta: float = 0.1
    """β of DPO."""
    ipo_beta: float = 0.1
    """β of IPO (its target margin is 1/(2β))."""
    eval_every: int = 10
    """Steps between the exact reward / KL evaluations that make the curves."""

    def __post_init__(self) -> None:
        for name in ("steps", "prompts_per_step", "eval_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {getattr(self, name)!r}")
        if not isinstance(self.samples_per_prompt, int) or self.samples_per_prompt < 2:
            raise ValueError(f"samples_per_prompt: expected an int >= 2, got {self.samples_per_prompt!r}")
        for name in ("lr", "dpo_beta", "ipo_beta"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: expected a float > 0, got {getattr(self, name)!r}")


@dataclass
class BanditRun:
    """What one bandit run measured."""

    reward: float
    """Exact expected reward after the last step."""
    kl: float
    """Exact KL(π ‖ π_ref) after the last step."""
    curve: list[tuple[int, float, float]]
    """(optimizer steps done, expected reward, KL) at step 0 and every ``eval_every`` steps."""
    weights: torch.Tensor
    """Final logits [V] (the LM-head weight)."""
    syncs: int
    wall_seconds: float
    records: list[dict]
    """The loop's metrics record of every step."""


def make_algorithm(name: str, config: BanditConfig, context: BuildContext, *, beta: float | None = None):
    """The algorithm object ``name`` with the comparison's budget (``beta`` overrides its β)."""
    n = config.samples_per_prompt
    if name in ("dpo", "ipo"):
        loss_type = "sigmoid" if name == "dpo" else "ipo"
        beta = beta if beta is not None else (config.dpo_beta if name == "dpo" else config.ipo_beta)
        return OnlineDPO(
            DPOConfig(beta=beta, loss_type=loss_type, samples_per_prompt=n), pad_token_id=context.pad_token_id
        )
    if name == REJECTION_SAMPLING:
        return _registered_algorithm(name, context, samples_per_prompt=n)
    raise ValueError(f"algorithm: expected one of {BANDIT_ALGORITHMS}, got {name!r}")


def _registered_algorithm(name: str, context: BuildContext, **overrides):
    """Build a registered algorithm from ``ALGORITHMS`` with its section's defaults plus ``overrides``."""
    from hotloop.algorithms.config import ALGORITHMS, RunConfig

    if name not in ALGORITHMS:
        raise ValueError(
            f"algorithm: {name!r} is not registered in hotloop.algorithms.config.ALGORITHMS (have {sorted(ALGORITHMS)})"
        )
    section, factory = ALGORITHMS[name]
    section_config = getattr(RunConfig(algorithm=name), section)
    known = {f.name for f in dataclasses.fields(section_config)}
    section_config = dataclasses.replace(section_config, **{k: v for k, v in overrides.items() if k in known})
    return factory(section_config, context)


def available_algorithms() -> tuple[str, ...]:
    """The bandit algorithms that can run in this checkout (rejection sampling once it is registered)."""
    from hotloop.algorithms.config import ALGORITHMS

    return tuple(a for a in BANDIT_ALGORITHMS if a != REJECTION_SAMPLING or a in ALGORITHMS)


def build_loop(
    algorithm: str,
    *,
    reward: str,
    sync_every: int | float,
    seed: int,
    config: BanditConfig,
    out_dir: str,
    beta: float | None = None,
    wrap_engine: Callable | None = None,
    check_sync: bool = True,
) -> OnlineLoop:
    """An ``OnlineLoop`` training a fresh ``TabularPolicy`` (= log π_ref) with ``algorithm`` on ``reward``.

    ``wrap_engine(engine) -> engine`` replaces the sampler (the replay experiment records or replays with it);
    ``check_sync`` turns the loop's proof on every sync on or off.
    """
    ref_probs = tabular.reference_probs()
    policy = tabular.TabularPolicy(ref_probs.log())
    trainer = Trainer(policy, TrainerConfig(lr=config.lr, max_grad_norm=None), reference=make_reference(policy))
    engine = tabular.BanditEngine(policy, seed=seed)  # the loop's sync policy copies it when s != 1
    engine = wrap_engine(engine) if wrap_engine is not None else engine
    table = tabular.reward_table(reward)
    reward_fn, tokenizer = tabular.BanditReward(table), tabular.ActionTokenizer()
    problems, sampling = tabular.bandit_problems(config.prompts_per_step), SamplingParams(max_new_tokens=1)
    context = BuildContext(
        pad_token_id=tokenizer.pad_id,
        engine=engine,
        problems=problems,
        tokenizer=tokenizer,
        reward_fn=reward_fn,
        sampling=sampling,
    )

    def evaluate(model) -> dict[str, float]:
        probs = model.probs()
        return {"reward": tabular.expected_reward(probs, table), "kl": tabular.kl_divergence(probs, ref_probs)}

    loop_config = LoopConfig(
        steps=config.steps,
        sync_every=sync_every,
        prompts_per_step=config.prompts_per_step,
        eval_every=config.eval_every,
        out_dir=out_dir,
        seed=seed,
        sync=SyncConfig(check=check_sync, probe_prompts=1, probe_tokens=1),
    )
    return OnlineLoop(
        loop_config,
        trainer=trainer,
        engine=engine,
        algorithm=make_algorithm(algorithm, config, context, beta=beta),
        reward_fn=reward_fn,
        problems=problems,
        tokenizer=tokenizer,
        sampling=sampling,
        evaluate=evaluate,
        progress=False,
        logprob_fn=tabular.logprobs,
    )


def run_loop(loop: OnlineLoop) -> BanditRun:
    """Run ``loop`` to the end; its curve starts at the initial policy."""
    start = loop.evaluate(loop.trainer.model)
    t0 = time.perf_counter()
    with report.one_thread():
        result = loop.run()
    wall = time.perf_counter() - t0
    curve = [(0, start["reward"], start["kl"])] + [
        (r["step"] + 1, r["eval/reward"], r["eval/kl"]) for r in result.records if "eval/reward" in r
    ]
    period = loop.config.sync_period
    syncs = 0 if period is None else math.ceil(loop.config.steps / period)
    return BanditRun(
        reward=curve[-1][1],
        kl=curve[-1][2],
        curve=curve,
        syncs=syncs,
        wall_seconds=wall,
        records=result.records,
        weights=loop.trainer.model.lm_head.weight.detach()[:, 0].clone(),
    )


def run_bandit(
    algorithm: str, *, reward: str, sync_every: int | float, seed: int, config: BanditConfig, beta: float | None = None
) -> BanditRun:
    """Train one algorithm at one sync period on one reward (loop files go to a temporary directory)."""
    with tempfile.TemporaryDirectory(prefix="hotloop-bandit-") as out_dir:
        loop = build_loop(
            algorithm, reward=reward, sync_every=sync_every, seed=seed, config=config, out_dir=out_dir, beta=beta
        )
        return run_loop(loop)


def sync_label(sync_every: int | float) -> str:
    """``s`` as written in tables and JSON: ``"1"``, ``"10"``, ``"inf"``."""
    return "inf" if sync_every in (None, math.inf) else str(int(sync_every))


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
