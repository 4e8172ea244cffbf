"""Smoke tests for the bench harness and the log-prob bench: structure and arithmetic, no timing claims."""

import importlib.util
import json

import pytest
import torch

from bench import logprob
from bench._harness import MB, Contender, Row, Unavailable, measure_interleaved, time_section, unavailable_row
from bench._results import add_ratios, collect_meta, device_name, device_slug, write_results


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny ops on a shared 2-core machine are faster and steadier that way."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_interleaved_rounds_rotate_the_order_and_call_between_before_each_call():
    log = []

    def contender(name):
        return Contender(lambda: log.append(name), between=lambda: log.append(f"between {name}"))

    out = measure_interleaved({n: contender(n) for n in "abc"}, warmup=1, reps=3, device="cpu")
    calls = [entry for entry in log if not entry.startswith("between")]
    rounds = ["".join(calls[i : i + 3]) for i in range(0, 12, 3)]
    assert rounds == ["abc", "bca", "cab", "abc"]  # warm-up round, then three timed rounds
    assert calls[12:] == ["a", "b", "c"]  # one memory call each
    assert all(log[k - 1] == f"between {c}" for k, c in enumerate(log) if not c.startswith("between"))
    for m in out.values():
        assert len(m.times) == 3 and m.min_s == min(m.times) and m.min_s <= m.median_s <= max(m.times)


def test_a_contender_that_raises_is_dropped_and_the_others_finish():
    calls = {"ok": 0, "bad": 0}

    def ok():
        calls["ok"] += 1

    def bad():
        calls["bad"] += 1
        if calls["bad"] == 2:
            raise MemoryError("out of memory on the second call")

    out = measure_interleaved({"bad": Contender(bad), "ok": Contender(ok)}, warmup=0, reps=4, device="cpu")
    assert isinstance(out["bad"], MemoryError) and calls["bad"] == 2
    assert len(out["ok"].times) == 4 and calls["ok"] == 5


