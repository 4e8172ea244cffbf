"""Character-level tokenizer for the built-in tasks.

One id per character of a small alphabet, after three special ids: ``pad = 0``, ``bos = 1``,
``eos = 2``. Small enough (V ≈ 20) that a two-layer model learns arithmetic in seconds on a CPU,
and exact: ``decode(encode(s)) == s`` for every string over the alphabet. :func:`load_tokenizer`
reads the tokenizer of a local model directory, this one or a Hugging Face one.
"""

from __future__ import annotations

import json
from pathlib import Path

_SPECIALS = ("<pad>", "<bos>", "<eos>")
_FILE = "char_tokenizer.json"


class CharTokenizer:
    """Maps each character of ``alphabet`` to one id; ids 0, 1, 2 are pad, bos, eos."""

    pad_id = 0
    bos_id = 1
    eos_id = 2

    def __init__(self, alphabet: str = "0123456789+-*=() ") -> None:
        if not isinstance(alphabet, str) or not alphabet:
            raise ValueError(f"alphabet: expected a non-empty str, got {alphabet!r}")
        if len(set(alphabet)) != len(alphabet):
            raise ValueError(f"alphabet: expected distinct characters, got {alphabet!r}")
        self.alphabet = alphabet
        self._to_id = {ch: i + len(_SPECIALS) for i, ch in enumerate(alphabet)}

    @property
    def vocab_size(self) -> int:
        """Number of ids, specials included."""
        return len(_SPECIALS) + len(self.alphabet)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Ids of ``text``, preceded by bos when ``add_bos``; raises on characters outside the alphabet."""
        unknown = sorted(set(text) - self._to_id.keys())
        if unknown:
            raise ValueError(f"text: characters {unknown} are not in the alphabet {self.alphabet!r}")
        ids = [self._to_id[ch] for ch in text]
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids) -> str:
        """Text of ``ids`` (list or 1-D tensor): stops at the first eos, skips pad and bos."""
        out = []
        for i in (ids.tolist() if hasattr(ids, "tolist") else ids):
            i = int(i)
            if i == self.eos_id:
                break
            if i >= len(_SPECIALS):
                out.append(self.alphabet[i - len(_SPECIALS)])
        return "".join(out)

    def save(self, directory) -> None:
        """Write ``char_tokenizer.json`` into ``directory`` (created if missing)."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / _FILE).write_text(json.dumps({"alphabet": self.alphabet, "specials": list(_SPECIALS)}))

    @classmethod
    def load(cls, directory) -> CharTokenizer:
        """Read a tokenizer written by :meth:`save`."""
        data = json.loads((Path(directory) / _FILE).read_text())
        return cls(data["alphabet"])

    def __eq__(self, other) -> bool:
        return isinstance(other, CharTokenizer) and other.alphabet == self.alphabet

    def __hash__(self) -> int:
        return hash(self.alphabet)

    def __repr__(self) -> str:
        return f"CharTokenizer(alphabet={self.alphabet!r})"


def load_tokenizer(directory):
    """The tokenizer saved in a local model directory: a :class:`CharTokenizer` when ``char_tokenizer.json`` is
    there, else ``transformers.AutoTokenizer.from_pretrained(directory)``."""
    if (Path(directory) / _FILE).exists():
        return CharTokenizer.load(directory)
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(directory)
