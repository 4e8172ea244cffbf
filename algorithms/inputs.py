"""Checks of everything a run reads from disk or imports, before any work starts.

:func:`check_inputs` looks at the files and directories a :class:`~hotloop.algorithms.config.RunConfig`
names — the model directory (or ``.gguf`` file), the prompts file, the pairs file, reward and judge
models — and at the optional packages the chosen reward needs, and raises one ``ValueError`` whose
message is a single line naming the file (and ``file:line`` inside a JSONL file). The CLI prints it and exits with 2,
so a typo costs a second, not the warm start.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from hotloop.algorithms.models import check_gguf_file, is_gguf

OPTIONAL_PACKAGES = {"math_verify": ("math_verify", "math-verify")}
"""Reward kind → (module it imports, pip package that provides it)."""
ALWAYS = (("matplotlib", "matplotlib"), ("rich", "rich"))
"""(module, pip package) every CLI run needs for its report."""


def check_inputs(config) -> None:
    """Raise ``ValueError`` (one line) for the first missing or malformed input of ``config``."""
    if config.model.path is not None and is_gguf(config.model.path):
        check_gguf_file(config.model.path)
    elif config.model.path is not None:
        check_model_dir("model.path", config.model.path)
    if config.reward.model:
        check_model_dir("reward.model", config.reward.model)
    if config.reward.judge.model and config.reward.judge.model != "policy":
        check_model_dir("reward.judge.model", config.reward.judge.model)
    if config.task.name == "jsonl":
        check_jsonl("task.prompts", config.task.prompts, {"prompt": str})
    if config.dpo.pairs_file is not None:
        check_jsonl("dpo.pairs_file", config.dpo.pairs_file, {"prompt": str, "chosen": str, "rejected": str})
    needed = [OPTIONAL_PACKAGES[k] for k in config.reward.kinds if k in OPTIONAL_PACKAGES] + list(ALWAYS)
    for module, package in needed:
        check_package(module, package)


def check_model_dir(name: str, path: str) -> None:
    """Raise unless ``path`` is a directory holding a transformers ``config.json``."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise ValueError(f"{name}: expected a local model directory, got {path!r} (no such directory)")
    if not (directory / "config.json").is_file():
        raise ValueError(
            f"{name}: expected a transformers model directory with config.json, got {path!r} "
            f"(holds {sorted(p.name for p in directory.iterdir())[:6]})"
        )


def check_jsonl(name: str, path: str, fields: dict[str, type]) -> int:
    """Raise ``ValueError("file:line: ...")`` unless every non-blank line is a JSON object with ``fields``;
    returns the number of rows."""
    file = Path(path).expanduser()
    try:
        text = file.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{name}: expected a readable JSONL file, got {path!r} ({err})") from None
    rows = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            raise ValueError(f"{file}:{number}: expected a JSON object per line, got {line[:60]!r} ({err})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{file}:{number}: expected a JSON object, got {type(row).__name__}")
        for field, kind in fields.items():
            if not isinstance(row.get(field), kind):
                raise ValueError(
                    f"{file}:{number}: expected a {kind.__name__} field {field!r}, got {row.get(field)!r:.60}"
                )
        rows += 1
    if rows == 0:
        raise ValueError(f"{name}: expected at least one row, got an empty file {path!r}")
    return rows


def check_package(module: str, package: str) -> None:
    """Raise unless ``module`` can be imported, naming the pip package that provides it."""
    if importlib.util.find_spec(module) is None:
        raise ValueError(
            f"missing optional package: {module} is not installed; expected it for this run (pip install {package})"
        )
