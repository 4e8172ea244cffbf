"""``python -m bench.gpu OUT_DIR [--dry-run] [--budget-s S]``: the one-command device check (see docs/gpu.md).

Correctness first (float64 references: log-prob, KL, forced launch configurations, token losses, CUDA row
kernels, a few online-loop steps), then timings. A wall-clock guard skips whatever would run past ``--budget-s``
(timing sections are reported skipped; a skipped correctness case fails the run). Writes
``OUT_DIR/gpu-<device>.{md,json,png}``; exits 1 if any check fails or a section crashes, 2 without a GPU.

``--dry-run``: the same script on CPU with the dry plan's tiny shapes and the Triton kernels under
``TRITON_INTERPRET=1`` (set here, before anything imports triton); the CUDA row kernels are skipped.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder for gpu-<device>.{md,json,png}")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreter")
    parser.add_argument("--budget-s", type=float, default=None, help="wall-clock budget (default 450; dry 150)")
    parser.add_argument(
        "--only",
        default=None,
        help="comma-separated sections to run (e.g. kernels,loop for a rerun); the rest are skipped",
    )
    parser.add_argument(
        "--build-dir",
        type=Path,
        default=Path("/tmp/hotloop-bench-gpu-build"),
        help="where the CUDA row kernels are compiled",
    )
    return parser.parse_args(argv)


class Runner:
    """Runs sections under the wall-clock budget and records them in the report."""

    def __init__(self, report, budget_s: float, only: set[str] | None = None) -> None:
        self.report, self.budget_s, self.start, self.only = report, budget_s, time.monotonic(), only

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def section(self, name: str, cases: list, run_case, estimate_s: float, *, fatal_skip: bool = True) -> None:
        """``run_case(case)`` for each case while ``estimate_s`` per case still fits in the budget."""
        if self.only is not None and name not in self.only:
            self.report.skipped.append((f"timing {name}" if not fatal_skip else f"unselected {name}", "--only"))
            return
        t0 = time.monotonic()
        print(f"== {name}: {len(cases)} case(s), {self.left():.0f} s left", flush=True)
        for k, case in enumerate(cases):
            if self.left() < estimate_s:
                why = f"budget: {len(cases) - k} case(s) not run, {self.left():.0f} s left < {estimate_s:.0f} s each"
                self.report.skipped.append((name if fatal_skip else f"timing {name}", why))
                break
            try:
                result = run_case(case)
            except Exception as exc:  # noqa: BLE001 - a crashed case is recorded and fails the run; the rest goes on
                traceback.print_exc()
                self.report.errors.append((name, f"{case!r:.120}: {type(exc).__name__}: {str(exc)[:300]}"))
                result = []
            for item in result or []:
                (self.report.checks if hasattr(item, "tol") else self.report.rows).append(item)
                if hasattr(item, "tol"):
                    print(f"  {'ok  ' if item.ok else 'FAIL'} {item.name}: {item.kind} {item.error:.2e}", flush=True)
            _free_memory()
        self.report.seconds[name] = time.monotonic() - t0


def _free_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (kernels read it when decorated)
        os.environ["HOTLOOP_BACKEND"] = "triton"
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("bench.gpu: no CUDA device (use --dry-run on CPU)", file=sys.stderr)
        return 2
    from ._sections import run_all

    device = torch.device("cpu" if args.dry_run else "cuda")
    only = None if args.only is None else {s.strip() for s in args.only.split(",")}
    budget = args.budget_s if args.budget_s is not None else (150.0 if args.dry_run else 450.0)
    report = run_all(
        device, dry=args.dry_run, runner_factory=lambda r: Runner(r, budget, only), build_dir=args.build_dir
    )
    paths = report.write(args.out_dir)
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    for line in report.failed:
        print(f"FAIL {line}")
    print(f"{'FAILED' if report.failed else 'PASSED'}: {sum(c.ok for c in report.checks)}/{len(report.checks)} checks")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
