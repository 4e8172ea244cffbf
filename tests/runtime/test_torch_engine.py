"""TorchEngine: greedy equals ``model.generate``, sampler log-probs equal a fresh forward, stop
tokens, n per prompt, seeds, zero-copy weight sync, sleep/wake."""

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from hotloop.runtime.engine import Completion, RolloutEngine, SamplingParams
from hotloop.runtime.torch_engine import TorchEngine, _truncate
from tests.helpers import relative_error

PAD, EOS = 0, 1
PROMPTS = [[3, 4, 5], [6, 7, 8, 9, 10, 11, 12], [13], [14, 15, 16, 17]]


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=20,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger weights than the default init so that the argmax is not a near-tie
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    return model


@pytest.fixture
def model():
    return tiny_llama()


def hf_greedy(model, prompts, max_new_tokens, eos=None):
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), PAD)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, L - len(p) :] = torch.tensor(p)
        mask[b, L - len(p) :] = 1
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=PAD,
        eos_token_id=eos,
        top_k=None,
        top_p=None,
        temperature=None,
    )
    return out[:, L:].tolist()


def fresh_logprobs(model, prompt, completion, temperature):
    ids = torch.tensor([prompt + completion.token_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].double()
    scale = temperature if temperature > 0 else 1.0
    logp = (logits / scale).log_softmax(-1)
    target = torch.tensor(completion.token_ids)
    return logp.gather(-1, target[:, None])[:, 0], logits


def test_engine_satisfies_the_rollout_engine_protocol(model):
    assert isinstance(TorchEngine(model, pad_token_id=PAD, eos_token_id=EOS), RolloutEngine)


@pytest.mark.parametrize("max_batch_size", [64, 3])
def test_greedy_equals_hf_generate_with_left_padding_and_unequal_prompts(model, max_batch_size):
    engine = TorchEngine(model, pad_token_id=PAD, eos_token_id=None, max_batch_size=max_batch_size)
    out = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=12))
    assert [c.token_ids for c in out] == hf_greedy(model, PROMPTS, 12)
    assert all(c.finish_reason == "length" and len(c.logprobs) == 12 for c in out)


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.0, 0, 1.0)])
def test_sampler_logprobs_equal_fresh_forward_log_softmax_over_temperature(model, temperature, top_k, top_p):
    engine = TorchEngine(model, pad_token_id=PAD, eos_token_id=EOS)
    sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=10, n=2, seed=7)
    for c in engine.generate(PROMPTS, sampling):
        ref, logits = fresh_logprobs(model, PROMPTS[c.prompt_index], c, temperature)
        assert relative_error(torch.tensor(c.logprobs), ref) <= 1e-5
        if top_k:  # every sampled token lies in the top-k of the fresh forward
            kth = logits.topk(top_k, dim=-1).values[:, -1]
            picked = logits.gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
            assert bool((picked >= kth).all())


def test_stop_token_ends_sequence_with_finish_reason_stop(model):
    engine = TorchEngine(model, pad_token_id=PAD, eos_token_id=None)
    free = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=12))
    stop_token = free[1].token_ids[2]
    out = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=12, stop_token_ids=(stop_token,)))
    for f, c in zip(free, out):
        if stop_token in f.token_ids:
            cut = f.token_ids.index(stop_token) + 1
            assert (c.token_ids, c.finish_reason) == (f.token_ids[:cut], "stop")
            assert c.logprobs == pytest.approx(f.logprobs[:cut], abs=1e-6)
        else:
            assert (c.token_ids, c.finish_reason) == (f.token_ids, "length")
    assert out[1].finish_reason == "stop"


def test_eos_token_always_stops_like_hf_generate(model):
    eos = (
        TorchEngine(model, pad_token_id=PAD, eos_token_id=None)
        .generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=12))[0]
        .token_ids[1]
    )
    engine = TorchEngine(model, pad_token_id=PAD, eos_token_id=eos)
    out = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=12))
    expected = [ids[: ids.index(eos) + 1] if eos in ids else ids for ids in hf_greedy(model, PROMPTS, 12, eos)]
    assert [c.token_ids for c in out] == expected
    assert out[0].finish_reason == "stop"


def test_n_samples_per_prompt_come_prompt_major(model):
    engine = TorchEngine(model, pad_token_id=PAD, eos_token_id=EOS)
    out = engine.generate(PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=6, n=3, seed=1))
    assert [c.prompt_index for c in out] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    greedy_once = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=6))
    greedy_n = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=6, n=3))
    assert [c.token_ids for c in greedy_n] == [c.token_ids for c in greedy_once for _ in range(3)]


