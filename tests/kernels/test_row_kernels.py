"""Native row kernels (csrc/, via kernels/_cpu_ext.py) against float64 eager PyTorch."""

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from hotloop.kernels import _cpu_ext
from tests.helpers import poison_, relative_error

REPO = Path(__file__).resolve().parents[2]
IGNORE = -100
# fp32 statistics and gradients within 1e-6 of float64; bf16 gradients are rounded to bf16.
TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2}

native = pytest.mark.skipif(
    not _cpu_ext.available(), reason="native row kernels not built (pip install -e . builds them) or HOTLOOP_NATIVE=0"
)


def _inputs(rows, vocab, dtype, scale=3.0, ignored_rows=(1,)):
    logits = (torch.randn(rows, vocab) * scale).to(dtype)
    targets = torch.randint(0, vocab, (rows,))
    targets[[r for r in ignored_rows if r < rows]] = IGNORE
    return logits, targets


def _check(out, ref, tol, what):
    err = relative_error(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,vocab", [(5, 1003), (3, 7), (4, 5001)])
@pytest.mark.parametrize("inv_temperature", [1.0, 0.7])
def test_row_stats_match_float64(nan_empty, dtype, rows, vocab, inv_temperature):
    logits, targets = _inputs(rows, vocab, dtype)
    out = _cpu_ext.row_stats(logits, targets, inv_temperature=inv_temperature, ignore_index=IGNORE)
    ref = _cpu_ext.reference_row_stats(logits, targets, inv_temperature=inv_temperature, ignore_index=IGNORE)
    for name, o, r, dtype in zip(("lse", "logp", "entropy"), out, ref, (torch.float64, torch.float32, torch.float32)):
        assert o.dtype == dtype, name
        _check(o, r, 1e-6, name)


@native
def test_row_stats_ignored_rows_have_zero_logp_and_entropy_but_a_real_lse(nan_empty):
    logits, targets = _inputs(3, 257, torch.float32, ignored_rows=(0, 1, 2))
    lse, logp, entropy = _cpu_ext.row_stats(logits, targets, inv_temperature=1.3, ignore_index=IGNORE)
    assert torch.equal(logp, torch.zeros(3)) and torch.equal(entropy, torch.zeros(3))
    _check(lse, torch.logsumexp(logits.double() * 1.3, -1), 1e-6, "lse")


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_stats_stay_finite_and_exact_for_logits_of_1e4(nan_empty, dtype):
    logits, targets = _inputs(4, 999, dtype, scale=1e4)
    out = _cpu_ext.row_stats(logits, targets, inv_temperature=1.0, ignore_index=IGNORE)
    ref = _cpu_ext.reference_row_stats(logits, targets, inv_temperature=1.0, ignore_index=IGNORE)
    for name, o, r in zip(("lse", "logp", "entropy"), out, ref):
        assert torch.isfinite(o).all(), name
        assert (o.double() - r).abs().max() <= 1e-6 * r.abs().max() + 1e-6, name


@native
def test_row_stats_treat_minus_inf_columns_as_zero_probability(nan_empty):
    logits, targets = _inputs(3, 301, torch.float32, ignored_rows=())
    targets.clamp_(max=149)
    masked = logits.clone()
    masked[:, 150:] = float("-inf")
    out = _cpu_ext.row_stats(masked, targets, inv_temperature=1.0, ignore_index=IGNORE)
    ref = _cpu_ext.reference_row_stats(logits[:, :150], targets, inv_temperature=1.0, ignore_index=IGNORE)
    for name, o, r in zip(("lse", "logp", "entropy"), out, ref):
        _check(o, r, 1e-6, name)


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fold_without_entropy_leaves_t_alone_and_gives_the_same_lse_and_logp(dtype):
    """Three vocabulary blocks folded with and without T: m, S, z_t bit-identical; T untouched without it."""
    logits, targets = _inputs(5, 4099, dtype, ignored_rows=(3,))
    with_t, without_t = _cpu_ext.new_row_state(5), _cpu_ext.new_row_state(5)
    sentinel = torch.randn(5, dtype=torch.float64)
    without_t[2] = sentinel
    for v0, v1 in ((0, 1000), (1000, 3001), (3001, 4099)):
        for state, flag in ((with_t, True), (without_t, False)):
            _cpu_ext.row_stats_fold_(
                logits[:, v0:v1], targets, vocab_start=v0, inv_temperature=0.7, state=state, with_entropy=flag
            )
    assert torch.equal(without_t[[0, 1, 3]], with_t[[0, 1, 3]]) and torch.equal(without_t[2], sentinel)
    lse, logp, _ = _cpu_ext.finish_row_state(with_t, targets, IGNORE)
    ref = _cpu_ext.reference_row_stats(logits, targets, inv_temperature=0.7, ignore_index=IGNORE)
    _check(lse, ref[0], 1e-6, "lse")
    _check(logp, ref[1], 1e-6, "logp")


@native
def test_row_stats_reject_out_of_range_targets():
    logits, targets = _inputs(4, 50, torch.float32, ignored_rows=())
    targets[2] = 50
    with pytest.raises(IndexError, match=r"targets\[2\]: expected .*, got 50"):
        _cpu_ext.row_stats(logits, targets, inv_temperature=1.0, ignore_index=IGNORE)


def _grad_case(dtype, vocab, start, stop, with_entropy, inv_temperature):
    rows = 6
    logits, targets = _inputs(rows, vocab, dtype, ignored_rows=(4,))
    targets[0], targets[1] = start, stop - 1  # block edges inside the block (when it has columns)
    targets[2] = 0 if start > 0 else vocab - 1  # outside the block unless it is the whole row
    lse, _, entropy = _cpu_ext.reference_row_stats(
        logits, targets, inv_temperature=inv_temperature, ignore_index=IGNORE
    )
    g_lp = torch.randn(rows)
    g_ent = torch.randn(rows) if with_entropy else None
    ref = _cpu_ext.reference_row_grad(
        logits, targets, grad_logp=g_lp, grad_entropy=g_ent, inv_temperature=inv_temperature, ignore_index=IGNORE
    )
    block = logits[:, start:stop].contiguous()
    _cpu_ext.row_grad_(
        block,
        targets,
        vocab_start=start,
        lse=lse.float(),
        entropy=entropy.float(),
        grad_logp=g_lp,
        grad_entropy=g_ent,
        inv_temperature=inv_temperature,
        ignore_index=IGNORE,
    )
    return block, ref[:, start:stop]


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab,start,stop", [(1003, 0, 1003), (1003, 301, 702), (7, 3, 7), (3001, 2, 2999)])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_row_grad_matches_float64_autograd_on_a_vocab_block(dtype, vocab, start, stop, with_entropy):
    block, ref = _grad_case(dtype, vocab, start, stop, with_entropy, inv_temperature=0.7)
    assert block.dtype == dtype
    _check(block, ref, TOL[dtype], "grad")
    assert torch.equal(block[4], torch.zeros_like(block[4])), "ignored row must be zero"


@native
@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_row_grad_with_large_logits_and_a_float64_lse_is_finite_and_exact(offset):
    """Peaked rows (|x| ~ 1e4) and flat rows shifted by 1e4: the float64 lse, split into fp32 hi + lo, keeps 1e-6."""
    logits, targets = _inputs(3, 513, torch.float32, scale=2.0 if offset else 1e4, ignored_rows=())
    logits += offset
    lse, _, entropy = _cpu_ext.reference_row_stats(logits, targets, inv_temperature=1.0, ignore_index=IGNORE)
    g_lp, g_ent = torch.randn(3), torch.randn(3)
    ref = _cpu_ext.reference_row_grad(
        logits, targets, grad_logp=g_lp, grad_entropy=g_ent, inv_temperature=1.0, ignore_index=IGNORE
    )
    out = logits.clone()
    _cpu_ext.row_grad_(
        out,
        targets,
        vocab_start=0,
        lse=lse,
        entropy=entropy.float(),
        grad_logp=g_lp,
        grad_entropy=g_ent,
        inv_temperature=1.0,
        ignore_index=IGNORE,
    )
    assert torch.isfinite(out).all()
    _check(out, ref, 1e-6, "grad")


@native
def test_row_grad_writes_only_its_columns_of_a_strided_view():
    full, targets = _inputs(4, 700, torch.float32, ignored_rows=())
    lse, _, _ = _cpu_ext.reference_row_stats(full, targets, inv_temperature=1.0, ignore_index=IGNORE)
    g_lp = torch.randn(4)
    ref = _cpu_ext.reference_row_grad(
        full, targets, grad_logp=g_lp, grad_entropy=None, inv_temperature=1.0, ignore_index=IGNORE
    )
    before = full.clone()
    _cpu_ext.row_grad_(
        full[:, 200:450],
        targets,
        vocab_start=200,
        lse=lse.float(),
        entropy=None,
        grad_logp=g_lp,
        grad_entropy=None,
        inv_temperature=1.0,
        ignore_index=IGNORE,
    )
    _check(full[:, 200:450], ref[:, 200:450], 1e-6, "grad")
    assert torch.equal(full[:, :200], before[:, :200]) and torch.equal(full[:, 450:], before[:, 450:])


@pytest.mark.parametrize("path", ["native", "torch"])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_row_grad_into_a_bf16_out_is_the_rounded_in_place_gradient_and_keeps_the_logits(
    path, with_entropy, monkeypatch
):
    """``out=`` (the bf16 operand of the gradient GEMMs, written by the row pass itself): the bf16 rounding of the
    in-place fp32 gradient, into a column slice of a wider poisoned buffer; the native kernel leaves the logits."""
    if path == "native" and not _cpu_ext.available():
        pytest.skip("native row kernels not built")
    monkeypatch.setenv("HOTLOOP_NATIVE", "1" if path == "native" else "0")
    from hotloop.kernels._torch_tiles import row_grad_

    full, targets = _inputs(5, 900, torch.float32, ignored_rows=(3,))
    targets[0] = 250  # a target inside the block
    lse, _, entropy = _cpu_ext.reference_row_stats(full, targets, inv_temperature=0.7, ignore_index=IGNORE)
    g_lp = torch.randn(5)
    g_ent = torch.randn(5) if with_entropy else None
    args = (targets, 200, lse, entropy.float(), g_lp, g_ent, 0.7, IGNORE)
    in_place = full[:, 200:650].clone()
    row_grad_(in_place, *args)
    block = full[:, 200:650].clone()
    before = block.clone()
    wide = poison_(torch.empty(5, 470, dtype=torch.bfloat16))
    row_grad_(block, *args, out=wide[:, 10:460])
    assert torch.equal(wide[:, 10:460], in_place.bfloat16())
    assert wide[:, :10].isnan().all() and wide[:, 460:].isnan().all(), "wrote outside out's columns"
    if path == "native":
        assert torch.equal(block, before), "the native kernel must leave the logits as they are"
    ref = _cpu_ext.reference_row_grad(
        full, targets, grad_logp=g_lp, grad_entropy=g_ent, inv_temperature=0.7, ignore_index=IGNORE
    )
    _check(wide[:, 10:460], ref[:, 200:650], TOL[torch.bfloat16], "grad")


@native
def test_row_grad_out_must_be_bf16_of_the_logits_shape():
    logits, targets = _inputs(4, 10, torch.float32)
    opts = dict(vocab_start=0, lse=torch.randn(4), entropy=None, grad_logp=torch.randn(4), grad_entropy=None)
    for out in (torch.empty(4, 10), torch.empty(4, 9, dtype=torch.bfloat16)):
        with pytest.raises(ValueError, match="out: expected bfloat16"):
            _cpu_ext.row_grad_(logits, targets, **opts, inv_temperature=1.0, ignore_index=IGNORE, out=out)
    with pytest.raises(ValueError, match="out: expected bfloat16"):
        _cpu_ext.row_grad_(
            logits.bfloat16(), targets, **opts, inv_temperature=1.0, ignore_index=IGNORE, out=torch.empty_like(logits)
        )


@native
def test_row_kernels_reject_bad_inputs_naming_the_argument():
    logits, targets = _inputs(4, 10, torch.float32)
    with pytest.raises(ValueError, match="logits: expected contiguous rows"):
        _cpu_ext.row_stats(logits.t(), targets[:1].repeat(10), inv_temperature=1.0, ignore_index=IGNORE)
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        _cpu_ext.row_stats(logits.half(), targets, inv_temperature=1.0, ignore_index=IGNORE)
    with pytest.raises(ValueError, match="targets: expected"):
        _cpu_ext.row_stats(logits, targets.int(), inv_temperature=1.0, ignore_index=IGNORE)
    with pytest.raises(ValueError, match="inv_temperature"):
        _cpu_ext.row_stats(logits, targets, inv_temperature=0.0, ignore_index=IGNORE)
    with pytest.raises(ValueError, match="entropy: expected a tensor when grad_entropy is given"):
        _cpu_ext.row_grad_(
            logits,
            targets,
            vocab_start=0,
            lse=poison_(torch.empty(4)),
            entropy=None,
            grad_logp=torch.randn(4),
            grad_entropy=torch.randn(4),
            inv_temperature=1.0,
            ignore_index=IGNORE,
        )


def test_hotloop_native_0_disables_the_native_kernels(monkeypatch):
    monkeypatch.setenv("HOTLOOP_NATIVE", "0")
    assert not _cpu_ext.available()
    with pytest.raises(RuntimeError, match="not available"):
        _cpu_ext.row_stats(
            torch.randn(2, 5), torch.zeros(2, dtype=torch.long), inv_temperature=1.0, ignore_index=IGNORE
        )


def test_missing_extension_warns_once_and_reports_unavailable(monkeypatch):
    def fail(name):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.delenv("HOTLOOP_NATIVE", raising=False)
    monkeypatch.setattr(_cpu_ext.importlib, "import_module", fail)
    _cpu_ext._module.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert not _cpu_ext.available() and not _cpu_ext.available()
        assert len(caught) == 1 and "PyTorch path" in str(caught[0].message)
    finally:
        monkeypatch.undo()
        _cpu_ext._module.cache_clear()


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_cuda_row_kernels_compile_with_nvcc(tmp_path):
    src = REPO / "csrc" / "row_kernels_cuda.cu"
    cmd = ["nvcc", "-c", "-O3", "-std=c++17", str(src), "-o", str(tmp_path / "row_kernels_cuda.o")]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "row_kernels_cuda.o").stat().st_size > 0


