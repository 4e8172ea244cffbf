"""What ``bench.gpu`` runs: the real shapes on a GPU, the same cases shrunk for ``--dry-run`` on CPU.

A case is (name, N, D, V, dtype, options). The real plan follows issue 15: bf16 N = 8192, D = 4096 at both Llama-3
(128256) and Qwen (151936) vocabularies; fp32 and fp16 smaller; odd shapes; all-ignored rows; logits offset by 1e4;
a −inf bias masking whole tiles; two shapes whose flat offsets exceed 2³¹ (the backward's gradient buffer
N·Vc > 2³¹ with one full-vocabulary chunk; the weight V·D > 2³¹). The dry plan keeps every case and option and
shrinks the sizes so the Triton interpreter runs them in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


@dataclass(frozen=True)
class Case:
    """One correctness case of a fused linear kernel: [N, D] hidden, [V, D] weight, options."""

    name: str
    n: int
    d: int
    v: int
    dtype: torch.dtype
    bias: bool = True
    ignored: float = 0.1  # fraction of rows with ignore_index
    offset: float = 0.0  # added to the bias (logits offset)
    masked: bool = False  # −inf bias on whole vocabulary tiles
    full_chunk: bool = False  # backward in one chunk of V columns (the [N, V] buffer: N·V offsets)
    ref_dtype: torch.dtype | None = None  # KL: the reference head's dtype (None: the policy's)

    @property
    def label(self) -> str:
        return f"{self.name} N={self.n} D={self.d} V={self.v} {str(self.dtype).split('.')[-1]}"


@dataclass(frozen=True)
class Plan:
    """Everything one run checks and times."""

    logprob: list[Case]
    kl: list[Case]
    forced: list[Case]  # run once per launch configuration the heuristics can choose
    loss_rows: tuple[int, int]  # (B, T) of the token-loss kernels; T > BLOCK_T walks several blocks
    timing: list[tuple[int, int, int]] = field(default_factory=list)  # (N, D, V) bf16
    loss_timing: list[tuple[int, int, int, int]] = field(default_factory=list)  # (S, T, D, V) of bench.losses
    loop: dict = field(default_factory=dict)  # model config and steps of the online-loop section
    reps: int = 5
    warmup: int = 2


def real_plan() -> Plan:
    big = 2**31
    logprob = [
        Case("llama3-vocab", 8192, 4096, 128256, BF16, bias=False),
        Case("qwen-vocab", 8192, 4096, 151936, BF16),
        Case("fp32", 2048, 1024, 32000, FP32),
        Case("fp16", 2048, 1024, 32000, FP16),
        Case("odd", 1000, 1000, 50257, BF16),
        Case("odd-fp32", 77, 129, 1031, FP32, bias=False),
        Case("all-ignored", 512, 512, 32000, BF16, ignored=1.0),
        Case("offset-1e4", 1024, 512, 32000, FP32, offset=1e4),
        Case("masked-tiles", 2048, 1024, 32000, BF16, masked=True),
        Case("buf-offsets>2^31", 16384, 256, 151936, BF16, full_chunk=True),  # 16384·151936 = 2.49e9
        Case("weight-offsets>2^31", 256, 16384, 151936, BF16, ignored=0.0),  # 151936·16384 = 2.49e9
    ]
    assert logprob[-2].n * logprob[-2].v > big and logprob[-1].v * logprob[-1].d > big
    kl = [
        Case("qwen-vocab", 4096, 2048, 151936, BF16),
        Case("fp32", 1024, 1024, 32000, FP32),
        Case("fp16", 1024, 1024, 32000, FP16, bias=False),
        Case("mixed bf16/fp32", 1024, 1024, 32000, BF16, ref_dtype=FP32),
        Case("odd", 1000, 1000, 50257, BF16),
        Case("offset-1e4", 512, 512, 32000, FP32, offset=1e4),
        Case("masked-tiles", 1024, 512, 32000, BF16, masked=True),
        Case("buf-offsets>2^31", 16384, 256, 151936, BF16, full_chunk=True),
    ]
    forced = [Case("forced", 1536, 1024, 32000, dt) for dt in (BF16, FP16, FP32)] + [
        Case("forced small-D", 1536, 24, 32000, BF16),
        Case("forced short", 100, 1024, 32000, BF16),
    ]
    loop = dict(
        hidden_size=896,
        layers=24,
        intermediate=4864,
        heads=14,
        kv_heads=2,
        steps=3,
        prompts=8,
        samples=4,
        max_new_tokens=32,
    )
    return Plan(
        logprob,
        kl,
        forced,
        loss_rows=(64, 6000),
        timing=[(8192, 4096, 128256), (8192, 4096, 151936)],
        loss_timing=[(16, 512, 4096, 151936)],
        loop=loop,
        reps=10,
        warmup=3,
    )


def dry_plan() -> Plan:
    """The same cases at interpreter sizes (tiles 16×32×16: one row block, 5 vocabulary tiles in 3 splits)."""

    def shrink(c: Case) -> Case:
        odd = "odd" in c.name  # ragged in every dimension: 19 rows, D = 24, V = 131
        n, d, v = (19, 24, 131) if odd else (min(c.n, 16), 16, 160)
        return Case(c.name, n, d, v, c.dtype, c.bias, c.ignored, c.offset, c.masked, c.full_chunk, c.ref_dtype)

    real = real_plan()
    loop = dict(
        hidden_size=32, layers=1, intermediate=64, heads=4, kv_heads=2, steps=2, prompts=2, samples=2, max_new_tokens=3
    )
    return Plan(
        [shrink(c) for c in real.logprob],
        [shrink(c) for c in real.kl],
        [shrink(c) for c in real.forced[:2]],
        loss_rows=(3, 100),
        timing=[(16, 16, 160)],
        loss_timing=[(2, 8, 16, 160)],
        loop=loop,
        reps=1,
        warmup=0,
    )
