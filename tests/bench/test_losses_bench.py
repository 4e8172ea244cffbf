"""Smoke tests for the losses bench: it runs end to end at a tiny size, writes its files, turns a missing peer into
a row; structure and arithmetic only, no timing claims."""

import json
import sys

import pytest
import torch

from bench import losses

TINY = ["--sizes", "4,9,16,97", "--reps", "1", "--warmup", "0"]


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny ops on a shared 2-core machine are faster and steadier that way."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_losses_bench_runs_every_implementation_end_to_end_on_a_tiny_size(tmp_path, one_thread):
    paths = losses.main([*TINY, "--no-compile", "--out-dir", str(tmp_path)])
    assert {p.name for p in paths.values()} == {"losses-cpu.md", "losses-cpu.json", "losses-cpu.png"}
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(paths["json"].read_text())
    rows = {(r["impl"], r["mode"]): r for r in data["rows"]}
    expected = {"dpo": ["floor", "naive", "hotloop grouped", "hotloop two_pass", "hotloop cached-ref", "liger",
                        "compat"], "grpo": ["floor", "naive", "hotloop", "liger", "compat"]}
    assert set(rows) == {(impl, losses.MODES[loss]) for loss, impls in expected.items() for impl in impls}
    for (impl, mode), row in rows.items():
        assert row["status"] == "ok" and row["median_ms"] > 0, (impl, mode, row["status"])
        assert None not in row["ratios"].values() and set(row["ratios"]) == {"floor", "naive", "liger"}
        if impl != "floor":
            # every implementation computes the same loss: its error against float64 is fp32 rounding
            assert row["max_abs_err"] < 1e-4, (impl, mode, row["max_abs_err"])
            assert "first call" in row["note"]
    assert rows["naive", losses.MODES["dpo"]]["ratios"]["naive"] == pytest.approx(1.0)
    assert rows["liger", losses.MODES["grpo"]]["ratios"]["liger"] == pytest.approx(1.0)
    assert "compiled=False" in rows["liger", losses.MODES["grpo"]]["note"]
    assert data["meta"]["dtype"] == "float32" and data["meta"]["liger_compiled"] is False
    assert data["rows"][0]["size"] == "N=36 (4×9) D=16 V=97 float32"
    assert "| liger | grpo dapo+k3 fwd+bwd |" in paths["md"].read_text()


def test_a_missing_peer_becomes_an_unavailable_row(tmp_path, monkeypatch, one_thread):
    monkeypatch.setitem(sys.modules, "liger_kernel.chunked_loss", None)  # import now fails as if not installed
    paths = losses.main([*TINY, "--losses", "grpo", "--impls", "floor,liger,compat", "--out-dir", str(tmp_path)])
    rows = {r["impl"]: r for r in json.loads(paths["json"].read_text())["rows"]}
    assert rows["liger"]["status"].startswith("unavailable: ModuleNotFoundError")
    assert rows["liger"]["mode"] == losses.MODES["grpo"] and rows["liger"]["median_ms"] is None
    assert rows["compat"]["status"] == "ok" and rows["floor"]["status"] == "ok"


@pytest.mark.parametrize("argv", [["--sizes", "4,9,16"], ["--sizes", "3,9,16,97"], ["--impls", "naive,nope"],
                                  ["--losses", "dpo,ppo"]])
def test_losses_cli_rejects_bad_sizes_unknown_impls_and_losses(argv):
    with pytest.raises(SystemExit):
        losses.parse_args(argv)