@pytest.mark.skipif(
    shutil.which("c++") is None or os.environ.get("HOTLOOP_NATIVE") == "0",
    reason="no C++ compiler here, or native kernels disabled",
)
def test_the_install_built_the_native_kernels_where_a_compiler_exists():
    """Where ``pip install`` had a compiler, a missing extension is a silent build failure, not a fallback."""
    assert _cpu_ext.available(), "kernels/_row_kernels*.so missing: rerun `pip install -e .` and read its warning"


def test_a_failing_compiler_leaves_one_warning_and_a_working_install(tmp_path):
    """setup.py with a compiler that always fails: exit 0, one 'not built' warning line, no extension."""
    pytest.importorskip("pybind11")
    env = {**os.environ, "CC": "false", "CXX": "false", "HOTLOOP_SKIP_CUDA_CHECK": "1"}
    cmd = [
        sys.executable,
        "setup.py",
        "-q",
        "build_ext",
        "--build-lib",
        str(tmp_path / "lib"),
        "--build-temp",
        str(tmp_path / "tmp"),
    ]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    warning_lines = [line for line in result.stderr.splitlines() if line.startswith("WARNING: hotloop:")]
    assert len(warning_lines) == 1 and "native kernels not built" in warning_lines[0]
    assert not list(tmp_path.rglob("*.so"))
