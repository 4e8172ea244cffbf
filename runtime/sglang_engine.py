"""``RolloutEngine`` on SGLang's offline ``Engine``, colocated with the trainer on the same GPU.

Follows the colocated pattern of verl's SGLang rollout: the engine starts with
``enable_memory_saver=True`` and a small ``mem_fraction_static`` (its KV-cache pool), gives its
weights and KV cache back during training (``release_memory_occupation``), takes the weights back
first to receive new ones (``resume_memory_occupation(tags=["weights"])`` then
``update_weights_from_tensor``, which ships CUDA IPC handles, so no weight copy through the host),
and everything else it released last (``wake`` resumes every tag ``sleep`` released: SGLang's
``GPU_MEMORY_ALL_TYPES``, i.e. ``kv_cache``, ``weights``, ``weights_drafter`` where present and
``cuda_graph``; a graph replayed without its memory would read freed memory). Peak memory during a
sync is the trainer's plus SGLang's weights.

Weights arrive as the sync protocol's flat buckets (``hotloop.runtime.weight_sync``): one
``load_format="flattened_bucket"`` update per bucket, the bucket itself as SGLang's
``flattened_tensor`` and :func:`flattened_bucket_metadata` as its metadata — one CUDA IPC handle
per bucket instead of one per tensor (slime measured per-tensor IPC 4.3× slower), and no copy
(``FlattenedTensorBucket(named_tensors=...)`` would ``torch.cat`` them). Other ``weights``
(a mapping, pairs) are bucketed here first. Every update returns ``(success, message)``: a failure
raises with SGLang's message and the version stays; SGLang's weights may then be partly updated, so
the next ``generate`` is refused until a sync succeeds.

Sleep without a sync. Memory released by ``release_memory_occupation`` comes back uninitialised
unless SGLang backs the weights up in host memory first (``ServerArgs.enable_weights_cpu_backup``,
sglang >= 0.5.3, which verl turns on for colocated rollouts). This engine turns it on by default
(``weights_cpu_backup=True``: ``sleep`` → ``wake`` restores the same weights, at the cost of a host
copy of them and two transfers per sleep), so a semi-online loop (``s > 1``) may sleep between
syncs. With ``weights_cpu_backup=False`` a ``sleep`` loses the weights, and ``generate`` refuses to
run until ``sync_weights`` has sent new ones.

Weights live in SGLang's scheduler process, not in this one: ``shares_weights_with`` is always
False and ``local_model`` is None (the online loop checkpoints the sync buckets, which hold the last
version sent; no host copy of the state dict per sync).

Log-probs: SGLang's ``output_token_logprobs`` are ``log_softmax(logits / T)`` before top-k/top-p
(unless the server sets ``SGLANG_RETURN_ORIGINAL_LOGPROB``, which this engine refuses), the same
convention as ``TorchEngine``. ``SamplingParams.seed`` is honoured only when the engine was built
with ``deterministic=True`` (SGLang's ``enable_deterministic_inference``); each row gets
``seed + row`` so the n samples of a prompt differ. A seed given to an engine built without it is
ignored with a ``RuntimeWarning`` (once per engine) saying that runs and resumes are not repeatable,
so a "bit-exact resume" is never claimed falsely.

Rows are expanded here (prompt-major, n per prompt) instead of with SGLang's own ``n`` so the order
of the returned completions is fixed by construction.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from hotloop.runtime.engine import Completion, SamplingParams
from hotloop.runtime.weight_sync import BucketedWeights, SyncPlan, named_tensors

_MISSING = 'SGLangEngine needs sglang and a CUDA GPU: pip install "hotloop[sglang]"'
MEMORY_TAGS = ("kv_cache", "weights", "weights_drafter", "cuda_graph")
"""SGLang's memory-saver tags (``sglang.srt.constants.GPU_MEMORY_ALL_TYPES``; used when that is absent)."""


