"""The config loader's errors and the ``hotloop`` CLI: a 2-step ``demo`` writes every promised file."""

import json
import math

import pytest

from hotloop.algorithms.cli import main
from hotloop.algorithms.config import RunConfig, load_config


def test_defaults_are_semi_online_dpo_on_arithmetic():
    config = load_config()
    assert isinstance(config, RunConfig) and config.algorithm == "online-dpo"
    assert config.task.name == "arithmetic" and config.loop.sync_period not in (None, 1)


def test_yaml_and_overrides_reach_nested_fields(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("algorithm: offline-dpo\ndpo: {beta: 0.3}\nloop: {steps: 7, sync_every: .inf}\n"
                    "trainer: {betas: [0.8, 0.9]}\n")
    config = load_config(path, ["dpo.loss_type=ipo", "loop.sync_every=2"])
    assert config.algorithm == "offline-dpo" and config.dpo.beta == 0.3 and config.dpo.loss_type == "ipo"
    assert config.loop.steps == 7 and config.loop.sync_every == 2 and config.trainer.betas == (0.8, 0.9)
    assert config.loop.prompts_per_step == RunConfig().loop.prompts_per_step   # untouched fields keep defaults
    assert load_config(path).loop.sync_period is None and load_config(path).loop.sync_every == math.inf


@pytest.mark.parametrize("overrides, field", [
    (["algorithm=ppo-magic"], "algorithm"),
    (["loop.sync_every=0"], "loop.sync_every"),
    (["loop.sync_every=-3"], "loop.sync_every"),
    (["task.name=jsonl", "task.prompts=p.jsonl"], "reward.kind"),
    (["dpo.betta=0.1"], "dpo.betta"),
    (["trainer.lr=-1"], "trainer.lr"),
])
def test_bad_configs_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        load_config(None, overrides)


def test_cli_reports_config_errors_without_a_traceback(capsys):
    assert main(["demo", "--set", "loop.sync_every=0", "--no-progress"]) == 2
    assert "loop.sync_every" in capsys.readouterr().err


def test_demo_smoke_run_writes_summary_metrics_plot_and_checkpoint(tmp_path):
    out = tmp_path / "demo"
    tiny = ["model.warm_start_steps=30", f"model.cache_dir={tmp_path / 'cache'}", "task.eval_problems=16",
            "loop.prompts_per_step=4", "dpo.samples_per_prompt=4", "dpo.pairs_per_prompt=1", "loop.eval_every=1"]
    args = ["demo", "--out", str(out), "--steps", "2", "--seed", "1", "--no-progress"]
    assert main(args + [a for t in tiny for a in ("--set", t)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert {"accuracy_before", "accuracy_after", "wall_seconds", "phase_seconds"} <= summary.keys()
    assert {"sampling", "scoring", "training", "sync"} <= summary["phase_seconds"].keys()
    assert 0.0 <= summary["accuracy_after"] <= 1.0 and summary["steps"] == 2
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1]
    assert (out / "accuracy_kl.png").stat().st_size > 0
    assert any(p.name.startswith("step-") for p in out.iterdir())
