"""Small OnlineLoops on the tiny Llama for the runtime tests and the kill-and-resume child process.

Everything is built from seeds (model weights, sampler, prompt draw), so two loops built with the
same arguments take bit-identical steps.
"""

import copy

import torch

from hotloop.algorithms.dpo import DPOConfig, OnlineDPO
from hotloop.algorithms.grpo import GRPO, GRPOConfig
from hotloop.algorithms.tasks.arithmetic import Problem
from hotloop.algorithms.tasks.tiny_model import build_tiny_model, tiny_llama_config
from hotloop.algorithms.tasks.tokenizer import CharTokenizer
from hotloop.runtime.engine import SamplingParams
from hotloop.runtime.engine_factory import make_engine
from hotloop.runtime.loop import OnlineLoop
from hotloop.runtime.loop_config import LoopConfig
from hotloop.runtime.sync_policy import SyncConfig
from hotloop.runtime.torch_engine import TorchEngine
from hotloop.runtime.trainer import Trainer, TrainerConfig, make_reference

TOK = CharTokenizer("0123456789+=")
PROBLEMS = [Problem(prompt=f"{a}+{b}=", answer=str(a + b)) for a in range(7) for b in range(5)]


def sevens(problems, texts):
    """Reward: fraction of '7' characters in the completion (a rule a tiny model can learn quickly)."""
    return torch.tensor([t.count("7") / max(1, len(t)) for t in texts], dtype=torch.float32)


def random_reward(problems, texts):
    """Reward without ties (from the global torch RNG, which checkpoints restore), so every step trains."""
    return torch.rand(len(texts))


class HostOnlyEngine(TorchEngine):
    """A real ``TorchEngine`` on its own copy that, like ``SGLangEngine``, exposes no in-process module.

    The loop must then send it state dicts and checkpoint a host copy of what it last sent.
    """

    @property
    def local_model(self) -> None:
        return None

    def shares_weights_with(self, module) -> bool:
        return False


def make_loop(
    out_dir,
    *,
    sync_every,
    steps,
    algorithm="dpo",
    reward=random_reward,
    lr=1e-3,
    seed=0,
    checkpoint_every=0,
    model_seed=3,
    samples=4,
    grad_accum_steps=1,
    max_grad_norm=1.0,
    eps=1e-8,
    max_new_tokens=4,
    host_only_engine=False,
    sync_check=True,
):
    """An ``OnlineLoop`` of online DPO (``algorithm="dpo"``) or GRPO (``"grpo"``, ``"grpo-rows"``) on the tiny Llama."""
    model = build_tiny_model(
        tiny_llama_config(TOK.vocab_size, hidden_size=32, layers=1, intermediate=64), seed=model_seed
    )
    trainer = Trainer(
        model,
        TrainerConfig(lr=lr, eps=eps, grad_accum_steps=grad_accum_steps, max_grad_norm=max_grad_norm),
        reference=make_reference(model),
    )
    engine = make_engine(model, pad_token_id=TOK.pad_id, eos_token_id=TOK.eos_id, seed=0)
    if host_only_engine:  # its own copy of the weights, reached only through sync_weights
        engine = HostOnlyEngine(
            copy.deepcopy(model).requires_grad_(False), pad_token_id=TOK.pad_id, eos_token_id=TOK.eos_id, seed=0
        )
    config = LoopConfig(
        steps=steps,
        sync_every=sync_every,
        prompts_per_step=4,
        eval_every=0,
        checkpoint_every=checkpoint_every,
        out_dir=str(out_dir),
        seed=seed,
        sync=SyncConfig(check=sync_check),
    )
    if algorithm == "dpo":
        algo = OnlineDPO(DPOConfig(beta=0.5, samples_per_prompt=samples), pad_token_id=TOK.pad_id)
    else:  # "grpo": dapo, a token-mean loss; "grpo-rows": grpo, a mean of per-row means
        loss_type = "dapo" if algorithm == "grpo" else "grpo"
        algo = GRPO(
            GRPOConfig(samples_per_prompt=samples, loss_type=loss_type, beta=0.05),
            pad_token_id=TOK.pad_id,
            max_completion_length=max_new_tokens,
        )
    return OnlineLoop(
        config,
        trainer=trainer,
        engine=engine,
        algorithm=algo,
        reward_fn=reward,
        problems=PROBLEMS,
        tokenizer=TOK,
        sampling=SamplingParams(max_new_tokens=max_new_tokens),
        progress=False,
    )
