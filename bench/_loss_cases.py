"""The losses of the ``bench/losses.py`` grid: their options, inputs, float64 reference, and every implementation.

One :class:`Spec` per loss (DPO sigmoid and IPO, KTO, ORPO, SimPO, CPO, GRPO and DAPO with and without a k3 KL
term), one :class:`Case` per grid cell (``S`` sequences — pairs for the preference losses, which then have ``2S`` —
of ``T`` tokens, every token counted, a reference variant and a dtype). Each implementation is a builder
``(case) -> zero-argument forward giving the scalar loss``:

- ``naive``: full ``[N, V]`` logits, fp32 ``log_softmax`` + ``gather``, then hotloop's functional loss;
- ``hotloop``: the fused module's function (``fused_linear_{dpo,kto,grpo}_loss``, ``strategy="auto"``);
- ``compat`` / ``liger`` / ``liger eager``: the Liger class of the loss from ``hotloop.kernels.compat.liger`` or
  ``liger_kernel.chunked_loss`` (``compiled=True`` / ``False``), constructed and called exactly as Liger's.

Reference variants: ``none`` (reference-free losses, GRPO without KL), ``head`` (a frozen reference head
``ref_hidden [S, T, D]``, ``ref_weight [V, D]`` run forward-only every call), ``cached`` (reference log-probs
precomputed once: DPO / KTO sequence sums, GRPO per-token; Liger 0.8.5 takes them only for GRPO).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from bench._harness import Unavailable
from hotloop.kernels.fused_linear_logprob import reference_fused_linear_logprob
from hotloop.kernels.losses import dpo_loss, grpo_loss, kto_loss, orpo_loss

REF_ELEMENTS = 2**24  # elements of one float64 logits chunk of the reference
GRPO_BETA = 0.04


@dataclass(frozen=True)
class Spec:
    """One loss: its family, the reference variants it takes, the fused function's and Liger's options."""

    name: str
    family: str  # "pair" | "kto" | "grpo"
    refs: tuple[str, ...]  # reference variants of the grid: "none", "head", "cached"
    options: dict  # keyword options of the fused function (and of the functional loss)
    liger_class: str
    liger_options: dict = field(default_factory=dict)


SPECS = {
    s.name: s
    for s in (
        Spec(
            "dpo",
            "pair",
            ("head", "cached"),
            dict(beta=0.1, loss_type="sigmoid"),
            "LigerFusedLinearDPOLoss",
            dict(beta=0.1, loss_type="sigmoid", use_ref_model=True),
        ),
        Spec(
            "ipo",
            "pair",
            ("head", "cached"),
            dict(beta=0.1, loss_type="ipo"),
            "LigerFusedLinearDPOLoss",
            dict(beta=0.1, loss_type="ipo", use_ref_model=True),
        ),
        Spec(
            "kto",
            "kto",
            ("head", "cached"),
            dict(beta=0.1),
            "LigerFusedLinearKTOLoss",
            dict(beta=0.1, use_ref_model=True),
        ),
        Spec("orpo", "pair", ("none",), dict(beta=0.1, loss_type="orpo"), "LigerFusedLinearORPOLoss", dict(beta=0.1)),
        Spec(
            "simpo",
            "pair",
            ("none",),
            dict(beta=0.1, reference_free=True, length_normalize=True, gamma=0.5, nll_coef=1.0),
            "LigerFusedLinearSimPOLoss",
            dict(beta=0.1, gamma=0.5),
        ),
        Spec(
            "cpo",
            "pair",
            ("none",),
            dict(beta=0.1, reference_free=True, nll_coef=1.0),
            "LigerFusedLinearCPOLoss",
            dict(beta=0.1),
        ),
        Spec(
            "grpo-dapo",
            "grpo",
            ("none",),
            dict(beta=0.0, loss_type="dapo"),
            "LigerFusedLinearGRPOLoss",
            dict(beta=0.0, use_ref_model=False, loss_type="dapo"),
        ),
        Spec(
            "grpo-dapo-kl",
            "grpo",
            ("head", "cached"),
            dict(beta=GRPO_BETA, loss_type="dapo"),
            "LigerFusedLinearGRPOLoss",
            dict(beta=GRPO_BETA, use_ref_model=True, loss_type="dapo"),
        ),
        Spec(
            "grpo",
            "grpo",
            ("none",),
            dict(beta=0.0, loss_type="grpo"),
            "LigerFusedLinearGRPOLoss",
            dict(beta=0.0, use_ref_model=False, loss_type="grpo"),
        ),
        Spec(
            "grpo-kl",
            "grpo",
            ("head", "cached"),
            dict(beta=GRPO_BETA, loss_type="grpo"),
            "LigerFusedLinearGRPOLoss",
            dict(beta=GRPO_BETA, use_ref_model=True, loss_type="grpo"),
        ),
    )
}


@dataclass(frozen=True)
class Case:
    """One grid cell: inputs (the policy head needs grad), per-token constants, the float64 reference loss."""

    spec: Spec
    ref: str  # "none" | "head" | "cached"
    size: str  # the table section of the cell
    hidden: torch.Tensor  # [S', T, D], S' = 2S for pairs
    weight: torch.Tensor  # [V, D]
    targets: torch.Tensor  # [S', T] int64
    ref_hidden: torch.Tensor
    ref_weight: torch.Tensor
    ref_tokens: torch.Tensor  # [S', T] float32 reference log-probs (the cached ones)
    extra: dict  # kto: labels; grpo: mask, advantages, old_logp
    reference: float

    @property
    def matmuls(self) -> int:  # the floor: logits, G @ W, G.T @ h, + the reference logits with a head
        return 4 if self.ref == "head" else 3


def _logp64(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[S, T]`` float64 log-probs, materialized ``REF_ELEMENTS`` logits at a time."""
    h, t, w = hidden.detach().reshape(-1, hidden.shape[-1]), targets.reshape(-1), weight.detach().double()
    rows = max(1, REF_ELEMENTS // weight.shape[0])
    parts = [
        reference_fused_linear_logprob(h[i : i + rows].double(), w, t[i : i + rows]) for i in range(0, len(t), rows)
    ]
    return torch.cat(parts).reshape(targets.shape)


def functional_loss(case: Case, logp: torch.Tensor, ref: torch.Tensor | None) -> torch.Tensor:
    """The cell's loss from per-token log-probs ``[S', T]`` (and reference ones), by hotloop's functional losses."""
    spec, seq, t = case.spec, logp.sum(-1), logp.shape[1]
    ref_seq = None if ref is None else ref.sum(-1)
    if spec.family == "kto":
        return kto_loss(seq, case.extra["labels"], ref_logps=ref_seq, **spec.options).loss
    if spec.family == "grpo":
        x = case.extra
        return grpo_loss(
            logp,
            x["advantages"].to(logp.dtype),
            x["mask"],
            old_logp=x["old_logp"].to(logp.dtype),
            ref_logp=ref,
            **spec.options,
        ).loss
    half = seq.shape[0] // 2
    lengths = torch.full((half,), float(t), dtype=logp.dtype, device=logp.device)
    kw = dict(chosen_lengths=lengths, rejected_lengths=lengths)
    nll = -seq[:half] / t  # per pair: its share of the token-mean NLL over the chosen tokens
    if spec.options.get("loss_type") == "orpo":
        return orpo_loss(seq[:half], seq[half:], beta=spec.options["beta"], nll_loss=nll, **kw).loss
    refs = {} if ref_seq is None else dict(ref_chosen_logps=ref_seq[:half], ref_rejected_logps=ref_seq[half:])
    nll_kw = dict(nll_loss=nll) if spec.options.get("nll_coef") else {}
    return dpo_loss(seq[:half], seq[half:], **refs, **spec.options, **kw, **nll_kw).loss


def make_case(spec: Spec, ref: str, s: int, t: int, d: int, v: int, dtype, device) -> Case:
    """Random inputs (logits of order 1), cached reference log-probs, float64 reference loss."""
    rows = 2 * s if spec.family == "pair" else s

    def head():
        return torch.randn(rows, t, d, device=device).to(dtype), (torch.randn(v, d, device=device) / d**0.5).to(dtype)

    (hidden, weight), (ref_hidden, ref_weight) = head(), head()
    targets = torch.randint(0, v, (rows, t), device=device)
    hidden.requires_grad_(True), weight.requires_grad_(True)
    logp64, ref64 = _logp64(hidden, weight, targets), _logp64(ref_hidden, ref_weight, targets)
    extra = {}
    if spec.family == "kto":
        extra = dict(labels=torch.arange(rows, device=device) % 2 == 0)
    elif spec.family == "grpo":
        extra = dict(
            mask=torch.ones(rows, t, dtype=torch.bool, device=device),
            advantages=torch.randn(rows, device=device),
            old_logp=(logp64 + 0.1 * torch.randn_like(logp64)).float(),
        )  # some ratios clip
    unit = "pairs" if spec.family == "pair" else "seqs"
    size = f"{unit}={s} T={t} ref={ref} {str(dtype).removeprefix('torch.')}"
    case = Case(spec, ref, size, hidden, weight, targets, ref_hidden, ref_weight, ref64.float(), extra, 0.0)
    reference = functional_loss(case, logp64, None if ref == "none" else ref64)
    return Case(**{**case.__dict__, "reference": float(reference)})


def _naive_logp(hidden, weight, targets):
    logits = (hidden @ weight.T).float()
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def naive(case: Case) -> Callable[[], torch.Tensor]:
    def forward():
        ref = None
        if case.ref == "head":
            with torch.no_grad():
                ref = _naive_logp(case.ref_hidden, case.ref_weight, case.targets)
        elif case.ref == "cached":
            ref = case.ref_tokens
        return functional_loss(case, _naive_logp(case.hidden, case.weight, case.targets), ref)

    return forward


def _reference_kwargs(case: Case) -> dict:
    """The fused function's reference arguments for the cell's variant."""
    if case.ref == "head":
        return dict(ref_hidden=case.ref_hidden, ref_weight=case.ref_weight)
    if case.ref == "none":
        return {}
    sums = case.ref_tokens.sum(-1)
    return dict(ref_logp=case.ref_tokens) if case.spec.family == "grpo" else dict(ref_logps=sums)


def hotloop(case: Case) -> Callable[[], torch.Tensor]:
    from hotloop.kernels import fused_linear_dpo_loss, fused_linear_grpo_loss, fused_linear_kto_loss

    h, w, t, x, opts, ref = (
        case.hidden,
        case.weight,
        case.targets,
        case.extra,
        case.spec.options,
        _reference_kwargs(case),
    )
    if case.spec.family == "pair":
        return lambda: fused_linear_dpo_loss(h, w, t, **ref, **opts).loss
    if case.spec.family == "kto":
        return lambda: fused_linear_kto_loss(h, w, t, labels=x["labels"], **ref, **opts).loss
    return lambda: (
        fused_linear_grpo_loss(
            h, w, t, advantages=x["advantages"], mask=x["mask"], old_logp=x["old_logp"], **ref, **opts
        ).loss
    )


def liger_style(module: str, compiled: bool) -> Callable[[Case], Callable[[], torch.Tensor]]:
    """Builder of the cell's Liger class from ``module`` (Liger's or hotloop's compat layer), called as Liger's."""

    def build(case: Case) -> Callable[[], torch.Tensor]:
        spec, h, w, t, x = case.spec, case.hidden, case.weight, case.targets, case.extra
        cached = case.ref == "cached"
        if cached and spec.family != "grpo" and module.startswith("liger_kernel"):
            raise Unavailable("Liger 0.8.5 takes no cached reference log-probs for this loss")
        fn = getattr(importlib.import_module(module), spec.liger_class)(**spec.liger_options, compiled=compiled)
        head = (case.ref_hidden, case.ref_weight) if case.ref == "head" else (None, None)
        if spec.family == "grpo":
            ref = dict(ref_per_token_logps=case.ref_tokens) if cached else dict(ref_input=head[0], ref_weight=head[1])
            return lambda: fn(h, w, t, x["mask"], x["advantages"], old_per_token_logps=x["old_logp"], **ref)[0]
        if spec.family == "kto":
            ref = dict(ref_logps=case.ref_tokens.sum(-1)) if cached else {}
            return lambda: fn(h, w, t, None, x["labels"], *head, **ref)[0]
        if cached:
            half = t.shape[0] // 2
            sums = case.ref_tokens.sum(-1)
            return lambda: fn(w, h, t, ref_chosen_logps=sums[:half], ref_rejected_logps=sums[half:])[0]
        return lambda: fn(w, h, t, None, *head)[0] if case.ref == "head" else fn(w, h, t)[0]

    return build


@dataclass(frozen=True)
class Impl:
    """A row of the table: ``build(case)`` returns a zero-argument forward giving the scalar loss."""

    name: str
    family: str  # the --impls name that selects it
    note: str
    build: Callable[[Case], Callable[[], torch.Tensor]]


IMPLEMENTATIONS = (
    Impl("naive", "naive", "full [N, V] logits + fp32 log_softmax/gather, hotloop's functional loss", naive),
    Impl("hotloop", "hotloop", "fused_linear_{dpo,kto,grpo}_loss, strategy='auto'", hotloop),
    Impl(
        "compat",
        "compat",
        "hotloop.kernels.compat.liger, called as Liger's",
        liger_style("hotloop.kernels.compat.liger", True),
    ),
    Impl("liger", "liger", "liger_kernel.chunked_loss, compiled=True", liger_style("liger_kernel.chunked_loss", True)),
    Impl(
        "liger eager",
        "liger-eager",
        "liger_kernel.chunked_loss, compiled=False",
        liger_style("liger_kernel.chunked_loss", False),
    ),
)
