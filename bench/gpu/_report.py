"""Results of one ``bench.gpu`` run: correctness checks, timing rows, skipped sections; written as
``gpu-<device>.{md,json,png}`` (the timing table and plot by ``bench._results.write_results``, the checks and
the loop section added in front of the table and into the JSON)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench._harness import Row
from bench._results import write_results


@dataclass
class Check:
    """One comparison: ``error`` (relative, or absolute in nats where ``kind`` says so) within ``tol``."""

    section: str
    name: str
    error: float
    tol: float
    kind: str = "rel"

    @property
    def ok(self) -> bool:
        return math.isfinite(self.error) and self.error <= self.tol


@dataclass
class Report:
    """Everything a run produced; ``failed`` decides the exit status."""

    meta: dict
    checks: list[Check] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (section, why)
    errors: list[tuple[str, str]] = field(default_factory=list)  # (section, exception) of a section that crashed
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per section
    targets: list[dict] = field(default_factory=list)  # performance targets: name, value, goal, met

    @property
    def failed(self) -> list[str]:
        """What makes the run fail: a check out of tolerance, a crashed section, a skipped correctness section."""
        bad = [f"{c.section}: {c.name}: {c.kind} error {c.error:.3e} > {c.tol:.1e}" for c in self.checks if not c.ok]
        bad += [f"{s}: crashed: {e}" for s, e in self.errors]
        return bad + [f"{s}: skipped ({why})" for s, why in self.skipped if not s.startswith(("timing", "unselected"))]

    def write(self, out_dir: Path) -> dict[str, Path]:
        meta = dict(self.meta, notes=self.meta.get("notes", []))
        paths = write_results("gpu", self.rows, meta, ratios_to=("floor", "liger"), out_dir=out_dir)
        table = paths["md"].read_text().split("\n", 1)[1]  # the harness's title line is replaced by ours
        paths["md"].write_text(self._markdown() + table)
        data = json.loads(paths["json"].read_text())
        data.update(
            checks=[dict(asdict(c), ok=c.ok) for c in self.checks],
            skipped=self.skipped,
            errors=self.errors,
            seconds=self.seconds,
            targets=self.targets,
            failed=self.failed,
        )
        paths["json"].write_text(json.dumps(data, indent=1, default=str))
        return paths

    def _markdown(self) -> str:
        lines = [
            f"# bench.gpu — {self.meta['device']}",
            "",
            f"**{'FAILED' if self.failed else 'PASSED'}**: {sum(c.ok for c in self.checks)} / {len(self.checks)}"
            f" checks within tolerance; wall time per section (s): "
            + ", ".join(f"{k} {v:.0f}" for k, v in self.seconds.items()),
            "",
        ]
        lines += [f"- FAIL {line}" for line in self.failed] + [""]
        if self.targets:
            dry = " (dry run: interpreter timings on CPU, not meaningful)" if self.meta.get("dry_run") else ""
            lines += [f"## Targets{dry}", "", "| target | measured | goal | met |", "|---|---|---|---|"]
            lines += [f"| {t['name']} | {t['value']} | {t['goal']} | {t['met']} |" for t in self.targets] + [""]
        lines += [
            "## Correctness (float64 references)",
            "",
            "| section | check | error | tol | ok |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {c.section} | {c.name} | {c.kind} {c.error:.2e} | {c.tol:.0e} | {'ok' if c.ok else 'FAIL'} |"
            for c in self.checks
        ]
        lines += ["", *(f"- skipped {s}: {why}" for s, why in self.skipped), "", "## Timings", ""]
        return "\n".join(lines) + "\n"
