"""The weight-sync protocol: buckets round-trip bit-exact on real transformers models (tied and untied), a
fingerprint catches one corrupted byte, shared memory into a real child process, a silent or failing consumer
raises naming the bucket, CUDA IPC where a GPU exists."""

import copy
import os
import shutil
import time

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from hotloop.runtime import _word_sum_ext
from hotloop.runtime.torch_engine import TorchEngine
from hotloop.runtime.weight_sync import SyncPlan, compare_fingerprints, fingerprint, fingerprints
from hotloop.runtime.weight_transport import InProcessTransport, ProcessTransport, start_consumer
from tests.runtime import weight_sync_child

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def real_model(arch: str, tied: bool, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    """A small real Llama or Qwen2 (Qwen2 has q/k/v biases) with every tensor drawn fresh (no zero biases)."""
    common = dict(
        vocab_size=61,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**common)) if arch == "llama" else Qwen2ForCausalLM(Qwen2Config(**common))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    return model.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arch, tied", [("llama", False), ("llama", True), ("qwen2", False), ("qwen2", True)])
def test_buckets_round_trip_bit_exact_on_real_models(arch, tied, dtype):
    model = real_model(arch, tied, dtype)
    model.model.norm.float()  # a second dtype: per-dtype buckets
    plan = SyncPlan(model, bucket_mb=0.004)  # ~4 KiB: many buckets, some tensors alone in theirs
    buffers = plan.allocate()
    plan.pack(model, buffers)
    state = model.state_dict()
    sent = dict(plan.views(buffers))
    assert len(plan.buckets) > 2 and {b.dtype for b in plan.buckets} == {dtype, torch.float32} | {dtype}
    assert plan.aliases == ({"lm_head.weight": "model.embed_tokens.weight"} if tied else {})
    assert sent.keys() == state.keys() - plan.aliases.keys()
    for name, tensor in state.items():
        got = sent[plan.aliases.get(name, name)]
        assert got.dtype == tensor.dtype and torch.equal(got.view(torch.uint8), tensor.view(torch.uint8)), name
    assert all(b.nbytes % 64 == 0 for b in plan.buckets)


