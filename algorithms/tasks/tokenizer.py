"""Tokenizers of a run: the character-level one of the built-in tasks, and a Hugging Face wrapper.

:class:`CharTokenizer`: one id per character of a small alphabet, after three special ids:
``pad = 0``, ``bos = 1``, ``eos = 2``. Small enough (V ≈ 20) that a two-layer model learns
arithmetic in seconds on a CPU, and exact: ``decode(encode(s)) == s`` for every string over the
alphabet. :func:`load_tokenizer` reads the tokenizer of a local model directory, this one or a
Hugging Face one.

:class:`HFTokenizer` gives a Hugging Face tokenizer the same ``encode(prompt) -> ids`` /
``decode(ids) -> text`` shape. By default (``chat_template=None``) a prompt is rendered through the
tokenizer's chat template when it has one, as one user turn after an optional system prompt, with
``add_generation_prompt=True``, so an instruct model sees what it was tuned on; the rendered text
is then tokenized without adding special tokens (the template writes them). ``chat_template=False``
(raw mode) encodes the prompt text itself with the tokenizer's special tokens (bos when it adds
one); ``True`` requires a template.
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
        for i in ids.tolist() if hasattr(ids, "tolist") else ids:
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


class HFTokenizer:
    """``encode(prompt) -> ids`` (chat-templated by default) and ``decode(ids) -> text`` up to eos, over a HF
    tokenizer ``inner``.

    Args:
        inner: a ``transformers`` tokenizer.
        chat_template: None = use the tokenizer's chat template when it has one; True = require it; False = raw.
        system_prompt: system turn before the prompt (None: none of ours; the template may add its default).
        template_options: extra keyword arguments of ``apply_chat_template`` (e.g. ``enable_thinking``).
    """

    def __init__(
        self,
        inner,
        *,
        chat_template: bool | None = None,
        system_prompt: str | None = None,
        template_options: dict | None = None,
    ) -> None:
        has_template = bool(getattr(inner, "chat_template", None))
        if chat_template is True and not has_template:
            raise ValueError(
                f"prompt.chat_template: expected a tokenizer with a chat template, got "
                f"{type(inner).__name__} without one; set prompt.chat_template: false (raw prompts)"
            )
        self.inner = inner
        self.templated = has_template if chat_template is None else bool(chat_template)
        self.system_prompt, self.template_options = system_prompt, dict(template_options or {})
        self.pad_id = inner.pad_token_id if inner.pad_token_id is not None else inner.eos_token_id
        self.eos_id = inner.eos_token_id

    def render(self, prompt: str) -> str:
        """The text the model sees for ``prompt``: the chat template's rendering, or ``prompt`` in raw mode."""
        if not self.templated:
            return prompt
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt is not None else []
        messages.append({"role": "user", "content": prompt})
        return self.inner.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **self.template_options
        )

    def encode_rendered(self, text: str) -> list[int]:
        """Ids of already rendered ``text`` (special tokens added only in raw mode)."""
        return self.inner.encode(text, add_special_tokens=not self.templated)

    def encode(self, prompt: str) -> list[int]:
        """Prompt ids: ``encode_rendered(render(prompt))``."""
        return self.encode_rendered(self.render(prompt))

    def decode(self, ids) -> str:
        """Text of ``ids`` up to the first eos, special tokens skipped."""
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.inner.decode(ids, skip_special_tokens=True)


def raw_tokenizer(tokenizer):
    """The tokenizer itself: a ``CharTokenizer``, or the Hugging Face one inside :class:`HFTokenizer`."""
    return tokenizer.inner if isinstance(tokenizer, HFTokenizer) else tokenizer


def load_tokenizer(directory):
    """The tokenizer saved in a local model directory: a :class:`CharTokenizer` when ``char_tokenizer.json`` is
    there, else ``transformers.AutoTokenizer.from_pretrained(directory)``."""
    if (Path(directory) / _FILE).exists():
        return CharTokenizer.load(directory)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)
