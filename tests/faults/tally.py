"""The fault suite's own tally: cases tried, clear errors, faults survived, runs lost.

Tests count into :data:`TALLY`; ``conftest.py`` prints it when the session finishes (and writes it as
JSON where ``HOTLOOP_FAULT_TALLY`` points), so docs/faults.md can quote a real run.
"""

import contextlib
from collections import Counter

TALLY: Counter = Counter()
KEYS = ("cases tried", "clear errors", "faults survived", "runs lost", "poisoned checkpoints")


@contextlib.contextmanager
def fault(kind: str):
    """Count one injected fault: survived when the block passes, a run lost when it raises."""
    TALLY[f"fault/{kind}"] += 1
    try:
        yield
    except BaseException:
        TALLY["runs lost"] += 1
        raise
    TALLY["faults survived"] += 1


def case(clear_error: bool = False) -> None:
    """Count one fuzzed call, and whether it ended in a named ValueError/TypeError."""
    TALLY["cases tried"] += 1
    TALLY["clear errors"] += int(clear_error)
