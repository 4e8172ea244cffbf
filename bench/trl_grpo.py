"""One GRPO step of a real model, hotloop against TRL's ``GRPOTrainer``, on the same settings: time and peak memory.

    python -m bench.trl_grpo [--model models/smollm2-135m-instruct] [--steps 4] [--prompts 8] [--samples 8]
                             [--max-new-tokens 96] [--no-gradient-checkpointing] [--out-dir bench/results]

Each side runs in its own child process, so its peak RSS is its own (``os.wait4``):

- ``hotloop``: ``hotloop train examples/smollm2-grpo.yaml`` (TorchEngine, fp32, DAPO loss, β = 0, lr 1e-5, the
  chat template) for ``--steps`` steps, no evaluation, no checkpoint; per step, ``metrics.jsonl``'s
  ``time/sampling`` and ``time/training`` and the rows it trained on (groups without reward contrast are dropped).
- ``trl``: TRL's ``GRPOTrainer`` on the same model, task (one-step word problems of the same seed, conversational
  prompts: the same chat template), math-verify reward, prompts × samples, new tokens, temperature 1, DAPO loss,
  β = 0, lr 1e-5, on the CPU in fp32; per step, the wall time of the step and of ``model.generate`` inside it.
  TRL trains on every row (zero-advantage rows give zero gradient but cost a forward and a backward).

Both sides recompute the decoder layers in the backward (activation checkpointing: TRL's ``GRPOConfig`` default,
hotloop's ``trainer.gradient_checkpointing``); ``--no-gradient-checkpointing`` turns it off on both.

Step 1 of each side includes one-time work (allocations, first calls), so the table reports the median of the
later steps. ``per row`` = training seconds / rows trained. Writes ``bench/results/trl_grpo-cpu.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench._harness import Row
from bench._results import RESULTS_DIR, collect_meta, device_slug, write_results

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "smollm2-grpo.yaml"
MB = 1 << 20


def _hotloop(args, out: Path) -> list[dict]:
    """Per-step {step_s, generate_s, train_s, rows} of ``hotloop train``, in this process (a child of ``main``)."""
    run_dir = out / "hotloop-run"
    from hotloop.algorithms.cli import main as hotloop_cli

    argv = ["train", str(EXAMPLE)]
    for setting in hotloop_settings(args, run_dir):
        argv += ["--set", setting]
    if hotloop_cli(argv) != 0:
        raise RuntimeError(f"hotloop {' '.join(argv)} failed")
    steps = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "time/sampling" not in record:
            continue
        sampling, training = record["time/sampling"], record["time/training"]
        rest = sum(v for k, v in record.items() if k.startswith("time/") and k not in ("time/sampling", "time/eval"))
        steps.append(dict(step_s=sampling + rest, generate_s=sampling, train_s=training, rows=record.get("rows", 0)))
    return steps


def hotloop_settings(args, run_dir: Path) -> list[str]:
    """``--set`` values of hotloop's side on top of the example: the bench's shape, no eval, no checkpoint."""
    return [
        f"model.path={args.model}",
        f"loop.steps={args.steps}",
        f"loop.prompts_per_step={args.prompts}",
        f"grpo.samples_per_prompt={args.samples}",
        f"sampling.max_new_tokens={args.max_new_tokens}",
        "loop.eval_every=0",
        "task.eval_problems=1",
        "loop.final_checkpoint=false",
        f"loop.out_dir={run_dir}",
        f"loop.seed={args.seed}",
        f"trainer.gradient_checkpointing={str(args.gradient_checkpointing).lower()}",
    ]


def _trl(args, out: Path) -> list[dict]:
    """Per-step {step_s, generate_s, train_s, rows} of TRL's GRPOTrainer (child process of ``main``)."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from hotloop.algorithms.tasks.arithmetic import Problem
    from hotloop.algorithms.tasks.word_problems import WordProblemsTask

    task = WordProblemsTask(1, args.seed)
    problems = task.problems(args.steps * args.prompts, "train")
    rows = [{"prompt": [{"role": "user", "content": p.prompt}], "answer": p.answer} for p in problems]
    data = Dataset.from_list(rows)

    def math_verify(completions, answer, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [task.score(Problem(prompt="", answer=a), text) for text, a in zip(texts, answer)]

    config = GRPOConfig(
        output_dir=str(out / "trl-run"),
        per_device_train_batch_size=args.prompts * args.samples,
        num_generations=args.samples,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        learning_rate=1e-5,
        beta=0.0,
        loss_type="dapo",
        max_steps=args.steps,
        use_cpu=True,
        bf16=False,
        shuffle_dataset=False,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=args.seed,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    trainer = GRPOTrainer(model=args.model, reward_funcs=math_verify, args=config, train_dataset=data)
    generate_s = [0.0]
    generate = trainer.model.generate

    def timed_generate(*a, **kw):
        start = time.perf_counter()
        try:
            return generate(*a, **kw)
        finally:
            generate_s[0] += time.perf_counter() - start

    trainer.model.generate = timed_generate
    steps = []

    class Steps(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start, generate_s[0] = time.perf_counter(), 0.0

        def on_step_end(self, *_, **__):
            step_s = time.perf_counter() - self.start
            rows = args.prompts * args.samples
            steps.append(dict(step_s=step_s, generate_s=generate_s[0], train_s=step_s - generate_s[0], rows=rows))

    trainer.add_callback(Steps())
    trainer.train()
    return steps


SIDES = {"hotloop": _hotloop, "trl": _trl}


def _child(args) -> None:
    """``--side``: run one side and write its steps (and nothing else) as JSON to ``--result``."""
    steps = SIDES[args.side](args, Path(args.result).parent)
    Path(args.result).write_text(json.dumps(steps))


def _run_side(side: str, argv: list[str], tmp: Path) -> tuple[list[dict], float]:
    """(steps, peak RSS MiB) of one side in a child process."""
    result = tmp / f"{side}.json"
    child = subprocess.Popen([sys.executable, "-m", "bench.trl_grpo", *argv, "--side", side, "--result", str(result)])
    _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{side}: the child process failed (exit {os.waitstatus_to_exitcode(status)})")
    return json.loads(result.read_text()), usage.ru_maxrss * 1024 / MB


def _row(side: str, steps: list[dict], peak_mb: float, args) -> Row:
    later = steps[1:] or steps
    step_s = statistics.median(s["step_s"] for s in later)
    generate_s = statistics.median(s["generate_s"] for s in later)
    train_s = statistics.median(s["train_s"] for s in later)
    rows = sum(s["rows"] for s in later)
    per_row = sum(s["train_s"] for s in later) / rows if rows else None
    note = (
        f"median of steps 2..{len(steps)}: sampling {generate_s:.1f} s, training {train_s:.1f} s, "
        f"{rows / len(later):.0f} rows trained per step, {per_row:.2f} s per trained row"
        if per_row is not None
        else "no rows trained"
    )
    return Row(
        impl=side,
        mode="grpo step",
        size=f"{args.prompts} prompts x {args.samples} samples x {args.max_new_tokens} tokens",
        median_ms=step_s * 1e3,
        peak_extra_mb=peak_mb,
        per_token_logp="",
        note=note + f"; peak RSS {peak_mb:.0f} MiB",
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-gradient-checkpointing",
        dest="gradient_checkpointing",
        action="store_false",
        help="keep every layer's activations on both sides (default: both recompute them, TRL's default)",
    )
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--side", choices=sorted(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Path] | None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.side:
        _child(args)
        return None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for side in SIDES:
            steps, peak = _run_side(side, argv, Path(tmp))  # each child parses the same options
            rows.append(_row(side, steps, peak, args))
    meta = collect_meta(
        "cpu",
        slug=device_slug("cpu"),
        threads=torch.get_num_threads(),
        notes=[
            "peak extra MB = the child process's peak RSS (whole process: model, optimizer, engine, Python).",
            "hotloop drops groups without reward contrast before training; TRL trains every row.",
            f"activation checkpointing on both sides: {'on' if args.gradient_checkpointing else 'off'}.",
        ],
    )
    paths = write_results("trl_grpo", rows, meta, ratios_to=("trl",), out_dir=args.out_dir)
    print(paths["md"].read_text())
    return paths


if __name__ == "__main__":
    main()
