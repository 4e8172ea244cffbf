"""Benchmark result files: ``bench/results/<area>-<device>.{md,json,png}`` and the stamps they carry.

:func:`collect_meta` stamps a run with the git SHA (``-dirty`` when tracked files other than the results
changed), torch/triton versions, device, UTC date, load average and the memory method;
:func:`write_results` adds the ``× <impl>`` ratio columns (:func:`add_ratios`) to the rows that
``bench._harness`` timed and writes the Markdown table, the JSON and the bar-chart PNG.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import subprocess
from dataclasses import asdict, replace
from pathlib import Path

import torch

from bench._harness import Row, memory_method

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent


def device_name(device: torch.device | str) -> str:
    """Human-readable device: the CUDA device name, or ``cpu-<n>cores``."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{os.cpu_count()}cores"


def device_slug(device: torch.device | str) -> str:
    """Short file-name slug: ``cpu``, ``h100``, ``a100``, ... (lower case, [a-z0-9-] only)."""
    device = torch.device(device)
    if device.type != "cuda":
        return "cpu"
    name = device_name(device)
    model = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", name)
    slug = model.group(1) if model else name
    return re.sub(r"[^a-z0-9]+", "-", slug.lower()).strip("-") or "cuda"


def add_ratios(rows: list[Row], ratios_to: tuple[str, ...]) -> list[Row]:
    """Rows whose ``ratios[impl]`` = median time over that of ``impl``'s row, for each impl of ``ratios_to``.

    Ratios compare rows with the same ``size`` and ``mode``; they are ``None`` where either time is missing.
    """
    ref = {(r.impl, r.size, r.mode): r.median_ms for r in rows if r.median_ms is not None}

    def ratio(row: Row, impl: str) -> float | None:
        denom = ref.get((impl, row.size, row.mode))
        return row.median_ms / denom if row.median_ms is not None and denom else None

    return [replace(r, ratios={impl: ratio(r, impl) for impl in ratios_to}) for r in rows]


def collect_meta(device: torch.device | str, **extra) -> dict:
    """Git SHA (``-dirty`` if tracked files other than bench/results/ changed), torch/triton versions, device, UTC date,
    load average."""

    def git(*args: str) -> str:
        try:
            out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
            return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    sha = git("rev-parse", "--short=12", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results"):  # results are outputs
        sha += "-dirty"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return {
        "git_sha": sha,
        "torch": torch.__version__,
        "triton": triton_version,
        "device": device_name(device),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "memory_method": memory_method(device),
        **extra,
    }


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _markdown(area: str, rows: list[Row], meta: dict, ratios_to: tuple[str, ...]) -> str:
    """The results table, one section per size, with the meta header and the method footer."""
    head = [f"# {area} — {meta['device']}", ""]
    head += [f"- {key}: {value}" for key, value in meta.items() if key not in ("memory_method", "notes")]
    lines = head + [""]
    titles = [
        "impl",
        "mode",
        "median ms",
        *(f"× {impl}" for impl in ratios_to),
        "peak extra MB",
        "per-token logp?",
        "max abs err",
        "note",
    ]
    for size in dict.fromkeys(r.size for r in rows):
        lines += [f"## {size}", "", "| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
        for r in (r for r in rows if r.size == size):
            note = r.note if r.status == "ok" else "; ".join(x for x in (r.status, r.note) if x)
            cells = [
                r.impl,
                r.mode,
                _fmt(r.median_ms, ".2f"),
                *(_fmt(r.ratios.get(i), ".2f") for i in ratios_to),
                _fmt(r.peak_extra_mb, ".1f"),
                r.per_token_logp,
                _fmt(r.max_abs_err, ".2e"),
                note.replace("|", "/"),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["---", "", f"Time: median of the timed calls. {meta['memory_method']}."]
    lines += [f"{note}" for note in meta.get("notes", [])]
    return "\n".join(lines) + "\n"


def _plot(path: Path, area: str, rows: list[Row], meta: dict) -> None:
    """Bar charts: median time (top) and peak extra memory (bottom), one column per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.status == "ok"]
    modes = list(dict.fromkeys(r.mode for r in ok)) or ["(none)"]
    sizes = list(dict.fromkeys(r.size for r in ok))
    impls = list(dict.fromkeys(r.impl for r in ok))
    colors = {impl: plt.cm.tab10(i % 10) for i, impl in enumerate(impls)}  # one colour per impl in every panel
    fig, axes = plt.subplots(2, len(modes), figsize=(6 * len(modes), 7), squeeze=False)
    for col, mode in enumerate(modes):
        present = [impl for impl in impls if any(r.mode == mode and r.impl == impl for r in ok)]
        width = 0.8 / max(len(present), 1)
        for row_i, (attr, label) in enumerate((("median_ms", "median ms"), ("peak_extra_mb", "peak extra MB"))):
            ax = axes[row_i][col]
            for k, impl in enumerate(present):
                values = {r.size: getattr(r, attr) for r in ok if r.mode == mode and r.impl == impl}
                xs = [i + k * width for i, s in enumerate(sizes) if values.get(s) is not None]
                ax.bar(
                    xs, [values[s] for s in sizes if values.get(s) is not None], width, label=impl, color=colors[impl]
                )
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(sizes))], sizes, fontsize=7, rotation=15)
            ax.set_ylabel(label)
            ax.set_title(f"{mode}: {label}", fontsize=9)
        axes[0][col].legend(fontsize=7)
    fig.suptitle(f"{area} — {meta['device']} — {meta['git_sha']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(
    area: str,
    rows: list[Row],
    meta: dict,
    *,
    ratios_to: tuple[str, ...] = ("floor", "naive"),
    out_dir: Path | str = RESULTS_DIR,
) -> dict[str, Path]:
    """Write ``<out_dir>/<area>-<device slug>.{md,json,png}`` with a ``× <impl>`` ratio column per ``ratios_to``.

    Args:
        area: benchmark area (``logprob``, ``losses``, ...).
        rows: the measured and unavailable rows.
        meta: from :func:`collect_meta` plus a ``slug`` key (device slug for the file names).
        ratios_to: impl names the ratio columns divide by (the floor first, then baselines and peers).
        out_dir: folder for the three files (created if missing).

    Returns:
        The three paths, keyed ``md``, ``json``, ``png``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = add_ratios(rows, ratios_to)
    stem = out_dir / f"{area}-{meta['slug']}"
    paths = {ext: stem.with_suffix(f".{ext}") for ext in ("md", "json", "png")}
    paths["md"].write_text(_markdown(area, rows, meta, ratios_to))
    paths["json"].write_text(
        json.dumps(
            {"area": area, "meta": meta, "ratios_to": list(ratios_to), "rows": [asdict(r) for r in rows]}, indent=1
        )
    )
    _plot(paths["png"], area, rows, meta)
    return paths