def test_the_n_samples_of_a_prompt_share_one_prefill_also_across_a_batch_boundary(model):
    engine = TorchEngine(model, pad_token_id=PAD, eos_token_id=EOS, max_batch_size=5)
    prefills, forward = [], model.forward
    model.forward = lambda **kw: (
        prefills.append(kw["input_ids"].shape[0]) if kw["input_ids"].shape[1] > 1 else None,
        forward(**kw),
    )[1]
    out = engine.generate(PROMPTS, SamplingParams(temperature=1.1, max_new_tokens=7, n=3, seed=5))
    assert prefills == [2, 3, 1]  # batches of rows 0-4 (prompts 0, 1), 5-9 (prompts 1, 2, 3), 10-11 (prompt 3)
    assert [c.prompt_index for c in out] == [i for i in range(len(PROMPTS)) for _ in range(3)]
    for c in out:
        ref, _ = fresh_logprobs(model, PROMPTS[c.prompt_index], c, 1.1)
        assert relative_error(torch.tensor(c.logprobs), ref) <= 1e-5


def test_top_k_1_and_tiny_top_p_equal_greedy(model):
    engine = TorchEngine(model, pad_token_id=PAD, eos_token_id=EOS)
    greedy = [c.token_ids for c in engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=8))]
    top_k = engine.generate(PROMPTS, SamplingParams(temperature=1.5, top_k=1, max_new_tokens=8, seed=3))
    top_p = engine.generate(PROMPTS, SamplingParams(temperature=1.5, top_p=1e-6, max_new_tokens=8, seed=3))
    assert [c.token_ids for c in top_k] == greedy
    assert [c.token_ids for c in top_p] == greedy


def test_seeded_sampling_is_reproducible_and_seed_changes_samples(model):
    engine = TorchEngine(model, pad_token_id=PAD, eos_token_id=EOS)
    sample = lambda seed: [
        c.token_ids
        for c in engine.generate(  # noqa: E731
            PROMPTS, SamplingParams(temperature=1.5, max_new_tokens=10, n=2, seed=seed)
        )
    ]
    assert sample(11) == sample(11)
    assert sample(11) != sample(12)


def test_engine_generator_stream_is_reproducible_from_its_seed(model):
    sampling = SamplingParams(temperature=1.5, max_new_tokens=10)
    a = TorchEngine(model, pad_token_id=PAD, eos_token_id=EOS, seed=5)
    b = TorchEngine(model, pad_token_id=PAD, eos_token_id=EOS, seed=5)
    first = [c.token_ids for c in a.generate(PROMPTS, sampling)]
    assert first == [c.token_ids for c in b.generate(PROMPTS, sampling)]
    assert first != [c.token_ids for c in a.generate(PROMPTS, sampling)]  # the stream moved on


def test_sync_weights_is_zero_copy_in_place_updates_change_outputs(model):
    engine = TorchEngine(model, pad_token_id=PAD, eos_token_id=None)
    greedy = SamplingParams(temperature=0, max_new_tokens=10)
    before = engine.generate(PROMPTS, greedy)
    assert {c.weight_version for c in before} == {0}
    with torch.no_grad():
        model.lm_head.weight.add_(torch.randn_like(model.lm_head.weight))  # what an optimizer step does
    engine.sync_weights(1)
    after = engine.generate(PROMPTS, greedy)
    assert engine.weight_version == 1 and {c.weight_version for c in after} == {1}
    assert [c.token_ids for c in after] != [c.token_ids for c in before]
    assert [c.token_ids for c in after] == hf_greedy(model, PROMPTS, 10)


def test_sync_weights_with_state_dict_loads_into_an_engine_copy(model):
    copy_engine = TorchEngine(copy.deepcopy(model), pad_token_id=PAD, eos_token_id=None)
    assert not copy_engine.shares_weights_with(model) and copy_engine.local_model is copy_engine.model
    assert TorchEngine(model, pad_token_id=PAD, eos_token_id=None).shares_weights_with(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    copy_engine.sync_weights(3, model.state_dict())
    out = copy_engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=10))
    assert [c.token_ids for c in out] == hf_greedy(model, PROMPTS, 10)
    with pytest.raises(ValueError, match="version"):
        copy_engine.sync_weights(2)


