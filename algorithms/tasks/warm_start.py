"""SFT warm start: fit the tiny model to an imperfect teacher, cached on disk, and measure it.

Each step draws ``batch_size`` training prompts and a fresh teacher completion for each (so the
model sees the teacher's error *rate*, not one fixed wrong answer per prompt), and minimises

    L = − Σ_{completion tokens t} log p(y_t | y_<t) / #completion tokens,

over ``bos · prompt · completion · eos`` with the prompt masked out of the loss. The loss is
computed from the decoder's hidden states and the ``lm_head`` weight by hotloop's fused kernel
(``hotloop.kernels.fused_linear_logprob``, which never materialises the ``[N, V]`` logits).

The result is saved with ``save_pretrained`` (safetensors) next to the tokenizer and a
``warm_start.json`` of every setting; a later call with the same settings loads it instead of
training. ``warm_start.json`` is written last, so an interrupted run is never taken for a cache.
"""

from __future__ import annotations

import copy
import json
import math
import random
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from hotloop.algorithms.tasks.tiny_model import build_tiny_model, tiny_llama_config
from hotloop.algorithms.tasks.tokenizer import CharTokenizer
from hotloop.kernels.fused_linear_logprob import fused_linear_logprob

IGNORE_INDEX = -100
_SETTINGS_FILE = "warm_start.json"
_WARMUP_FRACTION = 0.05


