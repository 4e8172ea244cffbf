"""Every bad input to the ``hotloop`` CLI is one clear line on stderr and exit status 2, before any work:
missing or unparsable YAML (line and column), unknown keys, bad values of each section, bad model
directories, malformed prompts and pairs files (file:line), an unavailable device, a missing optional
package, and a ``--resume`` whose config would continue a different run."""

import json

import pytest
import torch

from hotloop.algorithms import cli, inputs
from hotloop.algorithms.cli import check_resume_config, main
from hotloop.algorithms.loader import load_config, run_config_json
from hotloop.runtime.guards import ResumeMismatchError
from hotloop.runtime.trainer import Trainer, TrainerConfig
from tests.faults.tally import TALLY


@pytest.fixture(autouse=True)
def no_work(monkeypatch):
    """Any bad input must be refused before ``run`` starts work; reaching it fails the test."""

    def started(*args, **kwargs):
        raise AssertionError("the run started despite a bad input")

    monkeypatch.setattr(cli, "run", started)


def refused(capsys, argv, *needles):
    TALLY["cases tried"] += 1
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("hotloop: "), err
    for needle in needles:
        assert needle in err, err
    TALLY["clear errors"] += 1
    return err


def write(path, text):
    path.write_text(text)
    return str(path)


def test_missing_and_unparsable_yaml_name_the_file_line_and_column(tmp_path, capsys):
    refused(capsys, ["train", str(tmp_path / "nope.yaml")], "nope.yaml", "No such file")
    bad = write(tmp_path / "bad.yaml", "loop:\n  steps: 3\n   extra: [1\n")
    refused(capsys, ["train", bad], "bad.yaml:3:", "YAML syntax error")
    refused(capsys, ["train", write(tmp_path / "list.yaml", "- 1\n")], "expected a YAML mapping")
    refused(capsys, ["demo", "--set", "loop.steps=[1"], "loop.steps: expected a YAML value")


@pytest.mark.parametrize(
    "override, field",
    [
        ("sampling.temperature=-1", "sampling.temperature"),
        ("sampling.max_new_tokens=0", "sampling.max_new_tokens"),
        ("sampling.top_p=1.5", "sampling.top_p"),
        ("sampling.top_k=-2", "sampling.top_k"),
        ("sampling.max_batch_size=0", "sampling.max_batch_size"),
        ("model.warm_start_steps=-1", "model.warm_start_steps"),
        ("model.warm_start_error_rate=7", "model.warm_start_error_rate"),
        ("task.digits=0", "task.digits"),
        ("task.op=*", "task.op"),
        ("loop.steps=0", "loop.steps"),
        ("loop.prompts_per_step=x", "loop.prompts_per_step"),
        ("trainer.lr=-1", "trainer.lr"),
        ("trainer.max_skipped_steps=-1", "trainer.max_skipped_steps"),
        ("dpo.beta=0", "dpo.beta"),
        ("grpo.loss_type=nope", "grpo.loss_type"),
        ("kto.beta=0", "kto.beta"),
        ("reward.kind=nope", "reward.kind"),
        ("model.device=tpu", "model.device"),
        ("loop.bogus=1", "loop.bogus"),
        ("bogus=1", "bogus"),
    ],
)
def test_a_bad_value_in_any_section_is_refused_when_the_config_loads(override, field, capsys):
    refused(capsys, ["demo", "--set", override], f"{field}:")


def test_an_unavailable_device_is_refused(capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    refused(capsys, ["demo", "--set", "model.device=cuda"], "model.device", "CUDA is not available")


def test_bad_model_directories_are_refused(tmp_path, capsys):
    refused(capsys, ["demo", "--set", f"model.path={tmp_path / 'missing'}"], "model.path", "no such directory")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "weights.bin").write_bytes(b"x")
    refused(capsys, ["demo", "--set", f"model.path={tmp_path / 'empty'}"], "model.path", "config.json")
    refused(
        capsys, ["demo", "--set", "reward.kind=reward_model", "--set", f"reward.model={tmp_path / 'm'}"], "reward.model"
    )


