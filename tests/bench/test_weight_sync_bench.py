"""Smoke test for the weight-sync bench: it runs end to end at 1M parameters, writes its files, every contender
has a row and the ratios are arithmetic on the medians; no timing claims."""

import json

from bench import weight_sync


def test_weight_sync_bench_runs_every_contender_end_to_end_in_quick_mode(tmp_path):
    paths = weight_sync.main(["--quick", "--dtype", "fp32", "--out-dir", str(tmp_path)])
    assert {p.name for p in paths.values()} == {"weight_sync-cpu.md", "weight_sync-cpu.json", "weight_sync-cpu.png"}
    data = json.loads(paths["json"].read_text())
    rows = {r["impl"]: r for r in data["rows"]}
    assert set(rows) == {
        "floor",
        "bucketed (pack)",
        "bucketed + fingerprints",
        "load_state_dict",
        "shm → process",
        "shm → process (copy)",
        "pickle → pipe",
        "safetensors → disk",
    }
    assert all(r["status"] == "ok" and r["median_ms"] > 0 for r in rows.values())
    floor = rows["floor"]["median_ms"]
    assert all(abs(r["ratios"]["floor"] - r["median_ms"] / floor) < 1e-9 for r in rows.values())
    assert data["meta"]["skipped"] == "none"
