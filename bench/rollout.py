"""Rollout benchmark: decode tokens/s of ``TorchEngine`` and ``VLLMEngine`` against the floors of the work.

    python -m bench.rollout [--quick] [--reps k] [--models tiny,135M] [--compiled]    # in the vLLM venv (docs/vllm.md)

Each workload (model, prompts × samples, new tokens) is sampled by every engine in the same
interleaved rounds (after one short warm-up call each), at temperature 1 with no stop token, so every row
decodes exactly ``new tokens``. Models: ``tiny`` (the test model of tests/integration/
test_vllm_engine.py: D = 64, 2 layers, head_dim 32) and ``135M`` (SmolLM2-135M's shape: D = 576,
30 layers, 9 heads, 3 KV heads, head_dim 64, MLP 1536, vocab 49152, tied embeddings), random fp32
weights. Engines: ``torch`` (TorchEngine, all rows in one batch) and ``vllm-eager`` (VLLMEngine,
``enforce_eager=True``), or with ``--compiled`` ``vllm-compiled`` instead (torch.compile at start-up;
one vLLM engine lives in a process at a time). Its start-up time (writing the HF directory,
loading, warm-up; compile) is a row of its own.

Floors, measured in the same run: ``compute`` = 2 · matmul params · tokens FLOPs at the rate of a
fp32 ``torch.mm`` the size of the model's MLP (prefill and attention left out), and
``weight-read`` = one read of every weight per decode step (new tokens steps) at the rate of a
``copy_`` of a buffer the size of the model. The ``floor`` row is the larger of the two.

The vLLM rows need vLLM (``pip install "hotloop[vllm]"``); without it they are unavailable rows.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bench._harness import Row, unavailable_row
from bench._results import collect_meta, write_results
from hotloop.runtime.engine import SamplingParams
from hotloop.runtime.torch_engine import TorchEngine

MODELS = {
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=False,
    ),
    "135M": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        tie_word_embeddings=True,
    ),
}
# (model, prompts, samples per prompt, new tokens); the first is the target workload
QUICK = [("135M", 8, 4, 48), ("tiny", 8, 4, 48)]
FULL = QUICK + [("135M", 16, 4, 48), ("135M", 8, 4, 256), ("tiny", 16, 4, 256)]
PROMPT_LEN = 24


def build_model(name: str, seed: int = 0) -> LlamaForCausalLM:
    """Random fp32 Llama of shape ``name``."""
    config = LlamaConfig(
        **MODELS[name], max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2, dtype="float32"
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).float().eval()


def matmul_params(model: LlamaForCausalLM) -> int:
    """Weights multiplied per decoded token: every Linear's, the LM head's included (tied or not)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def floors(model: LlamaForCausalLM, tokens: int, steps: int) -> dict[str, float]:
    """Seconds of the compute floor and the weight-read floor, at rates measured now."""
    D, F = model.config.hidden_size, model.config.intermediate_size
    a, b, out = torch.randn(256, D), torch.randn(D, F), torch.empty(256, F)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    src, dst = torch.randn(weights // 4), torch.empty(weights // 4)
    flops = statistics.median(_rate(lambda: torch.mm(a, b, out=out), 2 * 256 * D * F) for _ in range(5))
    bytes_per_s = statistics.median(_rate(lambda: dst.copy_(src), 2 * weights) for _ in range(5))
    return {
        "compute": 2 * matmul_params(model) * tokens / flops,
        "weight-read": steps * weights / bytes_per_s,
        "flops": flops,
        "bytes_per_s": bytes_per_s,
    }


def _rate(fn, work: float, calls: int = 20) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return work * calls / (time.perf_counter() - start)


def start_vllm(model, enforce_eager: bool):
    """A VLLMEngine and its start-up seconds."""
    from hotloop.runtime.vllm_engine import VLLMEngine

    start = time.perf_counter()
    engine = VLLMEngine(model, pad_token_id=0, eos_token_id=None, enforce_eager=enforce_eager, max_num_seqs=64)
    return engine, time.perf_counter() - start


def workload_rows(name, model, engines, prompts, samples, new_tokens, reps) -> list[Row]:
    """Time every engine on one workload in shared rounds (after a short warm-up call each); add the floor rows.

    Rounds are timed here rather than by ``time_section``: its extra profiled call per contender doubles the cost
    of a 135M rollout on a shared 2-core machine, so peak memory is not reported.
    """
    rng = torch.Generator().manual_seed(1)
    ids = [torch.randint(3, model.config.vocab_size, (PROMPT_LEN,), generator=rng).tolist() for _ in range(prompts)]
    sampling = SamplingParams(temperature=1.0, max_new_tokens=new_tokens, n=samples, seed=0)
    tokens = prompts * samples * new_tokens
    size = f"{name}: {prompts}x{samples} rows x {new_tokens} tokens"
    times: dict[str, list[float]] = {impl: [] for impl in engines}
    for engine in engines.values():
        engine.generate(ids[:1], SamplingParams(max_new_tokens=4))
    for r in range(reps):
        for impl in list(engines)[r % len(engines) :] + list(engines)[: r % len(engines)]:
            start = time.perf_counter()
            out = engines[impl].generate(ids, sampling)
            times[impl].append(time.perf_counter() - start)
            assert sum(len(c.token_ids) for c in out) == tokens, "every row decodes new_tokens tokens"
            print(f"{size}: {impl} {times[impl][-1]:.1f} s", flush=True)
    rows = [
        Row(impl=impl, mode="decode", size=size, median_ms=statistics.median(t) * 1e3, min_ms=min(t) * 1e3)
        for impl, t in times.items()
    ]
    floor = floors(model, tokens, new_tokens)
    for kind in ("compute", "weight-read"):
        rows.append(
            Row(
                impl=f"{kind} floor",
                mode="decode",
                size=size,
                median_ms=floor[kind] * 1e3,
                note=f"{floor['flops'] / 1e9:.0f} GFLOP/s fp32 mm"
                if kind == "compute"
                else f"{floor['bytes_per_s'] / 1e9:.1f} GB/s copy",
            )
        )
    rows.append(
        Row(
            impl="floor",
            mode="decode",
            size=size,
            median_ms=max(floor["compute"], floor["weight-read"]) * 1e3,
            note="max(compute, weight-read)",
        )
    )
    for row in rows:
        row.note = "; ".join(x for x in (f"{tokens / (row.median_ms / 1e3):.0f} tok/s", row.note) if x)
    return rows


def engines_for(name, model, compiled: bool) -> tuple[dict, list[Row]]:
    """TorchEngine and a VLLMEngine (eager, or compiled with ``compiled``: one vLLM at a time); its start-up row."""
    engines = {"torch": TorchEngine(model, pad_token_id=0, eos_token_id=None, max_batch_size=64, seed=0)}
    rows = []
    for impl, eager in (("vllm-compiled", False),) if compiled else (("vllm-eager", True),):
        try:
            engines[impl], seconds = start_vllm(model, eager)
            rows.append(
                Row(
                    impl=impl,
                    mode="start-up",
                    size=name,
                    median_ms=seconds * 1e3,
                    note="write HF dir + load + warm-up" + ("" if eager else " + torch.compile"),
                )
            )
        except Exception as exc:  # noqa: BLE001 - vLLM missing or failing is a row, not a crash
            rows.append(unavailable_row(impl, exc, mode="start-up", size=name))
    return engines, rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the issue's target workloads")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of: tiny, 135M")
    parser.add_argument("--reps", type=int, default=3, help="timed rounds per workload")
    parser.add_argument(
        "--compiled", action="store_true", help="start vLLM with torch.compile instead of eager (minutes)"
    )
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    rows: list[Row] = []
    workloads = [w for w in (QUICK if args.quick else FULL) if w[0] in args.models.split(",")]
    for name in dict.fromkeys(w[0] for w in workloads):
        model = build_model(name)
        engines, startup = engines_for(name, model, args.compiled)
        rows += startup
        for _, prompts, samples, new_tokens in (w for w in workloads if w[0] == name):
            rows += workload_rows(name, model, engines, prompts, samples, new_tokens, args.reps)
        for engine in engines.values():
            getattr(engine, "shutdown", lambda: None)()
    notes = [
        "Engines ran in the same interleaved rounds, so their ratios are the robust numbers; other jobs on the "
        "machine (see the load average above) slow every row.",
        "Floors: compute = 2 x matmul params x tokens at a measured fp32 torch.mm rate; "
        "weight-read = one read of all weights per decode step at a measured copy rate.",
    ]
    meta = collect_meta("cpu", slug="cpu", reps=args.reps, quick=args.quick, notes=notes)
    paths = write_results("rollout" + ("-compiled" if args.compiled else ""), rows, meta, ratios_to=("floor", "torch"))
    print(paths["md"].read_text())


if __name__ == "__main__":
    main()