def test_a_gguf_model_path_is_checked_as_a_file_not_as_a_directory(tmp_path, capsys):
    refused(
        capsys, ["demo", "--set", f"model.path={tmp_path / 'm.gguf'}"], "model.path", "expected an existing .gguf file"
    )
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    config = load_config(None, [f"model.path={tmp_path / 'm.gguf'}"])
    try:
        inputs.check_inputs(config)  # with the gguf package installed, an existing .gguf file passes
    except ValueError as err:
        assert "hotloop[gguf]" in str(err) and "directory" not in str(err)


@pytest.mark.parametrize(
    "lines, where",
    [
        (['{"prompt": "1+1=", "answer": "2"}', '{"prompt": "2+2=", "answer": '], ":2:"),
        (['{"prompt": "1+1="}', "", '["not", "an", "object"]'], ":3:"),
        (['{"answer": "2"}'], ":1:"),
        ([], "empty file"),
    ],
)
def test_a_malformed_prompts_file_is_refused_at_its_line(lines, where, tmp_path, capsys):
    prompts = write(tmp_path / "prompts.jsonl", "\n".join(lines))
    refused(
        capsys,
        ["demo", "--set", "task.name=jsonl", "--set", f"task.prompts={prompts}", "--set", "reward.kind=exact_match"],
        where,
    )


def test_a_malformed_pairs_file_is_refused_at_its_line(tmp_path, capsys):
    pairs = write(
        tmp_path / "pairs.jsonl", '{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n'
    )
    refused(
        capsys, ["demo", "--algo", "offline-dpo", "--set", f"dpo.pairs_file={pairs}"], "pairs.jsonl:2:", "'rejected'"
    )
    refused(
        capsys,
        ["demo", "--algo", "offline-dpo", "--set", f"dpo.pairs_file={tmp_path / 'none.jsonl'}"],
        "dpo.pairs_file",
    )


def test_a_missing_optional_package_names_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(inputs.OPTIONAL_PACKAGES, "math_verify", ("hotloop_absent_module", "hotloop-absent"))
    refused(capsys, ["demo", "--set", "reward.kind=math_verify"], "hotloop_absent_module", "pip install hotloop-absent")


def saved_run(out_dir, config):
    model = torch.nn.Linear(2, 2)
    Trainer(model, TrainerConfig(), run_config=run_config_json(config)).save(out_dir, {"next_step": 1})


def test_resume_refuses_a_config_that_changes_the_trajectory_and_lists_each_key(tmp_path, capsys):
    out = tmp_path / "run"
    saved_run(out, load_config(None, [f"loop.out_dir={out}"], preset="demo"))
    err = refused(
        capsys,
        ["demo", "--out", str(out), "--resume", "--seed", "5", "--set", "dpo.beta=0.3", "--set", "loop.steps=200"],
        "loop.seed: 0 → 5",
        "dpo.beta: 0.2 → 0.3",
        "--force-resume",
    )
    assert "loop.steps" not in err.split("refusing")[1].split(")")[0]  # a safe key is not refused


def test_resume_accepts_safe_keys_explicitly_allowed_keys_and_force(tmp_path, capsys):
    out = tmp_path / "run"
    saved_run(out, load_config(None, [f"loop.out_dir={out}"], preset="demo"))
    changed = load_config(None, [f"loop.out_dir={out}", "loop.steps=200", "loop.seed=3"], preset="demo")
    with pytest.raises(ResumeMismatchError, match="loop.seed: 0 → 3"):
        check_resume_config(changed, allow=(), force=False)
    check_resume_config(changed, allow=("loop.seed",))
    check_resume_config(changed, force=True)
    assert "hotloop: resume: loop.steps: 80 → 200" in capsys.readouterr().err
    saved = json.loads((out / "step-000000" / "trainer.json").read_text())
    assert "run_config" in saved["extra"]
