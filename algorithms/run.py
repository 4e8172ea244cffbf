"""One run's composition: a ``RunConfig`` → policy, tokenizer, task, reward, engine, algorithm, loop.

:func:`run` is what ``hotloop demo`` and ``hotloop train`` execute: it builds the pieces
(:func:`build_setup`: the tiny model's cached SFT warm start or ``model.path``, the train/test
problems, the reward), writes ``run_config.json``, evaluates the initial policy (greedy held-out
accuracy, :func:`make_evaluate`), runs :class:`hotloop.runtime.loop.OnlineLoop` and evaluates again;
the summary and its plot are :mod:`hotloop.algorithms.summary`'s. The experiments' runner
(:mod:`hotloop.algorithms.experiments._grid`) builds their runs from the same pieces.

Everything runs on ``model.device`` (:func:`resolve_device`): the SFT warm start trains on the
CPU, then policy, reference, sampler copy and loaded reward or judge models move there.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path

import torch

from hotloop.algorithms.base import BuildContext, pack_rows
from hotloop.algorithms.config import ALGORITHMS, RunConfig, SamplingConfig
from hotloop.algorithms.loader import run_config_json
from hotloop.algorithms.logprobs import sequence_logprobs, token_logprobs
from hotloop.algorithms.rewards.build import build_reward
from hotloop.algorithms.rewards.reward_model import encode
from hotloop.algorithms.summary import write_summary
from hotloop.algorithms.tasks.arithmetic import Problem, in_test_split
from hotloop.algorithms.tasks.tokenizer import raw_tokenizer
from hotloop.runtime import distributed
from hotloop.runtime.engine import SamplingParams
from hotloop.runtime.engine_factory import make_engine
from hotloop.runtime.loop import LoopResult, OnlineLoop
from hotloop.runtime.torch_engine import TorchEngine
from hotloop.runtime.trainer import Trainer, make_reference

RUN_CONFIG = "run_config.json"
"""The run's whole config, written into ``loop.out_dir`` when a run starts (``hotloop export`` reads it)."""


@dataclasses.dataclass
class Setup:
    """The pieces one run is built from (:func:`build_setup`)."""

    model: torch.nn.Module
    tokenizer: object
    train: list
    test: list
    reward_fn: object
    warm_start_seconds: float
    device: torch.device


def builtin_task(config: RunConfig):
    """The built-in task ``config.task`` names (arithmetic, preference or word_problems), seeded by ``loop.seed``."""
    from hotloop.algorithms.tasks.arithmetic import ArithmeticTask
    from hotloop.algorithms.tasks.preference import PreferenceTask
    from hotloop.algorithms.tasks.word_problems import WordProblemsTask

    if config.task.name == "arithmetic":
        return ArithmeticTask(config.task.digits, config.task.op, config.loop.seed)
    if config.task.name == "word_problems":
        return WordProblemsTask(config.task.word_steps, config.loop.seed)
    return PreferenceTask(seed=config.loop.seed)


def _jsonl_problems(path: str) -> tuple[list[Problem], list[Problem]]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    problems = [Problem(prompt=r["prompt"], answer=str(r.get("answer", ""))) for r in rows]
    return ([p for p in problems if not in_test_split(p.prompt)], [p for p in problems if in_test_split(p.prompt)])


