"""Fused linear log-prob: per-token log p(target) and entropy of an LM head without [N, V] logits.

Math (``docs/notation.md``; s = 1/temperature, x = hidden @ weight.T + bias, t = target):

    z = s·x,  lse = logsumexp(z),  logp = z_t − lse,  H = lse − Σ_j p_j z_j,  p_j = exp(z_j − lse)
    d(g_lp·logp + g_ent·H)/dx_j = s·[g_lp(1[j=t] − p_j) − g_ent·p_j(log p_j + H)]

This file is the PyTorch path (CPU, or any device with ``HOTLOOP_BACKEND=torch``); CUDA tensors go
to ``_fused_linear_logprob_triton`` (decided by ``_dispatch.use_triton`` at call time).

- Tiles (``_torch_tiles``): fp32 [R, Vb] within ``HOTLOOP_BLOCK_BYTES`` (CPU default: half the last-level cache). R = N
  unless that would make Vb < 1024 columns (then row tiles, so GEMMs never turn skinny).
- Forward: per row tile, vocabulary blocks folded into running fp64 row statistics
  (``tiles.fold_block_``: max, Σe^{z−m}, Σe^{z−m}(z−m), z_t), then lse, logp, entropy; saved for
  backward: lse ([N] fp64: its fp32 rounding would scale every p_j by up to 1 ± 5e-4 at |z| ~ 1e4)
  and entropy ([N] fp32). One matmul (2·N·V·D FLOPs).
- Backward: per vocabulary block: recompute, turn into d/dx in place (``tiles.row_grad_``), then
  grad_W[v0:v1] = block.T @ H (K = R, straight into the output), grad_H += block @ W[v0:v1],
  grad_b[v0:v1] = block.sum(0). Three matmuls: four in all (8·N·V·D FLOPs); ``logprob_fwd_bwd``
  needs three (losses whose per-token gradient is known once a group of rows has its log-probs;
  it keeps full-row [C, V] chunks, C >= min(N, 256)).
- bf16: the logits GEMM takes the bf16 operands and writes fp32 logits (``_bf16_gemm_ext``: PyTorch's oneDNN
  micro-kernel tiled by ``csrc/bf16_gemm.cpp``; the fp32-exact product at a bf16 GEMM's speed, ~5x the fp32 one);
  fp16, an odd D or a CPU without the kernel upcast the weight slice by slice into an fp32 GEMM. For bf16 the two
  gradient GEMMs take bf16 operands (fp32 accumulation; ~2x faster on CPU, as the Triton path does). Grads
  accumulate in fp32 and return in the input dtype. No atomics: bit-identical run to run.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import Tensor, nn

from . import _cpu_ext
from . import _torch_tiles as tiles
from ._dispatch import use_triton
from ._head_checks import check_head_inputs
from ._stats import TokenStats
from ._workspace import workspace


def logprob_fwd(hidden2d, weight, targets, bias, *, temperature, ignore_index, with_entropy) -> TokenStats:
    """Per-row logp, entropy [N] fp32 and lse [N] fp64 by [R, Vb] tiles folded into running row statistics."""
    if use_triton(hidden2d.device):
        from ._fused_linear_logprob_triton import triton_logprob_fwd

        return triton_logprob_fwd(
            hidden2d,
            weight,
            targets,
            bias,
            temperature=temperature,
            ignore_index=ignore_index,
            with_entropy=with_entropy,
        )
    n, _ = hidden2d.shape
    v = weight.shape[0]
    dev = hidden2d.device
    targets = targets.contiguous()
    logp, entropy = torch.empty(2, n, device=dev).unbind(0)
    lse = torch.empty(n, device=dev, dtype=torch.float64)
    rows, cols = tiles.block_shape(n, v, dev)
    with workspace(rows * cols, dev) as buf, tiles.packed_head(weight) as head:
        for r0, r1 in tiles.spans(n, rows):
            h = hidden2d[r0:r1] if head is not None else hidden2d[r0:r1].float()
            t = targets[r0:r1]
            state = _cpu_ext.new_row_state(r1 - r0, dev)
            for v0, v1 in tiles.spans(v, cols):
                block = tiles.scratch(buf, r1 - r0, v1 - v0)
                tiles.logits_into(block, h, weight, bias, v0, head)
                tiles.fold_block_(block, t, v0, 1.0 / temperature, state, with_entropy=with_entropy)
            for dst, src in zip((lse, logp, entropy), _cpu_ext.finish_row_state(state, t, ignore_index)):
                dst[r0:r1] = src
    return TokenStats(logp=logp, entropy=entropy if with_entropy else None, lse=lse)


def logprob_bwd(
    hidden2d, weight, targets, bias, stats, grad_logp, grad_entropy, *, temperature, ignore_index, needs_grad
):
    """(grad_hidden, grad_weight, grad_bias) in the input dtype (None where not needed), by [R, Vb] tiles."""
    if use_triton(hidden2d.device):
        from ._fused_linear_logprob_triton import triton_logprob_bwd

        return triton_logprob_bwd(
            hidden2d,
            weight,
            targets,
            bias,
            stats,
            grad_logp,
            grad_entropy,
            temperature=temperature,
            ignore_index=ignore_index,
            needs_grad=needs_grad,
        )
    n, d = hidden2d.shape
    v = weight.shape[0]
    dev = hidden2d.device
    if n == 0:  # no rows: every gradient is zero
        zeros = (torch.zeros_like(hidden2d), torch.zeros_like(weight), None if bias is None else torch.zeros_like(bias))
        return tuple(z if need else None for z, need in zip(zeros, needs_grad))
    targets = targets.contiguous()
    grad_logp = grad_logp.float().contiguous()
    grad_entropy = None if grad_entropy is None else grad_entropy.float().contiguous()
    entropy = stats.entropy if grad_entropy is not None else None
    gdt = tiles.grad_gemm_dtype(weight.dtype)
    h32 = None if tiles.packable(weight) else hidden2d.float()
    h_g = hidden2d.to(gdt)
    gh = torch.zeros(n, d, device=dev) if needs_grad[0] else None
    gw = torch.empty_like(weight) if needs_grad[1] else None
    gb = torch.zeros(v, device=dev) if needs_grad[2] and bias is not None else None
    rows, cols = tiles.block_shape(n, v, dev)
    bf16_copy = workspace(rows * cols, dev, gdt) if gdt != torch.float32 else nullcontext()
    with workspace(rows * cols, dev) as buf, bf16_copy as gbuf, tiles.packed_head(weight) as head:
        for v0, v1 in tiles.spans(v, cols):
            w32 = weight[v0:v1].float() if head is None else None
            w_g = w32 if gdt == torch.float32 else weight[v0:v1]
            # grad_W[v0:v1] sums over row tiles: straight into an fp32 grad_W, else into an fp32 scratch
            gw_acc = None
            if gw is not None:
                gw_acc = gw[v0:v1] if gw.dtype == torch.float32 else torch.empty(v1 - v0, d, device=dev)
            for r0, r1 in tiles.spans(n, rows):
                block = tiles.scratch(buf, r1 - r0, v1 - v0)
                if head is None:
                    tiles.linear_into(block, h32[r0:r1], w32, None if bias is None else bias[v0:v1])
                else:
                    tiles.logits_into(block, hidden2d[r0:r1], weight, bias, v0, head)
                g = block if gbuf is None else tiles.scratch(gbuf, r1 - r0, v1 - v0)  # as in logprob_fwd_bwd
                tiles.row_grad_(
                    block,
                    targets[r0:r1],
                    v0,
                    stats.lse[r0:r1],
                    _rows_of(entropy, r0, r1),
                    grad_logp[r0:r1],
                    _rows_of(grad_entropy, r0, r1),
                    1.0 / temperature,
                    ignore_index,
                    out=g if gb is None and g is not block else None,
                )
                if gb is not None:
                    gb[v0:v1] += block.sum(dim=0)
                    if g is not block:
                        g.copy_(block)
                if gw_acc is not None:
                    _add_grad_weight(gw_acc, g, h_g[r0:r1], first=r0 == 0)
                if gh is not None and g.dtype == torch.float32:
                    gh[r0:r1].addmm_(g, w_g)
                elif gh is not None:
                    gh[r0:r1].add_(torch.mm(g, w_g))
            if gw_acc is not None and gw_acc.data_ptr() != gw[v0:v1].data_ptr():
                gw[v0:v1].copy_(gw_acc)
    return tiles.cast(gh, hidden2d.dtype), gw, tiles.cast(gb, weight.dtype)


def _add_grad_weight(acc: Tensor, g: Tensor, h: Tensor, *, first: bool) -> None:
    """``acc`` [Vb, D] fp32 ``=`` (first row tile) or ``+=`` ``g.T @ h``; a bf16 ``g`` forms the product, then adds."""
    if g.dtype != acc.dtype:
        product = torch.mm(g.T, h)
        if first:
            acc.copy_(product)
        else:
            acc.add_(product)
    elif first:
        torch.mm(g.T, h, out=acc)
    else:
        acc.addmm_(g.T, h)


def _rows_of(t: Tensor | None, r0: int, r1: int) -> Tensor | None:
    return None if t is None else t[r0:r1]


def _row_chunks(n: int, v: int, row_groups: list[Tensor] | None, device) -> list[tuple[Tensor, slice | None]]:
    """(rows int64 [n], slice or None): contiguous chunks, or whole row groups packed up to the budget."""
    chunk = tiles.block_rows(n, v, device)
    if row_groups is None:
        chunk = tiles.even_step(n, chunk)
        return [(torch.arange(r0, r1, device=device), slice(r0, r1)) for r0, r1 in tiles.spans(n, chunk)]
    chunks = []
    pending = []
    size = 0
    for group in row_groups:
        if pending and size + group.numel() > chunk:
            chunks.append((torch.cat(pending), None))
            pending = []
            size = 0
        pending.append(group.to(device=device, dtype=torch.int64))
        size += group.numel()
    if pending:
        chunks.append((torch.cat(pending), None))
    return chunks


def logprob_fwd_bwd(
    hidden2d,
    weight,
    targets,
    bias,
    *,
    temperature,
    ignore_index,
    with_entropy,
    token_grad: Callable,
    row_groups=None,
    needs_grad=(True, True, True),
):
    """TokenStats and (grad_hidden, grad_weight, grad_bias) with three matmuls per row chunk.

    ``token_grad(rows, logp, entropy) -> (grad_logp, grad_entropy | None)`` is called once per chunk of
    whole row groups (``row_groups``: int64 row-index tensors; None = contiguous chunks).
    """
    if use_triton(hidden2d.device):
        return _fwd_bwd_triton(
            hidden2d,
            weight,
            targets,
            bias,
            temperature=temperature,
            ignore_index=ignore_index,
            with_entropy=with_entropy,
            token_grad=token_grad,
            row_groups=row_groups,
            needs_grad=needs_grad,
        )
    n, d = hidden2d.shape
    v = weight.shape[0]
    dev = hidden2d.device
    s = 1.0 / temperature
    gdt = tiles.grad_gemm_dtype(weight.dtype)
    targets = targets.contiguous()
    w32 = None if tiles.packable(weight) else weight.float()  # one upcast serves every chunk
    w_g = w32 if gdt == torch.float32 else weight
    chunks = _row_chunks(n, v, row_groups, dev)
    covered = sum(rows.numel() for rows, _ in chunks) == n  # every row written once: no zero fill needed
    logp, entropy = torch.zeros(2, n, device=dev).unbind(0)
    lse = torch.zeros(n, device=dev, dtype=torch.float64)
    gh = (torch.empty if covered else torch.zeros)(n, d, device=dev) if needs_grad[0] else None
    # One chunk in bf16: its bf16 grad_W product is the gradient itself, so no fp32 [V, D] accumulator is held.
    direct_gw = needs_grad[1] and len(chunks) == 1 and gdt == weight.dtype != torch.float32
    gw = torch.empty(v, d, device=dev) if needs_grad[1] and not direct_gw else None  # the first GEMM overwrites it
    gb = torch.zeros(v, device=dev) if needs_grad[2] and bias is not None else None
    if gw is not None and not chunks:
        gw.zero_()
    most = max((rows.numel() for rows, _ in chunks), default=0) * v
    products = v * d if gw is not None and gdt != torch.float32 else 0  # bf16 grad_W products, added into fp32 gw
    bf16_copy = workspace(most + products, dev, gdt) if gdt != torch.float32 else nullcontext()
    with workspace(most, dev) as buf, bf16_copy as gbuf, tiles.packed_head(weight) as head:
        product = tiles.scratch(gbuf[most:], v, d) if products else None
        for k, (rows, span) in enumerate(chunks):
            h = hidden2d[span] if span is not None else hidden2d.index_select(0, rows)
            t = targets[span] if span is not None else targets.index_select(0, rows)
            block = tiles.scratch(buf, rows.numel(), v)
            if head is None:
                tiles.linear_into(block, h.float(), w32, bias)
            else:
                tiles.logits_into(block, h, weight, bias, 0, head)
            c_lse, c_logp, c_ent = tiles.row_stats(block, t, s, ignore_index)
            for dst, src in zip((lse, logp, entropy), (c_lse, c_logp, c_ent)):
                dst.index_copy_(0, rows, src)
            g_lp, g_ent = token_grad(rows, c_logp, c_ent if with_entropy else None)
            g_ent = None if g_ent is None else g_ent.detach().float().contiguous()
            g_lp = g_lp.detach().float().contiguous()
            # the bf16 operand of the gradient GEMMs is written by the row pass itself, unless grad_b needs fp32
            g = block if gbuf is None else tiles.scratch(gbuf, rows.numel(), v)
            out = g if gb is None and g is not block else None
            tiles.row_grad_(block, t, 0, c_lse, c_ent, g_lp, g_ent, s, ignore_index, out=out)
            if gb is not None:
                gb.add_(block.sum(dim=0))
                if g is not block:
                    g.copy_(block)
            h_g = h.to(gdt)
            tiles.add_row_grads(g, h_g, w_g, rows, span, gh, gw, first=k == 0, product=product)
            if direct_gw:
                gw = torch.mm(g.T, h_g)
    stats = TokenStats(logp=logp, entropy=entropy if with_entropy else None, lse=lse)
    return stats, tiles.cast(gh, hidden2d.dtype), tiles.cast(gw, weight.dtype), tiles.cast(gb, weight.dtype)


def _fwd_bwd_triton(
    hidden2d, weight, targets, bias, *, temperature, ignore_index, with_entropy, token_grad, row_groups, needs_grad
):
    """Triton path of ``logprob_fwd_bwd``: forward, one token_grad call on all grouped rows, backward."""
    opts = dict(temperature=temperature, ignore_index=ignore_index)
    stats = logprob_fwd(hidden2d, weight, targets, bias, with_entropy=with_entropy, **opts)
    n = hidden2d.shape[0]
    dev = hidden2d.device
    rows = torch.arange(n, device=dev) if row_groups is None else torch.cat(row_groups).to(dev, torch.int64)
    g_lp, g_ent = token_grad(rows, stats.logp[rows], stats.entropy[rows] if with_entropy else None)
    grad_logp = torch.zeros(n, device=dev).index_copy_(0, rows, g_lp.detach().float())
    grad_entropy = None if g_ent is None else torch.zeros(n, device=dev).index_copy_(0, rows, g_ent.detach().float())
    return (
        stats,
        *logprob_bwd(hidden2d, weight, targets, bias, stats, grad_logp, grad_entropy, needs_grad=needs_grad, **opts),
    )


class FusedLinearLogprobFunction(torch.autograd.Function):
    """logp (and entropy) [N] fp32 of hidden2d [N, D], weight [V, D], bias [V] | None; saves lse/entropy only."""

    @staticmethod
    def forward(ctx, hidden2d, weight, bias, targets, temperature, ignore_index, with_entropy):
        stats = logprob_fwd(
            hidden2d,
            weight,
            targets,
            bias,
            temperature=temperature,
            ignore_index=ignore_index,
            with_entropy=with_entropy,
        )
        ctx.save_for_backward(hidden2d, weight, bias, targets, stats.logp, stats.lse, stats.entropy)
        ctx.options = (temperature, ignore_index)
        ctx.set_materialize_grads(False)
        return (stats.logp, stats.entropy) if with_entropy else stats.logp

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        hidden2d, weight, bias, targets, logp, lse, entropy = ctx.saved_tensors
        temperature, ignore_index = ctx.options
        grad_logp = torch.zeros_like(lse) if grad_logp is None else grad_logp.float().contiguous()
        grad_entropy = None if grad_entropy is None else grad_entropy.float().contiguous()
        grads = logprob_bwd(
            hidden2d,
            weight,
            targets,
            bias,
            TokenStats(logp=logp, entropy=entropy, lse=lse),
            grad_logp,
            grad_entropy,
            temperature=temperature,
            ignore_index=ignore_index,
            needs_grad=ctx.needs_input_grad[:3],
        )
        return (*grads, None, None, None, None)


def fused_linear_logprob(
    hidden, weight, targets, bias=None, *, temperature=1.0, ignore_index=-100, return_entropy=False
):
    """log p(target) (and entropy) of logits = (hidden @ weight.T + bias) / temperature, never materialized.

    Rows whose target is ``ignore_index`` (padding, prompts) are dropped before any matmul (one host sync
    to count them), so a padded batch costs what the packed one does; packed variable-length input is
    simply ``[N, D]`` rows.

    Args:
        hidden: [..., D] float32 / bfloat16 / float16. weight: [V, D], same dtype. bias: [V] or None.
        targets: [...] int64 in [0, V), or ``ignore_index`` (those rows give 0).
        temperature: > 0. return_entropy: also return the entropy of each row's distribution.
    Returns:
        logp [...] float32, or (logp, entropy) [...] float32 each. Differentiable w.r.t. hidden, weight, bias.
    """
    check_head_inputs(hidden, weight, targets, bias, temperature, ignore_index)
    lead = hidden.shape[:-1]
    d = hidden.shape[-1]
    hidden2d = hidden.reshape(-1, d)
    flat_targets = targets.reshape(-1).contiguous()
    temperature = float(temperature)
    ignore_index = int(ignore_index)
    active = (flat_targets != ignore_index).nonzero().squeeze(1)
    compact = active.numel() < flat_targets.numel()
    if compact:  # gather the active rows (autograd scatters their gradient back; ignored rows get 0)
        hidden2d = hidden2d.index_select(0, active)
        flat_targets = flat_targets.index_select(0, active)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias)):
        out = FusedLinearLogprobFunction.apply(
            hidden2d, weight, bias, flat_targets, temperature, ignore_index, return_entropy
        )
        outs = out if return_entropy else (out, None)
    else:  # forward only: nothing saved
        stats = logprob_fwd(
            hidden2d,
            weight,
            flat_targets,
            bias,
            temperature=temperature,
            ignore_index=ignore_index,
            with_entropy=return_entropy,
        )
        outs = (stats.logp, stats.entropy)
    if compact:
        outs = tuple(None if o is None else o.new_zeros(lead.numel()).index_copy(0, active, o) for o in outs)
    logp, entropy = (None if o is None else o.reshape(lead) for o in outs)
    return (logp, entropy) if return_entropy else logp


class FusedLinearLogprob(nn.Module):
    """Module form of ``fused_linear_logprob``; options fixed at construction."""

    def __init__(self, *, temperature: float = 1.0, ignore_index: int = -100, return_entropy: bool = False):
        super().__init__()
        self.temperature = temperature
        self.ignore_index = ignore_index
        self.return_entropy = return_entropy

    def forward(self, hidden, weight, targets, bias=None):
        return fused_linear_logprob(
            hidden,
            weight,
            targets,
            bias,
            temperature=self.temperature,
            ignore_index=self.ignore_index,
            return_entropy=self.return_entropy,
        )


def reference_fused_linear_logprob(
    hidden, weight, targets, bias=None, *, temperature=1.0, ignore_index=-100, return_entropy=False
):
    """Float64 materialized logp (and entropy) [...], differentiable, for tests and benchmarks."""
    logits = hidden.double() @ weight.double().T + (0.0 if bias is None else bias.double())
    log_probs = torch.log_softmax(logits / temperature, dim=-1)
    ignored = targets == ignore_index
    safe = torch.where(ignored, 0, targets)
    logp = log_probs.gather(-1, safe.unsqueeze(-1)).squeeze(-1).masked_fill(ignored, 0.0)
    if not return_entropy:
        return logp
    entropy = -(log_probs.exp() * log_probs).sum(-1).masked_fill(ignored, 0.0)
    return logp, entropy
