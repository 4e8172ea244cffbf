"""Loader and checked entry points for the csrc/ native row kernels (``hotloop.kernels._row_kernels``).

With z = inv_temperature · x over a row of V logits and target t:

    lse = logsumexp(z),  logp = z_t − lse,  H = lse − Σ_j softmax(z)_j z_j
    row_grad_: x_j ← s · [g_lp (1[j = t] − p_j) − g_ent p_j (log p_j + H)],  p_j = exp(s x_j − lse)

``row_stats_fold_`` folds a block of columns into a running per-row state (fp64 ``[4, R]``: max m,
S = Σ e^{z−m}, T = Σ e^{z−m}(z−m), z_t), so a row may be swept in vocabulary blocks whose logits
are still in cache; ``finish_row_state`` turns the state into (lse, logp, entropy). ``row_stats``
is the one-block case.

The kernels are C++ (OpenMP over rows, SIMD within a row; docs/native-kernels.md) bound with
pybind11 and fed ``tensor.data_ptr()`` integers, so they need no PyTorch C++ headers. Memory: one
read of the logits per fold; one read and one in-place write for ``row_grad_``; outputs
are three fp32 vectors of length R.

``available()`` is False when ``HOTLOOP_NATIVE=0`` or when the extension was not built; the second
case warns once, and callers then run their PyTorch path.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from types import ModuleType

import torch

from hotloop._errors import expected

_DTYPE_FLAG = {torch.float32: 0, torch.bfloat16: 1}


@functools.cache
def _module() -> ModuleType | None:
    """The compiled extension, imported once; None (after one warning) if it cannot be imported."""
    try:
        return importlib.import_module("hotloop.kernels._row_kernels")
    except ImportError as err:
        warnings.warn(
            f"hotloop native row kernels unavailable ({err}); using the PyTorch path.", RuntimeWarning, stacklevel=3
        )
        return None


def available() -> bool:
    """Whether the compiled row kernels can be used (False when ``HOTLOOP_NATIVE=0``)."""
    if os.environ.get("HOTLOOP_NATIVE", "1").strip() == "0":
        return False
    return _module() is not None


def _require_module() -> ModuleType:
    if not available():
        raise RuntimeError("hotloop native row kernels are not available (HOTLOOP_NATIVE=0 or not built)")
    return _module()


def _check_logits(logits: torch.Tensor) -> None:
    if logits.device.type != "cpu":
        raise ValueError(expected("logits", "a CPU tensor", f"device {logits.device}"))
    if logits.dtype not in _DTYPE_FLAG:
        raise TypeError(expected("logits", "float32 or bfloat16", logits.dtype))
    if logits.dim() != 2:
        raise ValueError(expected("logits", "2-D [R, V]", f"shape {tuple(logits.shape)}"))
    if logits.size(1) > 1 and logits.stride(1) != 1:
        raise ValueError(expected("logits", "contiguous rows (stride(1) == 1)", f"strides {logits.stride()}"))


def _check_vector(name: str, t: torch.Tensor | None, rows: int, dtype: torch.dtype) -> None:
    if t is None:
        return
    if t.device.type != "cpu" or t.dtype != dtype or t.shape != (rows,) or not t.is_contiguous():
        seen = f"{t.dtype} {tuple(t.shape)} on {t.device} (contiguous={t.is_contiguous()})"
        raise ValueError(expected(name, f"a contiguous CPU {dtype} tensor of shape ({rows},)", seen))


def _check_inv_temperature(inv_temperature: float) -> float:
    s = float(inv_temperature)
    if not (s > 0.0 and s < float("inf")):
        raise ValueError(expected("inv_temperature", "a finite number > 0", inv_temperature))
    return s


def new_row_state(rows: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Empty running statistics for ``row_stats_fold_``: float64 [4, R] rows (m = −inf, S, T, z_t = 0)."""
    state = torch.zeros(4, rows, dtype=torch.float64, device=device)
    state[0] = float("-inf")
    return state


