"""Shared benchmark harness: timing, peak memory, peers that may be missing, the rows of the results tables.

Every area script (``bench/<area>.py``) builds, for each table section (one size, one loss), a row
and a zero-argument :class:`Contender` per implementation and mode; a peer that cannot be built here
(missing library or device) becomes an ``unavailable: <reason>`` row (:func:`unavailable_row`)
instead of a crash. :func:`time_section` times the contenders and fills in their rows;
``bench._results`` writes them to ``bench/results/<area>-<device>.{md,json,png}``.

Timing (:func:`measure_interleaved`): every contender of one table section is timed in the same
rounds. Each round calls every contender once, in an order rotated from round to round, so that a
slow spell of a shared machine (other tenants, frequency changes) lands on all of them alike
instead of on whichever one happened to run then. ``warmup`` untimed rounds first (compilation,
autotuning, allocator warm-up), then ``reps`` timed rounds; the median is reported. CUDA: one pair
of CUDA events per call, after a synchronize. CPU: ``time.perf_counter`` around each call.

Peak extra memory is taken in one more, untimed call so that measuring cannot slow the timed ones:
- CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus the memory
  allocated before the call (tensors from PyTorch's caching allocator; cuBLAS workspaces excluded).
- CPU: ``torch.profiler`` with ``profile_memory=True`` records every allocation and free made by
  PyTorch's CPU allocator; the peak of their running sum is the peak extra memory. Scratch memory
  that BLAS libraries allocate by themselves is not seen.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from hotloop.kernels import release_workspace

MB = 2**20


@dataclass(frozen=True)
class Measurement:
    """Wall-clock times of the timed calls (seconds) and the peak extra memory of one call (bytes)."""

    median_s: float
    min_s: float
    times: list[float]
    peak_extra_bytes: int


@dataclass
class Row:
    """One line of a results table. ``status`` is ``"ok"`` or ``"unavailable: <reason>"``."""

    impl: str
    mode: str
    size: str
    median_ms: float | None = None
    min_ms: float | None = None
    peak_extra_mb: float | None = None
    per_token_logp: str = ""
    max_abs_err: float | None = None
    note: str = ""
    status: str = "ok"
    ratios: dict[str, float | None] = field(default_factory=dict)  # impl -> median time over that impl's


def _time_one_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call: CUDA events around it on CUDA, ``perf_counter`` on the CPU."""
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3


