"""torch.distributed for the online loop: process groups from torchrun, FSDP2 sharding, each rank's share.

Launch. ``torchrun --nproc_per_node N [--nnodes M ...]`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_distributed` reads them and opens the default
process group (NCCL on CUDA, gloo on CPU) with a timeout, so that a dead peer makes every other
rank raise instead of hang, and a 1-D device mesh over all ranks. Without ``WORLD_SIZE`` (or with
``WORLD_SIZE=1``) it returns None and everything runs as one process.

Sharding. :func:`shard_model` applies FSDP2 ``fully_shard`` to every decoder layer (the classes a
``transformers`` model lists in ``_no_split_modules``) and then to the root, which keeps the
embeddings, the final norm and the LM head; with ``mixed_precision`` (CUDA only) parameters are
gathered in bf16 and gradients reduced in fp32. The frozen reference is sharded the same way.
hotloop's losses call the decoder and read ``lm_head.weight`` directly (the fused kernels never run
the head's ``forward``), so the root's parameters are gathered explicitly around every loss
(:func:`unsharded`); FSDP2's post-backward callback reduce-scatters their gradients and reshards
them, as for any group whose forward did not run. That callback covers the root's group only once
FSDP2 knows the root, which it learns at the root's first forward: :func:`shard_model` runs one
forward of one token (without it the head's gradients are silently never reduced).

Each rank's share. Every rank draws the same prompts of a step (a function of seed and step),
samples and scores its contiguous share (:func:`share`), and :func:`gather_scored` gives every rank
all completions and rewards in global order. Every rank then builds the *same* global batch — so a
GRPO group or a DPO pair is never split and every batch rule sees what one rank would see — and
trains on its part of whole units from ``split_batch(batch, world_size, rule)``. Part r's loss is
``S_r / N_r``; FSDP averages gradients over ranks, so the loss is scaled by ``world_size · N_r / N``
(:func:`rank_part`) and the gradient is that of ``S / N``, the one-rank loss of the global batch.
The logged metrics are summed over ranks and divided by ``world_size`` (:func:`reduce_metrics`).
A rank left without a unit (fewer units than ranks) trains on a copy of the last part with weight 0,
so that every rank runs the same collectives.

Agreement. :func:`agree` runs a check on every rank and raises on all of them when any failed,
naming the rank, so that one rank's error (a failed sync proof) does not leave the others waiting
in the next collective until the timeout.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from hotloop.runtime.micro_batches import SplitRule, micro_batch_rule, split_batch


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job: rank, world size, device and the mesh FSDP2 shards over."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh
    timeout_s: float

    @property
    def is_main(self) -> bool:
        """Rank 0 writes metrics and the checkpoint's small files."""
        return self.rank == 0


def init_distributed(*, timeout_s: float = 60.0) -> DistContext | None:
    """Open the process group torchrun describes (NCCL on CUDA, gloo on CPU); None outside a multi-rank job.

    Args:
        timeout_s: longest wait of any collective; a dead or stuck peer makes the others raise after it.
    """
    if not isinstance(timeout_s, (int, float)) or isinstance(timeout_s, bool) or not timeout_s > 0:
        raise ValueError(f"timeout_s: expected a number > 0, got {timeout_s!r}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    return DistContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        device=device,
        mesh=mesh,
        timeout_s=float(timeout_s),
    )


def shard_model(
    model: nn.Module, ctx: DistContext, *, trainable: bool = True, mixed_precision: bool = False
) -> nn.Module:
    """``fully_shard`` every decoder layer of ``model`` and then its root, in place; returns ``model``.

    Args:
        model: a ``transformers`` causal LM (its ``_no_split_modules`` name the decoder layer classes).
        ctx: from :func:`init_distributed`.
        trainable: False freezes the parameters first (the reference).
        mixed_precision: gather parameters in bf16, reduce gradients in fp32 (CUDA only).
    """
    layer_classes = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise ValueError(
            f"model: expected decoder layers named in _no_split_modules, got {type(model).__name__} "
            f"with _no_split_modules={sorted(layer_classes)}"
        )
    if mixed_precision and ctx.device.type != "cuda":
        raise ValueError(f"mixed_precision: expected False on {ctx.device.type} (bf16 FSDP runs on CUDA), got True")
    if not trainable:
        model.requires_grad_(False).eval()
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if mixed_precision
        else MixedPrecisionPolicy()
    )
    model.to(ctx.device)
    for layer in layers:
        fully_shard(layer, mesh=ctx.mesh, mp_policy=policy)
    fully_shard(model, mesh=ctx.mesh, mp_policy=policy)
    # FSDP2 learns which state is the root (and so which groups its post-backward callback covers) at the
    # root's first forward; hotloop's losses call the decoder directly, so that forward happens here, once
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=ctx.device))
    model.reshard()  # the root keeps its gathered parameters after a forward: the optimizer must see the shards
    return model


