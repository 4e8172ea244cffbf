"""``hotloop compare real-arithmetic``: its runs are the SmolLM2 examples' settings, a missing model is one line
with the fetch command, ``--set`` reaches its config, and a tiny run on a real transformers model standing in
for SmolLM2 (word-problem prompts, the fixture's HF char tokenizer) writes every promised file."""

import json
import math

import pytest

from hotloop.algorithms.cli import main
from hotloop.algorithms.experiments import compare, real_arithmetic
from hotloop.algorithms.experiments.real_arithmetic import RealArithmeticConfig, run_config
from hotloop.algorithms.loader import load_config

EXAMPLES = __import__("pathlib").Path(__file__).parents[2] / "examples"


@pytest.fixture(scope="module")
def stand_in(local_model_dirs, tmp_path_factory):
    """A tiny Llama with room for word-problem prompts (512 positions) beside the fixture's char tokenizer."""
    from transformers import AutoTokenizer

    from hotloop.algorithms.tasks.tiny_model import build_tiny_model, tiny_llama_config

    out = tmp_path_factory.mktemp("stand-in") / "policy"
    tokenizer = AutoTokenizer.from_pretrained(local_model_dirs / "policy")
    config = tiny_llama_config(len(tokenizer), hidden_size=32, layers=1, intermediate=64, max_position=512)
    build_tiny_model(config, seed=3).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize(
    "example, algorithm, s",
    [
        ("smollm2-online-dpo.yaml", "online-dpo", 1),
        ("smollm2-semi-online-dpo.yaml", "online-dpo", 4),
        ("smollm2-grpo.yaml", "grpo", 1),
    ],
)
def test_default_runs_are_the_smollm2_examples_apart_from_the_schedule(example, algorithm, s):
    ours = run_config(RealArithmeticConfig(), algorithm=algorithm, sync_every=s, seed=0)
    theirs = load_config(EXAMPLES / example)
    for section in (
        "algorithm",
        "model",
        "task",
        "prompt",
        "reward",
        "dpo" if algorithm != "grpo" else "grpo",
        "sampling",
        "engine",
        "trainer",
    ):
        assert getattr(ours, section) == getattr(theirs, section), section
    assert (ours.loop.sync_every, ours.loop.prompts_per_step, ours.loop.steps) == (
        s,
        theirs.loop.prompts_per_step,
        theirs.loop.steps,
    )
    assert ours.loop.final_checkpoint is False  # no 2 GB checkpoint per run
    if algorithm == "online-dpo":  # offline DPO: the same, never synced
        offline = run_config(RealArithmeticConfig(), algorithm=algorithm, sync_every=math.inf, seed=0)
        assert offline.loop.sync_period is None and offline.dpo == theirs.dpo


def test_a_missing_model_is_one_line_naming_the_fetch_command(tmp_path, capsys):
    missing = tmp_path / "models" / "smollm2"
    argv = [
        "compare",
        "real-arithmetic",
        "--seeds",
        "0",
        "--out",
        str(tmp_path / "out"),
        "--no-progress",
        "--set",
        f"model_path={missing}",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model_path" in err and str(missing) in err
    assert f"hotloop fetch-model smollm2-135m-instruct --out {missing}" in err
    assert not (tmp_path / "out").exists()


def test_set_reaches_the_experiment_config_and_bad_items_name_the_field():
    config = compare.experiment_config("real-arithmetic", ["steps=3", "semi_online_syncs=[2, 8]", "engine=vllm"])
    assert config == RealArithmeticConfig(steps=3, semi_online_syncs=(2, 8), engine="vllm")
    assert compare.experiment_config("real-arithmetic", []) is None
    with pytest.raises(ValueError, match="--set.*FIELD one of.*steps"):
        compare.experiment_config("real-arithmetic", ["stepz=3"])
    with pytest.raises(ValueError, match="engine: expected one of"):
        compare.experiment_config("real-arithmetic", ["engine=tensorrt"])
    with pytest.raises(ValueError, match="--set: expected an experiment with settings"):
        compare.experiment_config("bandit", ["steps=3"])
    assert "real-arithmetic" in compare.EXPERIMENTS and "real-arithmetic" not in compare.experiment_names("all")


def test_a_tiny_real_arithmetic_run_writes_summary_table_and_plot(stand_in, tmp_path):
    config = RealArithmeticConfig(
        model_path=str(stand_in),
        steps=2,
        semi_online_syncs=(2,),
        prompts_per_step=2,
        samples_per_prompt=4,
        max_new_tokens=6,
        eval_problems=4,
        eval_every=1,
        threads=1,
        overrides=("reward.kind=preference_rule",),
    )  # graded: every run has contrast
    summary, _ = compare.run_compare(
        "real-arithmetic", [5], tmp_path, progress=False, configs={"real-arithmetic": config}, command="test"
    )
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    entries = {e["algorithm"]: e for e in summary["entries"]}
    assert list(entries) == ["offline DPO", "semi-online DPO", "online DPO", "GRPO"]
    assert [entries[k]["syncs"] for k in entries] == [0, 1, 2, 2]
    assert all(e["seed"] == 5 and 0 <= e["value"] <= 1 and math.isfinite(e["kl"]) for e in entries.values())
    assert all(e["optimizer_steps"] == 2 and e["loop_steps"] == 2 for e in entries.values())
    assert all(e["initial_accuracy"] == entries["GRPO"]["initial_accuracy"] for e in entries.values())
    assert any(e["kl"] != 0 for e in entries.values())  # the runs moved the policy
    assert summary["environment"]["intra_op_threads"] == 1
    assert [t["claim"] for t in summary["targets"]][:3] == [
        "offline DPO < semi-online DPO (s = 2)",
        "semi-online DPO (s = 2) ≈ online DPO (within 5 points)",
        "offline DPO < online DPO",
    ]
    text = (tmp_path / "table.md").read_text()
    assert (
        "## real-arithmetic" in text and "| offline DPO | inf | 0 |" in text and "gain over the initial policy" in text
    )
    assert (tmp_path / "real-arithmetic-curves.png").stat().st_size > 1000
    assert real_arithmetic.CONFIG is RealArithmeticConfig
