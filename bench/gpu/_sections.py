"""The sections of one ``bench.gpu`` run, in order, with their per-case time estimates (H200 seconds; the
dry plan's are interpreter seconds). Imported only after ``__main__`` has set up the Triton environment."""

from __future__ import annotations

import torch

from bench._results import collect_meta, device_slug

from . import _kernels, _loop, _losses, _plan, _rows_cuda, _timing
from ._report import Report


def run_all(device: torch.device, *, dry: bool, runner_factory, build_dir) -> Report:
    plan = _plan.dry_plan() if dry else _plan.real_plan()
    report = Report(meta=collect_meta(device, slug=device_slug(device), dry_run=dry, notes=_NOTES))
    run = runner_factory(report)
    scale = 1.0 if not dry else 0.25
    run.section("logprob", plan.logprob, lambda c: _kernels.check_logprob(c, device), 12 * scale)
    kl_divs = ("kl", "reverse_kl", "jsd")
    run.section(
        "kl",
        list(enumerate(plan.kl)),
        lambda kc: _kernels.check_kl(kc[1], device, kl_divs if not dry else (kl_divs[kc[0] % 3],)),
        15 * scale,
    )
    run.section("forced", plan.forced, lambda c: _kernels.check_forced(c, device), 10 * scale)
    run.section("losses", [plan.loss_rows], lambda bt: _losses.check_losses(*bt, device), 10 * scale)
    if dry:
        report.skipped.append(("timing cuda-rows", "dry run: no CUDA device (the build needs nvcc and a GPU)"))
    else:
        run.section(
            "cuda-rows",
            [(4096, 151936)],
            lambda rv: _rows_cuda.check_rows(_rows_cuda.build(build_dir), *rv, device),
            60,
        )
    run.section("loop", [plan.loop], lambda cfg: _loop_case(cfg, device, report), 90 * scale)
    timing = dict(warmup=plan.warmup, reps=plan.reps)
    run.section(
        "kernels", plan.timing, lambda s: _timing.time_kernels([s], device, **timing), 20 * scale, fatal_skip=False
    )
    run.section(
        "logprob peers",
        plan.timing,
        lambda s: _timing.time_peers([s], device, dry=dry, **timing),
        90 * scale,
        fatal_skip=False,
    )
    run.section(
        "losses peers",
        plan.loss_timing,
        lambda s: _timing.time_losses([s], device, dry=dry, **timing),
        120 * scale,
        fatal_skip=False,
    )
    report.targets = _timing.targets(report.rows)
    return report


def _loop_case(cfg, device, report):
    checks, info = _loop.run_loop(cfg, device)
    report.meta["loop"] = info
    return checks


_NOTES = [
    "Correctness: relative error ‖out − ref‖/‖ref‖ against float64 (references in row chunks); 'abs' = max "
    "|out − ref| in nats. Tolerances: fp32 1e-5, bf16 1e-2, fp16 5e-3; logits offset by 1e4: a few fp32 ulps of "
    "1e4; token losses 1e-4 (scalar) / 1e-5 (gradients); sampler vs fresh forward 2e-3 nats.",
    "Timings: `triton kernels` rows call the launchers directly (fwd = logp + entropy; bwd = both gradients, "
    "entropy term on); floor = cuBLAS GEMMs of the same shapes in the same rounds (fwd 1, bwd 3, fwd+bwd 4). "
    "The other sections are bench.logprob and bench.losses (their notes apply: see docs/benchmarks.md).",
]
