"""Named presets: whole ``RunConfig`` values for a particular run, built over the component defaults.

A preset states only where its run differs from ``RunConfig()`` (whose every field is its
component's own default), torchtitan-style: ``demo()`` is what ``hotloop demo`` runs, ``smollm2()``
the pretrained-model settings the examples/ configs share. A YAML config picks one with
``preset: NAME`` (:func:`hotloop.algorithms.loader.load_config`) and names what it changes on top.
"""

from __future__ import annotations

from dataclasses import replace

from hotloop.algorithms.config import RunConfig


def demo() -> RunConfig:
    """``hotloop demo``: semi-online DPO (s = 4, LoopConfig's default) on 2-digit addition from the tiny model's SFT
    warm start; 80 steps of 32 prompts × 8 samples, 5 new tokens, AdamW lr 2e-4 with betas (0.9, 0.98)."""
    base = RunConfig()
    return replace(
        base,
        dpo=replace(base.dpo, beta=0.2, samples_per_prompt=8, pairs_per_prompt=2),
        sampling=replace(base.sampling, max_new_tokens=5),
        trainer=replace(base.trainer, lr=2e-4, betas=(0.9, 0.98), warmup_steps=5),
        loop=replace(base.loop, steps=80, prompts_per_step=32, final_checkpoint=None),
    )


def smollm2() -> RunConfig:
    """SmolLM2-135M-Instruct (``hotloop fetch-model smollm2-135m-instruct``) on one-step word problems scored by
    math-verify: 96 new tokens, lr 1e-5, 20 steps of 8 prompts, one checkpoint at the end.

    One-step problems: the model solves 0–6% of the 2-step ones, so most groups had no reward contrast and
    GRPO did not move in 20 steps (1% → 1%); on one-step problems with 8 samples per prompt and lr 1e-5 it
    went 14% → 24% (docs/real-models.md)."""
    base = RunConfig()
    return replace(
        base,
        model=replace(base.model, path="models/smollm2-135m-instruct"),
        task=replace(base.task, name="word_problems", word_steps=1, eval_problems=100),
        reward=replace(base.reward, kind="math_verify"),
        sampling=replace(base.sampling, max_new_tokens=96, max_batch_size=64),
        trainer=replace(base.trainer, lr=1e-5),
        loop=replace(base.loop, steps=20, prompts_per_step=8, checkpoint_every=0, final_checkpoint=True),
    )


PRESETS = {"demo": demo, "smollm2": smollm2}
"""Preset name (the YAML ``preset:`` key) → function returning its ``RunConfig``."""

DEMO_SIZED = {
    "sampling.max_new_tokens": "64-256",
    "trainer.lr": "1e-6-1e-5",
    "trainer.betas": "[0.9, 0.999]",
    "trainer.warmup_steps": "0-2",
}
"""Fields :func:`demo` sizes for the tiny model → what suits a pretrained model."""


def demo_default_warnings(config: RunConfig) -> list[str]:
    """One line per demo-sized value (:data:`DEMO_SIZED`, as :func:`demo` sets it) still in force while
    ``model.path`` names a pretrained model."""
    if config.model.path is None:
        return []
    out, sized = [], demo()
    for dotted, real in DEMO_SIZED.items():
        section, name = dotted.split(".")
        value = getattr(getattr(config, section), name)
        if value == getattr(getattr(sized, section), name):
            out.append(
                f"{dotted}={value!r} is the tiny demo model's setting; a pretrained model usually wants "
                f"{real} (see examples/ and docs/real-models.md)"
            )
    return out
