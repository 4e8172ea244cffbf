"""Rewards from a model or a rule: a sequence classifier's logit, or any Python scoring function.

:class:`SequenceClassifierReward` wraps any ``AutoModelForSequenceClassification`` (a trained
reward model such as Skywork-Reward, or a tiny random one in tests): the text
``prompt + completion`` is scored in batches of ``batch_size`` and the logit of ``label`` (0,
i.e. the single logit of a one-label reward head) is the reward. The model reads the last
non-pad token, so ``config.pad_token_id`` must be set; inputs are right-padded.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from hotloop.algorithms.rewards.base import check_batch
from hotloop.algorithms.tasks.tokenizer import CharTokenizer


def encode(tokenizer, text: str, *, special: bool) -> list[int]:
    """Token ids of ``text`` for a :class:`CharTokenizer` or a Hugging Face tokenizer.

    ``special`` adds the leading special tokens (bos) the tokenizer normally adds.
    """
    if isinstance(tokenizer, CharTokenizer):
        return tokenizer.encode(text, add_bos=special)
    return tokenizer.encode(text, add_special_tokens=special)


def pad_id(tokenizer) -> int:
    """The padding id of a :class:`CharTokenizer` or a Hugging Face tokenizer (eos if it has none)."""
    if isinstance(tokenizer, CharTokenizer):
        return tokenizer.pad_id
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def right_pad(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` [B, T] int64 and ``attention_mask`` [B, T] int64 of right-padded ``rows``."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids.to(device), mask.to(device)


class SequenceClassifierReward:
    """Reward = logit ``label`` of a sequence classifier on ``prompt + completion``."""

    def __init__(self, model, tokenizer, *, batch_size: int = 32, label: int = 0) -> None:
        num_labels = getattr(model.config, "num_labels", None)
        if num_labels is None or not hasattr(model, "score"):
            raise TypeError(f"model: expected a *ForSequenceClassification model, got {type(model).__name__}")
        if not isinstance(label, int) or not 0 <= label < num_labels:
            raise ValueError(f"label: expected an int in [0, {num_labels}), got {label!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        if model.config.pad_token_id is None:
            raise ValueError("model: expected config.pad_token_id to be set (the model reads the last non-pad token)")
        self.model, self.tokenizer, self.batch_size, self.label = model, tokenizer, batch_size, label

    @torch.no_grad()
    def __call__(self, problems: list, completions: list[str]) -> torch.Tensor:
        check_batch(problems, completions)
        device = next(self.model.parameters()).device
        rows = [encode(self.tokenizer, p.prompt + c, special=True) for p, c in zip(problems, completions)]
        out = []
        for start in range(0, len(rows), self.batch_size):
            ids, mask = right_pad(rows[start : start + self.batch_size], self.model.config.pad_token_id, device)
            out.append(self.model(input_ids=ids, attention_mask=mask).logits[:, self.label].float().cpu())
        return torch.cat(out) if out else torch.zeros(0)


class RuleBasedReward:
    """Reward = ``fn(problem, completion)`` for each pair, e.g. ``PreferenceTask().score``."""

    def __init__(self, fn: Callable[[object, str], float]) -> None:
        if not callable(fn):
            raise TypeError(f"fn: expected a callable (problem, completion) -> float, got {type(fn).__name__}")
        self.fn = fn

    def __call__(self, problems: list, completions: list[str]) -> torch.Tensor:
        check_batch(problems, completions)
        return torch.tensor([float(self.fn(p, c)) for p, c in zip(problems, completions)], dtype=torch.float32)
