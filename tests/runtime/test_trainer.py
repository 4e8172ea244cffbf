"""Trainer: gradient accumulation equals one big batch, clipping, schedules, versions, config checks."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hotloop.runtime.trainer import Trainer, TrainerConfig, lr_factor, make_reference
from tests.helpers import relative_error


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


def lm_loss(model, ids):
    """Mean next-token cross-entropy of a [B, T] batch (a mean, so equal micro batches average exactly)."""
    return model(input_ids=ids, labels=ids).loss


def grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _accumulating_and_whole(k):
    """(model, twin, accumulating trainer with k micro batches, one-batch trainer): same weights, lr 1e-3, no clip."""
    model = tiny_llama()
    twin = LlamaForCausalLM(model.config)
    twin.load_state_dict(model.state_dict())
    accum = Trainer(model, TrainerConfig(lr=1e-3, grad_accum_steps=k, max_grad_norm=None))
    whole = Trainer(twin, TrainerConfig(lr=1e-3, grad_accum_steps=1, max_grad_norm=None))
    return model, twin, accum, whole


def test_two_micro_batches_give_the_gradient_and_update_of_one_batch():
    model, twin, accum, whole = _accumulating_and_whole(2)
    ids = torch.randint(0, 20, (6, 9))
    m_accum = accum.step(lm_loss, [ids[:3], ids[3:]])
    m_whole = whole.step(lm_loss, [ids])
    assert relative_error(grads(model), grads(twin)) <= 1e-6
    assert relative_error(params(model), params(twin)) <= 1e-6
    assert m_accum["loss"] == pytest.approx(m_whole["loss"], rel=1e-6)
    assert m_accum["grad_norm"] == pytest.approx(m_whole["grad_norm"], rel=1e-6)


def test_clipping_scales_gradients_to_max_norm_and_reports_the_norm_before():
    model = tiny_llama()
    ids = torch.randint(0, 20, (4, 7))
    ref = tiny_llama()
    ref.load_state_dict(model.state_dict())
    lm_loss(ref, ids).mul(50.0).backward()
    raw = grads(ref)
    trainer = Trainer(model, TrainerConfig(max_grad_norm=0.25))
    metrics = trainer.step(lambda m, b: lm_loss(m, b) * 50.0, [ids])
    assert metrics["grad_norm"] == pytest.approx(raw.norm().item(), rel=1e-5)
    assert raw.norm().item() > 0.25
    assert grads(model).norm().item() == pytest.approx(0.25, rel=1e-4)
    assert relative_error(grads(model), raw * (0.25 / raw.norm())) <= 1e-5


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_learning_rate_follows_warmup_then_schedule(schedule):
    W, S, lr = 2, 7, 2e-3
    trainer = Trainer(tiny_llama(), TrainerConfig(lr=lr, warmup_steps=W, total_steps=S, schedule=schedule))
    ids = torch.randint(0, 20, (2, 5))
    seen = [trainer.step(lm_loss, [ids])["lr"] for _ in range(S)]
    shape = {
        "constant": lambda p: 1.0,
        "linear": lambda p: 1.0 - p,
        "cosine": lambda p: 0.5 * (1 + math.cos(math.pi * p)),
    }[schedule]
    expected = [lr * (s + 1) / W if s < W else lr * shape((s - W) / (S - W)) for s in range(S)]
    assert seen == pytest.approx(expected, rel=1e-12)
    assert trainer.version == S


def test_lr_factor_clamps_after_total_steps():
    assert lr_factor(50, warmup_steps=2, total_steps=10, schedule="linear") == 0.0
    assert lr_factor(50, warmup_steps=2, total_steps=10, schedule="cosine") == pytest.approx(0.0, abs=1e-15)


def test_step_counts_versions_and_accepts_loss_outputs_with_metrics():
    trainer = Trainer(tiny_llama(), TrainerConfig(grad_accum_steps=2))
    ids = torch.randint(0, 20, (4, 6))

    def loss_fn(model, batch):
        loss = lm_loss(model, batch)
        return loss, {"tokens": torch.tensor(float(batch.numel()))}

    assert trainer.version == 0
    metrics = trainer.step(loss_fn, [ids[:1], ids[1:]])
    assert trainer.version == 1 and "version" not in metrics
    assert metrics["tokens"] == pytest.approx((6 + 18) / 2)
    with pytest.raises(ValueError, match="micro_batches"):
        trainer.step(loss_fn, [ids[:1], ids[1:2], ids[2:]])
    with pytest.raises(ValueError, match="weights"):
        trainer.step(loss_fn, [ids[:1], ids[1:]], weights=[0.5, 0.6])


def test_unequal_micro_batches_weighted_by_their_share_give_the_gradient_of_one_batch():
    model, twin, accum, whole = _accumulating_and_whole(3)
    ids = torch.randint(0, 20, (5, 7))
    m_accum = accum.step(lm_loss, [ids[:1], ids[1:]], weights=[1 / 5, 4 / 5])  # 2 <= k micro batches
    m_whole = whole.step(lm_loss, [ids])
    assert relative_error(grads(model), grads(twin)) <= 1e-6
    assert m_accum["loss"] == pytest.approx(m_whole["loss"], rel=1e-6)


def test_step_changes_parameters_and_puts_the_model_in_train_mode():
    model = tiny_llama().eval()
    before = params(model).clone()
    Trainer(model, TrainerConfig(lr=1e-2)).step(lm_loss, [torch.randint(0, 20, (2, 5))])
    assert model.training
    assert not torch.equal(before, params(model))


def test_make_reference_is_a_frozen_eval_copy():
    model = tiny_llama().train()
    reference = make_reference(model)
    assert not reference.training and all(not p.requires_grad for p in reference.parameters())
    assert torch.equal(params(reference), params(model))
    Trainer(model, TrainerConfig(lr=1e-2)).step(lm_loss, [torch.randint(0, 20, (2, 5))])
    assert not torch.equal(params(reference), params(model))


def test_config_seed_reseeds_the_global_rngs():
    draws = []
    for warmup in range(2):
        torch.rand(warmup + 1)  # move the global stream differently each time
        Trainer(tiny_llama(), TrainerConfig(seed=123))
        draws.append(torch.rand(3))
    assert torch.equal(draws[0], draws[1])


@pytest.mark.parametrize(
    "field, value",
    [
        ("lr", 0.0),
        ("lr", float("nan")),
        ("weight_decay", -1.0),
        ("betas", (0.9, 1.0)),
        ("betas", [0.9, 0.99]),
        ("eps", 0.0),
        ("grad_accum_steps", 0),
        ("max_grad_norm", 0.0),
        ("warmup_steps", -1),
        ("schedule", "step"),
        ("seed", "1"),
        ("bf16_autocast", 1),
    ],
)
def test_bad_config_raises_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        TrainerConfig(**{field: value})


def test_decaying_schedules_need_total_steps():
    with pytest.raises(ValueError, match="total_steps"):
        TrainerConfig(schedule="cosine")
    with pytest.raises(ValueError, match="total_steps"):
        TrainerConfig(warmup_steps=5, total_steps=3)


def test_loss_fn_returning_a_non_scalar_raises_type_error():
    trainer = Trainer(tiny_llama(), TrainerConfig())
    ids = torch.randint(0, 20, (2, 5))
    with pytest.raises(TypeError, match="loss_fn"):
        trainer.step(lambda m, b: m(input_ids=b).logits, [ids])
    with pytest.raises(TypeError, match="loss_fn"):
        trainer.step(lambda m, b: "loss", [ids])
    assert trainer.version == 0


def test_the_fused_adamw_kernel_gives_the_per_tensor_update():
    """The trainer takes AdamW's fused kernel on CPU (fp32 parameters); two steps equal the default per-tensor
    AdamW's to fp32 rounding, weight decay and clipping included."""
    model = tiny_llama()
    twin = LlamaForCausalLM(model.config)
    twin.load_state_dict(model.state_dict())
    config = TrainerConfig(lr=1e-3, weight_decay=0.1, max_grad_norm=0.5)
    trainer = Trainer(model, config)
    before = params(model).clone()
    assert trainer.optimizer.defaults["fused"] is True
    reference = torch.optim.AdamW(twin.parameters(), lr=1e-3, betas=config.betas, eps=config.eps, weight_decay=0.1)
    for _ in range(2):
        ids = torch.randint(0, 20, (4, 9))
        trainer.step(lm_loss, [ids])
        twin.zero_grad()
        lm_loss(twin, ids).backward()
        torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.5)
        reference.step()
    assert relative_error(params(model), params(twin)) <= 1e-6
    assert relative_error(params(model), before) > 1e-4, "the steps must move the weights"


