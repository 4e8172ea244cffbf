"""A few online GRPO steps with ``TorchEngine`` and the trainer in bf16 autocast, on a random-weight Llama.

The real plan's model is 0.5B-class in its transformer (Qwen2.5-0.5B's widths: hidden 896, 24 layers, MLP 4864,
14 heads, 2 KV heads; ~0.36B parameters outside the tiny character vocabulary). After the steps, the sampler's
reported log-probs of fresh completions must equal a fresh forward of the trained model on the same tokens.

Written against the loop API of this branch (``make_engine``, ``LoopConfig``) in this one function, because that
API is being changed elsewhere; adapt ``run_loop`` when it moves.
"""

from __future__ import annotations

import tempfile
import time

import torch

from hotloop.algorithms.grpo import GRPO, GRPOConfig
from hotloop.algorithms.logprobs import token_logprobs
from hotloop.algorithms.tasks.arithmetic import Problem
from hotloop.algorithms.tasks.tiny_model import build_tiny_model, tiny_llama_config
from hotloop.algorithms.tasks.tokenizer import CharTokenizer
from hotloop.runtime.engine import SamplingParams
from hotloop.runtime.engine_factory import make_engine
from hotloop.runtime.loop import OnlineLoop
from hotloop.runtime.loop_config import LoopConfig
from hotloop.runtime.trainer import Trainer, TrainerConfig, make_reference

from ._report import Check

LOGPROB_TOL = 2e-3  # nats: sampler (KV cache, fp32) vs one fresh fp32 forward; TF32 stays off


def run_loop(cfg: dict, device: torch.device) -> tuple[list[Check], dict]:
    """Run ``cfg['steps']`` loop steps; return the sampler-vs-forward check and what the steps measured."""
    tok = CharTokenizer("0123456789+=")
    problems = [Problem(prompt=f"{a}+{b}=", answer=str(a + b)) for a in range(10) for b in range(10)]
    config = tiny_llama_config(
        tok.vocab_size,
        hidden_size=cfg["hidden_size"],
        layers=cfg["layers"],
        heads=cfg["heads"],
        kv_heads=cfg["kv_heads"],
        intermediate=cfg["intermediate"],
        max_position=128,
    )
    model = build_tiny_model(config, seed=0).to(device)
    params = sum(p.numel() for p in model.parameters())
    trainer = Trainer(model, TrainerConfig(lr=1e-5, bf16_autocast=True), reference=make_reference(model))
    engine = make_engine(model, kind="torch", pad_token_id=tok.pad_id, eos_token_id=tok.eos_id, seed=0)
    algo = GRPO(
        GRPOConfig(samples_per_prompt=cfg["samples"], loss_type="dapo", beta=0.05),
        pad_token_id=tok.pad_id,
        max_completion_length=cfg["max_new_tokens"],
    )
    sampling = SamplingParams(max_new_tokens=cfg["max_new_tokens"])
    with tempfile.TemporaryDirectory() as out_dir:
        loop = OnlineLoop(
            LoopConfig(
                steps=cfg["steps"],
                sync_every=1,
                prompts_per_step=cfg["prompts"],
                eval_every=0,
                checkpoint_every=0,
                out_dir=out_dir,
            ),
            trainer=trainer,
            engine=engine,
            algorithm=algo,
            reward_fn=lambda ps, texts: torch.rand(len(texts)),
            problems=problems,
            tokenizer=tok,
            sampling=sampling,
            progress=False,
        )
        start = time.perf_counter()
        result = loop.run()
        wall = time.perf_counter() - start
    err = _sampler_vs_forward(model, engine, tok, sampling)
    info = {
        "parameters": params,
        "steps": result.next_step,
        "wall_s": round(wall, 2),
        "phase_s": {k: round(v, 2) for k, v in result.phase_seconds.items()},
    }
    name = f"{params / 1e6:.0f}M-parameter Llama, {result.next_step} steps: sampler logprobs = fresh forward"
    return [Check("loop", name, err, LOGPROB_TOL, "abs")], info


@torch.no_grad()
def _sampler_vs_forward(model, engine, tok, sampling) -> float:
    """max |sampler log-prob − fresh forward log-prob| (nats) over completions of one prompt."""
    prompt = tok.encode("3+4=")
    completions = engine.generate([prompt], SamplingParams(max_new_tokens=sampling.max_new_tokens, n=4, seed=1))
    worst = 0.0
    for c in completions:
        ids = torch.tensor([prompt + c.token_ids], device=engine.device)
        fresh = token_logprobs(model, ids, torch.ones_like(ids))[0, len(prompt) - 1 :]
        worst = max(worst, (fresh.double().cpu() - torch.tensor(c.logprobs, dtype=torch.float64)).abs().max().item())
    return worst
