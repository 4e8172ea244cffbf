"""The config loader's errors and the ``hotloop`` CLI: a 2-step ``demo`` writes every promised file."""

import json
import math

import pytest

from hotloop.algorithms.cli import main
from hotloop.algorithms.config import ALGORITHMS, RunConfig, load_config


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
    (["reward.mixture=[[exact_match, -1.0]]"], "reward.mixture"),
    (["reward.mixture=[[verifier, 1.0]]"], "reward.mixture"),
    (["reward.kind=exact_match", "reward.mixture=[[math_verify, 1.0]]"], "reward.kind"),
    (["grpo.loss_type=ppo"], "grpo.loss_type"),
])
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


def test_reward_mixture_from_config_sums_the_weighted_kinds():
    import torch

    from hotloop.algorithms.cli import _reward
    from hotloop.algorithms.tasks.arithmetic import ArithmeticTask

    task = ArithmeticTask(2, "+", 0)
    config = load_config(None, ["reward.mixture=[[exact_match, 1.0], [preference_rule, 0.5]]"])
    problems = task.problems(4, "test")
    texts = [problems[0].answer, "x", problems[2].answer, problems[3].answer + "1"]
    assert torch.equal(_reward(config, task, None)(problems, texts), torch.tensor([1.5, 0.0, 1.5, 0.0]))


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


@pytest.fixture(scope="module")
def local_model_dirs(tmp_path_factory):
    """A tiny Llama policy and reward model saved with save_pretrained beside a char-level HF tokenizer, and a
    JSONL of prompts: everything ``hotloop train`` reads from disk, built here without downloads."""
    import torch
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import LlamaForSequenceClassification, PreTrainedTokenizerFast

    from hotloop.algorithms.tasks.tiny_model import build_tiny_model, tiny_llama_config

    root = tmp_path_factory.mktemp("local")
    chars = [chr(c) for c in range(32, 127)] + ["\n"]   # letters too: the English judge template encodes
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{ch: i + 3 for i, ch in enumerate(chars)}}
    inner = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    inner.decoder = decoders.Fuse()
    inner.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=inner, bos_token="<bos>", eos_token="<eos>",
                                        pad_token="<pad>")
    config = tiny_llama_config(len(vocab), hidden_size=32, layers=1, intermediate=64)
    build_tiny_model(config, seed=0).save_pretrained(root / "policy")
    config.num_labels = 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        LlamaForSequenceClassification(config).save_pretrained(root / "rm")
    for name in ("policy", "rm"):
        tokenizer.save_pretrained(root / name)
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(12) for b in range(8)]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.mark.parametrize("algorithm, section", [("grpo", "grpo"), ("kto", "kto"),
                                                ("rejection-sampling", "rejection_sampling"), ("rwr", "rwr"),
                                                ("self-rewarding", "self_rewarding.dpo"), ("online-dpo", "dpo")])
def test_train_runs_every_algorithm_on_a_local_transformers_model_and_a_jsonl(local_model_dirs, tmp_path, algorithm,
                                                                             section):
    root = local_model_dirs
    (tmp_path / "run.yaml").write_text(
        f"algorithm: {algorithm}\nmodel: {{path: {root / 'policy'}}}\n"
        f"task: {{name: jsonl, prompts: {root / 'prompts.jsonl'}, eval_problems: 4}}\n"
        f"reward: {{mixture: [[math_verify, 1.0], [reward_model, 0.5]], model: {root / 'rm'}}}\n"
        "sampling: {max_new_tokens: 3}\nloop: {steps: 2, prompts_per_step: 2, eval_every: 0, sync_every: 1}\n")
    out = tmp_path / "out"
    args = ["train", str(tmp_path / "run.yaml"), "--out", str(out), "--no-progress",
            "--set", f"{section}.samples_per_prompt=4"]
    assert main(args) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1] and not all(r["skipped"] for r in records)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["algorithm"] == algorithm and summary["steps"] == 2
