"""Prints the fault suite's tally at the end of the session (see ``tally.py``)."""

import json
import os

from tests.faults.tally import KEYS, TALLY


def pytest_terminal_summary(terminalreporter):
    if not TALLY:
        return
    line = ", ".join(f"{key}: {TALLY[key]}" for key in KEYS)
    terminalreporter.write_sep("-", "hotloop fault tally")
    terminalreporter.write_line(line)
    kinds = sorted(k for k in TALLY if k.startswith("fault/"))
    terminalreporter.write_line("faults injected: " + ", ".join(f"{k[6:]} ×{TALLY[k]}" for k in kinds))
    if os.environ.get("HOTLOOP_FAULT_TALLY"):
        with open(os.environ["HOTLOOP_FAULT_TALLY"], "w") as f:
            json.dump(dict(TALLY), f, indent=1, sort_keys=True)
