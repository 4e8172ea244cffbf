"""``python -m bench.gpu --dry-run``: the device check's very script on CPU (Triton interpreter, tiny shapes).

Run in a subprocess, as on the device (the script sets TRITON_INTERPRET itself before importing triton). A
failing check, a crashed or budget-skipped correctness section, or a missing output file fails the test; the
report logic that decides the exit status is tested directly below.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from bench.gpu import _kernels
from bench.gpu._report import Check, Report
from hotloop.kernels import _triton_utils

SECTIONS = ("logprob", "kl", "forced", "losses", "loop", "kernels", "logprob peers", "losses peers")


@pytest.mark.interpreter
def test_dry_run_passes_every_check_and_writes_the_three_files(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "HOTLOOP_BACKEND")}
    run = subprocess.run(
        [sys.executable, "-m", "bench.gpu", str(tmp_path), "--dry-run", "--budget-s", "500"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu-cpu.json", "gpu-cpu.md", "gpu-cpu.png"]
    data = json.loads((tmp_path / "gpu-cpu.json").read_text())
    assert data["failed"] == [] and data["errors"] == []
    assert set(SECTIONS) <= set(data["seconds"])
    sections = {c["section"] for c in data["checks"]}
    assert {"logprob", "kl", "forced", "losses", "loop"} <= sections and all(c["ok"] for c in data["checks"])
    assert any("masked-tiles" in c["name"] for c in data["checks"])
    assert {r["impl"] for r in data["rows"]} >= {"floor", "hotloop"}


def test_report_fails_on_an_out_of_tolerance_or_non_finite_check_and_on_skipped_correctness():
    report = Report(meta={"device": "cpu"})
    report.checks = [Check("kl", "a", 1e-6, 1e-5), Check("kl", "b", float("nan"), 1e-5)]
    report.skipped = [("timing peers", "budget")]
    assert [line.split(":")[1].strip() for line in report.failed] == ["b"]
    report.checks = report.checks[:1]
    assert report.failed == []
    report.skipped.append(("logprob", "budget"))
    assert report.failed == ["logprob: skipped (budget)"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_forced_tiles_cover_every_choice_of_the_cuda_heuristic(dtype):
    choices = {(n, d): _kernels.tile_choices(dtype, d) for n in (1, 100, 128, 8192) for d in (8, 24, 1024, 4096)}
    for (n, d), tiles in choices.items():
        assert _triton_utils.logits_tiles(torch.device("cuda"), n, d, dtype) in tiles, (n, d)
