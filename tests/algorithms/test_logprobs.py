"""token_logprobs with a completion mask: same log-probs and gradients at the completion tokens as without it,
0 at the prompt, and the LM head sees only the completion rows (the backbone still sees every position)."""

import pytest
import torch

from hotloop.algorithms import logprobs
from hotloop.algorithms.tasks.tiny_model import build_tiny_model, tiny_llama_config


@pytest.fixture
def batch():
    torch.manual_seed(0)
    model = build_tiny_model(tiny_llama_config(37, hidden_size=32, layers=1, intermediate=64), seed=0)
    input_ids = torch.randint(3, 37, (3, 9))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, :2] = 0  # left padding
    completion_mask = torch.zeros_like(input_ids)
    completion_mask[0, 5:], completion_mask[1, 4:], completion_mask[2, 6:] = 1, 1, 1
    return model, input_ids, attention_mask, completion_mask


def test_completion_mask_matches_full_and_skips_prompt_rows(batch, monkeypatch):
    model, input_ids, attention_mask, completion_mask = batch
    full = logprobs.token_logprobs(model, input_ids, attention_mask)
    (grad_full,) = torch.autograd.grad((full * completion_mask[:, 1:]).sum(), model.lm_head.weight)
    seen = {}

    def spy(hidden, weight, targets, bias=None, **kw):
        seen["counted"] = int((targets != kw["ignore_index"]).sum())
        return fused(hidden, weight, targets, bias, **kw)

    fused = logprobs.fused_linear_logprob
    monkeypatch.setattr(logprobs, "fused_linear_logprob", spy)
    part = logprobs.token_logprobs(model, input_ids, attention_mask, completion_mask=completion_mask)
    (grad_part,) = torch.autograd.grad(part.sum(), model.lm_head.weight)
    counted = completion_mask[:, 1:].bool()
    assert seen["counted"] == int(counted.sum()) < counted.numel()
    torch.testing.assert_close(part[counted], full[counted], rtol=1e-5, atol=1e-6)
    assert bool((part[~counted] == 0).all())
    torch.testing.assert_close(grad_part, grad_full, rtol=1e-5, atol=1e-6)
    seq = logprobs.sequence_logprobs(model, input_ids, attention_mask, completion_mask)
    torch.testing.assert_close(seq, (full * counted).sum(-1), rtol=1e-5, atol=1e-5)


def test_completion_mask_shape_is_checked(batch):
    model, input_ids, attention_mask, _ = batch
    with pytest.raises(ValueError, match="completion_mask: expected shape"):
        logprobs.token_logprobs(model, input_ids, attention_mask, completion_mask=input_ids[:, 1:])