def sft_loss(
    model: LlamaForCausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Mean negative log-likelihood of the non-ignored ``labels`` (next-token targets, shifted inside).

    Args:
        input_ids, attention_mask, labels: [B, T] int64; ``labels`` holds ``IGNORE_INDEX`` where no loss.
    Returns:
        scalar float32.
    """
    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    targets = labels[:, 1:].reshape(-1)
    logp = fused_linear_logprob(
        hidden[:, :-1].reshape(targets.numel(), -1), model.lm_head.weight, targets, ignore_index=IGNORE_INDEX
    )
    return -logp.sum() / (targets != IGNORE_INDEX).sum().clamp_min(1)


def _sft_batch(task, tokenizer: CharTokenizer, problems: list, rng: random.Random, error_rate: float):
    """Right-padded ``bos · prompt · teacher completion · eos`` with the prompt masked out of ``labels``."""
    rows, starts = [], []
    for problem in problems:
        prompt = tokenizer.encode(problem.prompt)
        completion = tokenizer.encode(task.teacher(problem, rng, error_rate), add_bos=False)
        rows.append(prompt + completion + [tokenizer.eos_id])
        starts.append(len(prompt))
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), tokenizer.pad_id, dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for i, (row, start) in enumerate(zip(rows, starts)):
        input_ids[i, : len(row)] = torch.tensor(row)
        labels[i, start : len(row)] = input_ids[i, start : len(row)]
    return input_ids, (input_ids != tokenizer.pad_id).long(), labels


def _lr_factor(step: int, steps: int) -> float:
    """Linear warm-up for the first 5% of steps, then cosine decay to 10%."""
    warmup = max(1, int(_WARMUP_FRACTION * steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.45 * (1.0 + math.cos(math.pi * progress))


def sft_warm_start(
    task,
    tokenizer: CharTokenizer,
    *,
    out_dir: Path,
    steps: int = 3000,
    batch_size: int = 128,
    lr: float = 3e-3,
    error_rate: float = 0.7,
    seed: int = 0,
    model_config: LlamaConfig | None = None,
    progress: bool = True,
) -> LlamaForCausalLM:
    """Train (or load from ``out_dir``) a tiny model fitted to ``task.teacher`` at ``error_rate``.

    Args:
        task: has ``alphabet``, ``problems(n, split)``, ``split_size(split)`` and
            ``teacher(problem, rng, error_rate)``.
        tokenizer: covers every character the task writes.
        out_dir: cache directory (created); holds the model, the tokenizer and ``warm_start.json``.
        model_config: defaults to ``tiny_llama_config(tokenizer.vocab_size)``.
    Returns:
        the model in eval mode, float32, on the CPU.
    """
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if not lr > 0:
        raise ValueError(f"lr: expected a positive float, got {lr!r}")
    if not 0.0 <= error_rate <= 1.0:
        raise ValueError(f"error_rate: expected a float in [0, 1], got {error_rate!r}")
    unknown = sorted(set(task.alphabet) - set(tokenizer.alphabet))
    if unknown:
        raise ValueError(f"tokenizer: characters {unknown} that {task!r} writes are not in its alphabet")
    # A copy, because save_pretrained writes ``architectures`` into the model's config.
    config = copy.deepcopy(model_config) if model_config is not None else tiny_llama_config(tokenizer.vocab_size)
    if config.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"model_config: vocab_size {config.vocab_size} < tokenizer.vocab_size {tokenizer.vocab_size}")
    settings = {
        "task": repr(task),
        "alphabet": tokenizer.alphabet,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "error_rate": error_rate,
        "seed": seed,
        "model_config": config.to_diff_dict(),
    }
    settings["model_config"].pop("architectures", None)
    out_dir = Path(out_dir)
    cached = _load_cached(out_dir, settings)
    if cached is not None:
        return cached
    model = build_tiny_model(config, seed)
    _train(model, task, tokenizer, settings, progress)
    model.eval()
    (out_dir / _SETTINGS_FILE).unlink(missing_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save(out_dir)
    (out_dir / _SETTINGS_FILE).write_text(json.dumps(settings, indent=1, sort_keys=True))
    return model


def _load_cached(out_dir: Path, settings: dict) -> LlamaForCausalLM | None:
    path = out_dir / _SETTINGS_FILE
    if not path.is_file() or json.loads(path.read_text()) != json.loads(json.dumps(settings)):
        return None
    return LlamaForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()


def _train(model: LlamaForCausalLM, task, tokenizer: CharTokenizer, settings: dict, progress: bool) -> None:
    # One intra-op thread: the matmuls are ~[1400, 64] x [64, 128], too small to split, and on a
    # shared CPU a second thread waiting for a busy core made steps 5-10x slower in measurements.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train_steps(model, task, tokenizer, settings, progress)
    finally:
        torch.set_num_threads(threads)


def _train_steps(model: LlamaForCausalLM, task, tokenizer: CharTokenizer, settings: dict, progress: bool) -> None:
    steps, batch_size = settings["steps"], settings["batch_size"]
    pool = task.problems(task.split_size("train"), "train")
    rng = random.Random(settings["seed"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["lr"], betas=(0.9, 0.98), weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, steps))
    model.train()
    bar = tqdm(range(steps), desc="SFT warm start", disable=not progress)
    for step in bar:
        batch = _sft_batch(task, tokenizer, rng.sample(pool, min(batch_size, len(pool))), rng, settings["error_rate"])
        loss = sft_loss(model, *batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")


@torch.no_grad()
def complete(
    model: LlamaForCausalLM,
    tokenizer: CharTokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    batch_size: int = 512,
) -> list[str]:
    """Completions of ``prompts`` (greedy when ``temperature == 0``), decoded up to the first eos.

    Prompts are left-padded; ``generate`` derives positions from the attention mask and keeps a KV cache.
    """
    if temperature < 0:
        raise ValueError(f"temperature: expected >= 0, got {temperature!r}")
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(prompts), batch_size):
        rows = [tokenizer.encode(p) for p in prompts[start : start + batch_size]]
        width = max(map(len, rows))
        ids = torch.tensor([[tokenizer.pad_id] * (width - len(r)) + r for r in rows])
        sampling = (
            {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
            if temperature > 0
            else {"do_sample": False}
        )
        gen = model.generate(
            input_ids=ids,
            attention_mask=(ids != tokenizer.pad_id).long(),
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_id,
            eos_token_id=tokenizer.eos_id,
            **sampling,
        )
        out += [tokenizer.decode(row) for row in gen[:, width:]]
    model.train(was_training)
    return out


def greedy_accuracy(
    model: LlamaForCausalLM, tokenizer: CharTokenizer, task, problems: list, max_new_tokens: int
) -> float:
    """Mean ``task.score`` of greedy completions of ``problems``."""
    return sampled_accuracy(model, tokenizer, task, problems, max_new_tokens, temperature=0.0)


def sampled_accuracy(
    model: LlamaForCausalLM,
    tokenizer: CharTokenizer,
    task,
    problems: list,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
) -> float:
    """Mean ``task.score`` of one completion per problem sampled at ``temperature`` (0 = greedy)."""
    if not problems:
        raise ValueError("problems: expected at least one problem, got none")
    texts = complete(
        model, tokenizer, [p.prompt for p in problems], max_new_tokens=max_new_tokens, temperature=temperature
    )
    return sum(task.score(p, t) for p, t in zip(problems, texts)) / len(problems)