@pytest.mark.parametrize("arch, tied", [("llama", True), ("qwen2", False)])
def test_a_copy_bound_to_the_buckets_follows_every_pack_and_keeps_its_tied_weights_tied(arch, tied):
    trainer = real_model(arch, tied)
    plan = SyncPlan(trainer, bucket_mb=0.01)
    buffers = plan.allocate()
    stale = plan.bind(copy.deepcopy(trainer).requires_grad_(False), buffers)
    with torch.no_grad():
        for p in trainer.parameters():
            p.add_(torch.randn_like(p))
    assert not torch.equal(stale.model.embed_tokens.weight, trainer.model.embed_tokens.weight)
    plan.pack(trainer, buffers)
    for (name, a), b in zip(stale.state_dict().items(), trainer.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert (stale.lm_head.weight is stale.model.embed_tokens.weight) == tied


def torch_fingerprints(buffers: list[torch.Tensor]) -> list[int]:
    """The reference: torch's wrapping int64 sum of each bucket's bytes read as int64 words."""
    return [int(b.view(torch.uint8).view(torch.int64).sum()) for b in buffers]


@pytest.fixture(params=["native", "torch"])
def word_sums(request, monkeypatch):
    """Both fingerprint paths: csrc/word_sum.cpp (skipped when not built) and PyTorch's (HOTLOOP_NATIVE=0)."""
    monkeypatch.setenv("HOTLOOP_NATIVE", "1" if request.param == "native" else "0")
    if request.param == "native" and _word_sum_ext.native() is None:
        pytest.skip("hotloop.runtime._word_sum not built (pip install -e . builds it)")
    return request.param


@pytest.mark.skipif(
    shutil.which("c++") is None or os.environ.get("HOTLOOP_NATIVE") == "0",
    reason="no C++ compiler here, or native kernels disabled",
)
def test_the_install_built_the_word_sums_where_a_compiler_exists():
    """Where ``pip install`` had a compiler, a missing extension is a silent build failure, not a fallback."""
    assert _word_sum_ext.native() is not None, "runtime/_word_sum*.so missing: rerun `pip install -e .`"


@pytest.mark.parametrize("dtype", DTYPES)
def test_packing_with_fingerprints_equals_packing_then_fingerprinting_with_tensors_above_the_piece_size(
    dtype, word_sums
):
    generator = torch.Generator().manual_seed(int(torch.randint(1 << 30, ())))
    shapes = [(3, 5), (1031, 1031 * 8 // dtype.itemsize), (7,), (517, 3), (1 << 20,), (1,)]
    state = {
        f"t{i}": torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
        for i, shape in enumerate(shapes)
    }
    state["strided"] = torch.randn(40, 30, generator=generator, dtype=torch.float64).to(dtype).t()
    state["unaligned"] = torch.randn(101, generator=generator, dtype=torch.float64).to(dtype)[1:]  # not 8-aligned
    state["empty"] = torch.empty(0, dtype=dtype)
    plan = SyncPlan(state, bucket_mb=6)  # the big tensors alone in their buckets, the small ones together
    buffers = plan.allocate()
    threads_before = torch.__config__.parallel_info()  # the packing threads must leave the caller's settings
    for buffer in buffers:  # poisoned: stale bytes in the padding too, which the fingerprint must count
        buffer.view(torch.uint8).copy_(torch.randint(256, (buffer.nbytes,), generator=generator, dtype=torch.uint8))
    fused = plan.pack_fingerprinted(state, buffers)
    assert len(buffers) > 2 and fused == fingerprints(buffers) == torch_fingerprints(buffers)
    assert torch.__config__.parallel_info() == threads_before
    for name, view in plan.views(buffers):
        assert torch.equal(view.view(torch.uint8), state[name].contiguous().view(torch.uint8)), name
    state["t1"].view(torch.uint8).view(-1)[-1] ^= 1  # one byte of a piece-copied tensor changes its bucket's alone
    changed = plan.pack_fingerprinted(state, buffers)
    assert (
        changed == fingerprints(buffers) == torch_fingerprints(buffers)
        and [a != b for a, b in zip(fused, changed)].count(True) == 1
    )
    with pytest.raises(KeyError, match="t0"):  # a failure in a packing thread reaches the caller
        plan.pack({k: v for k, v in state.items() if k != "t0"}, buffers)


def test_one_corrupted_byte_anywhere_changes_the_fingerprint_and_the_comparison_names_the_bucket(word_sums):
    model = real_model("qwen2", tied=True, dtype=torch.bfloat16)
    plan = SyncPlan(model, bucket_mb=0.01)
    buffers = plan.allocate()
    plan.pack(model, buffers)
    sent = fingerprints(buffers)
    generator = torch.Generator().manual_seed(7)
    for _ in range(20):
        b = int(torch.randint(len(buffers), (), generator=generator))
        raw = buffers[b].view(torch.uint8)
        at, bit = int(torch.randint(raw.numel(), (), generator=generator)), int(torch.randint(8, ()))
        raw[at] ^= 1 << bit
        assert fingerprint(buffers[b]) != sent[b]
        with pytest.raises(RuntimeError, match=f"weight sync v3: bucket {b}: consumer fingerprint"):
            compare_fingerprints(3, sent, fingerprints(buffers))
        raw[at] ^= 1 << bit
    assert fingerprints(buffers) == sent


def test_a_torch_engine_loads_bucket_views_of_another_copy_and_a_bad_name_leaves_its_version():
    trainer = real_model("llama", tied=True)
    engine = TorchEngine(real_model("llama", tied=True, seed=1), pad_token_id=0, eos_token_id=None)
    plan = SyncPlan(trainer, bucket_mb=0.01)
    buffers = InProcessTransport(engine).buffers(plan)
    plan.pack(trainer, buffers)
    assert InProcessTransport(engine).send(2, plan.views(buffers), timeout_s=1) == fingerprints(buffers)
    assert engine.weight_version == 2
    unchecked = InProcessTransport(engine).send(2, plan.views(buffers), timeout_s=1, with_fingerprints=False)
    assert unchecked == [None] * len(buffers)  # the sync check off: the buckets are not read again
    for (name, a), b in zip(engine.model.state_dict().items(), trainer.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(KeyError, match="missing"):
        engine.sync_weights(3, [(n, t) for n, t in plan.views(buffers) if n != "model.norm.weight"])
    with pytest.raises(KeyError, match="unexpected name 'nope'"):
        engine.sync_weights(3, [*plan.views(buffers), ("nope", torch.zeros(1))])
    assert engine.weight_version == 2


def _child(target):
    process, conn = start_consumer(target)
    return process, ProcessTransport(conn)


def test_shared_memory_into_a_real_child_process_matches_fingerprints_on_every_sync():
    model = real_model("qwen2", tied=False)
    plan = SyncPlan(model, bucket_mb=0.01)
    process, transport = _child(weight_sync_child.copying_consumer)
    try:
        buffers = transport.buffers(plan)
        assert all(b.is_shared() for b in buffers)
        seen = []
        for version in range(3):
            plan.pack(model, buffers)
            received = transport.send(version, plan.views(buffers), timeout_s=120)
            compare_fingerprints(version, fingerprints(buffers), received)
            seen.append(received)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p))
        assert seen[0] != seen[1] != seen[2]
        unchecked = transport.send(3, plan.views(buffers), timeout_s=120, with_fingerprints=False)
        assert unchecked == [None] * len(buffers)  # every bucket still answered, none fingerprinted
    finally:
        transport.close()
        process.join(30)
    assert process.exitcode == 0


def test_a_consumer_that_never_answers_times_out_naming_the_bucket_and_the_side():
    model = real_model("llama", tied=True)
    plan = SyncPlan(model, bucket_mb=0.01)
    process, transport = _child(weight_sync_child.silent_consumer)
    try:
        buffers = transport.buffers(plan)
        plan.pack(model, buffers)
        t0 = time.perf_counter()
        with pytest.raises(TimeoutError, match=r"weight sync v5: bucket 0 of \d+: consumer did not answer within 2 s"):
            transport.send(5, plan.views(buffers), timeout_s=2)
        assert time.perf_counter() - t0 < 30
    finally:
        process.kill()
        process.join(30)


def test_a_consumer_that_fails_raises_its_message_naming_the_bucket():
    model = real_model("llama", tied=False)
    plan = SyncPlan(model, bucket_mb=0.01)
    process, transport = _child(weight_sync_child.failing_consumer)
    try:
        buffers = transport.buffers(plan)
        plan.pack(model, buffers)
        with pytest.raises(RuntimeError, match=r"bucket 1: consumer failed: ValueError: cannot load bucket 1"):
            transport.send(0, plan.views(buffers), timeout_s=120)
    finally:
        transport.close()
        process.join(30)


@pytest.mark.gpu
def test_cuda_ipc_into_a_real_child_process_matches_fingerprints():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    model = real_model("qwen2", tied=True).cuda()
    plan = SyncPlan(model, bucket_mb=0.01)
    process, conn = start_consumer(weight_sync_child.copying_consumer)
    transport = ProcessTransport(conn, device="cuda")
    try:
        buffers = transport.buffers(plan)
        for version in range(2):
            plan.pack(model, buffers)
            compare_fingerprints(
                version, fingerprints(buffers), transport.send(version, plan.views(buffers), timeout_s=120)
            )
    finally:
        transport.close()
        process.join(30)
    assert process.exitcode == 0