def row_stats_fold_(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    vocab_start: int,
    inv_temperature: float,
    state: torch.Tensor,
    with_entropy: bool = True,
) -> None:
    """Fold the columns ``vocab_start .. vocab_start + Vb`` of each row into ``state``, in place.

    Args:
        logits: [R, Vb] float32 | bfloat16 on CPU, rows contiguous (row stride may exceed Vb).
        targets: [R] int64 column in the full row; a target outside this block only skips z_t here.
        state: [4, R] float64 from ``new_row_state`` (m, S, T, z_t), updated in place.
        with_entropy: accumulate T (needed for the entropy only); False leaves T untouched and
            saves a multiply-add per logit.
    """
    ext = _require_module()
    _check_logits(logits)
    rows, block = logits.shape
    _check_vector("targets", targets, rows, torch.int64)
    if state.dtype != torch.float64 or state.shape != (4, rows) or not state.is_contiguous():
        seen = f"{state.dtype} {tuple(state.shape)} (contiguous={state.is_contiguous()})"
        raise ValueError(expected("state", f"a contiguous float64 tensor of shape (4, {rows})", seen))
    if int(vocab_start) < 0:
        raise ValueError(expected("vocab_start", "an int >= 0", vocab_start))
    s = _check_inv_temperature(inv_temperature)
    if rows == 0 or block == 0:
        return
    m, total, shifted, target_logit = (row.data_ptr() for row in state)
    shifted = shifted if with_entropy else 0  # a null T pointer: the kernel skips T
    ext.row_stats_fold(
        logits.data_ptr(),
        targets.data_ptr(),
        m,
        total,
        shifted,
        target_logit,
        rows,
        block,
        logits.stride(0),
        int(vocab_start),
        _DTYPE_FLAG[logits.dtype],
        s,
        torch.get_num_threads(),
    )


def finish_row_state(
    state: torch.Tensor, targets: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lse [R] float64, logp, entropy [R] float32) of a folded state; logp = entropy = 0 on ignored rows.

    lse stays float64 for ``row_grad_`` (see there): at |z| ~ 1e4 its fp32 rounding alone would
    scale every probability of the row by up to 1 ± 5e-4.
    """
    m, total, shifted, target_logit = state.unbind(0)
    log_total = torch.log(total)
    lse = m + log_total
    ignored = targets == ignore_index
    logp = (target_logit - lse).masked_fill_(ignored, 0.0)
    entropy = (log_total - shifted / total).masked_fill_(ignored, 0.0)
    return lse, logp.float(), entropy.float()


def row_stats(
    logits: torch.Tensor, targets: torch.Tensor, *, inv_temperature: float, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row log-sum-exp, target log-prob and entropy of ``inv_temperature · logits`` (one fold).

    Args:
        logits: [R, V] float32 | bfloat16 on CPU, rows contiguous (row stride may exceed V).
        targets: [R] int64; rows equal to ``ignore_index`` get logp = entropy = 0.
    Returns:
        (lse [R] float64, logp [R] float32, entropy [R] float32); lse is computed for ignored rows too.
    Raises:
        IndexError: a non-ignored target outside [0, V).
    """
    _check_logits(logits)
    rows, vocab = logits.shape
    _check_vector("targets", targets, rows, torch.int64)
    if vocab == 0:
        raise ValueError(expected("logits", "at least one column", f"shape {tuple(logits.shape)}"))
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        want = f"a value in [0, {vocab}) or ignore_index ({ignore_index})"
        raise IndexError(expected(f"targets[{row}]", want, int(targets[row])))
    state = new_row_state(rows)
    row_stats_fold_(logits, targets, vocab_start=0, inv_temperature=inv_temperature, state=state)
    return finish_row_state(state, targets, ignore_index)


