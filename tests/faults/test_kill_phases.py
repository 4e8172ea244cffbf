"""SIGKILL in every phase of a step, and inside every part of the checkpoint write, then resume: the
resumed run ends bit-identical to an uninterrupted one (weights of policy and sampler, every metrics
line), and no checkpoint left behind is poisoned (each verifies against its manifest, all finite).

Children come from one ``forkserver`` that imported torch and hotloop once (see ``child.py``).
"""

import json
import multiprocessing
import signal

import pytest
import torch
from safetensors.torch import load_file

from hotloop.runtime import checkpoint_files
from hotloop.runtime.checkpoint import latest_checkpoint
from tests.faults import child
from tests.faults.tally import TALLY, fault
from tests.helpers import assert_same_final_state

STEPS, KILL_AT = 4, 2
TIMEOUT = 300


@pytest.fixture(scope="module")
def spawn():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["tests.faults.child"])

    def start(out_dir, fault_spec=None, resume=False) -> int:
        process = ctx.Process(target=child.run, args=(str(out_dir), STEPS, fault_spec, resume))
        process.start()
        process.join(TIMEOUT)
        if process.is_alive():
            process.kill()
            raise AssertionError(f"child {fault_spec} hung")
        return process.exitcode

    return start


@pytest.fixture(scope="module")
def reference(spawn, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("uninterrupted")
    assert spawn(out_dir) == 0
    return final_state(out_dir)


def final_state(out_dir):
    path = latest_checkpoint(out_dir)
    weights = {name: load_file(str(path / f"{name}.safetensors")) for name in ("model", "engine")}
    lines = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return weights, [{k: v for k, v in r.items() if not k.startswith("time/")} for r in lines]


def assert_no_poisoned_checkpoint(out_dir):
    for path in sorted(out_dir.glob("step-*")):
        checkpoint_files.verify(path)
        for file in path.glob("*.safetensors"):
            for name, tensor in load_file(str(file)).items():
                if not torch.isfinite(tensor).all():
                    TALLY["poisoned checkpoints"] += 1
                    raise AssertionError(f"{file}: {name} is non-finite")


@pytest.mark.parametrize("phase", child.PHASES)
def test_sigkill_in_each_phase_then_resume_equals_the_uninterrupted_run(phase, spawn, reference, tmp_path):
    with fault(f"SIGKILL in {phase}"):
        assert spawn(tmp_path, f"{phase}@{KILL_AT}") == -signal.SIGKILL
        assert_no_poisoned_checkpoint(tmp_path)
        assert spawn(tmp_path, resume=True) == 0
        assert_same_final_state(final_state(tmp_path), reference, STEPS)
        assert_no_poisoned_checkpoint(tmp_path)
