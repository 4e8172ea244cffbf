"""The files of one checkpoint: safe encodings and a manifest that proves a checkpoint whole.

Nothing in a checkpoint can run code when it is loaded. Model weights are safetensors; every other
piece of state (optimizer, scheduler, RNGs) is split by :func:`write_state` into its tensors, saved
as a list with ``torch.save`` and read back with ``torch.load(weights_only=True)``, and the rest, a
JSON tree in which each tensor is a ``{"__tensor__": i}`` placeholder (tuples, dicts with non-string
keys and numpy arrays get their own tags, so every value round-trips exactly).

Tied weights: a state dict may name one tensor twice (``lm_head.weight`` and
``model.embed_tokens.weight`` of a tied model). :func:`save_weights` stores it once and records the
alias in the file's metadata; :func:`load_weights` restores every name, so a strict load sees all keys.

The manifest (``manifest.json``, written last) lists every file with its size and SHA-256;
:func:`verify` re-reads them and names the first file that is missing, short or changed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

MANIFEST = "manifest.json"
FORMAT = 2
_ALIASES = "hotloop.aliases"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or corrupt; the message names its path and the file."""


def save_weights(state: dict[str, torch.Tensor], file: Path) -> None:
    """``state`` as safetensors, each shared tensor stored once and its other names kept as aliases."""
    seen: dict[tuple, str] = {}
    tensors, aliases = {}, {}
    for name, tensor in state.items():
        key = (
            tensor.device,
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tensor.stride(),
            tensor.dtype,
        )
        if key in seen and tensor.numel() > 0:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            tensors[name] = tensor.detach().contiguous()
    save_file(tensors, str(file), metadata={_ALIASES: json.dumps(aliases)})


def load_weights(file: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every name :func:`save_weights` was given, aliases included, on ``device``."""
    tensors = load_file(str(file), device=str(device))
    with safe_open(str(file), framework="pt") as f:
        aliases = json.loads((f.metadata() or {}).get(_ALIASES, "{}"))
    for name, target in aliases.items():
        tensors[name] = tensors[target]
    return tensors


def write_state(out: Path, name: str, state) -> None:
    """``state`` as ``<name>.json`` (the tree) and ``<name>.pt`` (its tensors, a list)."""
    tensors: list[torch.Tensor] = []
    tree = _encode(state, tensors)
    torch.save([t.detach().cpu().clone() for t in tensors], out / f"{name}.pt")
    (out / f"{name}.json").write_text(json.dumps(tree))


def read_state(path: Path, name: str):
    """What :func:`write_state` wrote, loaded with ``weights_only=True``."""
    tensors = torch.load(path / f"{name}.pt", map_location="cpu", weights_only=True)
    return _decode(json.loads((path / f"{name}.json").read_text()), tensors)


def read_json_state(path: Path, name: str):
    """The JSON part of :func:`write_state`'s ``name`` alone (its tensors as None), without reading ``.pt``."""
    return _decode(json.loads((path / f"{name}.json").read_text()), _NoTensors())


class _NoTensors:
    def __getitem__(self, index: int) -> None:
        return None


def _encode(value, tensors: list):
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return {"__tensor__": len(tensors) - 1}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, tensors) for k, v in value.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"state: expected tensors, arrays and JSON values, got {type(value).__name__}")


def _decode(tree, tensors: list):
    if isinstance(tree, list):
        return [_decode(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if "__tensor__" in tree:
        return tensors[tree["__tensor__"]]
    if "__ndarray__" in tree:
        return np.array(tree["__ndarray__"], dtype=tree["dtype"])
    if "__tuple__" in tree:
        return tuple(_decode(v, tensors) for v in tree["__tuple__"])
    if "__items__" in tree:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in tree["__items__"]}
    return {k: _decode(v, tensors) for k, v in tree.items()}


def sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(out: Path, step: int) -> None:
    """``manifest.json``: size and SHA-256 of every other file in ``out``."""
    files = {
        p.name: {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in sorted(out.iterdir()) if p.name != MANIFEST
    }
    (out / MANIFEST).write_text(json.dumps({"format": FORMAT, "step": step, "files": files}, indent=1))


_verified: dict[Path, tuple] = {}


def verify(path: Path, required: tuple[str, ...] = ()) -> None:
    """Raise ``CheckpointError`` naming ``path`` and the first file that is missing, short or changed."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(
            f"{path}: manifest.json is missing or unreadable ({type(err).__name__}: {err}); "
            f"the checkpoint is incomplete or was written by an older hotloop"
        ) from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: expected checkpoint format {FORMAT}, got {manifest.get('format')!r}")
    for name in (*required, *files):
        if name not in files:
            raise CheckpointError(f"{path}: {name} is not in the manifest (an incomplete checkpoint)")
    stamp = tuple(_stat(path / name) for name in sorted(files))
    if _verified.get(path) == stamp:
        return
    for name, entry in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (the manifest lists {entry['bytes']} bytes)")
        if file.stat().st_size != entry["bytes"]:
            raise CheckpointError(
                f"{file}: {file.stat().st_size} bytes, the manifest says {entry['bytes']} (truncated or overwritten)"
            )
        if sha256(file) != entry["sha256"]:
            raise CheckpointError(f"{file}: SHA-256 differs from the manifest's (corrupt)")
    _verified[path] = stamp


def _stat(file: Path) -> tuple:
    try:
        st = os.stat(file)
    except OSError:
        return (file.name, None)
    return (file.name, st.st_size, st.st_mtime_ns, st.st_ino)
