"""A pure-PyTorch rollout engine that samples from the trainer's own ``nn.Module`` (zero-copy).

Design: the engine holds a reference to the module the optimizer updates, so after an optimizer
step the next ``generate`` already sees the new weights and ``sync_weights`` only records the
version. For ``s > 1`` the sync policy (``hotloop.runtime.sync_policy``) hands it a stale copy
whose tensors are views into the sync buckets (``adopt_model``), so a sync is the packing memcpy
and ``sync_weights`` finds every tensor already in place; given other tensors it copies them in
place (cast to the module's dtype). Prompts are left-padded
into batches of at most ``max_batch_size`` rows; position ids count only real tokens
(``cumsum(mask) - 1``), so a padded prompt sees the positions it would see alone. The ``n`` samples
of a prompt share one prefill: each distinct prompt of a batch is prefilled once and its KV-cache
rows are repeated (``Cache.batch_select_indices``), which cuts the prefill by ``n``. Decoding runs
one token per step on a ``transformers`` ``DynamicCache`` (passed as ``cache=``, which replaced the
deprecated ``past_key_values=`` in transformers 5.2x), and the prefill computes the logits of the
last position only (``logits_to_keep=1``) where the model's forward takes it; memory is the KV cache,
``2 · layers · B · (L + max_new_tokens) · kv_heads · head_dim`` elements, freed when ``generate``
returns. Sampling: log_softmax(logits / T) in float32 gives the sampler log-probs (before
truncation, see ``engine.py``); top-k then top-p mask the tempered logits; ``torch.multinomial``
draws with a ``torch.Generator`` (``SamplingParams.seed`` or the engine's own stream). The EOS
token always stops a sequence, as do ``stop_token_ids``; finished rows are fed the pad token
until the whole batch is done, as ``model.generate`` does.
"""

from __future__ import annotations

import gc
import inspect
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from hotloop.runtime.engine import Completion, SamplingParams, check_prompt_ids
from hotloop.runtime.weight_sync import named_tensors