def test_generate_restores_train_mode_and_builds_no_graph(model):
    model.train()
    engine = TorchEngine(model, pad_token_id=PAD, eos_token_id=EOS)
    engine.generate(PROMPTS, SamplingParams(max_new_tokens=4))
    assert model.training
    model.eval()
    engine.generate(PROMPTS, SamplingParams(max_new_tokens=4))
    assert not model.training
    assert all(p.grad is None for p in model.parameters())


def test_sleep_blocks_generate_until_wake(model):
    engine = TorchEngine(model, pad_token_id=PAD, eos_token_id=EOS)
    engine.sleep()
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate(PROMPTS, SamplingParams())
    engine.wake()
    engine.flush_cache()
    out = engine.generate(PROMPTS, SamplingParams(max_new_tokens=3))
    assert len(out) == len(PROMPTS) and all(isinstance(c, Completion) for c in out)


def test_generation_stops_at_the_context_limit(model):
    engine = TorchEngine(model, pad_token_id=PAD, eos_token_id=None)
    out = engine.generate([[3] * 60], SamplingParams(temperature=0, max_new_tokens=32))
    assert len(out[0].token_ids) == 4 and out[0].finish_reason == "length"
    with pytest.raises(ValueError, match="prompt_token_ids"):
        engine.generate([[3] * 64], SamplingParams())


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -0.1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -1),
        ("max_new_tokens", 0),
        ("n", 0),
        ("seed", 1.5),
        ("stop_token_ids", [1]),
        ("top_k", True),
    ],
)
def test_bad_sampling_params_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("prompts", [[], [[]], [[1, -2]], [[1.0]]])
def test_bad_prompts_raise(model, prompts):
    engine = TorchEngine(model, pad_token_id=PAD, eos_token_id=EOS)
    with pytest.raises(ValueError, match="prompt_token_ids"):
        engine.generate(prompts, SamplingParams())


def test_left_padded_batch_equals_each_prompt_alone_with_absolute_positions():
    # GPT-2's learned absolute positions (unlike RoPE) change the output if padded rows get shifted position ids
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=20,
            n_embd=32,
            n_layer=2,
            n_head=2,
            n_positions=64,
            pad_token_id=PAD,
            eos_token_id=EOS,
            bos_token_id=2,
        )
    )
    with torch.no_grad():
        model.transformer.wpe.weight.mul_(30.0)
    engine = TorchEngine(model, pad_token_id=PAD, eos_token_id=None)
    greedy = SamplingParams(temperature=0, max_new_tokens=10)
    batched = engine.generate(PROMPTS, greedy)
    alone = [engine.generate([p], greedy)[0] for p in PROMPTS]
    assert [c.token_ids for c in batched] == [c.token_ids for c in alone]
    for b, a in zip(batched, alone):
        assert b.logprobs == pytest.approx(a.logprobs, abs=1e-5)


@pytest.mark.parametrize("top_k, top_p", [(0, 0.55), (4, 1.0), (6, 0.7), (0, 0.999)])
def test_truncation_keeps_exactly_the_top_k_then_the_smallest_nucleus(top_k, top_p):
    logits = 2.0 * torch.randn(5, 23, dtype=torch.float64)
    kept = torch.isfinite(_truncate(logits, top_k, top_p))
    for row, keep in zip(logits, kept):
        order = row.argsort(descending=True).tolist()
        order = order[:top_k] if top_k else order
        probs = row[order].softmax(-1)
        size = next(i + 1 for i in range(len(order)) if probs[: i + 1].sum() >= top_p or i + 1 == len(order))
        assert sorted(keep.nonzero()[:, 0].tolist()) == sorted(order[:size])


def test_sampling_and_training_alternate_on_the_same_module(model):
    from hotloop.runtime.trainer import Trainer, TrainerConfig

    engine = TorchEngine(model, pad_token_id=PAD, eos_token_id=None)
    trainer = Trainer(model, TrainerConfig(lr=1e-2))
    greedy = SamplingParams(temperature=0, max_new_tokens=6)
    for _ in range(2):
        completions = engine.generate(PROMPTS, greedy)
        ids = torch.tensor([PROMPTS[0] + completions[0].token_ids])
        trainer.step(lambda m, b: m(input_ids=b, labels=b).loss, [ids])  # no inference tensor may leak into autograd
        engine.sync_weights(trainer.version)
    assert engine.weight_version == 2
    assert [c.token_ids for c in engine.generate(PROMPTS, greedy)] == hf_greedy(model, PROMPTS, 6)
