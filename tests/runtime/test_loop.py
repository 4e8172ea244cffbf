"""OnlineLoop bookkeeping on a tiny model: sync schedule and staleness, sampler log-probs vs a fresh
forward, learning signal, and exact resume after an interruption."""

import math
import os
import signal

import pytest
import torch

from hotloop.algorithms.base import pack_rows
from hotloop.algorithms.dpo import DPOConfig, OnlineDPO
from hotloop.algorithms.logprobs import token_logprobs
from hotloop.algorithms.tasks.arithmetic import Problem
from hotloop.algorithms.tasks.tiny_model import build_tiny_model, tiny_llama_config
from hotloop.algorithms.tasks.tokenizer import CharTokenizer
from hotloop.runtime.engine import SamplingParams
from hotloop.runtime.loop import LoopConfig, OnlineLoop, make_engine
from hotloop.runtime.torch_engine import TorchEngine
from hotloop.runtime.trainer import Trainer, TrainerConfig, make_reference
from tests.helpers import assert_close

TOK = CharTokenizer("0123456789+=")
PROBLEMS = [Problem(prompt=f"{a}+{b}=", answer=str(a + b)) for a in range(7) for b in range(5)]


def sevens(problems, texts):
    """Reward: fraction of '7' characters in the completion (a rule a tiny model can learn quickly)."""
    return torch.tensor([t.count("7") / max(1, len(t)) for t in texts], dtype=torch.float32)


def random_reward(problems, texts):
    """Reward without ties, so every group has a contrast and every step trains."""
    return torch.rand(len(texts))


def make_loop(tmp_path, *, sync_every, steps, reward=random_reward, lr=1e-3, seed=0, checkpoint_every=0,
              model_seed=3, samples=4):
    model = build_tiny_model(tiny_llama_config(TOK.vocab_size, hidden_size=32, layers=1, intermediate=64),
                             seed=model_seed)
    trainer = Trainer(model, TrainerConfig(lr=lr), reference=make_reference(model))
    engine = make_engine(model, sync_every=sync_every, pad_token_id=TOK.pad_id, eos_token_id=TOK.eos_id, seed=0)
    config = LoopConfig(steps=steps, sync_every=sync_every, prompts_per_step=4, eval_every=0,
                        checkpoint_every=checkpoint_every, out_dir=str(tmp_path), seed=seed)
    algorithm = OnlineDPO(DPOConfig(beta=0.5, samples_per_prompt=samples), pad_token_id=TOK.pad_id)
    return OnlineLoop(config, trainer=trainer, engine=engine, algorithm=algorithm, reward_fn=reward,
                      problems=PROBLEMS, tokenizer=TOK, sampling=SamplingParams(max_new_tokens=4), progress=False)


@pytest.mark.parametrize("sync_every, expected", [
    (1, [0, 0, 0, 0, 0, 0, 0]),
    (3, [0, 1, 2, 0, 1, 2, 0]),
    (math.inf, [0, 1, 2, 3, 4, 5, 6]),
    (None, [0, 1, 2, 3, 4, 5, 6]),
])
def test_sync_happens_every_s_steps_and_staleness_is_step_mod_s(tmp_path, sync_every, expected):
    loop = make_loop(tmp_path, sync_every=sync_every, steps=7)
    initial = {k: v.clone() for k, v in loop.engine.model.state_dict().items()}
    synced_at = []
    original = loop.engine.sync_weights
    loop.engine.sync_weights = lambda version, state=None: (synced_at.append(version), original(version, state))
    result = loop.run()
    assert [r["staleness"] for r in result.records] == expected
    period = LoopConfig(sync_every=sync_every).sync_period
    assert synced_at == ([t for t in range(7) if t % period == 0] if period else [])
    assert loop.zero_copy == (sync_every == 1)
    if period is None:  # offline: the sampler's weights never change
        assert all(torch.equal(v, initial[k]) for k, v in loop.engine.model.state_dict().items())
    assert result.phase_seconds["sync"] >= 0 and all("time/sampling" in r for r in result.records)


def test_zero_copy_engine_with_lagging_sync_is_refused(tmp_path):
    loop = make_loop(tmp_path, sync_every=1, steps=1)
    with pytest.raises(ValueError, match="engine"):
        OnlineLoop(LoopConfig(steps=1, sync_every=2, out_dir=str(tmp_path)), trainer=loop.trainer, engine=loop.engine,
                   algorithm=loop.algorithm, reward_fn=random_reward, problems=PROBLEMS, tokenizer=TOK,
                   sampling=SamplingParams())


def test_sampler_logprobs_equal_token_logprobs_of_a_fresh_forward():
    model = build_tiny_model(tiny_llama_config(TOK.vocab_size, hidden_size=48, layers=2), seed=1)
    engine = TorchEngine(model, pad_token_id=TOK.pad_id, eos_token_id=TOK.eos_id, seed=5)
    prompts = [TOK.encode(p) for p in ("1+2=", "31+4=", "5=", "12+34=")]
    completions = engine.generate(prompts, SamplingParams(temperature=0.7, max_new_tokens=7, n=3))
    ids, mask, comp = pack_rows([prompts[c.prompt_index] for c in completions], [c.token_ids for c in completions],
                                TOK.pad_id)
    with torch.no_grad():
        fresh = token_logprobs(model, ids, mask, temperature=0.7)
    picked = fresh[comp[:, 1:].bool()]
    sampler = torch.tensor([lp for c in completions for lp in c.logprobs], dtype=torch.float64)
    assert_close(picked, sampler, torch.float32, "sampler vs fresh forward")


def test_short_online_loop_raises_reward(tmp_path):
    loop = make_loop(tmp_path, sync_every=1, steps=24, reward=sevens, lr=1e-2, samples=6)
    records = loop.run().records
    first = sum(r["reward"] for r in records[:4]) / 4
    last = sum(r["reward"] for r in records[-4:]) / 4
    assert last > first + 0.2, (first, last)


def test_interrupted_then_resumed_run_matches_an_uninterrupted_one_bit_for_bit(tmp_path):
    steps, stop_at = 7, 4
    straight = make_loop(tmp_path / "a", sync_every=3, steps=steps, reward=sevens, lr=1e-2)
    straight.run()

    calls = []

    def interrupting_reward(problems, texts):
        calls.append(1)
        if len(calls) == stop_at + 1:
            os.kill(os.getpid(), signal.SIGTERM)   # arrives mid-step; the loop finishes it, checkpoints, stops
        return sevens(problems, texts)

    first = make_loop(tmp_path / "b", sync_every=3, steps=steps, reward=interrupting_reward, lr=1e-2)
    result = first.run()
    assert result.interrupted and result.next_step == stop_at + 1
    resumed = make_loop(tmp_path / "b", sync_every=3, steps=steps, reward=sevens, lr=1e-2)
    assert resumed.run(resume=True).next_step == steps
    for (name, a), b in zip(straight.trainer.model.state_dict().items(), resumed.trainer.model.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(straight.engine.model.state_dict().values(), resumed.engine.model.state_dict().values()):
        assert torch.equal(a, b)
    lines_a = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    lines_b = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert len(lines_a) == len(lines_b) == steps


def test_loop_config_rejects_sync_every_below_one():
    with pytest.raises(ValueError, match="sync_every"):
        LoopConfig(sync_every=0)
