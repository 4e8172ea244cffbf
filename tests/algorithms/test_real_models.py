"""Real-model plumbing on the tiny models: chat templates, the word-problem task, checkpoint_every 0, export
(greedy generation identical to the run's final policy), no reference copy for GRPO with beta 0, step metrics."""

import json

import pytest
import torch

from hotloop.algorithms.cli import main
from hotloop.algorithms.loader import load_config
from hotloop.algorithms.presets import demo_default_warnings
from hotloop.algorithms.tasks.tokenizer import HFTokenizer
from hotloop.algorithms.tasks.word_problems import WordProblemsTask
from hotloop.runtime.engine import Completion, SamplingParams
from hotloop.runtime.rollout_metrics import rollout_metrics

TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture()
def hf_tokenizer(local_model_dirs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(local_model_dirs / "policy")


def test_chat_template_is_applied_by_default_when_the_tokenizer_has_one(hf_tokenizer):
    assert not HFTokenizer(hf_tokenizer).templated  # the fixture's tokenizer has no template: raw
    raw = HFTokenizer(hf_tokenizer, chat_template=False)
    assert raw.encode("1+2=") == hf_tokenizer.encode("1+2=", add_special_tokens=True)
    hf_tokenizer.chat_template = TEMPLATE
    chat = HFTokenizer(hf_tokenizer, system_prompt="Be exact.")
    assert chat.templated and chat.render("1+2=") == "<system>Be exact.<user>1+2=<assistant>"
    assert chat.encode("1+2=") == hf_tokenizer.encode(chat.render("1+2="), add_special_tokens=False)
    assert HFTokenizer(hf_tokenizer, chat_template=False).render("1+2=") == "1+2="


def test_requiring_a_chat_template_the_tokenizer_lacks_names_the_field(hf_tokenizer):
    with pytest.raises(ValueError, match=r"prompt\.chat_template"):
        HFTokenizer(hf_tokenizer, chat_template=True)


def test_prompt_options_come_from_yaml_and_set(tmp_path):
    config = load_config(
        None,
        [
            "prompt.chat_template=false",
            "prompt.system_prompt=Solve it.",
            "prompt.template_options={enable_thinking: false}",
        ],
    )
    assert config.prompt.chat_template is False and config.prompt.system_prompt == "Solve it."
    assert config.prompt.template_options == {"enable_thinking": False}
    with pytest.raises(ValueError, match=r"prompt\.chat_template"):
        load_config(None, ["prompt.chat_template=sometimes"])


def test_word_problems_are_deterministic_disjoint_and_scored_by_math_verify():
    task = WordProblemsTask(steps=3, seed=0)
    train, test = task.problems(200, "train"), task.problems(50, "test")
    assert train == WordProblemsTask(steps=3, seed=0).problems(200, "train")
    assert not {p.prompt for p in train} & {p.prompt for p in test}
    assert {p.prompt for p in WordProblemsTask(steps=3, seed=1).problems(50, "test")} <= {
        p.prompt for p in task.problems(task.split_size("test"), "test")
    }
    p = test[0]
    assert task.score(p, f"First we add, then we multiply, so the answer is {p.answer}.") == 1.0
    assert task.score(p, f"\\boxed{{{p.answer}}}") == 1.0
    assert task.score(p, f"{int(p.answer) + 1}") == 0.0
    assert all(int(q.answer) >= 0 for q in train)


def test_word_problems_need_a_pretrained_model_and_demo_defaults_warn():
    with pytest.raises(ValueError, match=r"model\.path"):
        load_config(None, ["task.name=word_problems"])
    config = load_config(None, ["model.path=/some/model", "trainer.lr=1e-6"], preset="demo")
    warnings = demo_default_warnings(config)
    assert any("sampling.max_new_tokens" in w for w in warnings) and not any("trainer.lr" in w for w in warnings)
    assert demo_default_warnings(load_config(preset="demo")) == []  # the tiny model: its own sizes
    assert demo_default_warnings(load_config(None, ["model.path=/some/model"])) == []  # no demo preset


def test_rollout_metrics_lengths_truncation_entropy_and_mixture_sources():
    from hotloop.algorithms.rewards.mixture import WeightedMixture

    completions = [
        Completion(
            prompt_index=0, token_ids=[5, 6, 2], logprobs=[-1.0, -2.0, -0.5], finish_reason="stop", weight_version=0
        ),
        Completion(prompt_index=0, token_ids=[7], logprobs=[-0.5], finish_reason="length", weight_version=0),
    ]
    mix = WeightedMixture(
        [(lambda p, c: torch.tensor([1.0, 0.0]), 1.0), (lambda p, c: torch.tensor([0.5, 0.25]), 2.0)],
        names=["math_verify", "preference_rule"],
    )
    mix([None, None], ["a", "b"])
    out = rollout_metrics(completions, mix)
    assert out["completion/length_mean"] == 2.0 and out["completion/length_max"] == 3.0
    assert out["completion/truncated"] == 0.5 and out["entropy"] == pytest.approx(4.0 / 4)
    assert out["reward/math_verify"] == 0.5 and out["reward/preference_rule"] == 0.375


def _tiny_demo(tmp_path, *extra):
    out = tmp_path / "demo"
    tiny = [
        "model.warm_start_steps=30",
        f"model.cache_dir={tmp_path / 'cache'}",
        "task.eval_problems=8",
        "loop.prompts_per_step=4",
        "dpo.samples_per_prompt=4",
        "dpo.pairs_per_prompt=1",
        "loop.eval_every=0",
        "grpo.samples_per_prompt=4",
        *extra,
    ]
    args = ["demo", "--out", str(out), "--steps", "2", "--seed", "0", "--no-progress"]
    assert main(args + [a for t in tiny for a in ("--set", t)]) == 0
    return out


def test_checkpoint_every_zero_writes_no_checkpoint_unless_the_final_one_is_asked(tmp_path):
    out = _tiny_demo(tmp_path / "a", "loop.checkpoint_every=0")
    assert not any(p.name.startswith("step-") for p in out.iterdir())
    assert main(["export", str(out), str(tmp_path / "x")]) == 2  # nothing to export, and it says why
    out = _tiny_demo(tmp_path / "b", "loop.checkpoint_every=0", "loop.final_checkpoint=true")
    assert len([p for p in out.iterdir() if p.name.startswith("step-")]) == 1


def test_grpo_with_beta_zero_keeps_no_reference_and_reports_no_kl(tmp_path):
    out = _tiny_demo(tmp_path, "algorithm=grpo", "loop.sync_every=1")
    step = next(p for p in out.iterdir() if p.name.startswith("step-"))
    assert not (step / "reference.safetensors").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kl_after"] is None and summary["kl_label"].startswith("KL to reference")
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert {"completion/length_mean", "completion/length_max", "completion/truncated", "entropy"} <= record.keys()


def test_export_loads_with_from_pretrained_and_generates_like_the_final_policy(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from hotloop.algorithms.export import export_run
    from hotloop.algorithms.tasks.tokenizer import load_tokenizer
    from hotloop.runtime.torch_engine import TorchEngine

    out = _tiny_demo(tmp_path)
    exported = AutoModelForCausalLM.from_pretrained(export_run(out, tmp_path / "hf")).eval()
    final = load_file(next(p for p in out.iterdir() if p.name.startswith("step-")) / "model.safetensors")
    state = exported.state_dict()
    assert all(torch.equal(state[k], v) for k, v in final.items())
    tok = load_tokenizer(tmp_path / "hf")
    prompts = [tok.encode(f"{a}+{b}=") for a, b in ((12, 39), (5, 77), (40, 8))]
    ours = TorchEngine(exported, pad_token_id=tok.pad_id, eos_token_id=tok.eos_id).generate(
        prompts, SamplingParams(temperature=0.0, max_new_tokens=4)
    )
    for p, c in zip(prompts, ours):
        hf = exported.generate(torch.tensor([p]), do_sample=False, max_new_tokens=4)[0, len(p) :].tolist()
        assert hf[: len(c.token_ids)] == c.token_ids


def test_a_gguf_path_without_the_gguf_package_or_file_names_model_path(tmp_path):
    import importlib.util

    from hotloop.algorithms.models import fetch_model, is_gguf, load_causal_lm

    assert is_gguf("m.Q4_1.GGUF") and not is_gguf(tmp_path)
    with pytest.raises(ValueError, match=r"model\.path: expected an existing \.gguf file"):
        load_causal_lm(tmp_path / "missing.gguf")
    with pytest.raises(ValueError, match=r"model\.path: expected a model directory"):
        load_causal_lm(tmp_path / "missing-dir")
    with pytest.raises(ValueError, match="name: expected one of"):
        fetch_model("gpt-5", tmp_path)
    if importlib.util.find_spec("gguf") is None:
        (tmp_path / "m.gguf").write_bytes(b"GGUF")
        with pytest.raises(ValueError, match=r"hotloop\[gguf\]"):
            load_causal_lm(tmp_path / "m.gguf")