def test_cpu_peak_memory_sees_live_allocations_and_not_freed_ones():
    def two_live_blocks():
        a = torch.ones(MB // 4)  # 1 MiB
        b = torch.ones(2 * MB // 4)  # 2 MiB while a is alive
        return a.sum() + b.sum()

    def one_block_at_a_time():
        for _ in range(3):
            torch.ones(MB // 4).sum()

    out = measure_interleaved(
        {"two": Contender(two_live_blocks), "one": Contender(one_block_at_a_time)}, warmup=0, reps=1, device="cpu"
    )
    assert out["two"].peak_extra_bytes >= 3 * MB
    assert out["one"].peak_extra_bytes < 2 * MB


def test_measure_rejects_zero_reps():
    with pytest.raises(ValueError, match="reps"):
        measure_interleaved({"x": Contender(lambda: None)}, warmup=0, reps=0, device="cpu")


def test_time_section_fills_rows_keeps_computed_memory_and_reports_failures():
    def fails():
        raise RuntimeError("kernel launch failed\nsecond line")

    entries = [
        (Row("fast", "fwd", "s", note="n"), Contender(lambda: torch.ones(MB // 4).sum())),
        (Row("floor", "fwd", "s", peak_extra_mb=12.5), Contender(lambda: torch.ones(MB // 4).sum())),
        (Row("broken", "fwd", "s", per_token_logp="yes", note="m"), Contender(fails)),
    ]
    fast, floor, broken = time_section(entries, warmup=0, reps=2, device="cpu")
    assert fast.status == "ok" and fast.median_ms > 0 and fast.min_ms <= fast.median_ms
    assert fast.peak_extra_mb >= 1.0 and fast.note == "n"
    assert floor.peak_extra_mb == 12.5
    assert broken.status == "unavailable: RuntimeError: kernel launch failed" and broken.median_ms is None
    assert (broken.impl, broken.mode, broken.size, broken.per_token_logp, broken.note) == (
        "broken",
        "fwd",
        "s",
        "yes",
        "m",
    )


def test_cpu_device_name_and_slug():
    assert device_name("cpu").startswith("cpu-") and device_name("cpu").endswith("cores")
    assert device_slug("cpu") == "cpu"


def test_unavailable_row_names_the_reason_and_keeps_the_row_fields():
    try:
        import hotloop_no_such_module  # noqa: F401
    except ImportError as exc:
        row = unavailable_row("x", exc, mode="both", size="s")
    assert row.status.startswith("unavailable: ModuleNotFoundError") and "hotloop_no_such_module" in row.status
    assert (row.impl, row.mode, row.size) == ("x", "both", "s")
    off_device = unavailable_row("y", Unavailable("Triton kernel, CUDA only"), mode="both", size="s")
    assert off_device.status == "unavailable: Triton kernel, CUDA only"


def test_ratios_divide_by_floor_and_baseline_of_the_same_size_and_mode():
    rows = [
        Row("floor", "fwd", "a", median_ms=2.0),
        Row("naive", "fwd", "a", median_ms=8.0),
        Row("fast", "fwd", "a", median_ms=4.0),
        Row("fast", "bwd", "a", median_ms=3.0),
        Row("fast", "fwd", "b", median_ms=5.0),
        Row("gone", "fwd", "a", status="unavailable: x"),
    ]
    out = {(r.impl, r.mode, r.size): r for r in add_ratios(rows, ("floor", "naive"))}
    assert out["fast", "fwd", "a"].ratios["floor"] == pytest.approx(2.0)
    assert out["fast", "fwd", "a"].ratios["naive"] == pytest.approx(0.5)
    assert out["naive", "fwd", "a"].ratios["naive"] == pytest.approx(1.0)
    for key in (("fast", "bwd", "a"), ("fast", "fwd", "b"), ("gone", "fwd", "a")):
        assert out[key].ratios == {"floor": None, "naive": None}


def test_write_results_writes_stamped_md_json_and_png(tmp_path):
    meta = collect_meta("cpu", slug="cpu", notes=["a footer note"])
    rows = [
        Row("floor", "fwd", "a", median_ms=2.0, peak_extra_mb=0.0),
        Row("naive", "fwd", "a", median_ms=6.0, peak_extra_mb=3.5, per_token_logp="yes"),
        Row("gone", "both", "a", status="unavailable: no CUDA"),
    ]
    paths = write_results("demo", rows, meta, out_dir=tmp_path)
    assert {p.name for p in paths.values()} == {"demo-cpu.md", "demo-cpu.json", "demo-cpu.png"}
    data = json.loads(paths["json"].read_text())
    assert {"git_sha", "torch", "triton", "device", "date", "memory_method"} <= set(data["meta"])
    naive = next(r for r in data["rows"] if r["impl"] == "naive")
    assert naive["ratios"] == {"floor": pytest.approx(3.0), "naive": pytest.approx(1.0)}
    md = paths["md"].read_text()
    assert "| naive | fwd | 6.00 | 3.00 | 1.00 | 3.5 | yes |" in md
    assert "unavailable: no CUDA" in md and "a footer note" in md and meta["git_sha"] in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_logprob_bench_runs_end_to_end_on_a_tiny_size(tmp_path, one_thread):
    paths = logprob.main(
        [
            "--sizes",
            "33,16,97",
            "--reps",
            "1",
            "--warmup",
            "0",
            "--out-dir",
            str(tmp_path),
            "--impls",
            "floor,naive,trl,liger",
        ]
    )
    data = json.loads(paths["json"].read_text())
    rows = {(r["impl"], r["mode"]): r for r in data["rows"]}
    for impl in ("floor", "naive", "trl"):
        for mode in logprob.MODES:
            assert rows[impl, mode]["status"] == "ok" and rows[impl, mode]["median_ms"] > 0
            assert None not in rows[impl, mode]["ratios"].values()
    assert rows["naive", "fwd+bwd"]["ratios"]["naive"] == pytest.approx(1.0)
    assert rows["liger", "both"]["status"].startswith("unavailable")
    assert data["meta"]["dtype"] == "float32" and data["rows"][0]["size"] == "N=33 D=16 V=97 float32"


@pytest.mark.skipif(
    importlib.util.find_spec("hotloop.kernels.fused_linear_logprob") is None,
    reason="hotloop.kernels.fused_linear_logprob not written yet",
)
def test_logprob_bench_error_column_is_small_for_exact_implementations(tmp_path, one_thread):
    paths = logprob.main(
        [
            "--sizes",
            "40,24,131",
            "--reps",
            "1",
            "--warmup",
            "0",
            "--out-dir",
            str(tmp_path),
            "--impls",
            "naive,hotloop,torch,trl",
        ]
    )
    rows = json.loads(paths["json"].read_text())["rows"]
    errors = {r["impl"]: r["max_abs_err"] for r in rows if r["status"] == "ok"}
    assert set(errors) == {"naive", "hotloop", "torch", "trl"}
    assert all(err < 1e-4 for err in errors.values()), errors


def test_logprob_grid_axes_give_sizes_and_skip_large_cells():
    args = logprob.parse_args(["--seqs", "1,16", "--tokens", "128,2048", "--dim", "64", "--vocab", "1000"])
    assert args.sizes == [(128, 64, 1000), (2048, 64, 1000), (2048, 64, 1000)]  # 16 × 2048 > 16384 rows: skipped


def test_logprob_cli_rejects_bad_sizes_and_unknown_impls():
    with pytest.raises(SystemExit):
        logprob.parse_args(["--seqs", "1"])  # --tokens missing
    with pytest.raises(SystemExit):
        logprob.parse_args(["--sizes", "1,2"])
    with pytest.raises(SystemExit):
        logprob.parse_args(["--impls", "naive,nope"])
