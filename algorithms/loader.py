"""YAML → ``RunConfig``: a file names only what it changes, ``key.sub=value`` overrides go on top.

``load_config(path, ["loop.sync_every=1", "dpo.loss_type=ipo"])`` reads ``path``, applies the
overrides (each value parsed as YAML) and builds the nested dataclasses of
:mod:`hotloop.algorithms.config` over ``RunConfig()``, or over a named preset
(:mod:`hotloop.algorithms.presets`) when the file says ``preset: demo``; the ``hotloop demo`` command
passes ``preset="demo"``. The loader adds no values of its own: a field nobody names keeps its
dataclass default. Errors are ``ValueError``s naming the dotted field (or file:line:col).
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from collections.abc import Sequence
from pathlib import Path

import yaml

from hotloop.algorithms.config import RunConfig
from hotloop.algorithms.presets import PRESETS


def load_config(
    path: str | Path | None = None, overrides: Sequence[str] = (), *, preset: str | None = None
) -> RunConfig:
    """``RunConfig`` from a YAML file (None: no file) with ``key.sub=value`` overrides applied, over the preset the
    file (or an override) names with ``preset: NAME``, else over ``preset``, else over ``RunConfig()``."""
    data = {}
    if path is not None:
        data = _read_yaml(Path(path))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override: expected key.sub=value, got {item!r}")
        node = data
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"{key}: {part!r} is a value, not a section")
        try:
            node[leaf] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ValueError(f"{key}: expected a YAML value, got {value!r} ({_yaml_problem(err)})") from None
    name = data.pop("preset", preset)
    if name is not None and name not in PRESETS:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)} or null, got {name!r}")
    return _build(RunConfig, data, "", base=None if name is None else PRESETS[name]())


def run_config_json(config: RunConfig) -> dict:
    """``config`` as JSON values (tuples become lists), as ``run_config.json`` and checkpoints store it."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def config_from_json(data: dict) -> RunConfig:
    """The ``RunConfig`` that :func:`run_config_json` wrote (every field given, no preset)."""
    return _build(RunConfig, data, "", base=None)


def _read_yaml(path: Path) -> dict:
    """The top-level mapping of a YAML file; a missing file or a syntax error is a ValueError naming file:line:col."""
    try:
        text = path.read_text()
    except OSError as err:
        raise ValueError(f"{path}: expected a readable YAML config file, got {err.strerror or err}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        raise ValueError(f"{where}: YAML syntax error: {_yaml_problem(err)}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a YAML mapping at the top level, got {type(data).__name__}")
    return data


def _yaml_problem(err: yaml.YAMLError) -> str:
    return (
        " ".join(str(part) for part in (getattr(err, "context", None), getattr(err, "problem", None)) if part)
        or str(err).splitlines()[0]
    )


def _build(cls, data: dict, prefix: str, base):
    """Instance of dataclass ``cls`` from ``data`` over ``base`` (or the defaults), errors prefixed."""
    if not isinstance(data, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{prefix}{unknown[0]}: unknown key; expected one of {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    defaults = base if base is not None else _defaults(cls)
    kwargs = {}
    for name, value in data.items():
        current = getattr(defaults, name)
        if dataclasses.is_dataclass(hints[name]) and isinstance(hints[name], type):
            kwargs[name] = _build(hints[name], value, f"{prefix}{name}.", current)
        else:
            kwargs[name] = _coerce(value, hints[name])
    try:
        return dataclasses.replace(defaults, **kwargs)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{prefix}{err}") from None


def _defaults(cls):
    try:
        return cls()
    except (ValueError, TypeError) as err:
        raise ValueError(f"{cls.__name__}: {err}") from None


def _coerce(value, hint):
    """YAML lists become tuples (nested ones too) for tuple fields, "1e-4" a float for float fields; ``.inf`` stays
    a float."""
    if isinstance(value, list) and tuple in (typing.get_origin(h) for h in (hint, *typing.get_args(hint))):
        return _tuples(value)
    if isinstance(value, str) and (hint is float or float in typing.get_args(hint)):
        try:  # YAML 1.1 reads "1e-4" (no dot) as a string
            return float(value)
        except ValueError:
            return value
    if isinstance(value, float) and value.is_integer() and not math.isinf(value) and int in typing.get_args(hint):
        return int(value)
    return value


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value