def resolve_device(name: str) -> torch.device:
    """``model.device`` as a device: "auto" → cuda when available, else cpu; an unavailable cuda is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"model.device: got {name!r}, but CUDA is not available here (torch.cuda.is_available() "
            f"is False; torch {torch.__version__}, built with CUDA {torch.version.cuda}); "
            f"expected 'cpu' or 'auto'"
        )
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"model.device: expected a cuda index below {torch.cuda.device_count()}, got {name!r}")
    return device


def build_setup(config: RunConfig, *, progress: bool) -> Setup:
    """Policy (on ``model.device``), tokenizer, train/test problems and reward for ``config`` (warm-starting the
    tiny model)."""
    device = resolve_device(config.model.device)
    task = None if config.task.name == "jsonl" else builtin_task(config)
    t0 = time.perf_counter()
    model, tokenizer = load_policy(config, task, progress=progress)
    model = model.to(device)
    warm = time.perf_counter() - t0
    if task is None:
        train, test = _jsonl_problems(config.task.prompts)
    else:
        train = task.problems(task.split_size("train"), "train")
        test = task.problems(min(config.task.eval_problems, task.split_size("test")), "test")
    reward_fn = build_reward(config.reward, task=task, tokenizer=raw_tokenizer(tokenizer), policy=model, device=device)
    return Setup(model, tokenizer, train, test[: config.task.eval_problems], reward_fn, warm, device)


def load_policy(config: RunConfig, task, *, progress: bool) -> tuple[torch.nn.Module, object]:
    """The initial policy (float32, CPU) and the run's tokenizer: ``model.path`` (HF directory or ``.gguf``) with
    an :class:`HFTokenizer` set up by ``config.prompt``, or the tiny model's SFT warm start (cached)."""
    from hotloop.algorithms.models import is_gguf, load_causal_lm, load_hf_tokenizer
    from hotloop.algorithms.tasks.tokenizer import CharTokenizer, HFTokenizer, load_tokenizer
    from hotloop.algorithms.tasks.warm_start import sft_warm_start

    if config.model.path is None:
        tokenizer = CharTokenizer(task.alphabet)
        cache = (
            Path(config.model.cache_dir).expanduser()
            / "warm_start"
            / (f"{config.task.name}-{config.task.digits}{config.task.op}-seed{config.loop.seed}")
        )
        model = sft_warm_start(
            task,
            tokenizer,
            out_dir=cache,
            steps=config.model.warm_start_steps,
            error_rate=config.model.warm_start_error_rate,
            seed=config.loop.seed,
            progress=progress,
        )
        return model.float(), tokenizer
    path = config.model.path
    tokenizer = load_hf_tokenizer(path) if is_gguf(path) else load_tokenizer(path)
    if not isinstance(tokenizer, CharTokenizer):
        tokenizer = HFTokenizer(
            tokenizer,
            chat_template=config.prompt.chat_template,
            system_prompt=config.prompt.system_prompt,
            template_options=config.prompt.template_options,
        )
    return load_causal_lm(path).float(), tokenizer


def _token_id(tokenizer, name: str) -> int:
    return getattr(tokenizer, f"{name}_id")


def sampling_params(config: SamplingConfig, tokenizer) -> SamplingParams:
    """The run's ``SamplingParams``: ``config`` with each stop string mapped to its single token id."""
    stops = set(config.stop_token_ids)
    for text in config.stop_strings:
        try:
            ids = encode(raw_tokenizer(tokenizer), text, special=False)
        except ValueError as err:
            raise ValueError(
                f"sampling.stop_strings: {text!r} is not encodable by the run's tokenizer ({err})"
            ) from None
        if len(ids) != 1:
            raise ValueError(
                f"sampling.stop_strings: expected strings of one token each, got {text!r} = "
                f"{len(ids)} tokens {ids}; give its ids in sampling.stop_token_ids instead"
            )
        stops.add(ids[0])
    return SamplingParams(
        temperature=config.temperature,
        top_p=config.top_p,
        top_k=config.top_k,
        max_new_tokens=config.max_new_tokens,
        stop_token_ids=tuple(sorted(stops)),
    )


def make_evaluate(setup: Setup, config: RunConfig, reference: torch.nn.Module | None):
    """``evaluate(model)``: greedy held-out accuracy and, with a reference, a sampled estimate of KL(π ‖ π_ref)
    per sequence."""
    tok, prompts = setup.tokenizer, [setup.tokenizer.encode(p.prompt) for p in setup.test]
    base = dataclasses.replace(sampling_params(config.sampling, tok), temperature=0.0, top_p=1.0, top_k=0)

    @torch.no_grad()
    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        engine = TorchEngine(
            model,
            pad_token_id=_token_id(tok, "pad"),
            eos_token_id=_token_id(tok, "eos"),
            max_batch_size=config.sampling.max_batch_size,
            seed=0,
        )
        greedy = engine.generate(prompts, base)
        rewards = setup.reward_fn(setup.test, [tok.decode(c.token_ids) for c in greedy])
        if reference is None:
            return {"accuracy": rewards.float().mean().item()}
        sampled = engine.generate(prompts, dataclasses.replace(base, temperature=1.0, seed=config.loop.seed))
        rows = pack_rows(prompts, [c.token_ids for c in sampled], _token_id(tok, "pad"))
        policy = torch.tensor([sum(c.logprobs) for c in sampled])
        kl = (policy - sequence_logprobs(reference, *(r.to(setup.device) for r in rows)).cpu()).mean().item()
        return {"accuracy": rewards.float().mean().item(), "kl": kl}

    return evaluate