def row_grad_(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    vocab_start: int,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    inv_temperature: float,
    ignore_index: int,
    out: torch.Tensor | None = None,
) -> None:
    """Overwrite a logit block with d(Σ g_lp · logp + g_ent · H)/d logits, in place (or write it to ``out``).

    Args:
        logits: [R, Vb] float32 | bfloat16 on CPU, columns ``vocab_start .. vocab_start + Vb`` of
            the full rows; rows contiguous. Becomes the gradient, same dtype (math in fp32).
        targets: [R] int64 column in the full row; ``ignore_index`` rows become 0.
        lse: [R] float64 from ``row_stats`` (or float32). A float64 lse is passed as its fp32 rounding
            plus the remainder, so ``log p = (z − lse_hi) − lse_lo`` stays exact to fp32 even where
            |z| ~ 1e4 (a lone fp32 lse is off by up to half an ulp there, ~5e-4, and so is every p_j).
        entropy: [R] float32, needed when ``grad_entropy`` is given.
        grad_logp: [R] float32 upstream gradient of logp. grad_entropy: [R] float32 or None (no entropy term).
        out: None, or [R, Vb] bfloat16 (rows contiguous) that takes the gradient of float32 ``logits``, which then
            stay as they are: one pass where an in-place pass and a bf16 copy would take two.
    """
    ext = _require_module()
    _check_logits(logits)
    rows, block = logits.shape
    if out is not None:
        _check_logits(out)
        if out.dtype != torch.bfloat16 or logits.dtype != torch.float32 or out.shape != logits.shape:
            want = f"bfloat16 {tuple(logits.shape)} (the gradient of float32 logits)"
            raise ValueError(expected("out", want, f"{out.dtype} {tuple(out.shape)} for {logits.dtype} logits"))
    _check_vector("targets", targets, rows, torch.int64)
    lse_hi, lse_lo = split_lse(lse, rows)
    for name, t in (("entropy", entropy), ("grad_logp", grad_logp), ("grad_entropy", grad_entropy)):
        _check_vector(name, t, rows, torch.float32)
    if grad_entropy is not None and entropy is None:
        raise ValueError(expected("entropy", "a tensor when grad_entropy is given", None))
    if int(vocab_start) < 0:
        raise ValueError(expected("vocab_start", "an int >= 0", vocab_start))
    s = _check_inv_temperature(inv_temperature)
    if rows == 0 or block == 0:
        return
    use_entropy = grad_entropy is not None
    ext.row_grad(
        logits.data_ptr(),
        targets.data_ptr(),
        lse_hi.data_ptr(),
        lse_lo.data_ptr(),
        entropy.data_ptr() if use_entropy else 0,
        grad_logp.data_ptr(),
        grad_entropy.data_ptr() if use_entropy else 0,
        rows,
        block,
        logits.stride(0),
        int(vocab_start),
        _DTYPE_FLAG[logits.dtype],
        s,
        int(ignore_index),
        torch.get_num_threads(),
        0 if out is None else out.data_ptr(),
        0 if out is None else out.stride(0),
    )


def split_lse(lse: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous float32 (hi, lo) [R] with hi + lo = ``lse`` (float64: to ~1e-12 relative; float32: lo = 0)."""
    if not isinstance(lse, torch.Tensor) or lse.dtype not in (torch.float32, torch.float64) or lse.shape != (rows,):
        seen = f"{lse.dtype} {tuple(lse.shape)}" if isinstance(lse, torch.Tensor) else type(lse).__name__
        raise ValueError(expected("lse", f"a float64 or float32 tensor of shape ({rows},)", seen))
    hi = lse.float().contiguous()
    return hi, (lse - hi.to(lse.dtype)).float().contiguous()


def reference_row_stats(
    logits: torch.Tensor, targets: torch.Tensor, *, inv_temperature: float, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float64 eager ``row_stats`` (lse, logp, entropy) [R] for tests and benchmarks."""
    z = logits.double() * inv_temperature
    lse = torch.logsumexp(z, dim=-1)
    ignored = targets == ignore_index
    safe = torch.where(ignored, 0, targets)
    logp = z.gather(-1, safe[:, None]).squeeze(-1) - lse
    entropy = lse - (torch.softmax(z, dim=-1) * z).sum(-1)
    return lse, logp.masked_fill(ignored, 0.0), entropy.masked_fill(ignored, 0.0)


def reference_row_grad(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    inv_temperature: float,
    ignore_index: int,
) -> torch.Tensor:
    """Float64 gradient of Σ g_lp · logp + g_ent · H w.r.t. the full logits [R, V], by autograd."""
    x = logits.double().requires_grad_(True)
    _, logp, entropy = reference_row_stats(x, targets, inv_temperature=inv_temperature, ignore_index=ignore_index)
    objective = (grad_logp.double() * logp).sum()
    if grad_entropy is not None:
        objective = objective + (grad_entropy.double() * entropy).sum()
    (grad,) = torch.autograd.grad(objective, x)
    return grad