class SGLangEngine:
    """Samples with an in-process SGLang engine; refit from the trainer's tensors.

    Args:
        model_path: HF model directory SGLang loads the architecture and first weights from.
        model: the trainer's module; ``sync_weights(version)`` without a state dict sends its weights.
        mem_fraction_static: fraction of GPU memory SGLang may take for weights and KV cache.
        deterministic: SGLang's deterministic inference (needed for ``SamplingParams.seed``).
        weights_cpu_backup: keep a host copy of the weights across ``sleep`` (see the module docstring).
        **engine_kwargs: passed to ``sglang.Engine`` (e.g. ``dtype``, ``attention_backend``).
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        model: nn.Module | None = None,
        mem_fraction_static: float = 0.3,
        deterministic: bool = False,
        weights_cpu_backup: bool = True,
        **engine_kwargs,
    ) -> None:
        try:
            import sglang
        except ImportError as error:
            raise ImportError(_MISSING) from error
        if not torch.cuda.is_available():
            raise ImportError(_MISSING)
        if os.environ.get("SGLANG_RETURN_ORIGINAL_LOGPROB", "").lower() in ("1", "true"):
            raise ValueError("SGLANG_RETURN_ORIGINAL_LOGPROB: expected unset (tempered log-probs), got it set")
        if not Path(model_path).is_dir():
            raise ValueError(f"model_path: expected a model directory, got {model_path!r}")
        if weights_cpu_backup:
            from sglang.srt.server_args import ServerArgs

            if "enable_weights_cpu_backup" not in {f.name for f in dataclasses.fields(ServerArgs)}:
                raise ValueError(
                    f"weights_cpu_backup: sglang {sglang.__version__} has no enable_weights_cpu_backup "
                    f"(sglang >= 0.5.3); expected False, with a sync_weights after every wake"
                )
            engine_kwargs["enable_weights_cpu_backup"] = True
        self.model = model
        self.deterministic = deterministic
        self.weights_cpu_backup = weights_cpu_backup
        self._engine = sglang.Engine(
            model_path=str(model_path),
            skip_tokenizer_init=True,
            enable_memory_saver=True,
            mem_fraction_static=mem_fraction_static,
            enable_deterministic_inference=deterministic,
            **engine_kwargs,
        )
        self._tp_size = int(getattr(self._engine.server_args, "tp_size", 1))
        self._released: list[str] = []
        self._warned_seed = False
        self._weights_lost = False
        self._version = 0

    @property
    def weight_version(self) -> int:
        """Version of the weights the next ``generate`` samples with."""
        return self._version

    @property
    def local_model(self) -> None:
        """None: the weights ``generate`` uses live in SGLang's scheduler process."""
        return None

    def shares_weights_with(self, module: nn.Module) -> bool:
        """False: SGLang samples from its own copy, which only ``sync_weights`` updates."""
        return False

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> list[Completion]:
        """Sample ``sampling.n`` completions per prompt, prompt-major (see ``RolloutEngine``)."""
        if self._released:
            raise RuntimeError(f"generate: the engine released {self._released}; call wake() first")
        if self._weights_lost:
            raise RuntimeError(
                "generate: SGLang's weights are not valid (released by sleep() without a CPU backup, "
                "or a failed sync); expected a successful sync_weights(version, weights) first"
            )
        if not isinstance(sampling, SamplingParams):
            raise TypeError(f"sampling: expected SamplingParams, got {type(sampling).__name__}")
        if sampling.seed is not None and not self.deterministic and not self._warned_seed:
            warnings.warn(
                f"sampling.seed={sampling.seed}: SGLang honours seeds only with deterministic inference; "
                f"this engine (deterministic=False) samples unseeded, so runs and resumes are not "
                f"repeatable (build it with deterministic=True)",
                RuntimeWarning,
                stacklevel=2,
            )
            self._warned_seed = True
        if not prompt_token_ids or not all(isinstance(p, (list, tuple)) and p for p in prompt_token_ids):
            raise ValueError(
                f"prompt_token_ids: expected a non-empty list of non-empty token-id lists, "
                f"got {prompt_token_ids!r:.200}"
            )
        rows = [i for i in range(len(prompt_token_ids)) for _ in range(sampling.n)]
        outputs = self._engine.generate(
            input_ids=[list(prompt_token_ids[i]) for i in rows],
            sampling_params=[self._params(sampling, r) for r in range(len(rows))],
            return_logprob=True,
        )
        return [self._completion(i, out) for i, out in zip(rows, outputs)]

    def sync_weights(self, version: int, weights=None) -> None:
        """Send ``weights`` (or the attached ``model``'s) to SGLang bucket by bucket and record ``version``."""
        if not isinstance(version, int) or version < self._version:
            raise ValueError(f"version: expected an int >= current version {self._version}, got {version!r}")
        if weights is None and self.model is None:
            raise ValueError("weights: expected tensors, or an engine built with model=, got None")
        if "weights" in self._released:  # weights must be resident to be overwritten
            self._engine.resume_memory_occupation(tags=["weights"])
            self._released.remove("weights")
        bucketed = weights if isinstance(weights, BucketedWeights) else _bucketed(weights, self.model)
        self._weights_lost = True  # until every bucket has landed
        for i, payload in enumerate(flattened_buckets(bucketed)):
            result = self._engine.update_weights_from_tensor(
                named_tensors=[payload] * self._tp_size,
                load_format="flattened_bucket",
                flush_cache=i == len(bucketed.buffers) - 1,
            )
            check_update(result, version, i)
        self._weights_lost = False
        self._version = version

    def sleep(self) -> None:
        """Release all of SGLang's GPU memory (every memory-saver tag) back to the trainer."""
        if not self._released:
            self._engine.release_memory_occupation()
            self._released = list(_memory_tags())
            self._weights_lost = self._weights_lost or not self.weights_cpu_backup

    def wake(self) -> None:
        """Resume every tag ``sleep`` released (weights, KV cache, CUDA graphs, ...); no-op when awake."""
        if self._released:
            self._engine.resume_memory_occupation(tags=list(self._released))
            self._released = []

    def flush_cache(self) -> None:
        """Drop SGLang's radix (prefix) cache."""
        self._engine.flush_cache()

    def shutdown(self) -> None:
        """Stop SGLang's scheduler and detokenizer processes."""
        self._engine.shutdown()

    def _params(self, sampling: SamplingParams, row: int) -> dict:
        params = {
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": sampling.top_k if sampling.top_k > 0 else -1,
            "max_new_tokens": sampling.max_new_tokens,
            "stop_token_ids": list(sampling.stop_token_ids),
        }
        if sampling.seed is not None and self.deterministic:
            params["sampling_seed"] = sampling.seed + row
        return params

    def _completion(self, prompt_index: int, out: dict) -> Completion:
        meta = out["meta_info"]
        reason = meta["finish_reason"]["type"] if isinstance(meta["finish_reason"], dict) else meta["finish_reason"]
        if reason not in ("stop", "length"):
            raise RuntimeError(f"generate: SGLang finished prompt {prompt_index} with {meta['finish_reason']!r}")
        # one (logprob, token_id, text) per generated token, the stop token included
        entries = meta["output_token_logprobs"]
        return Completion(
            prompt_index=prompt_index,
            token_ids=[int(e[1]) for e in entries],
            logprobs=[float(e[0]) for e in entries],
            finish_reason=reason,
            weight_version=self._version,
        )


