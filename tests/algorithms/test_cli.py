"""The config loader's errors and the ``hotloop`` CLI: a 2-step ``demo`` writes every promised file; device,
stop tokens and every reward kind reach the run."""

import dataclasses
import json
import math

import pytest
import torch

from hotloop.algorithms.cli import main
from hotloop.algorithms.config import ALGORITHMS, RunConfig
from hotloop.algorithms.loader import load_config
from hotloop.algorithms.run import build_setup, resolve_device, sampling_params


def test_defaults_are_semi_online_dpo_on_arithmetic():
    config = load_config()
    assert isinstance(config, RunConfig) and config.algorithm == "online-dpo"
    assert config.task.name == "arithmetic" and config.loop.sync_period not in (None, 1)


def test_yaml_and_overrides_reach_nested_fields(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "algorithm: offline-dpo\ndpo: {beta: 0.3}\nloop: {steps: 7, sync_every: .inf}\ntrainer: {betas: [0.8, 0.9]}\n"
    )
    config = load_config(path, ["dpo.loss_type=ipo", "loop.sync_every=2"])
    assert config.algorithm == "offline-dpo" and config.dpo.beta == 0.3 and config.dpo.loss_type == "ipo"
    assert config.loop.steps == 7 and config.loop.sync_every == 2 and config.trainer.betas == (0.8, 0.9)
    assert config.loop.prompts_per_step == RunConfig().loop.prompts_per_step  # untouched fields keep defaults
    assert load_config(path).loop.sync_period is None and load_config(path).loop.sync_every == math.inf


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["algorithm=ppo-magic"], "algorithm"),
        (["loop.sync_every=0"], "loop.sync_every"),
        (["loop.sync_every=-3"], "loop.sync_every"),
        (["task.name=jsonl", "task.prompts=p.jsonl"], "reward.kind"),
        (["dpo.betta=0.1"], "dpo.betta"),
        (["trainer.lr=-1"], "trainer.lr"),
        (["reward.mixture=[[exact_match, -1.0]]"], "reward.mixture"),
        (["reward.mixture=[[verifier, 1.0]]"], "reward.mixture"),
        (["reward.kind=exact_match", "reward.mixture=[[math_verify, 1.0]]"], "reward.kind"),
        (["grpo.loss_type=ppo"], "grpo.loss_type"),
        (["reward.kind=llm_judge"], "reward.judge.model"),
        (["reward.judge.verdicts=[yes, yes]"], "reward.judge.verdicts"),
        (["reward.judge.template=no fields"], "reward.judge.template"),
        (["reward.style.target_length=0"], "reward.style.target_length"),
        (["model.device=tpu"], "model.device"),
        (["dpo.pairs_file=pairs.jsonl"], "dpo.pairs_file"),
        (["sampling.stop_token_ids=[-1]"], "sampling.stop_token_ids"),
        (["sampling.stop_strings=['']"], "sampling.stop_strings"),
    ],
)
def test_bad_configs_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        load_config(None, overrides)


def test_every_registered_algorithm_is_a_demo_choice_and_loads_with_its_section():
    from hotloop.algorithms.cli import _parser

    with pytest.raises(SystemExit):
        _parser().parse_args(["demo", "--algo", "ppo-magic"])
    for name, (section, _) in ALGORITHMS.items():
        assert _parser().parse_args(["demo", "--algo", name]).algo == name
        config = load_config(None, [f"algorithm={name}"])
        assert config.algorithm_section is getattr(config, section)


def test_cli_reports_config_errors_without_a_traceback(capsys):
    assert main(["demo", "--set", "loop.sync_every=0", "--no-progress"]) == 2
    assert "loop.sync_every" in capsys.readouterr().err


def test_run_config_checkpoints_often_enough_that_a_kill_loses_at_most_ten_steps():
    loop = load_config().loop
    assert 1 <= loop.checkpoint_every <= 10 and loop.checkpoint_every < loop.steps


# -- device -------------------------------------------------------------------------------------------


def test_device_auto_is_cuda_when_available_else_cpu(monkeypatch):
    assert load_config().model.device == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


def test_unavailable_cuda_is_a_config_error_naming_model_device(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"model\.device: got 'cuda', but CUDA is not available.*expected 'cpu'"):
        resolve_device("cuda")
    assert main(["demo", "--set", "model.device=cuda:0", "--no-progress"]) == 2
    assert "model.device" in capsys.readouterr().err


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_build_setup_puts_the_policy_and_model_rewards_on_the_device(local_model_dirs, device):
    root = local_model_dirs
    config = load_config(
        None,
        [
            f"model.path={root / 'policy'}",
            f"model.device={device}",
            "task.name=jsonl",
            f"task.prompts={root / 'prompts.jsonl'}",
            "reward.kind=reward_model",
            f"reward.model={root / 'rm'}",
        ],
    )
    setup = build_setup(config, progress=False)
    expected = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else "cpu")
    assert setup.device == expected and next(setup.model.parameters()).device.type == expected.type
    assert next(setup.reward_fn.model.parameters()).device.type == expected.type


# -- stop tokens --------------------------------------------------------------------------------------


def test_stop_strings_map_to_token_ids_beside_the_given_ids():
    from hotloop.algorithms.tasks.tokenizer import CharTokenizer

    tok = CharTokenizer("0123456789+=")
    config = load_config(None, ["sampling.stop_strings=['+', '=']", "sampling.stop_token_ids=[4, 13]"]).sampling
    assert config.stop_strings == ("+", "=") and config.stop_token_ids == (4, 13)
    params = sampling_params(config, tok)
    assert params.stop_token_ids == (4, tok.encode("+", add_bos=False)[0], tok.encode("=", add_bos=False)[0])
    assert sampling_params(load_config().sampling, tok).stop_token_ids == ()
    for bad in ("12", "x"):  # two tokens; not in the alphabet
        with pytest.raises(ValueError, match=r"sampling\.stop_strings: .*" + bad):
            sampling_params(load_config(None, [f"sampling.stop_strings=['{bad}']"]).sampling, tok)


