"""Metrics of one step's samples that people read: lengths, truncation, entropy, each reward's share.

All come from what the loop already has, at no extra forward pass:

- ``completion/length_mean``, ``completion/length_max``: generated tokens per completion (a stop token counts).
- ``completion/truncated``: fraction that ran out of ``max_new_tokens`` (``finish_reason == "length"``); a high
  value means the budget is too small for the task and the reward sees cut-off answers.
- ``entropy``: mean over every sampled token of ``− log p_sampler(token)``, the Monte Carlo estimate of the
  per-token entropy of the sampler's tempered distribution ``softmax(logits / T)``, from the engine's
  log-probs (before top-p/top-k; the sampler's weights, which lag the trainer's by the staleness).
- whatever the algorithm counted while building the batch (its ``last_batch_metrics``, e.g. online DPO's
  ``pairs/skipped_*`` reasons, :mod:`hotloop.algorithms.pairing`).
- ``reward/<kind>``: mean of each source of a :class:`hotloop.algorithms.rewards.mixture.WeightedMixture`
  (unweighted), read from the mixture's ``last_components``; absent for a single reward.
"""

from __future__ import annotations

import torch

from hotloop.runtime.engine import Completion


def rollout_metrics(completions: list[Completion], reward_fn=None, algorithm=None) -> dict[str, float]:
    """Length, truncation and entropy of ``completions``, per-source rewards of a mixture ``reward_fn`` and the
    ``algorithm``'s batch counts."""
    if not completions:
        return {}
    lengths = [len(c.token_ids) for c in completions]
    tokens = sum(lengths)
    out = {
        "completion/length_mean": tokens / len(lengths),
        "completion/length_max": float(max(lengths)),
        "completion/truncated": sum(c.finish_reason == "length" for c in completions) / len(completions),
    }
    if tokens:
        out["entropy"] = -sum(sum(c.logprobs) for c in completions) / tokens
    components: dict[str, torch.Tensor] = getattr(reward_fn, "last_components", None) or {}
    out.update({f"reward/{name}": values.float().mean().item() for name, values in components.items()})
    out.update(getattr(algorithm, "last_batch_metrics", None) or {})
    return out