def shard_run(
    ctx: DistContext, policy: nn.Module, reference: nn.Module | None, *, mixed_precision: bool = False
) -> tuple[nn.Module, nn.Module | None]:
    """Shard the policy (trainable) and the frozen reference in place for a run on ``ctx``'s ranks."""
    policy = shard_model(policy, ctx, mixed_precision=mixed_precision)
    if reference is not None:
        reference = shard_model(reference, ctx, trainable=False, mixed_precision=mixed_precision)
    return policy, reference


def unsharded_eval(evaluate: Callable[[nn.Module], dict], reference: nn.Module | None) -> Callable:
    """``evaluate(model)`` with the root parameters of the sharded model and reference gathered; every rank runs
    the same evaluation (greedy decoding of the same prompts with the same weights: as many forwards)."""

    def gathered(model: nn.Module) -> dict:
        with (
            unsharded(model, reshard=True),
            unsharded(reference, reshard=True) if reference is not None else contextlib.nullcontext(),
        ):
            return evaluate(model)

    return gathered


@contextlib.contextmanager
def unsharded(model: nn.Module, *, reshard: bool) -> Iterator[None]:
    """Gather ``model``'s root parameters (embeddings, head) for code that reads them outside ``forward``.

    ``reshard=False`` for the policy under training: its backward still needs them, and FSDP2's
    post-backward reshards them; ``reshard=True`` for no-grad use (the reference, the sync proof).
    A model that is not an ``FSDPModule`` passes through.
    """
    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        if reshard:
            model.reshard()


