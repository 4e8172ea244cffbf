"""Fused linear KL: exact full-vocabulary divergence between a policy head and a frozen reference head.

π is the policy (``hidden``, ``weight``, ``bias``: the head that gets gradients), π_ref the reference or
teacher (``ref_hidden``, ``ref_weight``, ``ref_bias``: frozen, never gets a gradient). Per row, with
s = 1/temperature, p = softmax(s·(hidden @ weight.T + bias)) and
q = softmax(s·(ref_hidden @ ref_weight.T + ref_bias)):

    "kl"          KL(π ‖ π_ref) = Σ_j p_j (log p_j − log q_j)          d/dz = p ⊙ (log p − log q − KL)
    "reverse_kl"  KL(π_ref ‖ π) = Σ_j q_j (log q_j − log p_j)          d/dz = p − q
    "jsd"         JSD_β = β·KL(π_ref ‖ M) + (1−β)·KL(π ‖ M),  M = β·q + (1−β)·p,  0 < β < 1
                                                                     d/dz = (1−β)·p ⊙ (log p − log M − KL(π ‖ M))

with z = s·x the scaled policy logits (d/dx = s·d/dz). "kl" is the KL penalty of RLHF / GRPO, computed
exactly where ``losses/kl_penalty.py``'s k1/k2/k3 estimate it from one sampled token (distillation papers
call this direction "reverse KL"). "reverse_kl" is distillation's "forward KL" (cross-entropy to the
teacher's distribution minus its entropy). "jsd" is Liger-Kernel's generalized JSD (β weights the
reference/teacher); Liger's ``beta=0`` is "reverse_kl" here and its ``beta=1`` is "kl".

Layout as the other fused losses (``_fused_linear_common``): padded ``hidden [B, T, D]`` or packed ``[N, D]`` +
``cu_seqlens [B + 1]``; a row counts iff its target != ``ignore_index`` and its ``mask`` (if given) is true, and
only counted rows (N_a of them) enter the matmuls. Loss = Σ_i w_i·D_i over them (``normalize``: "token"
w = 1/N_a, Liger's reduction; "sequence" w = 1/(B·N_a of the row's sequence); "sum" w = 1).

The gradient is known in the forward, so it is computed there; backward only scales it by the scalar upstream
gradient (``_fused_linear_common.FusedLossFunction``). Held until backward: grad_hidden [N, D], grad_weight
[V, D], grad_bias [V] in the input dtype (as Liger's chunked losses); the [N, V] logits of either head never exist.

PyTorch path (CPU, or ``HOTLOOP_BACKEND=torch``): full-row [C, V] chunks (``tiles.block_rows``), three fp32 blocks
(four for "jsd"): both logits, both log-softmaxes (ATen's fused kernel), the per-row divergence, KL and entropy
and the unscaled gradient block G; then, with c = per-row weight·s on the [C, D] side, grad_H[rows] = c·(G @ W),
grad_W += G.T @ (c·H), grad_b += G.T @ c (bf16 GEMM operands for bf16 input, fp32 accumulation, as
``fused_linear_logprob``). FLOPs: 2·N·V·(D + D_ref) for the logits, 4·N·V·D for the gradients (four matmuls
when D_ref = D; two under ``torch.no_grad``).
Triton path (CUDA, ``_fused_linear_kl_triton``): online softmax over vocabulary tiles for both heads, then a
gradient pass that recomputes both logits tiles: 2·N·V·(D + D_ref) more ("jsd" needs one more stats pass,
since M needs both normalizers first).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from . import _torch_tiles as tiles
from ._dispatch import use_triton
from ._fused_linear_common import Layout, attach_grads, check_fused_args, grads_needed, make_layout
from ._head_checks import check_reference_like_hidden
from ._stats import KLStats
from ._workspace import workspace
from .losses.output import LossOutput
from .options import KLOptions


@dataclass
class KLOutput(LossOutput):
    """``LossOutput`` plus ``per_token``: the selected divergence per row (detached float32, hidden's leading shape)."""

    per_token: Tensor | None = None


def _log_softmax_into(out: Tensor, logits: Tensor, s: float) -> Tensor:
    """out [R, V] fp32 ← log softmax(s·logits); logits are scaled in place.

    ATen's fused kernel forms (z − max z) − log Σ e^{z − max z}: never z − lse, whose rounding (an ulp of |z|,
    1e-3 at |z| ~ 1e4) would scale every p of the row.
    """
    if s != 1.0:
        logits.mul_(s)
    return torch.log_softmax(logits, dim=1, out=out)


def _row_math_(lp: Tensor, lq: Tensor, p: Tensor, t: Tensor | None, opts: KLOptions):
    """(divergence, kl, entropy) [R] and d divergence / d scaled policy logit [R, V] from log p (lp) and log q (lq).

    The fp32 [R, V] buffers (``t`` only for "jsd") are overwritten; the gradient returned is a view of one of them.
    """
    vecdot = torch.linalg.vecdot
    torch.exp(lp, out=p)
    entropy = -vecdot(p, lp)
    if opts.divergence == "kl":
        d = torch.sub(lp, lq, out=lq)  # log p − log q
        kl = vecdot(p, d)
        return kl, kl, entropy, d.sub_(kl[:, None]).mul_(p)
    if opts.divergence == "reverse_kl":
        d = lp.sub_(lq)
        q = lq.exp_()
        return -vecdot(q, d), vecdot(p, d), entropy, p.sub_(q)
    beta = opts.beta
    log_a = math.log1p(-opts.beta)
    log_b = math.log(opts.beta)
    kl = vecdot(p, torch.sub(lp, lq, out=t))
    # log M = logaddexp(log((1−β)p), log(βq)): M itself underflows where both p and q do.
    log_m = torch.logaddexp(lp.add_(log_a), lq.add_(log_b), out=t)
    d_p = lp.sub_(log_m).sub_(log_a)  # log p − log M
    student = vecdot(p, d_p)  # KL(π ‖ M)
    log_bq_m = lq.sub_(log_m)  # log(βq / M)
    beta_q = log_m.add_(log_bq_m).exp_()
    teacher = vecdot(beta_q, log_bq_m.sub_(log_b))  # Σ βq·log(q / M) = β·KL(π_ref ‖ M)
    return teacher + (1.0 - beta) * student, kl, entropy, d_p.sub_(student[:, None]).mul_(p).mul_(1.0 - beta)


def kl_fwd_bwd(
    hidden2d,
    weight,
    bias,
    ref_hidden2d,
    ref_weight,
    ref_bias,
    row_weight,
    *,
    options: KLOptions,
    temperature: float,
    needs_grad=(True, True, True),
):
    """KLStats [N] and the gradients of Σ_i row_weight_i·D_i w.r.t. (hidden2d, weight, bias) (None where not needed).

    Args:
        hidden2d: [N, D] policy hidden. weight: [V, D]. bias: [V] | None (policy dtype).
        ref_hidden2d: [N, D_ref]. ref_weight: [V, D_ref]. ref_bias: [V] | None (reference dtype).
        row_weight: [N] float32 weight of each row in the loss.
        options: the divergence and its beta (``normalize`` is applied by the caller through ``row_weight``).
        temperature: > 0; both heads' logits are divided by it.
    Returns:
        (KLStats, grad_hidden | None, grad_weight | None, grad_bias | None), grads in the input dtype.
    """
    if use_triton(hidden2d.device):
        from ._fused_linear_kl_triton import triton_kl_fwd_bwd

        return triton_kl_fwd_bwd(
            hidden2d,
            weight,
            bias,
            ref_hidden2d,
            ref_weight,
            ref_bias,
            row_weight,
            options=options,
            temperature=temperature,
            needs_grad=needs_grad,
        )
    n, d = hidden2d.shape
    v = weight.shape[0]
    dev = hidden2d.device
    s = 1.0 / temperature
    want_h = needs_grad[0]
    want_w = needs_grad[1]
    want_b = needs_grad[2] and bias is not None
    grads = want_h or want_w or want_b
    gdt = tiles.grad_gemm_dtype(weight.dtype)
    # one upcast serves every chunk (fp32 grad_W is accumulated anyway); bf16 heads run the bf16 -> fp32 GEMM
    w32 = weight.float() if grads and not tiles.packable(weight) else None
    w_g = w32 if gdt == torch.float32 else weight
    div, kl, entropy = (torch.zeros(n, device=dev) for _ in range(3))
    gh = torch.zeros(n, d, device=dev) if want_h else None
    gw = torch.zeros(v, d, device=dev) if want_w else None
    gb = torch.zeros(v, device=dev) if want_b else None
    # Full-row chunks as logprob_fwd_bwd's (>= 256 rows at the default budget: the K of the grad_W GEMM), with
    # three such blocks live (four for "jsd").
    chunk = tiles.even_step(n, tiles.block_rows(n, v, dev))
    blocks = 4 if options.divergence == "jsd" else 3
    row_scale = row_weight.float() * s  # d/dx = s·d/dz
    heads = tiles.packed_head(weight), tiles.packed_head(ref_weight)
    with workspace(blocks * chunk * v, dev) as flat, heads[0] as head, heads[1] as ref_head:
        bufs = [*flat[: blocks * chunk * v].view(blocks, -1).unbind(0)] + [None] * (4 - blocks)
        for r0, r1 in tiles.spans(n, chunk):
            x, x_ref, lp, t = (None if b is None else tiles.scratch(b, r1 - r0, v) for b in bufs)
            h32 = hidden2d[r0:r1].float()
            if head is not None:
                tiles.logits_into(x, hidden2d[r0:r1], weight, bias, 0, head)
            elif w32 is not None:
                tiles.linear_into(x, h32, w32, bias)
            else:
                tiles.logits_into(x, h32, weight, bias, 0)
            ref_h = ref_hidden2d[r0:r1] if ref_head is not None else ref_hidden2d[r0:r1].float()
            tiles.logits_into(x_ref, ref_h, ref_weight, ref_bias, 0, ref_head)
            _log_softmax_into(lp, x, s)
            lq = _log_softmax_into(x, x_ref, s)  # x is free: log q goes there, and p into x_ref
            c_div, c_kl, c_ent, g = _row_math_(lp, lq, x_ref, t, options)
            for dst, src in zip((div, kl, entropy), (c_div, c_kl, c_ent)):
                dst[r0:r1] = src
            if grads:
                _add_grads(g, h32, row_scale[r0:r1], w_g, slice(r0, r1), gh, gw, gb)
    grads = tuple(tiles.cast(g, dtype) for g, dtype in ((gh, hidden2d.dtype), (gw, weight.dtype), (gb, weight.dtype)))
    return (KLStats(div, kl, entropy), *grads)


def _add_grads(g: Tensor, h32: Tensor, row_scale: Tensor, w: Tensor, rows: slice, gh, gw, gb) -> None:
    """grad_H[rows] = diag(c)·g @ W, grad_W += g.T @ diag(c)·H, grad_b += g.T @ c into fp32 accumulators.

    g [R, V] fp32 is d/dz unscaled: the row scale c [R] goes on the [R, D] side (and into a GEMV), which saves a
    pass over the [R, V] block. bf16 inputs: bf16 GEMM operands (``tiles.grad_gemm_dtype``), fp32 accumulation.
    """
    g_in = g.to(w.dtype)
    if gh is not None:
        gh[rows] = torch.mm(g_in, w).float().mul_(row_scale[:, None])
    if gw is not None:
        h_scaled = (h32 * row_scale[:, None]).to(w.dtype)
        if w.dtype == torch.float32:
            gw.addmm_(g_in.T, h_scaled)
        else:
            gw.add_(torch.mm(g_in.T, h_scaled))
    if gb is not None:
        gb.addmv_(g.T, row_scale)


def _row_weights(layout: Layout, normalize: str) -> Tensor:
    """[N_a] float32 w_i with loss = Σ_i w_i·D_i over the active rows; see the module docstring."""
    ones = torch.ones(layout.hidden.shape[0], device=layout.hidden.device)
    if normalize == "sum":
        return ones
    if normalize == "token":
        return ones / max(ones.numel(), 1)
    per_seq = layout.seq_sum(ones).float().clamp_min(1.0) * layout.num_seqs
    return ones / per_seq[layout.seq_ids]


def fused_linear_kl(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None = None,
    *,
    ref_hidden: Tensor,
    ref_weight: Tensor,
    ref_bias: Tensor | None = None,
    mask: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    divergence: str = KLOptions.divergence,
    beta: float = KLOptions.beta,
    normalize: str = KLOptions.normalize,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> KLOutput:
    """Exact full-vocabulary divergence between the policy and a frozen reference head, logits never stored.

    Args:
        hidden: policy hidden, ``[B, T, D]`` (padded) or ``[N, D]`` (packed with ``cu_seqlens``),
            float32 / bfloat16 / float16. weight: ``[V, D]``, hidden's dtype. bias: ``[V]`` or None.
        targets: ``[B, T]`` / ``[N]`` int64 token ids; rows with ``ignore_index`` (prompt, padding) do not
            count, nor rows where ``mask`` is false; other values must lie in [0, V) and are otherwise unused.
        ref_hidden: reference hidden in hidden's layout, ``[..., D_ref]``, any float dtype.
        ref_weight: ``[V, D_ref]``, ref_hidden's dtype. ref_bias: ``[V]`` or None. Frozen: never gets a gradient.
        mask: ``[B, T]`` / ``[N]`` bool or 0/1, or None. cu_seqlens: ``[B + 1]`` int32/int64 (packed).
        divergence, beta, normalize: the fields of :class:`KLOptions`.
        temperature: > 0; both heads' logits are divided by it.
    Returns:
        KLOutput: ``loss`` (0-d float32, differentiable w.r.t. hidden, weight, bias), ``per_token`` (detached,
        targets' shape, float32, 0 where not counted), ``metrics`` {"kl": mean KL(π ‖ π_ref), "entropy": mean
        entropy of π, and "reverse_kl" / "jsd": mean of the selected divergence} over counted rows.
    """
    options = KLOptions.pick(locals())  # first: locals() are the arguments
    check_fused_args(hidden, weight, targets, bias, mask, cu_seqlens, (ref_hidden, ref_weight, ref_bias))
    layout = make_layout(
        hidden,
        weight,
        targets,
        bias,
        mask=mask,
        cu_seqlens=cu_seqlens,
        temperature=temperature,
        ignore_index=ignore_index,
    )
    check_reference_like_hidden(hidden, ref_hidden, ref_weight, ref_bias, weight.shape[0])
    ref2d = ref_hidden.detach().reshape(-1, ref_hidden.shape[-1])
    if layout.rows is not None:
        ref2d = ref2d.index_select(0, layout.rows)
    row_weight = _row_weights(layout, options.normalize)
    needs = grads_needed(hidden, weight, bias)
    stats, *grads = kl_fwd_bwd(
        layout.hidden,
        weight.detach(),
        None if bias is None else bias.detach(),
        ref2d,
        ref_weight.detach(),
        None if ref_bias is None else ref_bias.detach(),
        row_weight,
        options=options,
        temperature=float(temperature),
        needs_grad=needs,
    )
    loss = torch.linalg.vecdot(stats.divergence, row_weight)
    loss = attach_grads(loss, layout, hidden, weight, bias, grads) if any(needs) else loss
    per_token = torch.zeros(layout.token_shape, device=hidden.device)
    per_token.view(-1).index_copy_(0, _active_rows(layout), stats.divergence)
    return KLOutput(loss=loss, metrics=_metrics(options.divergence, stats), per_token=per_token)


def _active_rows(layout: Layout) -> Tensor:  # [N_a] int64 flat row of each active row
    return torch.arange(layout.hidden.shape[0], device=layout.hidden.device) if layout.rows is None else layout.rows


def _metrics(divergence: str, stats: KLStats) -> dict[str, Tensor]:
    """Detached means over the active rows (0 when there are none); no host sync."""
    with torch.no_grad():
        count = max(stats.kl.numel(), 1)
        metrics = {"kl": stats.kl.sum() / count, "entropy": stats.entropy.sum() / count}
        if divergence != "kl":
            metrics[divergence] = stats.divergence.sum() / count
    return metrics


class FusedLinearKL(nn.Module):
    """Module form of :func:`fused_linear_kl`: :class:`KLOptions` fields (checked now), ``temperature`` and
    ``ignore_index`` at construction, tensors in ``forward``."""

    def __init__(self, *, temperature: float = 1.0, ignore_index: int = -100, **options):
        super().__init__()
        self.options = KLOptions(**options)
        self.temperature = temperature
        self.ignore_index = ignore_index

    def forward(
        self, hidden, weight, targets, bias=None, *, ref_hidden, ref_weight, ref_bias=None, mask=None, cu_seqlens=None
    ) -> KLOutput:
        return fused_linear_kl(
            hidden,
            weight,
            targets,
            bias,
            ref_hidden=ref_hidden,
            ref_weight=ref_weight,
            ref_bias=ref_bias,
            mask=mask,
            cu_seqlens=cu_seqlens,
            temperature=self.temperature,
            ignore_index=self.ignore_index,
            **asdict(self.options),
        )


def reference_fused_linear_kl(
    hidden,
    weight,
    targets,
    bias=None,
    *,
    ref_hidden,
    ref_weight,
    ref_bias=None,
    mask=None,
    cu_seqlens=None,
    divergence=KLOptions.divergence,
    beta=KLOptions.beta,
    normalize=KLOptions.normalize,
    temperature=1.0,
    ignore_index=-100,
) -> KLOutput:
    """Float64 materialized ``fused_linear_kl`` from the textbook formulas, differentiable, for tests and benchmarks."""

    def log_probs(h, w, b):
        return torch.log_softmax((h.double() @ w.double().T + (0.0 if b is None else b.double())) / temperature, -1)

    lp = log_probs(hidden, weight, bias)
    lq = log_probs(ref_hidden, ref_weight, ref_bias)
    p = lp.exp()
    q = lq.exp()
    kl = (p * (lp - lq)).sum(-1)
    if divergence == "kl":
        div = kl
    elif divergence == "reverse_kl":
        div = (q * (lq - lp)).sum(-1)
    else:  # M = β·q + (1−β)·p, in log space
        lm = torch.logaddexp(lq + math.log(beta), lp + math.log1p(-beta))
        div = beta * (q * (lq - lm)).sum(-1) + (1 - beta) * (p * (lp - lm)).sum(-1)
    keep = (targets != ignore_index) & (True if mask is None else mask.bool())
    cu = None if cu_seqlens is None else cu_seqlens.tolist()
    if cu is not None:
        keep = keep & (torch.arange(keep.numel(), device=keep.device) < cu[-1])
    div, kl, entropy = (x.masked_fill(~keep, 0.0) for x in (div, kl, -(p * lp).sum(-1)))
    count = max(int(keep.sum()), 1)
    if normalize == "sum":
        loss = div.sum()
    elif normalize == "token":
        loss = div.sum() / count
    elif cu is None:
        loss = (div.sum(-1) / keep.sum(-1).clamp_min(1)).mean()
    else:
        loss = sum(div[a:b].sum() / max(int(keep[a:b].sum()), 1) for a, b in zip(cu, cu[1:])) / (len(cu) - 1)
    metrics = {"kl": kl.sum() / count, "entropy": entropy.sum() / count}
    if divergence != "kl":
        metrics[divergence] = div.sum() / count
    return KLOutput(loss=loss, metrics=metrics, per_token=div)
