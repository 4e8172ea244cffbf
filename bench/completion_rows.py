"""What skipping prompt rows in the LM head saves: one GRPO training step of a SmolLM2-135M-shaped model.

    python -m bench.completion_rows [--prompts 8] [--samples 4] [--prompt-len 40] [--completion-len 48] [--reps 2]

Model: ``LlamaForCausalLM`` with SmolLM2-135M's shape (hidden 576, 30 layers, 9 heads, 3 KV heads, intermediate
1536, vocabulary 49152, tied embeddings), random weights, float32. Batch: ``prompts × samples`` rows, prompts of
``prompt-len ± 4`` tokens, completions of ``completion-len`` tokens (a few shorter), right-padded. One step = the
policy's ``token_logprobs`` → DAPO ``grpo_loss`` → ``backward`` (``algorithms/grpo.py``'s loss, no KL term):

- ``all rows``: ``token_logprobs`` without ``completion_mask`` (what the algorithms did before): the fused LM head
  runs on every non-padding position, prompts included;
- ``completion rows``: ``completion_mask=`` given (what they do now): prompt rows are ignored before any matmul.

The backbone runs on every position in both (the completion attends to the prompt); only the LM-head work shrinks,
by the prompt share of the rows. The ``lm head`` section times ``fused_linear_logprob`` fwd+bwd alone on the
step's hidden states, both ways. Timed in interleaved rounds (``bench/_harness.py``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench._harness import Contender, Row, time_section
from bench._results import RESULTS_DIR, collect_meta, device_slug, write_results
from hotloop.algorithms.logprobs import IGNORE_INDEX, token_logprobs
from hotloop.kernels.fused_linear_logprob import fused_linear_logprob
from hotloop.kernels.losses import grpo_loss

SMOL_135M = dict(
    hidden_size=576,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    intermediate_size=1536,
    vocab_size=49152,
    tie_word_embeddings=True,
)


def build_model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**SMOL_135M, max_position_embeddings=2048)).eval()


def make_batch(rows: int, prompt_len: int, completion_len: int, vocab: int, seed: int = 0):
    """(input_ids, attention_mask, completion_mask) [rows, L], right-padded; prompts ± 4, some completions shorter."""
    g = torch.Generator().manual_seed(seed)
    plen = prompt_len + torch.randint(-4, 5, (rows,), generator=g)
    clen = torch.where(torch.arange(rows) % 4 == 3, completion_len * 3 // 4, completion_len)
    length = int((plen + clen).max())
    ids = torch.randint(3, vocab, (rows, length), generator=g)
    pos = torch.arange(length)
    attention = (pos < (plen + clen).unsqueeze(1)).long()
    completion = ((pos >= plen.unsqueeze(1)) & (attention == 1)).long()
    return ids.masked_fill(attention == 0, 0), attention, completion


def step_contender(model, batch, advantages, with_mask: bool) -> Contender:
    ids, attention, completion = batch
    mask = completion[:, 1:]

    def step() -> None:
        logp = token_logprobs(model, ids, attention, completion_mask=completion if with_mask else None)
        grpo_loss(logp, advantages, mask, old_logp=logp.detach(), loss_type="dapo").loss.backward()

    return Contender(step, lambda: model.zero_grad(set_to_none=True))


def head_contender(hidden, weight, targets) -> Contender:
    def step() -> None:
        logp = fused_linear_logprob(hidden, weight, targets, ignore_index=IGNORE_INDEX)
        logp.sum().backward()

    def free() -> None:
        hidden.grad = weight.grad = None

    return Contender(step, free)


def run(args) -> list[Row]:
    model = build_model()
    rows = args.prompts * args.samples
    batch = make_batch(rows, args.prompt_len, args.completion_len, SMOL_135M["vocab_size"])
    ids, attention, completion = batch
    counted = int(attention[:, 1:].sum())
    completion_rows = int(completion[:, 1:].sum())
    share = f"{completion_rows} of {counted} rows ({1 - completion_rows / counted:.0%} prompt)"
    size = f"135M-shape, {rows} rows × {ids.shape[1]} tokens"
    advantages = torch.randn(rows)
    entries = [
        (
            Row(name, "grpo step fwd+bwd", size, note=f"LM head on {what}"),
            step_contender(model, batch, advantages, with_mask),
        )
        for name, with_mask, what in (("all rows", False, f"{counted} rows"), ("completion rows", True, share))
    ]
    out = time_section(entries, warmup=args.warmup, reps=args.reps, device="cpu")
    with torch.no_grad():
        hidden = model.model(input_ids=ids, attention_mask=attention).last_hidden_state[:, :-1]
    hidden = hidden.reshape(-1, hidden.shape[-1]).clone().requires_grad_(True)
    weight = model.lm_head.weight.detach().clone().requires_grad_(True)
    targets = {
        k: ids[:, 1:].masked_fill(m[:, 1:] == 0, IGNORE_INDEX).reshape(-1)
        for k, m in (("all rows", attention), ("completion rows", completion))
    }
    heads = [
        (
            Row(k, "lm head fwd+bwd", size, note=f"fused_linear_logprob, {int((t != IGNORE_INDEX).sum())} rows"),
            head_contender(hidden, weight, t),
        )
        for k, t in targets.items()
    ]
    return out + time_section(heads, warmup=args.warmup, reps=max(args.reps, 3), device="cpu")


def main(argv: list[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(prog="python -m bench.completion_rows", description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=40)
    parser.add_argument("--completion-len", type=int, default=48)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    rows = run(args)
    for r in rows:
        print(f"{r.mode:<18} {r.impl:<16} {r.median_ms:.0f} ms  {r.note}", flush=True)
    meta = collect_meta(
        "cpu",
        slug=device_slug("cpu"),
        threads=torch.get_num_threads(),
        notes=["× all rows: median over the `all rows` median of the same section."],
    )
    paths = write_results("completion_rows", rows, meta, ratios_to=("all rows",), out_dir=args.out_dir)
    print(paths["md"].read_text())
    return paths


if __name__ == "__main__":
    main()