def flattened_bucket_metadata(plan: SyncPlan, bucket: int) -> list[dict]:
    """SGLang's ``FlattenedTensorMetadata`` fields of every tensor in ``bucket`` of ``plan``.

    ``start_idx`` / ``end_idx`` are element offsets into the flat bucket (slots start 64-byte aligned, so
    there may be gaps between tensors, which SGLang's slicing skips); ``dtype`` is the bucket's (no cast).
    """
    spec = plan.buckets[bucket]
    return [
        {
            "name": s.name,
            "shape": torch.Size(s.shape),
            "dtype": spec.dtype,
            "start_idx": s.offset,
            "end_idx": s.offset + s.numel,
            "numel": s.numel,
        }
        for s in plan.slots
        if s.bucket == bucket
    ]


def flattened_buckets(weights: BucketedWeights):
    """One serialized ``{"flattened_tensor", "metadata"}`` payload per bucket (SGLang's flattened_bucket format)."""
    from sglang.srt.utils import MultiprocessingSerializer
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorMetadata

    for i, buffer in enumerate(weights.buffers):
        metadata = [FlattenedTensorMetadata(**m) for m in flattened_bucket_metadata(weights.plan, i)]
        yield MultiprocessingSerializer.serialize({"flattened_tensor": buffer, "metadata": metadata}, output_str=True)


def check_update(result, version: int, bucket: int) -> None:
    """Raise with SGLang's message unless ``update_weights_from_tensor`` returned success."""
    success, message = result if isinstance(result, tuple) else (getattr(result, "success", result), result)
    if success is not True:
        raise RuntimeError(f"sync_weights: SGLang refused bucket {bucket} of version {version}: {message}")


def _bucketed(weights, model: nn.Module | None) -> BucketedWeights:
    """Pack a mapping / (name, tensor) pairs (or ``model``'s weights) into buckets on the tensors' device."""
    state = model.state_dict() if weights is None else dict(named_tensors(weights))
    plan = SyncPlan(state)
    buffers = plan.allocate()
    plan.pack(state, buffers)
    return plan.views(buffers)


def _memory_tags() -> tuple[str, ...]:
    try:
        from sglang.srt.constants import GPU_MEMORY_ALL_TYPES
    except ImportError:
        return MEMORY_TAGS
    return tuple(GPU_MEMORY_ALL_TYPES)