def _cpu_peak_extra_bytes(fn: Callable[[], object]) -> int:
    """Peak of the running sum of PyTorch CPU allocations and frees during one call of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    running = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        if event.device_type() == torch.autograd.DeviceType.CPU:
            running += event.nbytes()
            peak = max(peak, running)
    return peak


def _cuda_peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


@dataclass(frozen=True)
class Contender:
    """One timed callable of a section: ``fn`` does the work; ``between`` runs untimed before every call."""

    fn: Callable[[], object]
    between: Callable[[], None] | None = None


def measure_interleaved(
    contenders: dict[str, Contender],
    *,
    warmup: int,
    reps: int,
    device: torch.device | str,
) -> dict[str, Measurement | Exception]:
    """Time every contender in the same rounds, then take each one's peak extra memory.

    Args:
        contenders: name -> Contender; all run on ``device``.
        warmup: untimed rounds first.
        reps: timed rounds (at least 1); round r starts at contender r mod len(contenders).
        device: picks CUDA events or ``perf_counter``, and the memory method.

    Returns:
        name -> Measurement (median, min and all times; peak extra bytes of one more, untimed call),
        or the exception that contender raised; it is dropped from later rounds, the others go on.
    """
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    device = torch.device(device)
    names, times = list(contenders), {name: [] for name in contenders}
    failed: dict[str, Exception] = {}

    def attempt(name: str, action: Callable[[], None]) -> None:
        try:
            action()
        except Exception as exc:  # noqa: BLE001 - one contender's failure (OOM, a peer's bug) must not stop the others
            failed[name] = exc
            if device.type == "cuda":
                torch.cuda.empty_cache()

    def one_call(c: Contender, timed: list[float] | None) -> None:
        if c.between is not None:
            c.between()
        if timed is None:
            c.fn()
        else:
            timed.append(_time_one_call(c.fn, device))

    for r in range(warmup + reps):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if name not in failed:
                attempt(name, lambda: one_call(contenders[name], times[name] if r >= warmup else None))  # noqa: B023 (called at once)
    out: dict[str, Measurement | Exception] = {}
    for name, c in contenders.items():
        peaks: list[int] = []
        if name not in failed:
            attempt(name, lambda: peaks.append(_peak_extra_bytes(c, device)))  # noqa: B023 (called at once)
        if name in failed:
            out[name] = failed[name]
        else:
            out[name] = Measurement(statistics.median(times[name]), min(times[name]), times[name], peaks[0])
    return out


def _peak_extra_bytes(contender: Contender, device: torch.device) -> int:
    """Peak extra memory of one call, after the contender's ``between``; ``between`` runs again after it.

    hotloop's kept tile buffers are freed first (``release_workspace``), so the call allocates them again and they
    count in its peak, as in a first call.
    """
    if contender.between is not None:
        contender.between()
    release_workspace()
    if device.type == "cuda":
        peak = _cuda_peak_extra_bytes(contender.fn, device)
    else:
        peak = _cpu_peak_extra_bytes(contender.fn)
    if contender.between is not None:
        contender.between()
    return peak


def memory_method(device: torch.device | str) -> str:
    """One sentence saying how peak extra memory was measured on ``device`` (for table footers)."""
    if torch.device(device).type == "cuda":
        return (
            "peak extra memory = torch.cuda.max_memory_allocated() during one untimed call "
            "minus memory allocated before it (caching-allocator tensors; cuBLAS workspaces excluded)"
        )
    return (
        "peak extra memory = peak of the running sum of PyTorch CPU allocator allocations and frees "
        "recorded by torch.profiler(profile_memory=True) during one untimed call "
        "(BLAS-internal scratch not seen; hotloop's kept tile buffers freed before it, so they count)"
    )


class Unavailable(RuntimeError):
    """Raised by a peer that cannot run here (missing package, wrong device, wrong GPU)."""


def unavailable_row(name: str, exc: BaseException, **row_fields) -> Row:
    """The row of a peer that could not run: ``unavailable: [<type>: ]<first line of the message>``.

    ``row_fields`` (``mode``, ``size``, ``per_token_logp``, ``note``) place it in its table. Out-of-memory,
    missing packages, missing CUDA and errors inside the peer all become such rows; an ``Unavailable``
    carries only its message.
    """
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    message = str(exc).strip()
    reason = message.splitlines()[0][:160] if message else ""
    kind = "" if isinstance(exc, Unavailable) else f"{type(exc).__name__}: "
    return Row(impl=name, status=f"unavailable: {kind}{reason}", **row_fields)


def time_section(
    entries: list[tuple[Row, Contender]], *, warmup: int, reps: int, device: torch.device | str
) -> list[Row]:
    """Time one table section's contenders in shared rounds (:func:`measure_interleaved`) and fill in their rows.

    Each row arrives with its impl, mode, size and notes; it leaves with median/min ms and peak extra MB
    (measured, unless the row came with a computed one), or as an unavailable row if its contender raised.
    """
    results = measure_interleaved(
        {str(k): c for k, (_, c) in enumerate(entries)}, warmup=warmup, reps=reps, device=device
    )
    rows = []
    for k, (row, _) in enumerate(entries):
        m = results[str(k)]
        if isinstance(m, Exception):
            rows.append(
                unavailable_row(
                    row.impl, m, mode=row.mode, size=row.size, per_token_logp=row.per_token_logp, note=row.note
                )
            )
        else:
            peak = m.peak_extra_bytes / MB if row.peak_extra_mb is None else row.peak_extra_mb
            rows.append(replace(row, median_ms=m.median_s * 1e3, min_ms=m.min_s * 1e3, peak_extra_mb=peak))
    return rows