class TorchEngine:
    """Batched sampling with a KV cache from the same module the trainer updates.

    Args:
        model: a causal LM returning ``.logits [B, T, V]`` and ``.past_key_values`` (HF interface).
        pad_token_id: id used to left-pad prompts and fill finished rows.
        eos_token_id: id that always ends a completion (None: only ``stop_token_ids`` do).
        device: where inputs are placed; defaults to the device of the model's first parameter.
        max_batch_size: most rows (prompts × n) decoded together.
        seed: seed of the engine's own generator (used when ``SamplingParams.seed`` is None);
            None draws it from the global torch RNG, so ``torch.manual_seed`` makes runs repeatable.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        pad_token_id: int,
        eos_token_id: int | None,
        device: torch.device | str | None = None,
        max_batch_size: int = 64,
        seed: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        if not isinstance(pad_token_id, int) or pad_token_id < 0:
            raise ValueError(f"pad_token_id: expected an int >= 0, got {pad_token_id!r}")
        if eos_token_id is not None and (not isinstance(eos_token_id, int) or eos_token_id < 0):
            raise ValueError(f"eos_token_id: expected None or an int >= 0, got {eos_token_id!r}")
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size: expected an int >= 1, got {max_batch_size!r}")
        self.model = model
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.max_batch_size = max_batch_size
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed if seed is not None else int(torch.randint(2**62, ()).item()))
        self._version = 0
        self._asleep = False
        self._forward_kwargs = _forward_kwargs(model)

    @property
    def weight_version(self) -> int:
        """Version of the weights the next ``generate`` samples with (trainer optimizer steps)."""
        return self._version

    @property
    def local_model(self) -> nn.Module:
        """The module ``generate`` samples from (the trainer's own, or a copy)."""
        return self.model

    def shares_weights_with(self, module: nn.Module) -> bool:
        """True when this engine samples from ``module`` itself, so it sees every optimizer step at once."""
        return module is self.model

    def sync_weights(
        self, version: int, weights: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor] | None = None
    ) -> None:
        """Record ``version``; copy ``weights`` (name, tensor) into the module in place when given.

        Names are the module's ``state_dict`` names; a tied alias may be left out (it shares its
        tensor), every other tensor must come. A tensor that already is the module's own storage
        (the loop's stale copy is bound to the sync buckets) is not copied; others are cast on copy.
        On failure the version stays.
        """
        if not isinstance(version, int) or version < self._version:
            raise ValueError(f"version: expected an int >= current version {self._version}, got {version!r}")
        if weights is not None:
            _load_in_place(self.model, weights)
        self._version = version

    def adopt_model(self, model: nn.Module) -> None:
        """Sample from ``model`` from now on (the sync policy's stale copy of the trainer's module)."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        self.model = model
        self._forward_kwargs = _forward_kwargs(model)

    def sleep(self) -> None:
        """Release cached memory (the KV cache lives only inside ``generate``) back to the allocator."""
        self._asleep = True
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def wake(self) -> None:
        """Allow ``generate`` again; no-op when awake."""
        self._asleep = False

    def flush_cache(self) -> None:
        """No prefix cache survives a ``generate`` call, so there is nothing to drop."""

    @torch.inference_mode()
    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> list[Completion]:
        """Sample ``sampling.n`` completions per prompt, returned prompt-major.

        Args:
            prompt_token_ids: B non-empty lists of token ids.
            sampling: temperature, top-p/top-k, length, stop tokens, n, seed.

        Returns:
            ``B · n`` completions: the n of prompt 0, then those of prompt 1, ...
        """
        if self._asleep:
            raise RuntimeError("generate: the engine is asleep; call wake() first")
        if not isinstance(sampling, SamplingParams):
            raise TypeError(f"sampling: expected SamplingParams, got {type(sampling).__name__}")
        check_prompt_ids(prompt_token_ids)
        generator = self.generator
        if sampling.seed is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(sampling.seed)
        rows = [i for i in range(len(prompt_token_ids)) for _ in range(sampling.n)]
        was_training = self.model.training
        self.model.eval()
        try:
            out: list[Completion] = []
            for start in range(0, len(rows), self.max_batch_size):
                chunk = rows[start : start + self.max_batch_size]
                out += self._generate_batch(chunk, [prompt_token_ids[i] for i in chunk], sampling, generator)
            return out
        finally:
            self.model.train(was_training)

    def _generate_batch(
        self, prompt_index: list[int], prompts: list[list[int]], sampling: SamplingParams, generator: torch.Generator
    ) -> list[Completion]:
        """Decode one left-padded batch until every row stopped or ``max_new_tokens`` ran out."""
        # the n samples of a prompt are neighbours: prefill each distinct prompt once, then repeat its rows
        runs = _run_index(prompt_index)
        firsts = [b for b in range(len(runs)) if b == 0 or runs[b] != runs[b - 1]]
        ids, mask = _left_pad([prompts[b] for b in firsts], self.pad_token_id, self.device)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        expand = torch.tensor(runs, dtype=torch.long, device=self.device) if len(firsts) < len(prompts) else None
        stop = torch.tensor(
            sorted(set(sampling.stop_token_ids) | _opt(self.eos_token_id)), dtype=torch.long, device=self.device
        )
        max_new = min(sampling.max_new_tokens, self._room(ids.shape[1]))
        B = len(prompts)
        tokens = torch.full((B, max_new), self.pad_token_id, dtype=torch.long, device=self.device)
        logps = torch.zeros(B, max_new, dtype=torch.float32, device=self.device)
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        stopped = torch.zeros(B, dtype=torch.bool, device=self.device)
        lengths = torch.zeros(B, dtype=torch.long, device=self.device)
        cache_arg, keep = self._forward_kwargs
        cache = None
        for t in range(max_new):
            output = self.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **{cache_arg: cache}, **keep
            )
            cache, logits = getattr(output, cache_arg), output.logits[:, -1]
            if t == 0 and expand is not None:
                cache.batch_select_indices(expand)
                logits, mask, positions = logits[expand], mask[expand], positions[expand]
            token, logp = sample_next(logits, sampling, generator)
            token = token.masked_fill(done, self.pad_token_id)
            tokens[:, t], logps[:, t] = token, logp.masked_fill(done, 0.0)
            lengths += (~done).long()
            hit = torch.isin(token, stop) & ~done
            stopped |= hit
            done |= hit
            if bool(done.all()):
                break
            ids = token[:, None]
            mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
            positions = positions[:, -1:] + 1
        del cache
        tokens, logps, lengths, stopped = tokens.tolist(), logps.tolist(), lengths.tolist(), stopped.tolist()
        return [
            Completion(
                prompt_index=p,
                token_ids=tokens[b][: lengths[b]],
                logprobs=logps[b][: lengths[b]],
                finish_reason="stop" if stopped[b] else "length",
                weight_version=self._version,
            )
            for b, p in enumerate(prompt_index)
        ]

    def _room(self, padded_len: int) -> int:
        """New tokens that still fit in the model's context after a prompt of ``padded_len`` tokens."""
        limit = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        if limit is None:
            return 2**31
        if padded_len >= limit:
            raise ValueError(
                f"prompt_token_ids: longest prompt has {padded_len} tokens, "
                f"expected < max_position_embeddings = {limit}"
            )
        return limit - padded_len


