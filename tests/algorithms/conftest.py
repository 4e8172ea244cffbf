"""Fixtures of the algorithm tests: a tiny transformers policy, reward model and prompts saved on disk."""

import json

import pytest


@pytest.fixture(scope="session")
def local_model_dirs(tmp_path_factory):
    """A tiny Llama policy and reward model saved with save_pretrained beside a char-level HF tokenizer, and a
    JSONL of prompts: everything ``hotloop train`` reads from disk, built here without downloads."""
    import torch
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import LlamaForSequenceClassification, PreTrainedTokenizerFast

    from hotloop.algorithms.tasks.tiny_model import build_tiny_model, tiny_llama_config

    root = tmp_path_factory.mktemp("local")
    chars = [chr(c) for c in range(32, 127)] + ["\n"]  # letters too: the English judge template encodes
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{ch: i + 3 for i, ch in enumerate(chars)}}
    inner = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    inner.decoder = decoders.Fuse()
    inner.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=inner, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
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