def engine_options(config: RunConfig) -> dict:
    """Keyword arguments of ``make_engine`` for ``config.engine`` (besides kind and the token ids)."""
    engine = config.engine
    if engine.kind == "torch":
        return {"max_batch_size": config.sampling.max_batch_size, "seed": config.loop.seed}
    model_dir = engine.model_dir or config.model.path
    options = {"seed": config.loop.seed, **({} if engine.dtype == "auto" else {"dtype": engine.dtype})}
    if engine.kind == "vllm":
        return {
            **options,
            "model_dir": model_dir,
            **({} if engine.memory_fraction is None else {"gpu_memory_utilization": engine.memory_fraction}),
        }
    return {
        **options,
        "model_dir": model_dir,
        "deterministic": True,
        **({} if engine.memory_fraction is None else {"mem_fraction_static": engine.memory_fraction}),
    }


def probe_logprobs(pad_token_id: int):
    """The trainer side of the proof on every sync: ``token_logprobs`` (the fused kernel) of each completion."""

    @torch.no_grad()
    def logprob_fn(
        model, prompts: list[list[int]], completions: list[list[int]], temperature: float = 1.0
    ) -> list[list[float]]:
        device = next(model.parameters()).device
        ids, mask, comp = (r.to(device) for r in pack_rows(prompts, completions, pad_token_id))
        logp = token_logprobs(model, ids, mask, temperature=temperature)[comp[:, 1:].bool()].tolist()
        out, start = [], 0
        for c in completions:
            out.append(logp[start : start + len(c)])
            start += len(c)
        return out

    return logprob_fn


def run(config: RunConfig, *, resume: bool = False, progress: bool = True) -> dict:
    """Warm start (or load) → evaluate → the online loop → evaluate; returns and writes the summary."""
    t0 = time.perf_counter()
    ctx = distributed.init_distributed()  # under torchrun: this rank's process group (docs/distributed.md)
    main = ctx is None or ctx.is_main
    progress = progress and main
    setup = build_setup(config, progress=progress)
    run_config = run_config_json(config)
    Path(config.loop.out_dir).mkdir(parents=True, exist_ok=True)
    if main:
        (Path(config.loop.out_dir) / RUN_CONFIG).write_text(json.dumps(run_config, indent=1))
    tok = setup.tokenizer
    sampling = sampling_params(config.sampling, tok)
    # several ranks: each samples from its own plain copy, fed bucket by bucket from the sharded policy
    engine_model = setup.model if ctx is None else copy.deepcopy(setup.model).requires_grad_(False)
    engine = make_engine(
        engine_model,
        kind=config.engine.kind,
        pad_token_id=_token_id(tok, "pad"),
        eos_token_id=_token_id(tok, "eos"),
        **engine_options(config),
    )
    section, factory = ALGORITHMS[config.algorithm]
    context = BuildContext(
        pad_token_id=_token_id(tok, "pad"),
        engine=engine,
        problems=setup.train,
        tokenizer=tok,
        reward_fn=setup.reward_fn,
        sampling=sampling,
    )
    algorithm = factory(getattr(config, section), context)
    # a frozen copy only when the loss reads it (GRPO with beta = 0 does not): no KL is reported then
    reference = make_reference(setup.model) if algorithm.needs_reference else None
    evaluate = make_evaluate(setup, config, reference)
    before = evaluate(setup.model)
    policy = setup.model
    if ctx is not None:
        policy, reference = distributed.shard_run(ctx, policy, reference, mixed_precision=config.trainer.bf16_autocast)
        evaluate = distributed.unsharded_eval(evaluate, reference)
    trainer = Trainer(policy, config.trainer, reference=reference, run_config=run_config)
    loop = OnlineLoop(
        config.loop,
        trainer=trainer,
        engine=engine,
        algorithm=algorithm,
        reward_fn=setup.reward_fn,
        problems=algorithm.prompt_pool(setup.train),
        tokenizer=tok,
        sampling=sampling,
        evaluate=evaluate,
        progress=progress,
        logprob_fn=probe_logprobs(_token_id(tok, "pad")),
        dist=ctx,
    )
    result = loop.run(resume=resume)
    after = evaluate(trainer.model) if result.interrupted else _last_eval(result, evaluate, trainer.model)
    if not main:
        return {"interrupted": result.interrupted, "steps": result.next_step, "rank": ctx.rank}
    return write_summary(config, result, before, after, setup.warm_start_seconds, time.perf_counter() - t0)


def _last_eval(result: LoopResult, evaluate, model) -> dict[str, float]:
    last = result.records[-1] if result.records else {}
    if "eval/accuracy" in last:
        return {"accuracy": last["eval/accuracy"]} | ({"kl": last["eval/kl"]} if "eval/kl" in last else {})
    return evaluate(model)
