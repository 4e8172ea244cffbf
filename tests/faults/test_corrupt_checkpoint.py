"""Corrupt each file of the newest checkpoint in turn (a flipped byte, a truncation, a deletion): the
resume names the bad file, falls back to the newest good checkpoint with a warning, and ends
bit-identical to an uninterrupted run. A torn or garbage ``metrics.jsonl`` line, a garbage ``latest``
pointer and a directory of only bad checkpoints are handled too; checkpoints unpickle nothing."""

import json
import shutil

import pytest
import torch

from hotloop.runtime.checkpoint import CheckpointError, CheckpointFallbackWarning, latest_checkpoint, load_checkpoint
from hotloop.runtime.guards import repair_metrics
from tests.faults.tally import fault
from tests.runtime.tiny_loop import make_loop

STEPS, SAVED = 4, 3
FILES = (
    "model.safetensors",
    "reference.safetensors",
    "engine.safetensors",
    "trainer.json",
    "trainer.pt",
    "rng.json",
    "rng.pt",
    "loop_state.json",
    "manifest.json",
)


def run(out_dir, steps, resume=False):
    torch.manual_seed(0)
    loop = make_loop(out_dir, sync_every=2, steps=steps, checkpoint_every=1, lr=1e-2)
    loop.run(resume=resume)
    return loop


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run of STEPS, and a run directory stopped after SAVED steps (checkpoints 1..SAVED)."""
    root = tmp_path_factory.mktemp("runs")
    straight = run(root / "straight", STEPS)
    run(root / "partial", SAVED)
    return straight, root / "partial"


def corrupt(file, how):
    data = file.read_bytes()
    if how == "flip":
        middle = len(data) // 2
        file.write_bytes(data[:middle] + bytes([data[middle] ^ 0x55]) + data[middle + 1 :])
    elif how == "truncate":
        file.write_bytes(data[: len(data) // 3])
    else:
        file.unlink()


def assert_same(a, b):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("how", ["flip", "truncate", "delete"])
@pytest.mark.parametrize("name", FILES)
def test_a_corrupt_file_is_named_and_the_newest_good_checkpoint_is_chosen(name, how, runs, tmp_path):
    _, partial = runs
    with fault(f"{how} {name}"):
        out = tmp_path / "run"
        shutil.copytree(partial, out)
        bad = out / f"step-{SAVED:06d}"
        corrupt(bad / name, how)
        with pytest.raises(CheckpointError, match=rf"{bad}.*(manifest|{name})"):
            load_checkpoint(bad, model=make_loop(out, sync_every=2, steps=1).trainer.model)
        with pytest.warns(CheckpointFallbackWarning, match=rf"{bad}.*falling back to .*step-{SAVED - 1:06d}"):
            assert latest_checkpoint(out) == out / f"step-{SAVED - 1:06d}"


@pytest.mark.parametrize(
    "name, how", [("model.safetensors", "flip"), ("rng.pt", "truncate"), ("manifest.json", "delete")]
)
def test_resuming_past_a_corrupt_latest_checkpoint_equals_the_uninterrupted_run(name, how, runs, tmp_path):
    straight, partial = runs
    with fault(f"{how} {name}, then resume"):
        out = tmp_path / "run"
        shutil.copytree(partial, out)
        corrupt(out / f"step-{SAVED:06d}" / name, how)
        with pytest.warns(CheckpointFallbackWarning):
            resumed = run(out, STEPS, resume=True)
        assert_same(straight.trainer.model, resumed.trainer.model)
        assert_same(straight.engine.model, resumed.engine.model)
        records = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert records == list(range(STEPS))


@pytest.mark.parametrize("garbage", [b'{"step": 1, "loss', b"\x00\xff not json", b"[1, 2]"])
def test_a_torn_or_garbage_metrics_line_is_dropped_with_a_warning(garbage, tmp_path):
    with fault("garbage metrics line"):
        path = tmp_path / "metrics.jsonl"
        path.write_bytes(b'{"step": 0}\n' + garbage + b'\n{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
        with pytest.warns(UserWarning, match=r"dropped 2 torn or non-JSON line\(s\) \(line \[2, 5\]\)"):
            assert repair_metrics(path, 2) == [2, 5]
        assert path.read_text() == '{"step": 0}\n{"step": 1}\n'


def test_resuming_over_a_garbage_metrics_line_keeps_every_step_once(runs, tmp_path):
    _, partial = runs
    with fault("garbage metrics line, then resume"):
        out = tmp_path / "run"
        shutil.copytree(partial, out)
        lines = (out / "metrics.jsonl").read_bytes().split(b"\n")
        (out / "metrics.jsonl").write_bytes(b"\n".join(lines[:1] + [b"\x00garbage"] + lines[1:]))
        with pytest.warns(UserWarning, match="dropped 1 torn or non-JSON line"):
            run(out, STEPS, resume=True)
        records = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert records == list(range(STEPS))


def test_a_garbage_latest_pointer_falls_back_to_the_highest_good_step(runs, tmp_path):
    _, partial = runs
    with fault("garbage latest pointer"):
        out = tmp_path / "run"
        shutil.copytree(partial, out)
        (out / "latest").write_bytes(b"\xff\xfe../../etc")
        assert latest_checkpoint(out) == out / f"step-{SAVED:06d}"


def test_when_every_checkpoint_is_bad_the_error_lists_each_path(runs, tmp_path):
    _, partial = runs
    with fault("every checkpoint corrupt"):
        out = tmp_path / "run"
        shutil.copytree(partial, out)
        for path in out.glob("step-*"):
            corrupt(path / "trainer.pt", "truncate")
        with pytest.raises(CheckpointError, match="no good checkpoint") as error:
            latest_checkpoint(out)
        for path in out.glob("step-*"):
            assert str(path / "trainer.pt") in str(error.value)


def test_checkpoint_tensors_load_weights_only_and_the_rest_is_json(runs):
    _, partial = runs
    path = latest_checkpoint(partial)
    for name in ("trainer", "rng"):
        tensors = torch.load(path / f"{name}.pt", weights_only=True)
        assert isinstance(tensors, list) and all(isinstance(t, torch.Tensor) for t in tensors)
        json.loads((path / f"{name}.json").read_text())
