"""Preference pairs from verifiable rewards when correct samples are few: fallbacks that do not starve.

Online DPO pairs the i-th best of a prompt's samples with its i-th worst while their rewards differ
(:func:`hotloop.algorithms.preference_data.best_worst_pairs`). On a real model a hard prompt often has
one correct sample in eight (or none), so that rule gives one pair, or none, per prompt, and a step trains on
1-4 pairs. Three fallbacks, chosen in ``DPOConfig``, keep the step fed; none of them ever pairs
different prompts' completions (a "chosen" answer to another question says nothing about this one):

- ``pair_fallback: reuse`` (:func:`contrast_pairs`): a sample better than the group's worst may be the
  chosen side of several pairs, and one worse than its best the rejected side of several, so one
  correct + seven wrong samples give ``pairs_per_prompt`` pairs (the correct one against the first
  wrong ones), not one. Each pair still has chosen reward > rejected reward.
- ``hard_prompt_samples: k`` (:class:`hotloop.algorithms.dpo.OnlineDPO`): a prompt whose samples all
  tie (all wrong, say) gets ``k`` more samples from the same sampler weights before pairing; seeded
  from the step's sampled tokens, so a resumed run draws the same ones.
- skipping, counted: every group that still has no contrast is skipped and counted by reason in the
  step's metrics (:func:`skip_reasons`): ``pairs/skipped_all_correct`` and ``pairs/skipped_all_wrong``
  (0/1 rewards), ``pairs/skipped_tied`` (any other single value); ``pairs/groups_with_contrast`` counts
  the groups that gave pairs.
"""

from __future__ import annotations

import dataclasses
import zlib

import torch

from hotloop.algorithms.base import group_by_prompt

PAIR_FALLBACKS = ("none", "reuse")
"""``DPOConfig.pair_fallback`` values: "none" = best with worst only; "reuse" = see :func:`contrast_pairs`."""


def contrast_pairs(rewards: torch.Tensor, groups: list[list[int]], pairs_per_group: int) -> list[tuple[int, int]]:
    """Up to ``pairs_per_group`` (chosen, rejected) pairs per group with samples reused across pairs.

    In each group sorted by reward (ties in sampling order), ``top`` are the samples above the worst
    reward and ``bottom`` those below the best, worst first; pair k is ``(top[k % |top|], bottom[k % |bottom|])``
    while the chosen reward exceeds the rejected one. With as many good as bad samples this is the
    i-th best with the i-th worst; with one good sample it is that sample against several bad ones.
    """
    values, pairs = rewards.tolist(), []
    for group in groups:
        order = sorted(group, key=lambda i: -values[i])
        if not order or values[order[0]] == values[order[-1]]:
            continue
        top = [i for i in order if values[i] > values[order[-1]]]
        bottom = [i for i in reversed(order) if values[i] < values[order[0]]]
        seen = set()
        for k in range(min(pairs_per_group, len(top) * len(bottom))):
            pair = (top[k % len(top)], bottom[k % len(bottom)])
            if values[pair[0]] > values[pair[1]] and pair not in seen:
                seen.add(pair)
                pairs.append(pair)
    return pairs


def skip_reasons(rewards: torch.Tensor, groups: list[list[int]]) -> dict[str, float]:
    """Counts of groups without a reward contrast by reason, and of groups with one (see the module docstring)."""
    values = rewards.tolist()
    out = {
        "pairs/groups_with_contrast": 0.0,
        "pairs/skipped_all_correct": 0.0,
        "pairs/skipped_all_wrong": 0.0,
        "pairs/skipped_tied": 0.0,
    }
    for group in groups:
        distinct = {values[i] for i in group}
        if len(distinct) > 1:
            key = "groups_with_contrast"
        elif distinct == {1.0}:
            key = "skipped_all_correct"
        elif distinct == {0.0}:
            key = "skipped_all_wrong"
        else:
            key = "skipped_tied"
        out[f"pairs/{key}"] += 1.0
    return out


def resample_tied(algorithm, problems: list, prompt_ids: list[list[int]], completions: list, rewards: torch.Tensor):
    """``algorithm.config.hard_prompt_samples`` more scored samples for each prompt whose samples all tie.

    Uses ``algorithm.engine`` / ``sampling`` / ``reward_fn`` / ``decode``; seeded by a CRC32 of the step's sampled
    tokens, so a resumed step draws the same. Returns (completions, rewards, number of prompts resampled).
    """
    k = algorithm.config.hard_prompt_samples
    values = rewards.tolist()
    groups = group_by_prompt(completions, len(prompt_ids))
    hard = [p for p, g in enumerate(groups) if g and len({values[i] for i in g}) == 1]
    if not k or not hard:
        return completions, rewards, 0
    seed = zlib.crc32(str([c.token_ids for c in completions]).encode())
    extra = algorithm.engine.generate(
        [prompt_ids[p] for p in hard], dataclasses.replace(algorithm.sampling, n=k, seed=seed)
    )
    extra = [dataclasses.replace(c, prompt_index=hard[c.prompt_index]) for c in extra]
    scores = algorithm.reward_fn(
        [problems[c.prompt_index] for c in extra], [algorithm.decode(c.token_ids) for c in extra]
    )
    return completions + extra, torch.cat([rewards.float().cpu(), scores.float().cpu()]), len(hard)
