"""The sync policy of the online loop: when the sampler is synced, how, what proves it, what is checkpointed.

Schedule. With period ``s`` (``LoopConfig.sync_every``) step ``t`` syncs when ``t % s == 0``;
``s = 1`` is online, ``s > 1`` semi-online, ``s = None`` / ``inf`` offline (never).

Zero-copy rule. An engine that samples from the trainer's own module
(``engine.shares_weights_with(model)``) cannot lag, so it is used as is only at ``s = 1``, where a
sync is a version bump. At any other ``s`` the policy gives it a stale copy: a deep copy of the
module whose tensors are views into the plan's bucket buffers (``SyncPlan.bind``) handed over with
``engine.adopt_model(copy)``; a sync then packs the trainer's tensors into the buckets — one memcpy
per tensor, the floor — and the engine's ``sync_weights`` finds every view already in place. An
engine sharing the trainer's module without ``adopt_model`` is refused at ``s != 1``. Any other
engine gets the bucket views through the transport (in-process by default) at every sync.

Offline pin. An engine whose weights live outside this process (``local_model is None``) is sent
the initial weights once when a fresh run starts, so it provably holds what the checkpoint assumes.

Checkpoint. Zero-copy: nothing (the trainer's model is saved). Bucket-backed (a stale copy or an
out-of-process engine): the bucket buffers, which hold exactly the last synced version — no
per-sync host copy of the state dict. An engine with its own in-process module: that module. On
resume the buckets are loaded in place and sent again.

Proof on every sync (``SyncConfig.check``). Zero-copy (``s = 1``, the engine samples from the
trainer's module object) there is nothing to prove beyond identity: no copy was made, so the check
is ``engine.shares_weights_with(model)``, which raises if the engine was pointed elsewhere; the
engine's log-probs are then the trainer module's by construction (that its KV-cached decode agrees
with one full forward is ``TorchEngine``'s test, not a property of a sync). Otherwise, after each
sync, the fingerprints of both sides must
match (``weight_sync``; timed with the sync), and the engine's log-probs must equal the trainer's
log-probs of the same tokens within ``LOGPROB_TOLERANCE`` of the trainer's dtype: fp32 1e-4 (two
kernels, a KV-cached decode against one full forward, differ by ~1e-6 here), bf16 0.1 and fp16
0.05 (one bf16 rounding of a logit near 10 is 0.04). The rows checked are the first
``probe_prompts`` completions the step samples right after the sync (their sampler log-probs at
the step's temperature, before top-p/top-k, against the trainer's at that temperature): no extra
generate call, so the check costs one small trainer forward (``time/check``; a fixed greedy probe
costs ``probe_tokens`` decode steps more, about a quarter of a tiny-model step, measured). A step
that samples nothing uses :meth:`SyncPolicy.probe`: greedy completions of the pool's first prompts.
A mismatch raises naming the version and the worst token. The trainer side is ``logprob_fn``
(injected: the CLI passes ``hotloop.algorithms.logprobs``'s fused kernel; the default is a plain
forward + log_softmax, since the runtime never imports the kernels).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from hotloop.runtime.engine import SamplingParams
from hotloop.runtime.weight_sync import SyncPlan, compare_fingerprints, fingerprints
from hotloop.runtime.weight_transport import InProcessTransport, Transport

LOGPROB_TOLERANCE = {torch.float64: 1e-4, torch.float32: 1e-4, torch.bfloat16: 0.1, torch.float16: 0.05}
"""Absolute probe tolerance on log-probs, by the trainer's parameter dtype (see the module docstring)."""

LogprobFn = Callable[[nn.Module, list[list[int]], list[list[int]], float], list[list[float]]]
"""``logprob_fn(model, prompts, completions, temperature) -> per-token log_softmax(logits / T)[token]`` of each
completion given its prompt."""