def test_stop_tokens_from_the_config_end_sampled_completions():
    from hotloop.algorithms.tasks import CharTokenizer, build_tiny_model, tiny_llama_config
    from hotloop.runtime.torch_engine import TorchEngine

    tok = CharTokenizer("0123456789+=")
    model = build_tiny_model(tiny_llama_config(tok.vocab_size, hidden_size=16, heads=2, kv_heads=1), seed=0)
    stops = "13579"
    config = load_config(None, [f"sampling.stop_strings={list(stops)}", "sampling.max_new_tokens=12"]).sampling
    params = sampling_params(config, tok)
    engine = TorchEngine(model, pad_token_id=tok.pad_id, eos_token_id=tok.eos_id, seed=0)
    completions = engine.generate([tok.encode("12+3=")] * 4, dataclasses.replace(params, n=16, seed=0))
    stop_ids = set(params.stop_token_ids)
    assert any(c.finish_reason == "stop" and c.token_ids[-1] in stop_ids for c in completions)
    for c in completions:
        assert not stop_ids & set(c.token_ids[:-1])
        assert (c.finish_reason == "stop") == (c.token_ids[-1] in stop_ids | {tok.eos_id})


def test_demo_smoke_run_writes_summary_metrics_plot_and_checkpoint(tmp_path):
    out = tmp_path / "demo"
    tiny = [
        "model.warm_start_steps=30",
        f"model.cache_dir={tmp_path / 'cache'}",
        "task.eval_problems=16",
        "loop.prompts_per_step=4",
        "dpo.samples_per_prompt=4",
        "dpo.pairs_per_prompt=1",
        "loop.eval_every=1",
    ]
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


@pytest.mark.parametrize(
    "algorithm, section",
    [
        ("grpo", "grpo"),
        ("kto", "kto"),
        ("rejection-sampling", "rejection_sampling"),
        ("rwr", "rwr"),
        ("self-rewarding", "self_rewarding.dpo"),
        ("online-dpo", "dpo"),
    ],
)
def test_train_runs_every_algorithm_on_a_local_transformers_model_and_a_jsonl(
    local_model_dirs, tmp_path, algorithm, section
):
    root = local_model_dirs
    (tmp_path / "run.yaml").write_text(
        f"algorithm: {algorithm}\nmodel: {{path: {root / 'policy'}}}\n"
        f"task: {{name: jsonl, prompts: {root / 'prompts.jsonl'}, eval_problems: 4}}\n"
        f"reward: {{mixture: [[math_verify, 1.0], [reward_model, 0.5]], model: {root / 'rm'}}}\n"
        "sampling: {max_new_tokens: 3}\nloop: {steps: 2, prompts_per_step: 2, eval_every: 0, sync_every: 1}\n"
    )
    out = tmp_path / "out"
    args = [
        "train",
        str(tmp_path / "run.yaml"),
        "--out",
        str(out),
        "--no-progress",
        "--set",
        f"{section}.samples_per_prompt=4",
    ]
    assert main(args) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1] and not all(r["skipped"] for r in records)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["algorithm"] == algorithm and summary["steps"] == 2


def _train(root, tmp_path, yaml_body: str, *overrides: str) -> list[dict]:
    """``hotloop train`` on the saved tiny policy for a YAML body; the metrics records."""
    (tmp_path / "run.yaml").write_text(
        f"model: {{path: {root / 'policy'}}}\ntask: {{name: jsonl, prompts: {root / 'prompts.jsonl'}, "
        "eval_problems: 4}\nsampling: {max_new_tokens: 3}\n" + yaml_body
    )
    out = tmp_path / "out"
    args = ["train", str(tmp_path / "run.yaml"), "--out", str(out), "--no-progress"]
    assert main(args + [a for o in overrides for a in ("--set", o)]) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_train_with_the_policy_as_llm_judge_in_a_verifiable_mixture(local_model_dirs, tmp_path):
    records = _train(
        local_model_dirs,
        tmp_path,
        "algorithm: grpo\nreward: {mixture: [[math_verify, 1.0], [llm_judge, 0.5]], "
        "judge: {model: policy}}\nloop: {steps: 2, prompts_per_step: 2, eval_every: 0, sync_every: 1}\n",
        "grpo.samples_per_prompt=4",
    )
    # σ(ℓ_yes − ℓ_no) ∈ (0, 1) on every sample, so the mixed mean reward is strictly positive
    assert [r["step"] for r in records] == [0, 1] and all(r["reward"] > 0 for r in records)


def test_train_offline_dpo_draws_the_prompts_of_its_pairs_file(local_model_dirs, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"{a}*{b}=", "chosen": str(a * b), "rejected": str(a * b + 1)} for a in range(3) for b in (2, 3)]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = _train(
        local_model_dirs,
        tmp_path,
        f"algorithm: offline-dpo\ndpo: {{pairs_file: {pairs}}}\nreward: {{kind: math_verify}}\n"
        "loop: {steps: 3, prompts_per_step: 2, eval_every: 0, sync_every: .inf}\n",
    )
    # the task's prompts ("a+b=") have no stored pairs: every step trains only if the pool is the file's prompts
    assert [r["step"] for r in records] == [0, 1, 2] and not any(r["skipped"] for r in records)
    assert all(r["pairs"] == 2.0 and math.isfinite(r["loss"]) for r in records)


def test_python_dash_m_runs_the_cli_like_the_console_script():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "hotloop.algorithms.cli", "train", "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "usage: hotloop train" in out.stdout
