"""One wording for every argument error in hotloop: ``"<argument>: expected <what>, got <seen>"``.

Kernels, runtime and algorithms phrase their ``ValueError`` / ``TypeError`` messages with :func:`expected`, so a
user reads the same sentence whichever layer refused a value. This module imports nothing from hotloop: runtime
may use it (runtime never imports kernels), and so may every other layer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable


def expected(name: str, what: str, got: object) -> str:
    """The message ``"name: expected what, got got"`` (``got`` printed as given: pass a repr, shape or dtype)."""
    return f"{name}: expected {what}, got {got}"


def require(ok: bool, name: str, what: str, got: object, error: type[Exception] = ValueError) -> None:
    """Raise ``error(expected(name, what, got))`` unless ``ok``."""
    if not ok:
        raise error(expected(name, what, got))


def check_choice(name: str, value: object, choices: Iterable[str]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    choices = tuple(choices)
    require(value in choices, name, f"one of {choices}", repr(value))


def is_real(value: object) -> bool:
    """True for a finite int or float (not a bool): what a numeric option may be."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
