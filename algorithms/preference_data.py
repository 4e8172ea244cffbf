"""Preference-pair data for the DPO family: the stored pair, where pairs come from, and how they are packed.

A :class:`PreferencePair` holds the token ids of a prompt and of its chosen and rejected completions (eos
included). Pairs come from scored samples (:func:`preference_pairs`: each prompt's i-th best with its
i-th worst, :func:`best_worst_pairs`, or the fallback of :mod:`hotloop.algorithms.pairing`) or from a
JSONL file of ``{"prompt", "chosen", "rejected"}`` texts (:func:`read_pairs`); :func:`pair_batch`
packs them into the interleaved chosen/rejected rows of a :class:`PairBatch`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from hotloop.algorithms.base import Batch, check_scored, group_by_prompt, pack_rows
from hotloop.algorithms.pairing import contrast_pairs
from hotloop.algorithms.tasks.arithmetic import Problem
from hotloop.runtime.engine import Completion

PAIR_KEYS = ("prompt", "chosen", "rejected")
"""Keys of one line of a preference-pairs JSONL file (texts)."""


@dataclass(frozen=True, kw_only=True)
class PairBatch(Batch):
    """Rows ``[c_0, r_0, c_1, r_1, ...]``: pair p is (chosen row 2p, rejected row 2p + 1)."""

    chosen: torch.Tensor
    """[P] int64 row index of each pair's preferred completion."""
    rejected: torch.Tensor
    """[P] int64 row index of each pair's dispreferred completion."""


@dataclass(frozen=True)
class PreferencePair:
    """One stored preference: token ids of the prompt and of the two completions (eos included)."""

    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    chosen_reward: float = 1.0
    rejected_reward: float = 0.0


def best_worst_pairs(rewards: torch.Tensor, groups: list[list[int]], pairs_per_group: int) -> list[tuple[int, int]]:
    """(chosen, rejected) indices: in each group the i-th best with the i-th worst, while they differ.

    Ties keep sampling order, so the result is deterministic; groups with one reward value give none.
    """
    values, pairs = rewards.tolist(), []  # one host copy, not one per element
    for group in groups:
        order = sorted(group, key=lambda i: -values[i])
        for i in range(min(pairs_per_group, len(order) // 2)):
            best, worst = order[i], order[-1 - i]
            if values[best] > values[worst]:
                pairs.append((best, worst))
    return pairs


def preference_pairs(
    prompt_ids: list[list[int]],
    completions: list[Completion],
    rewards: torch.Tensor,
    pairs_per_prompt: int,
    fallback: str = "none",
) -> list[PreferencePair]:
    """Pairs of each prompt's scored samples: best vs worst (:func:`best_worst_pairs`), or with ``fallback="reuse"``
    :func:`hotloop.algorithms.pairing.contrast_pairs`."""
    check_scored(completions, rewards)
    groups = group_by_prompt(completions, len(prompt_ids))
    pick = contrast_pairs if fallback == "reuse" else best_worst_pairs
    return [
        PreferencePair(
            tuple(prompt_ids[completions[w].prompt_index]),
            tuple(completions[w].token_ids),
            tuple(completions[l].token_ids),
            float(rewards[w]),
            float(rewards[l]),
        )
        for w, l in pick(rewards, groups, pairs_per_prompt)
    ]


def read_pairs(
    path: str | Path, encode: Callable[[str], list[int]], eos_token_id: int
) -> tuple[list[Problem], list[PreferencePair]]:
    """Problems (one per distinct prompt) and preference pairs of a JSONL file of PAIR_KEYS texts.

    ``prompt_ids = encode(prompt)`` (bos included); a completion's ids are those of
    ``encode(prompt + text)`` after the prompt's, then ``eos_token_id`` (what the sampler would emit).
    Raises ``ValueError`` naming the file, the line number and what is wrong with the line.
    """
    problems: dict[str, Problem] = {}
    pairs = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        row = _pair_row(path, number, line)
        try:
            prompt_ids = encode(row["prompt"])
            ids = [_completion_ids(prompt_ids, encode(row["prompt"] + row[k]), k) for k in ("chosen", "rejected")]
        except ValueError as err:
            raise ValueError(f"{path}:{number}: {err}") from None
        problems.setdefault(row["prompt"], Problem(prompt=row["prompt"], answer=""))
        pairs.append(PreferencePair(tuple(prompt_ids), (*ids[0], eos_token_id), (*ids[1], eos_token_id)))
    if not pairs:
        raise ValueError(f"{path}: expected at least one line with keys {PAIR_KEYS}, got none")
    return list(problems.values()), pairs


def _pair_row(path, number: int, line: str) -> dict:
    """One parsed line of a pairs file, checked to hold PAIR_KEYS strings."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path}:{number}: expected a JSON object with keys {PAIR_KEYS}, got invalid JSON ({err.msg})"
        ) from None
    if not isinstance(row, dict):
        raise ValueError(f"{path}:{number}: expected a JSON object with keys {PAIR_KEYS}, got {type(row).__name__}")
    for key in PAIR_KEYS:
        if key not in row:
            raise ValueError(f"{path}:{number}: missing key {key!r}; expected keys {PAIR_KEYS}, got {sorted(row)}")
        if not isinstance(row[key], str):
            raise ValueError(f"{path}:{number}: key {key!r}: expected a string, got {row[key]!r}")
    return row


def _completion_ids(prompt_ids: list[int], full_ids: list[int], key: str) -> list[int]:
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError(
            f"key {key!r}: the prompt's tokens are not a prefix of the tokens of prompt + {key} "
            f"(the tokenizer merges across the boundary); end the prompt where a token ends"
        )
    return full_ids[len(prompt_ids) :]


def pair_batch(pairs: list[PreferencePair], pad_token_id: int, version: int) -> PairBatch:
    """Pack preference pairs into interleaved chosen/rejected rows."""
    prompts = [list(p.prompt_ids) for p in pairs for _ in range(2)]
    completions = [list(ids) for p in pairs for ids in (p.chosen_ids, p.rejected_ids)]
    input_ids, attention_mask, completion_mask = pack_rows(prompts, completions, pad_token_id)
    rewards = torch.tensor([r for p in pairs for r in (p.chosen_reward, p.rejected_reward)], dtype=torch.float32)
    P = len(pairs)
    return PairBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        completion_mask=completion_mask,
        rewards=rewards,
        sampler_version=version,
        chosen=torch.arange(0, 2 * P, 2),
        rejected=torch.arange(1, 2 * P, 2),
    )
