"""Smoke tests for the losses bench grid: it runs end to end at a tiny size, writes its files and summary, turns a
missing peer into a row; structure and arithmetic only, no timing claims."""

import json
import sys

import pytest
import torch

from bench import losses

TINY = ["--quick", "--reps", "1"]


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny ops on a shared 2-core machine are faster and steadier that way."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_losses_grid_runs_every_loss_and_implementation_on_a_tiny_size(tmp_path, one_thread):
    paths = losses.main([*TINY, "--losses", "dpo,simpo,kto,grpo-dapo-kl", "--out-dir", str(tmp_path)])
    assert {p.name for p in paths.values()} == {"losses-cpu.md", "losses-cpu.json", "losses-cpu.png"}
    data = json.loads(paths["json"].read_text())
    cells = {(r["mode"], r["size"]) for r in data["rows"]}
    assert cells == {
        ("dpo", "pairs=1 T=16 ref=head float32"),
        ("dpo", "pairs=1 T=16 ref=cached float32"),
        ("simpo", "pairs=1 T=16 ref=none float32"),
        ("kto", "seqs=1 T=16 ref=head float32"),
        ("kto", "seqs=1 T=16 ref=cached float32"),
        ("grpo-dapo-kl", "seqs=1 T=16 ref=head float32"),
        ("grpo-dapo-kl", "seqs=1 T=16 ref=cached float32"),
    }
    for row in data["rows"]:
        liger_cached = row["impl"] == "liger eager" and "cached" in row["size"] and row["mode"] != "grpo-dapo-kl"
        if liger_cached:  # Liger 0.8.5 has no cached reference log-probs for DPO / KTO
            assert row["status"].startswith("unavailable: Liger 0.8.5 takes no cached"), row
            continue
        assert row["status"] == "ok" and row["median_ms"] > 0, row
        if row["impl"] != "floor":  # every implementation computes the same loss: fp32 rounding only
            assert row["max_abs_err"] < 1e-4, row
            assert "first call" in row["note"]
    assert {r["impl"] for r in data["rows"]} == {"floor", "naive", "hotloop", "compat", "liger eager"}
    md = paths["md"].read_text()
    assert "## Summary: worst cell per loss" in md and "| simpo | compat |" in md
    assert md.index("## Summary") < md.index("## pairs=1 T=16 ref=head float32")


def test_cells_follow_the_axes_and_skip_large_ones():
    args = losses.parse_args(
        [
            "--losses",
            "dpo,grpo",
            "--seqs",
            "1,16",
            "--tokens",
            "512,2048",
            "--refs",
            "none,cached",
            "--max-rows",
            "16384",
        ]
    )
    assert losses.cells(args) == [
        ("dpo", "cached", 1, 512, torch.float32),
        ("grpo", "none", 1, 512, torch.float32),
        ("dpo", "cached", 1, 2048, torch.float32),
        ("grpo", "none", 1, 2048, torch.float32),
        ("dpo", "cached", 16, 512, torch.float32),
        ("grpo", "none", 16, 512, torch.float32),
    ]  # 16 × 2048 rows: skipped


def test_a_missing_peer_becomes_an_unavailable_row(tmp_path, monkeypatch, one_thread):
    monkeypatch.setitem(sys.modules, "liger_kernel.chunked_loss", None)  # import now fails as if not installed
    paths = losses.main([*TINY, "--losses", "grpo", "--impls", "floor,liger-eager,compat", "--out-dir", str(tmp_path)])
    rows = {r["impl"]: r for r in json.loads(paths["json"].read_text())["rows"]}
    assert rows["liger eager"]["status"].startswith("unavailable: ModuleNotFoundError")
    assert rows["compat"]["status"] == "ok" and rows["floor"]["status"] == "ok"


@pytest.mark.parametrize(
    "argv",
    [
        ["--seqs", "1,x"],
        ["--tokens", "0"],
        ["--impls", "naive,nope"],
        ["--losses", "dpo,ppo"],
        ["--refs", "some"],
        ["--dtypes", "fp8"],
    ],
)
def test_losses_cli_rejects_bad_axes_unknown_impls_and_losses(argv):
    with pytest.raises(SystemExit):
        losses.parse_args(argv)
