"""Kill a real child process mid-run and resume it: SIGTERM checkpoints and exits 130, SIGKILL loses only
the step in flight, and either way the resumed run ends bit-identical to an uninterrupted one.

The child (``kill_resume_child.py``) runs semi-online DPO (s = 2) with a checkpoint every step and
blocks while scoring step ``PAUSE_AT`` until the parent writes a line, so each signal lands at a
known point without sleeps. Checkpoints after step 3 hold a stale sampler (synced at step 2).
"""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from hotloop.runtime.checkpoint import latest_checkpoint
from tests.helpers import assert_same_final_state

ROOT = Path(__file__).resolve().parents[2]
STEPS, PAUSE_AT = 6, 3
TIMEOUT = 120


def start(out_dir: Path, *, pause_at: int = -1, resume: bool = False) -> subprocess.Popen:
    args = [sys.executable, "-m", "tests.runtime.kill_resume_child", str(out_dir), str(STEPS), str(pause_at)]
    return subprocess.Popen(
        args + (["--resume"] if resume else []),
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_until_paused(child: subprocess.Popen) -> None:
    seen = []
    for line in child.stdout:
        if line.strip() == "paused":
            return
        seen.append(line)
    raise AssertionError(f"the child exited ({child.wait()}) before pausing:\n{''.join(seen)}")


def finish(child: subprocess.Popen, expected_status: int, stdin: str = "") -> None:
    output, _ = child.communicate(stdin, timeout=TIMEOUT)
    assert child.returncode == expected_status, output


def final_state(out_dir: Path) -> tuple[dict, list[dict]]:
    """The last checkpoint's policy and sampler weights, and every metrics line without its timings."""
    path = latest_checkpoint(out_dir)
    weights = {name: load_file(str(path / f"{name}.safetensors")) for name in ("model", "engine")}
    lines = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return weights, [{k: v for k, v in r.items() if not k.startswith("time/")} for r in lines]


def assert_same_run(out_dir: Path, reference_dir: Path) -> None:
    assert_same_final_state(final_state(out_dir), final_state(reference_dir), STEPS)


def next_step(out_dir: Path) -> int:
    return json.loads((latest_checkpoint(out_dir) / "loop_state.json").read_text())["next_step"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The run directory of an uninterrupted child run (started at once, so it runs beside the first test)."""
    out_dir = tmp_path_factory.mktemp("uninterrupted")
    child = start(out_dir)
    done = []

    def result() -> Path:
        if not done:
            finish(child, 0)
            done.append(True)
        return out_dir

    yield result
    if child.poll() is None:
        child.kill()
        child.wait()


def test_sigterm_mid_run_checkpoints_exits_130_and_the_resumed_run_is_bit_identical(tmp_path, uninterrupted):
    child = start(tmp_path, pause_at=PAUSE_AT)
    wait_until_paused(child)
    child.send_signal(signal.SIGTERM)
    finish(child, 130, stdin="go\n")  # the step in flight completes, is checkpointed, the loop returns
    assert next_step(tmp_path) == PAUSE_AT + 1
    finish(start(tmp_path, resume=True), 0)
    assert_same_run(tmp_path, uninterrupted())


def test_sigkill_mid_run_resumes_from_the_last_complete_checkpoint_bit_identically(tmp_path, uninterrupted):
    child = start(tmp_path, pause_at=PAUSE_AT)
    wait_until_paused(child)
    child.kill()
    assert child.wait(timeout=TIMEOUT) == -signal.SIGKILL
    assert next_step(tmp_path) == PAUSE_AT  # every finished step was checkpointed; only the one in flight is lost
    finish(start(tmp_path, resume=True), 0)
    assert_same_run(tmp_path, uninterrupted())
