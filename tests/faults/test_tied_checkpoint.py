"""A tied-embedding transformers Llama checkpoints once per tensor and loads back strictly with every key
(``model.embed_tokens.weight`` and ``lm_head.weight``), still tied, into a module and into a state dict."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hotloop.runtime.checkpoint import load_checkpoint
from hotloop.runtime.checkpoint_files import load_weights
from hotloop.runtime.trainer import Trainer, TrainerConfig
from tests.faults.tally import fault


def tied_llama(seed):
    torch.manual_seed(seed)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=37,
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            tie_word_embeddings=True,
        )
    )


def test_a_tied_model_round_trips_strictly_and_stays_tied(tmp_path):
    with fault("tied embeddings"):
        model = tied_llama(0)
        assert model.lm_head.weight is model.model.embed_tokens.weight
        trainer = Trainer(model, TrainerConfig(lr=1e-2))
        ids = torch.randint(0, 37, (2, 7))
        trainer.step(lambda m, b: m(input_ids=b, labels=b).loss, [ids])
        path = trainer.save(tmp_path, {"next_step": 1})
        saved = load_weights(path / "model.safetensors")
        assert set(saved) == set(model.state_dict())
        restored = tied_llama(1)
        load_checkpoint(path, model=restored)
        assert restored.lm_head.weight is restored.model.embed_tokens.weight
        for (name, a), b in zip(model.state_dict().items(), restored.state_dict().values(), strict=True):
            assert torch.equal(a, b), name
        engine = {k: torch.full_like(v, float("nan")) for k, v in model.state_dict().items()}
        path = trainer.save(tmp_path, {"next_step": 1}, extra_models={"engine": model})
        load_checkpoint(path, model=tied_llama(2), extra_models={"engine": engine}, rng=False)
        for name, tensor in engine.items():
            assert torch.equal(tensor, model.state_dict()[name]), name