def share(n: int, ctx: DistContext | None) -> range:
    """Indices ``[0, n)`` of this rank's contiguous share (sizes differ by at most one, rank order)."""
    if ctx is None:
        return range(n)
    sizes = [n // ctx.world_size + (r < n % ctx.world_size) for r in range(ctx.world_size)]
    start = sum(sizes[: ctx.rank])
    return range(start, start + sizes[ctx.rank])


def gather_scored(completions: list, rewards: torch.Tensor, offset: int, ctx: DistContext) -> tuple[list, torch.Tensor]:
    """Every rank's completions (``prompt_index`` shifted by its share's ``offset``) and rewards, in rank order."""
    local = [(c.__class__, {**vars(c), "prompt_index": c.prompt_index + offset}) for c in completions]
    gathered: list = [None] * ctx.world_size
    dist.all_gather_object(gathered, (local, rewards.cpu()))
    out = [cls(**fields) for part, _ in gathered for cls, fields in part]
    return out, torch.cat([r for _, r in gathered])


def rank_part(batch, rule: SplitRule, ctx: DistContext, k: int = 1) -> tuple[Any, float, int]:
    """This rank's whole units of the global ``batch``, its loss scale ``world_size · N_r / N`` and the number
    of micro batches every rank cuts its part into (at most ``k``; the same on every rank, so that every rank
    runs as many forward/backward collectives)."""
    parts = split_batch(batch, ctx.world_size, rule)
    micro = min(k, min(part.rows // rule.unit_rows for part, _ in parts))
    if ctx.rank >= len(parts):
        return parts[-1][0], 0.0, micro
    part, weight = parts[ctx.rank]
    return part, weight * ctx.world_size, micro


def scaled_loss(loss_fn: Callable, scale: float, policy: nn.Module, reference: nn.Module | None) -> Callable:
    """``loss_fn`` with the root parameters of policy and reference gathered, loss and metrics times ``scale``."""

    def scaled(model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict]:
        with (
            unsharded(policy, reshard=False),
            unsharded(reference, reshard=True) if reference is not None else contextlib.nullcontext(),
        ):
            out = loss_fn(model, batch)
        loss, metrics = (out.loss, out.metrics or {}) if hasattr(out, "loss") else (out, {})
        return loss * scale, {name: torch.as_tensor(value).detach().float() * scale for name, value in metrics.items()}

    return scaled


def train_step(trainer, loss_fn: Callable, batch, rule: SplitRule, ctx: DistContext) -> dict[str, float]:
    """One optimizer step of ``trainer`` on this rank's part of the global ``batch`` (micro batches of it when
    ``grad_accum_steps > 1``); returns the global metrics (see the module docstring)."""
    part, scale, micro = rank_part(batch, rule, ctx, trainer.config.grad_accum_steps)
    parts = split_batch(part, micro, rule)
    metrics = trainer.step(
        scaled_loss(loss_fn, scale, trainer.model, trainer.reference),
        [b for b, _ in parts],
        weights=[w for _, w in parts],
    )
    return reduce_metrics(metrics, ctx, keep=("grad_norm", "lr", "skipped/nonfinite"))


def reduce_metrics(metrics: dict[str, float], ctx: DistContext, *, keep: Sequence[str] = ()) -> dict[str, float]:
    """Sum each metric over ranks and divide by ``world_size`` (the global weighted mean of scaled metrics);
    the names in ``keep`` (already global: ``grad_norm``, ``lr``) are left as they are."""
    names = sorted(k for k, v in metrics.items() if k not in keep and isinstance(v, (int, float)))
    values = torch.tensor([float(metrics[k]) for k in names], dtype=torch.float64)
    dist.all_reduce(values)
    return {**metrics, **{k: v / ctx.world_size for k, v in zip(names, values.tolist())}}


def check_loop(ctx: DistContext, algorithm, prompts_per_step: int) -> SplitRule:
    """The algorithm's split rule (its batches are cut into rank parts of whole units), after checking that
    every rank gets as many prompts (so every rank runs the same number of probe forwards)."""
    if prompts_per_step % ctx.world_size:
        raise ValueError(
            f"prompts_per_step: expected a multiple of the world size {ctx.world_size}, got {prompts_per_step}"
        )
    try:
        return micro_batch_rule(algorithm)
    except ValueError as error:
        raise ValueError(f"world_size: expected 1, got {ctx.world_size}: {error}") from None


def unsharded_logprobs(logprob_fn: Callable) -> Callable:
    """``logprob_fn`` (the sync proof's trainer side) with the sharded model's root parameters gathered."""

    def gathered(model: nn.Module, *args: Any) -> Any:
        with unsharded(model, reshard=True):
            return logprob_fn(model, *args)

    return gathered


@contextlib.contextmanager
def stop_on_peer_failure(ctx: DistContext | None, what: str) -> Iterator[None]:
    """Re-raise a failed collective (a peer died: its connection closed; or stalled: the timeout) as one error
    naming this rank and ``what`` it was doing; every other error passes unchanged."""
    try:
        yield
    except RuntimeError as error:
        if ctx is None or not _collective_failure(error):
            raise
        raise RuntimeError(
            f"rank {ctx.rank} of {ctx.world_size}: {what}: a collective failed, so another rank "
            f"died or stalled (collective timeout {ctx.timeout_s:g} s); stopping this rank: "
            f"{error}"
        ) from error


def _collective_failure(error: RuntimeError) -> bool:
    """Whether ``error`` came from the communication backend (gloo raises plain RuntimeErrors naming its sources)."""
    return isinstance(error, dist.DistError) or "gloo/" in str(error) or "NCCL" in str(error)


def agree(ctx: DistContext | None, check: Callable[[], Any], what: str) -> Any:
    """Run ``check`` on every rank; when any rank raised, raise on all of them, naming the first failed rank."""
    if ctx is None:
        return check()
    error, result = None, None
    try:
        result = check()
    except Exception as err:  # every rank must reach the all_reduce below, whatever failed here
        error = err
    failed = torch.tensor([ctx.world_size if error is None else ctx.rank], dtype=torch.int64)
    dist.all_reduce(failed, op=dist.ReduceOp.MIN)
    first = int(failed)
    if error is not None:
        raise RuntimeError(f"rank {ctx.rank}: {what} failed: {error}") from error
    if first < ctx.world_size:
        raise RuntimeError(f"rank {ctx.rank}: {what} failed on rank {first} (its error is in its log)")
    return result
