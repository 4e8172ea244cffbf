"""SGLangEngine on a GPU: greedy equals TorchEngine greedy, a weight sync changes the outputs,
sleep/wake round-trips. Without sglang + CUDA only the clear ImportError is checked."""

import importlib.util

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hotloop.runtime.engine import RolloutEngine, SamplingParams
from hotloop.runtime.torch_engine import TorchEngine

PAD, EOS = 0, 1
PROMPTS = [[3, 4, 5], [6, 7, 8, 9, 10, 11, 12], [13], [14, 15, 16, 17]]
HAVE_SGLANG = importlib.util.find_spec("sglang") is not None and torch.cuda.is_available()
needs_sglang = pytest.mark.skipif(not HAVE_SGLANG, reason="needs sglang and a CUDA device")


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
        dtype="float32",
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # wide argmax margins, so float32 kernels of both engines agree on greedy
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    return model


@pytest.mark.skipif(HAVE_SGLANG, reason="sglang and CUDA are present")
def test_missing_sglang_or_gpu_raises_a_clear_import_error(tmp_path):
    from hotloop.runtime.sglang_engine import SGLangEngine

    with pytest.raises(ImportError, match=r"pip install \"hotloop\[sglang\]\""):
        SGLangEngine(tmp_path)


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    from hotloop.runtime.sglang_engine import SGLangEngine

    path = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_llama()
    model.save_pretrained(path)
    model = model.cuda()
    sglang_engine = SGLangEngine(path, model=model, dtype="float32", mem_fraction_static=0.2)
    yield model, sglang_engine, TorchEngine(model, pad_token_id=PAD, eos_token_id=EOS)
    sglang_engine.shutdown()


@pytest.mark.sglang
@needs_sglang
def test_sglang_greedy_equals_torch_engine_greedy(engines):
    model, sglang_engine, torch_engine = engines
    assert isinstance(sglang_engine, RolloutEngine)
    greedy = SamplingParams(temperature=0, max_new_tokens=12, n=2)
    ours, theirs = torch_engine.generate(PROMPTS, greedy), sglang_engine.generate(PROMPTS, greedy)
    assert [c.prompt_index for c in theirs] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [c.token_ids for c in theirs] == [c.token_ids for c in ours]
    assert [c.finish_reason for c in theirs] == [c.finish_reason for c in ours]
    for a, b in zip(ours, theirs):
        assert b.logprobs == pytest.approx(a.logprobs, abs=1e-3)


@pytest.mark.sglang
@needs_sglang
def test_sglang_sampler_logprobs_are_tempered(engines):
    model, sglang_engine, _ = engines
    for c in sglang_engine.generate(PROMPTS, SamplingParams(temperature=0.7, max_new_tokens=8)):
        ids = torch.tensor([PROMPTS[c.prompt_index] + c.token_ids], device="cuda")
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(PROMPTS[c.prompt_index]) - 1 : -1].float()
        ref = (logits / 0.7).log_softmax(-1).gather(-1, ids[0, -len(c.token_ids) :, None])[:, 0]
        assert c.logprobs == pytest.approx(ref.tolist(), abs=1e-3)


@pytest.mark.sglang
@needs_sglang
def test_sglang_weight_sync_after_sleep_changes_outputs(engines):
    model, sglang_engine, torch_engine = engines
    greedy = SamplingParams(temperature=0, max_new_tokens=12)
    before = [c.token_ids for c in sglang_engine.generate(PROMPTS, greedy)]
    sglang_engine.sleep()
    with torch.no_grad():
        model.lm_head.weight.add_(3.0 * torch.randn_like(model.lm_head.weight))
    sglang_engine.sync_weights(1)
    sglang_engine.wake()
    after = sglang_engine.generate(PROMPTS, greedy)
    assert {c.weight_version for c in after} == {1}
    assert [c.token_ids for c in after] != before
    assert [c.token_ids for c in after] == [c.token_ids for c in torch_engine.generate(PROMPTS, greedy)]


@pytest.mark.parametrize("tied", [False, True])
def test_flattened_bucket_metadata_rebuilds_every_tensor_from_the_bucket_as_sglang_slices_it(tied):
    from hotloop.runtime.sglang_engine import flattened_bucket_metadata
    from hotloop.runtime.weight_sync import SyncPlan

    model = tiny_llama()
    model.config.tie_word_embeddings = tied
    if tied:
        model.tie_weights()
    model.model.norm.to(torch.bfloat16)  # a second dtype: a bucket of its own
    plan = SyncPlan(model, bucket_mb=0.02)
    buffers = plan.allocate()
    plan.pack(model, buffers)
    state, rebuilt = model.state_dict(), {}
    for i, buffer in enumerate(buffers):
        for meta in flattened_bucket_metadata(plan, i):  # FlattenedTensorBucket.reconstruct_tensors' slicing
            assert meta["dtype"] == buffer.dtype and meta["end_idx"] - meta["start_idx"] == meta["numel"]
            rebuilt[meta["name"]] = buffer[meta["start_idx"] : meta["end_idx"]].reshape(meta["shape"])
    assert rebuilt.keys() == state.keys() - ({"lm_head.weight"} if tied else set())
    assert all(torch.equal(rebuilt[k], state[k]) for k in rebuilt)


def test_a_failed_sglang_update_raises_with_sglangs_message():
    from hotloop.runtime.sglang_engine import check_update

    check_update((True, "Succeeded to update model weights."), 3, 0)
    with pytest.raises(RuntimeError, match="refused bucket 2 of version 7: Failed to update weights: shape"):
        check_update((False, "Failed to update weights: shape mismatch"), 7, 2)


@pytest.mark.sglang
@needs_sglang
def test_a_failed_sglang_sync_raises_and_leaves_the_version(engines):
    model, sglang_engine, _ = engines
    version = sglang_engine.weight_version
    with pytest.raises(RuntimeError, match="SGLang refused bucket 0"):
        sglang_engine.sync_weights(version + 1, {"model.embed_tokens.weight": torch.zeros(3, 5, device="cuda")})
    assert sglang_engine.weight_version == version
    sglang_engine.sync_weights(version + 1)  # a good sync makes it usable again
    assert sglang_engine.weight_version == version + 1


@pytest.mark.sglang
@needs_sglang
def test_sglang_wake_resumes_every_tag_sleep_released_and_cuda_graphs_replay(engines):
    model, sglang_engine, torch_engine = engines
    greedy = SamplingParams(temperature=0, max_new_tokens=12)
    sglang_engine.sync_weights(sglang_engine.weight_version + 1)
    before = [c.token_ids for c in sglang_engine.generate(PROMPTS, greedy)]
    sglang_engine.sleep()
    assert {"kv_cache", "weights", "cuda_graph"} <= set(sglang_engine._released)
    sglang_engine.wake()
    assert sglang_engine._released == []
    assert [c.token_ids for c in sglang_engine.generate(PROMPTS, greedy)] == before
