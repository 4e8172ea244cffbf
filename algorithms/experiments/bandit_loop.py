"""One bandit run: the shared budget, the algorithm, hotloop's ``OnlineLoop`` on the tabular policy, its result.

The experiments ``bandit``, ``kl-budget`` and ``replay`` all train through this module: a fresh
:class:`~hotloop.algorithms.experiments.tabular.TabularPolicy` initialised to ``log π_ref``, trained by
hotloop's own ``OnlineLoop`` / ``Trainer`` / algorithm classes (:func:`build_loop`) under one
:class:`BanditConfig` budget; ``dpo`` and ``ipo`` are ``OnlineDPO`` (best vs worst of each prompt's
samples) with ``loss_type`` sigmoid / ipo, ``rejection-sampling`` is the registered Best-of-N SFT
algorithm. :func:`run_loop` records the exact expected reward and KL(π ‖ π_ref) curve.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from hotloop.algorithms.base import BuildContext
from hotloop.algorithms.dpo import DPOConfig, OnlineDPO
from hotloop.algorithms.experiments import report, tabular
from hotloop.runtime.engine import SamplingParams
from hotloop.runtime.loop import OnlineLoop
from hotloop.runtime.loop_config import LoopConfig
from hotloop.runtime.sync_policy import SyncConfig
from hotloop.runtime.trainer import Trainer, TrainerConfig, make_reference

BANDIT_ALGORITHMS = ("dpo", "ipo", "rejection-sampling")
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
