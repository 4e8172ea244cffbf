"""Float64 references of the fused linear log-prob and KL, computed in row chunks (autograd per chunk).

At N = 8192 × V = 151936 a float64 logits matrix is 10 GB, so rows are taken ``chunk_rows`` at a time: the
reference's weight (and its float64 gradient) is whole, the logits of one chunk at a time. Columns with a −inf
logit (a masking bias) follow 0·log 0 = 0 through ``p * where(p > 0, x, 0)``, which autograd differentiates
without NaN. The relative error is ‖out − ref‖ / ‖ref‖ in float64 (inf where ``out`` is not finite).
"""

from __future__ import annotations

import math

import torch

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 5e-3}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.detach().double(), ref.detach().double()
    if out64.shape != ref64.shape or not torch.isfinite(out64).all():
        return math.inf
    return ((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30)).item()


def chunk_rows(v: int) -> int:
    """Rows per chunk: 2^25 float64 logits (256 MiB) per chunk, autograd's copies included a few GB at most."""
    return max(1, 2**25 // max(v, 1))


def _xlogx_safe(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """p·x with 0 where p = 0 (x may be −inf or NaN there), NaN-free under autograd."""
    return p * torch.where(p > 0, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _leaves(*tensors):
    return [None if t is None else t.detach().double().requires_grad_() for t in tensors]


def logprob(hidden, weight, bias, targets, *, temperature, ignore_index, grad_logp, grad_entropy):
    """(logp, entropy, grad_hidden, grad_weight, grad_bias) in float64 of Σ g_lp·logp + g_ent·entropy."""
    w64, b64 = _leaves(weight, bias)
    logps, ents, grads_h = [], [], []
    step = chunk_rows(weight.shape[0])
    for r0 in range(0, hidden.shape[0], step):
        h64 = hidden[r0 : r0 + step].double().requires_grad_()
        logits = h64 @ w64.T + (0.0 if b64 is None else b64)
        lp = torch.log_softmax(logits / temperature, dim=-1)
        tgt = targets[r0 : r0 + step]
        keep = tgt != ignore_index
        logp = torch.where(keep, lp.gather(1, tgt.clamp_min(0)[:, None])[:, 0], 0.0)
        ent = torch.where(keep, -_xlogx_safe(lp.exp(), lp).sum(-1), 0.0)
        objective = (grad_logp[r0 : r0 + step].double() * logp).sum()
        if grad_entropy is not None:
            objective = objective + (grad_entropy[r0 : r0 + step].double() * ent).sum()
        objective.backward()
        logps.append(logp.detach())
        ents.append(ent.detach())
        grads_h.append(h64.grad)
        del logits, lp, objective
    return torch.cat(logps), torch.cat(ents), torch.cat(grads_h), w64.grad, None if b64 is None else b64.grad


def _divergences(lp, lq, beta):
    """Per-row (kl, reverse_kl, jsd) from float64 log-probs [R, V] of the policy and the reference."""
    p, q = lp.exp(), lq.exp()
    kl = _xlogx_safe(p, lp - lq).sum(-1)
    rev = _xlogx_safe(q, lq - lp).sum(-1)
    lm = torch.logaddexp(lp + math.log1p(-beta), lq + math.log(beta))
    jsd = beta * _xlogx_safe(q, lq - lm).sum(-1) + (1 - beta) * _xlogx_safe(p, lp - lm).sum(-1)
    return {"kl": kl, "reverse_kl": rev, "jsd": jsd}


def kl(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, row_weight, *, divergence, beta, temperature):
    """(divergence, kl, entropy, grad_hidden, grad_weight, grad_bias) in float64 of Σ_i row_weight_i·D_i."""
    w64, b64 = _leaves(weight, bias)
    rw64 = ref_weight.double()
    rb64 = None if ref_bias is None else ref_bias.double()
    out = {"div": [], "kl": [], "entropy": [], "grad_h": []}
    step = chunk_rows(weight.shape[0])
    for r0 in range(0, hidden.shape[0], step):
        h64 = hidden[r0 : r0 + step].double().requires_grad_()
        lp = torch.log_softmax((h64 @ w64.T + (0.0 if b64 is None else b64)) / temperature, dim=-1)
        zq = ref_hidden[r0 : r0 + step].double() @ rw64.T + (0.0 if rb64 is None else rb64)
        lq = torch.log_softmax(zq / temperature, dim=-1)
        divs = _divergences(lp, lq, beta)
        (row_weight[r0 : r0 + step].double() * divs[divergence]).sum().backward()
        out["div"].append(divs[divergence].detach())
        out["kl"].append(divs["kl"].detach())
        out["entropy"].append(-_xlogx_safe(lp.exp(), lp).sum(-1).detach())
        out["grad_h"].append(h64.grad)
        del lp, lq, zq, divs
    cat = {k: torch.cat(v) for k, v in out.items()}
    return cat["div"], cat["kl"], cat["entropy"], cat["grad_h"], w64.grad, None if b64 is None else b64.grad
