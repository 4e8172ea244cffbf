"""Checkpoints: bit-exact resume (weights, optimizer, schedule, RNGs), atomic saves, pruning."""

import json
import random

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hotloop.runtime import checkpoint
from hotloop.runtime.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from hotloop.runtime.trainer import Trainer, TrainerConfig, make_reference

CONFIG = TrainerConfig(lr=3e-3, weight_decay=0.01, warmup_steps=2, total_steps=10, schedule="cosine", max_grad_norm=0.5)


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=20,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def noisy_loss(model, ids):
    """LM loss plus a term drawn from the global torch RNG, so a resume must restore that RNG too."""
    return model(input_ids=ids, labels=ids).loss + 0.1 * (torch.randn(()) * model.lm_head.weight.mean())


def rng_draws(generator):
    return (
        random.random(),
        float(np.random.rand()),
        torch.rand(2).tolist(),
        torch.rand(2, generator=generator).tolist(),
    )


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def fresh_run():
    model = tiny_llama()
    trainer = Trainer(model, CONFIG, reference=make_reference(model))
    return model, trainer, torch.Generator().manual_seed(99)


def test_resume_reproduces_the_next_step_bit_for_bit(tmp_path):
    model, trainer, sampler = fresh_run()
    ids = torch.randint(0, 20, (3, 8))
    for _ in range(3):
        trainer.step(noisy_loss, [ids])
    torch.rand(5, generator=sampler)
    path = trainer.save(tmp_path, {"step": trainer.version, "cursor": 17}, generators={"sampler": sampler})
    draws_1 = rng_draws(sampler)
    metrics_1 = trainer.step(noisy_loss, [ids])
    p1 = params(model)

    torch.manual_seed(12345)  # a different process state: new weights, new RNG positions
    random.seed(1)
    model_2, trainer_2, sampler_2 = fresh_run()
    state = trainer_2.load(tmp_path, generators={"sampler": sampler_2})
    assert state == {"step": 3, "cursor": 17} and path.name == "step-000003"
    assert trainer_2.version == 3
    assert rng_draws(sampler_2) == draws_1
    metrics_2 = trainer_2.step(noisy_loss, [ids])
    assert all(torch.equal(a, b) for a, b in zip(p1, params(model_2)))
    assert metrics_2 == metrics_1
    assert all(torch.equal(a, b) for a, b in zip(params(trainer.reference), params(trainer_2.reference)))


def test_save_writes_the_layout_and_latest_points_at_the_newest(tmp_path):
    model, trainer, _ = fresh_run()
    first = trainer.save(tmp_path, {"a": 1})
    trainer.step(noisy_loss, [torch.randint(0, 20, (2, 5))])
    second = trainer.save(tmp_path, {"a": 2})
    assert {p.name for p in second.iterdir()} == {
        "model.safetensors",
        "reference.safetensors",
        "trainer.pt",
        "trainer.json",
        "rng.pt",
        "rng.json",
        "loop_state.json",
        "manifest.json",
    }
    assert (tmp_path / "latest").read_text().strip() == "step-000001"
    assert latest_checkpoint(tmp_path) == second and first.exists()
    assert json.loads((second / "loop_state.json").read_text()) == {"a": 2}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_keep_prunes_old_checkpoints(tmp_path):
    model = tiny_llama()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(5):
        save_checkpoint(
            tmp_path, step=step, model=model, optimizer=optimizer, scheduler=None, loop_state={"step": step}, keep=2
        )
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000003", "step-000004"]


@pytest.mark.parametrize("where", ["_capture_rng", "_write_latest"])
def test_interrupted_save_leaves_previous_checkpoint_and_latest_valid(tmp_path, monkeypatch, where):
    model, trainer, _ = fresh_run()
    good = trainer.save(tmp_path, {"step": 0})
    before = params(model)
    trainer.step(noisy_loss, [torch.randint(0, 20, (2, 5))])

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(checkpoint, where, crash)
    with pytest.raises(OSError, match="simulated"):
        trainer.save(tmp_path, {"step": 1})
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path) == good
    assert (tmp_path / "latest").read_text().strip() == "step-000000"
    model_2, trainer_2, _ = fresh_run()
    assert trainer_2.load(tmp_path) == {"step": 0}
    assert all(torch.equal(a, b) for a, b in zip(before, params(model_2)))


def test_non_json_loop_state_fails_without_touching_the_previous_checkpoint(tmp_path):
    model, trainer, _ = fresh_run()
    good = trainer.save(tmp_path, {"step": 0})
    with pytest.raises(TypeError):
        trainer.save(tmp_path, {"step": object()})
    assert latest_checkpoint(tmp_path) == good
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_leftover_temp_directory_from_a_crash_is_ignored_then_removed(tmp_path):
    model, trainer, _ = fresh_run()
    (tmp_path / ".tmp-step-000007-999").mkdir(parents=True)
    (tmp_path / ".tmp-step-000007-999" / "model.safetensors").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path) is None
    trainer.save(tmp_path, {})
    assert not (tmp_path / ".tmp-step-000007-999").exists()


def test_latest_falls_back_to_the_highest_step_when_the_pointer_is_missing(tmp_path):
    model, trainer, _ = fresh_run()
    trainer.save(tmp_path, {})
    trainer.step(noisy_loss, [torch.randint(0, 20, (2, 5))])
    newest = trainer.save(tmp_path, {})
    (tmp_path / "latest").unlink()
    assert latest_checkpoint(tmp_path) == newest


def test_missing_checkpoint_and_unknown_generator_raise(tmp_path):
    model, trainer, sampler = fresh_run()
    with pytest.raises(FileNotFoundError, match="path"):
        load_checkpoint(tmp_path, model=model)
    trainer.save(tmp_path, {})
    with pytest.raises(KeyError, match="sampler"):
        trainer.load(tmp_path, generators={"sampler": sampler})
    with pytest.raises(ValueError, match="keep"):
        trainer.save(tmp_path, {}, keep=0)


def test_extra_models_round_trip_inside_the_atomic_checkpoint(tmp_path):
    model, trainer, _ = fresh_run()
    stale_copy = tiny_llama()
    path = trainer.save(tmp_path, {}, extra_models={"engine": stale_copy})
    assert (path / "engine.safetensors").exists()
    restored = tiny_llama()
    model_2, trainer_2, _ = fresh_run()
    trainer_2.load(path, extra_models={"engine": restored})
    assert all(torch.equal(a, b) for a, b in zip(params(stale_copy), params(restored)))
    assert not all(torch.equal(a, b) for a, b in zip(params(stale_copy), params(model_2)))
    with pytest.raises(ValueError, match="extra_models"):
        trainer.save(tmp_path, {}, extra_models={"../x": stale_copy})


def test_a_state_dict_as_extra_model_is_loaded_back_in_place_and_its_keys_are_checked(tmp_path):
    model, trainer, _ = fresh_run()
    host_copy = {k: v.detach().clone() + 1.0 for k, v in tiny_llama().state_dict().items()}
    path = trainer.save(tmp_path, {}, extra_models={"engine": host_copy})
    target = {k: torch.zeros_like(v) for k, v in host_copy.items()}
    trainer.load(path, extra_models={"engine": target})
    assert all(torch.equal(target[k], v) for k, v in host_copy.items())
    del target["lm_head.weight"]
    with pytest.raises(KeyError, match="lm_head.weight"):
        trainer.load(path, extra_models={"engine": target})
