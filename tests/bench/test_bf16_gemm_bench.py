"""Smoke test for the bf16 GEMM bench: it runs end to end at a small size, writes its files, and each mode's
error is what its arithmetic implies (hotloop and the fp32 GEMM at fp32 accuracy, torch's bf16 output at bf16's);
no timing claims."""

import json

import pytest

from bench import bf16_gemm
from hotloop.kernels import _bf16_gemm_ext


@pytest.mark.skipif(_bf16_gemm_ext._kernel() is None, reason="no bf16 brgemm here")
def test_bf16_gemm_bench_runs_every_mode_in_quick_mode(tmp_path):
    paths = bf16_gemm.main(["--quick", "--out-dir", str(tmp_path)])
    data = json.loads(paths["json"].read_text())
    rows = {r["impl"]: r for r in data["rows"]}
    assert set(rows) == {"torch bf16", "torch fp32", "hotloop", "hotloop GEMM"}
    assert all(r["status"] == "ok" and r["median_ms"] > 0 for r in rows.values())
    # logits of size ~4 (weight scaled by 4/sqrt(D)): bf16 output rounding errs by ~4 * 2^-9; fp32 by ~1e-6
    assert all(rows[k]["max_abs_err"] < 1e-4 for k in ("hotloop", "hotloop GEMM", "torch fp32"))
    assert rows["torch bf16"]["max_abs_err"] > 1e-3