def sample_next(
    logits: torch.Tensor, sampling: SamplingParams, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row and its sampler log-prob.

    Args:
        logits: [B, V] next-token logits (any float dtype; computed in float32).
        sampling: temperature (0 = greedy), top_k, top_p.
        generator: random stream for ``torch.multinomial``.

    Returns:
        token [B] int64 and logp [B] float32 = log_softmax(logits / T)[token], before truncation.
    """
    logits = logits.float()
    if sampling.temperature == 0:
        token = logits.argmax(dim=-1)
        return token, logits.log_softmax(-1).gather(-1, token[:, None])[:, 0]
    scaled = logits / sampling.temperature
    logp = scaled.log_softmax(-1)
    kept = _truncate(scaled, sampling.top_k, sampling.top_p)
    token = torch.multinomial(kept.softmax(-1), 1, generator=generator)[:, 0]
    return token, logp.gather(-1, token[:, None])[:, 0]


def _truncate(scaled: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k, then outside the top-p nucleus, to -inf (at least one kept)."""
    if top_k and top_k < scaled.shape[-1]:
        kth = scaled.topk(top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return scaled


def _run_index(prompt_index: list[int]) -> list[int]:
    """For each row, the index of its run of equal neighbouring prompt indices ([4, 4, 7, 4] -> [0, 0, 1, 2])."""
    out = [0]
    for before, here in zip(prompt_index, prompt_index[1:]):
        out.append(out[-1] + (here != before))
    return out


def _left_pad(prompts: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L] ids left-padded with ``pad`` and the matching 0/1 attention mask."""
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), L), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, L - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[b, L - len(p) :] = 1
    return ids.to(device), mask.to(device)


def _forward_kwargs(model: nn.Module) -> tuple[str, dict]:
    """The KV-cache argument's name (``cache`` since transformers 5.2x; ``past_key_values`` before, now
    deprecated) and ``logits_to_keep=1`` where the forward takes it (the prefill's logits at the last position only)."""
    params = inspect.signature(model.forward).parameters
    cache_arg = "cache" if "cache" in params else "past_key_values"
    return cache_arg, ({"logits_to_keep": 1} if "logits_to_keep" in params else {})


def _load_in_place(model: nn.Module, weights) -> None:
    """Copy (name, tensor) pairs into ``model``'s tensors; every distinct tensor must be covered."""
    state = model.state_dict(keep_vars=True)
    pairs = list(named_tensors(weights))  # checked before any copy
    for name, tensor in pairs:
        if name not in state:
            raise KeyError(f"weights: unexpected name {name!r}; expected names of the model's state_dict")
        if state[name].shape != tensor.shape:
            raise ValueError(f"weights[{name!r}]: expected shape {tuple(state[name].shape)}, got {tuple(tensor.shape)}")
    covered = {state[name].data_ptr() for name, _ in pairs}
    missing = [name for name, t in state.items() if t.data_ptr() not in covered and t.numel()]
    if missing:
        raise KeyError(f"weights: expected every tensor of the model, missing {missing[:5]}")
    with torch.no_grad():
        for name, tensor in pairs:
            target = state[name]
            if target.data_ptr() != tensor.data_ptr() or target.dtype != tensor.dtype:
                target.copy_(tensor)


def _opt(token: int | None) -> set[int]:
    return set() if token is None else {token}