def test_gradient_checkpointing_recomputes_the_layers_and_gives_the_same_update():
    """``gradient_checkpointing=True`` runs each decoder layer twice per step (the forward and the backward's
    recompute) and the update equals the one that kept the activations, to fp32 rounding."""
    model = tiny_llama()
    twin = LlamaForCausalLM(model.config)
    twin.load_state_dict(model.state_dict())
    checkpointed = Trainer(model, TrainerConfig(lr=1e-3, gradient_checkpointing=True))
    kept = Trainer(twin, TrainerConfig(lr=1e-3))
    calls = {"checkpointed": 0, "kept": 0}
    for name, m in (("checkpointed", model), ("kept", twin)):  # the recompute skips module hooks: wrap forward
        mlp = m.model.layers[0].mlp
        mlp.forward = lambda *a, name=name, forward=mlp.forward: calls.__setitem__(name, calls[name] + 1) or forward(*a)
    before = params(model).clone()
    for _ in range(2):
        ids = torch.randint(0, 20, (4, 9))
        checkpointed.step(lm_loss, [ids])
        kept.step(lm_loss, [ids])
    assert calls == {"checkpointed": 4, "kept": 2}
    assert relative_error(params(model), params(twin)) <= 1e-6
    assert relative_error(params(model), before) > 1e-4, "the steps must move the weights"


def test_gradient_checkpointing_refuses_a_model_without_it():
    with pytest.raises(TypeError, match="trainer.gradient_checkpointing"):
        Trainer(torch.nn.Linear(3, 3), TrainerConfig(gradient_checkpointing=True))