@dataclass(frozen=True, kw_only=True)
class SyncConfig:
    """How weights are handed over and proved at every sync."""

    bucket_mb: float = 512
    """Most MiB per flat bucket (a larger tensor gets a bucket of its own)."""
    timeout_s: float = 300.0
    """Longest wait on a consumer for one bucket before a sync raises."""
    check: bool = True
    """Prove every sync: compare fingerprints and the engine's probe log-probs with the trainer's."""
    probe_prompts: int = 2
    """Rows checked per sync: the first completions the step samples (or, in a step that samples nothing,
    greedy completions of the first prompts of the training pool)."""
    probe_tokens: int = 4
    """Greedy tokens generated per prompt of the greedy probe."""
    probe_tolerance: float | None = None
    """Absolute log-prob tolerance of the probe; None = LOGPROB_TOLERANCE of the trainer's dtype."""

    def __post_init__(self) -> None:
        for name in ("bucket_mb", "timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"{name}: expected a number > 0, got {value!r}")
        for name in ("probe_prompts", "probe_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        if self.probe_tolerance is not None and not (
            isinstance(self.probe_tolerance, (int, float)) and self.probe_tolerance > 0
        ):
            raise ValueError(f"probe_tolerance: expected None or a number > 0, got {self.probe_tolerance!r}")


def sync_period(sync_every: int | float | None) -> int | None:
    """``sync_every`` as an int, or None when the sampler is never re-synced (None or inf)."""
    return None if sync_every is None or sync_every == math.inf else int(sync_every)


class SyncPolicy:
    """Decides and performs the online loop's syncs (see the module docstring).

    Args:
        config: buckets, timeout and the proof.
        period: steps between syncs, or None (offline).
        model: the trainer's module.
        engine: a ``RolloutEngine``.
        probe_prompts: token ids of the probe's prompts.
        logprob_fn: trainer-side log-probs (default :func:`forward_logprobs`).
        transport: how buckets reach the engine (default in-process).
        gather: for a sharded policy, the bucket-by-bucket gather (``hotloop.runtime.distributed_sync``) that
            packs the buckets instead of ``plan.pack``; the engine's own module is bound to the buckets.
    """

    def __init__(
        self,
        config: SyncConfig,
        period: int | None,
        *,
        model: nn.Module,
        engine,
        probe_prompts: list[list[int]],
        logprob_fn: LogprobFn | None = None,
        transport: Transport | None = None,
        gather=None,
    ) -> None:
        self.config, self.period, self.model, self.engine = config, period, model, engine
        self.gather = gather
        self.probe_prompts = probe_prompts[: config.probe_prompts]
        self.logprob_fn = logprob_fn or forward_logprobs
        shares = engine.shares_weights_with(model)
        self.zero_copy = shares and period == 1
        self.plan = self.buffers = None
        self.bucket_backed = False
        if self.zero_copy:
            return
        if shares and not hasattr(engine, "adopt_model"):
            raise ValueError(
                f"engine: samples from the trainer's own module (zero-copy), which cannot lag, and has no "
                f"adopt_model to take a stale copy; sync_every={period!r} needs an engine on a copy"
            )
        self.plan = gather.plan if gather is not None else SyncPlan(model, bucket_mb=config.bucket_mb)
        self.transport = transport or InProcessTransport(engine)
        self.buffers = self.transport.buffers(self.plan)
        if shares:
            engine.adopt_model(self.plan.bind(copy.deepcopy(model).requires_grad_(False), self.buffers))
        if gather is not None and engine.local_model is not None:
            self.plan.bind(engine.local_model, self.buffers)
        self.bucket_backed = shares or gather is not None or engine.local_model is None

    def due(self, step: int) -> bool:
        """Whether step ``step`` starts with a sync."""
        return self.period is not None and step % self.period == 0

    def sync(self, version: int) -> float:
        """Hand the trainer's weights of ``version`` to the engine and compare fingerprints; the seconds it took."""
        t0 = time.perf_counter()
        if self.zero_copy:
            self.engine.sync_weights(version)
        else:
            self._pack_and_send(version)
        return time.perf_counter() - t0

    def pin_offline(self) -> None:
        """Send the initial weights to an engine holding them out of process (offline, fresh run)."""
        if self.period is None and self.bucket_backed and self.engine.local_model is None:
            self._pack_and_send(self.engine.weight_version)

    def checkpoint_state(self) -> nn.Module | dict[str, torch.Tensor] | None:
        """What holds the engine's weights for a checkpoint (see the module docstring)."""
        if self.zero_copy:
            return None
        if self.bucket_backed:
            return {f"bucket{i}": buffer for i, buffer in enumerate(self.buffers)}
        return self.engine.local_model

    def restore(self, version: int) -> None:
        """After a checkpoint was loaded in place: make the engine hold it as ``version``."""
        if self.bucket_backed:
            self._send(version)
        else:
            self.engine.sync_weights(version)

    def _pack_and_send(self, version: int) -> None:
        """Pack the trainer's tensors (fingerprinting them on the way when the check is on; a sharded policy is
        gathered bucket by bucket instead) and send them."""
        if self.gather is not None:
            self.gather.pack(self.buffers)
            self._send(version)
        elif self.config.check:
            self._send(version, self.plan.pack_fingerprinted(self.model, self.buffers))
        else:
            self.plan.pack(self.model, self.buffers)
            self._send(version)

    def _send(self, version: int, sent: list[int] | None = None) -> None:
        """Send the packed buckets; with the check on, compare the consumer's fingerprints with ``sent`` (or the
        buckets' own, read here when the caller did not fingerprint while packing)."""
        check = self.config.check
        if check and sent is None:
            sent = fingerprints(self.buffers)
        received = self.transport.send(
            version, self.plan.views(self.buffers), timeout_s=self.config.timeout_s, with_fingerprints=check
        )
        if check:
            compare_fingerprints(version, sent, received)

    def verify(self, version: int, prompts: list[list[int]], completions: list, temperature: float) -> float:
        """Prove the sync of ``version`` just made; the worst |diff| (0.0 for zero-copy). See the module docstring.

        Args:
            prompts: token ids of each completion's prompt.
            completions: the step's first samples after the sync (empty: the greedy :meth:`probe` runs instead).
            temperature: the temperature they were sampled at.
        """
        if self.zero_copy:
            if not self.engine.shares_weights_with(self.model):
                raise RuntimeError(
                    f"sync check v{version}: the engine no longer samples from the trainer's module "
                    f"(zero-copy at sync_every=1), so it does not hold version {version}"
                )
            return 0.0
        if not completions:
            return self.probe(version)
        return self.check(version, prompts, completions, temperature)

    def probe(self, version: int) -> float:
        """The fixed greedy probe: generate ``probe_tokens`` per probe prompt, then :meth:`check` them."""
        self.engine.wake()
        greedy = SamplingParams(temperature=0.0, max_new_tokens=self.config.probe_tokens)
        completions = self.engine.generate(self.probe_prompts, greedy)
        return self.check(
            version, [self.probe_prompts[c.prompt_index] for c in completions], completions, greedy.logprob_temperature
        )

    def check(self, version: int, prompts: list[list[int]], completions: list, temperature: float) -> float:
        """Raise unless the completions' sampler log-probs equal the trainer's at ``temperature`` (> 0: the
        ``SamplingParams.logprob_temperature`` they were sampled with); the worst |diff|."""
        expected = self.logprob_fn(self.model, prompts, [c.token_ids for c in completions], temperature)
        tolerance = self.config.probe_tolerance or LOGPROB_TOLERANCE.get(_dtype(self.model), 0.1)
        worst, where = 0.0, None
        for i, (c, ref) in enumerate(zip(completions, expected)):
            for t, (got, want) in enumerate(zip(c.logprobs, ref)):
                diff = abs(got - want)
                diff = math.inf if math.isnan(diff) else diff  # NaN: the worst
                if diff > worst:
                    worst, where = diff, (i, t, c.token_ids[t], got, want)
        if where is not None and worst > tolerance:
            i, t, token, got, want = where
            raise RuntimeError(
                f"sync check v{version}: probe row {i}, token {t} (id {token}): engine log-prob "
                f"{got:.6f}, trainer {want:.6f}; |diff| {worst:.3g} > tolerance {tolerance:g}: the "
                f"engine does not sample with the trainer's weights of version {version}"
            )
        return worst

    def close(self) -> None:
        """Release the transport."""
        if self.plan is not None:
            self.transport.close()


@torch.no_grad()
def forward_logprobs(
    model: nn.Module, prompts: list[list[int]], completions: list[list[int]], temperature: float = 1.0
) -> list[list[float]]:
    """Per-token log-probs of each completion given its prompt: a plain forward per row, log_softmax(logits / T)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        out = []
        for prompt, completion in zip(prompts, completions):
            ids = torch.tensor([prompt + completion], device=device)
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float() / temperature
            out.append(logits.log_softmax(-1).gather(-1, ids[0, len(prompt) :, None])[:, 0].tolist())
        return out
    finally:
        model.train(was_training)


def _dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype
