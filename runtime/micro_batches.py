"""Micro batches for gradient accumulation: cut a batch into parts whose weighted losses add up to its loss.

Every built-in loss is ``S / N``: a sum over units (rows, pairs, tokens) divided by a normaliser N that
is the number of rows or of completion tokens. :func:`split_batch` cuts a batch into micro batches of
whole units (a DPO pair, a GRPO group) and weights micro batch i by ``N_i / N``:
``Σ_i (N_i / N) · S_i / N_i = S / N``, the gradient of the whole batch up to float rounding. Each
algorithm's ``split_rule()`` says what a unit is and what N counts, or refuses when its loss couples a
whole batch (KTO's mismatched reference point). A batch is any frozen dataclass with ``rows`` and a
``completion_mask [B, T]`` (``hotloop.algorithms.base.Batch``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch


@dataclass(frozen=True, kw_only=True)
class SplitRule:
    """How an algorithm's batches split into micro batches whose weighted losses add up to the batch loss."""

    unit_rows: int
    """Consecutive rows that stay in one micro batch (a DPO pair: 2; a GRPO group: G)."""
    normalizer: Literal["rows", "tokens"]
    """What the loss divides its sum by: rows (sequences, pairs) or completion tokens."""
    row_index_fields: tuple[str, ...] = ()
    """[P] int64 fields that hold row indices (DPO's ``chosen``/``rejected``), rebased in each micro batch."""


def micro_batch_rule(algorithm) -> SplitRule:
    """``algorithm.split_rule()``; ValueError naming the algorithm when it has none (or refuses to split)."""
    split_rule = getattr(algorithm, "split_rule", None)
    if split_rule is None:
        raise ValueError(
            f"{type(algorithm).__name__}: no split_rule(), so its batches cannot be cut into micro batches"
        )
    return split_rule()


def split_batch(batch, k: int, rule: SplitRule) -> list[tuple[object, float]]:
    """Cut ``batch`` into ``min(k, units)`` micro batches of whole units, each with its loss weight.

    Every tensor field whose first dimension is B (rows) is sliced by rows; the fields named in
    ``rule.row_index_fields`` keep the entries that fall in the micro batch, rebased to its first row;
    other fields are shared. Columns are not trimmed, so padded-length constants (Dr. GRPO's T) stay.

    Returns:
        ``(micro_batch, weight)`` pairs in row order; weight ``N_i / N`` with N counted as ``rule.normalizer``
        says (rows, or completion tokens ``completion_mask[:, 1:]``); the weights sum to 1.
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k: expected an int >= 1, got {k!r}")
    R, unit = batch.rows, rule.unit_rows
    if R % unit:
        raise ValueError(f"batch: expected a multiple of unit_rows={unit} rows, got {R}")
    units, n = R // unit, min(k, R // unit)
    sizes = [units // n + (i < units % n) for i in range(n)]
    bounds = [unit * sum(sizes[:i]) for i in range(n + 1)]
    per_row = batch.completion_mask[:, 1:].sum(-1) if rule.normalizer == "tokens" else torch.ones(R)
    cumulative = torch.cat([per_row.new_zeros(1), per_row.cumsum(0)]).tolist()  # one host copy
    counts = [cumulative[b] - cumulative[a] for a, b in zip(bounds, bounds[1:])]
    total = cumulative[-1]
    # an all-empty batch has loss 0 in every micro batch: any weights summing to 1 do
    weights = [c / total for c in counts] if total > 0 else [1.0 / n] * n
    return [(_rows(batch, a, b, rule.row_index_fields), w) for a, b, w in zip(bounds, bounds[1:], weights)]


def _rows(batch, start: int, stop: int, index_fields: tuple[str, ...]) -> object:
    """Rows ``[start, stop)`` of ``batch`` (see :func:`split_batch`)."""
    changes = {}
    for f in dataclasses.fields(batch):
        value = getattr(batch, f.name)
        if f.name in index_fields:
            changes[f.name] = value[(value >= start) & (value < stop)] - start
        elif isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == batch.rows:
            changes[f.name] = value[start:stop]
    return dataclasses.replace(batch, **changes)
