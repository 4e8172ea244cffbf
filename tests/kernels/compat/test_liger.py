"""hotloop.kernels.compat.liger vs Liger-Kernel's own chunked losses on the same CPU inputs (every returned element,
gradients w.r.t. input, weight, bias), their signatures, and the documented differences (vs float64 references)."""

import inspect
import warnings

import pytest
import torch

from hotloop.kernels import fused_linear_logprob
from hotloop.kernels.compat import liger as compat
from hotloop.kernels.fused_linear_dpo import reference_fused_linear_dpo_loss
from hotloop.kernels.fused_linear_grpo import reference_fused_linear_grpo_loss
from tests.helpers import assert_close, relative_error

chunked = pytest.importorskip("liger_kernel.chunked_loss")

B, T, D, V = 2, 7, 12, 37  # pairs (DPO family) / sequences (KTO: 2B, GRPO: 2B), tokens, hidden, vocabulary
IGNORE = -100
# Two implementations, each within the dtype's tolerance of float64 (fp32 1e-5, bf16 1e-2), differ by up to twice it.
VS_LIGER = {torch.float32: 2e-5, torch.bfloat16: 2e-2}
CLASSES = ("DPO", "CPO", "ORPO", "SimPO", "KTO", "GRPO", "JSD")


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    monkeypatch.setenv("HOTLOOP_BACKEND", "torch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Liger warns about its own deprecations on CPU
        yield


def _head(rows, bias=True, grad=True, dtype=torch.float32):
    """(hidden [*rows, D], weight [V, D], bias [V] | None), logits of order 1."""
    hidden, weight = torch.randn(*rows, D).to(dtype), (torch.randn(V, D) / D**0.5).to(dtype)
    b = torch.randn(V).to(dtype) if bias else None
    return [x if x is None or not grad else x.requires_grad_(True) for x in (hidden, weight, b)]


def _targets(rows, prompt=2):
    """Targets with an ignored prompt and, on the second sequence, an ignored padding tail."""
    targets = torch.randint(0, V, rows)
    targets[..., :prompt] = IGNORE
    targets[1, -3:] = IGNORE
    return targets


def _error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / max(‖ref‖, 1): the outputs are sums of terms of order 1 (log-probs, logits, per-token losses)
    whose cancellation can leave a value far below 1 that no fp32 sum gets to a relative 1e-5."""
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1.0)).item()


def _flat(x):
    return [y for z in x for y in _flat(z)] if isinstance(x, tuple) else [x]


def _run(module, args, kwargs, upstream):
    """Flattened outputs and gradients of (loss × upstream) w.r.t. the float leaves, on fresh copies of ``args``."""
    args = [
        a.detach().clone().requires_grad_(a.requires_grad) if torch.is_tensor(a) and a.is_floating_point() else a
        for a in args
    ]
    out = module(*args, **kwargs)
    leaves = [a for a in args if torch.is_tensor(a) and a.requires_grad]
    grads = torch.autograd.grad((out[0] if isinstance(out, tuple) else out) * upstream, leaves)
    return out, grads


def _assert_same(name, ctor, args, kwargs=None, ours_ctor=None, dtype=torch.float32):
    """Our class and Liger's: same return structure, every element and every gradient within VS_LIGER[dtype]."""
    upstream = 0.5 + torch.rand(())
    theirs, their_grads = _run(
        getattr(chunked, f"LigerFusedLinear{name}Loss")(compiled=False, **ctor), args, kwargs or {}, upstream
    )
    ours, our_grads = _run(
        getattr(compat, f"LigerFusedLinear{name}Loss")(compiled=False, **ctor, **(ours_ctor or {})),
        args,
        kwargs or {},
        upstream,
    )
    assert type(ours) is type(theirs) and len(_flat(ours)) == len(_flat(theirs))
    if isinstance(theirs, tuple):
        assert [len(x) if isinstance(x, tuple) else None for x in ours] == [
            len(x) if isinstance(x, tuple) else None for x in theirs
        ]
    for i, (o, t) in enumerate(zip(_flat(ours), _flat(theirs))):
        assert o.shape == t.shape and o.dtype == torch.float32, f"output {i}: {o.shape}/{o.dtype} vs {t.shape}"
        assert i == 0 or not o.requires_grad, f"aux output {i} is not detached"
        err = _error(o, t)
        assert err <= VS_LIGER[dtype], f"output {i}: error {err:.2e} vs Liger ({o} vs {t})"
    for which, g, r in zip(("input", "weight", "bias"), our_grads, their_grads):
        err = relative_error(g, r)
        assert g.dtype == r.dtype == dtype and err <= VS_LIGER[dtype], f"grad {which}: {g.dtype} error {err:.1e}"
    return ours


def _pair_args(bias=True, ref=True, dtype=torch.float32):
    """Liger's preference call: (lin_weight, _input, target, bias[, ref_input, ref_weight, ref_bias])."""
    hidden, weight, b = _head((2 * B, T), bias, dtype=dtype)
    args = [weight, hidden, _targets((2 * B, T)), b]
    return args + _head((2 * B, T), grad=False, dtype=dtype) if ref else args


SMOOTHING = {"exo_pair": 0.1, "robust": 0.2}


@pytest.mark.parametrize("loss_type", sorted(chunked.LigerFusedLinearDPOLoss._SUPPORTED_LOSS_TYPES))
def test_dpo_matches_liger_for_every_liger_loss_type(loss_type):
    ctor = dict(loss_type=loss_type, label_smoothing=SMOOTHING.get(loss_type, 0.0), compute_nll_loss=True, alpha=0.5)
    _assert_same("DPO", ctor, _pair_args())


@pytest.mark.parametrize("strategy", ["grouped", "two_pass"])
@pytest.mark.parametrize("use_ref_model", [True, False])
def test_dpo_matches_liger_with_averaged_log_probs_and_both_strategies(strategy, use_ref_model):
    _assert_same(
        "DPO",
        dict(use_ref_model=use_ref_model, average_log_prob=True, beta=0.3),
        _pair_args(bias=False, ref=use_ref_model),
        ours_ctor=dict(strategy=strategy),
    )


@pytest.mark.parametrize(
    "ctor", [{}, dict(average_log_prob=True, label_smoothing=0.1, alpha=0.3), dict(compute_nll_loss=False, beta=0.5)]
)
def test_cpo_matches_liger(ctor):
    _assert_same("CPO", ctor, _pair_args(ref=False))


@pytest.mark.parametrize(
    "ctor", [{}, dict(gamma=0.1, label_smoothing=0.2, alpha=0.4, compute_nll_loss=True), dict(compute_nll_loss=False)]
)
def test_simpo_matches_liger(ctor):
    _assert_same("SimPO", ctor, _pair_args(ref=False))


@pytest.mark.parametrize("case", ["nll on target", "no nll", "nll_target"])
def test_orpo_matches_liger(case):
    args = _pair_args(ref=False)
    if case == "nll_target":
        args.append(_targets((2 * B, T), prompt=1))
    _assert_same("ORPO", dict(beta=0.2, compute_nll_loss=case != "no nll"), args)


def _kto_args(ref=True, kl=0.3):
    hidden, weight, b = _head((2 * B, T))
    labels = torch.tensor([True, False, False, True])
    return [hidden, weight, _targets((2 * B, T)), b, labels, *_head((2 * B, T), grad=False), torch.tensor(kl)]


@pytest.mark.parametrize("average_log_prob", [False, True])
@pytest.mark.parametrize("use_ref_model", [True, False])
def test_kto_matches_liger(use_ref_model, average_log_prob):
    _assert_same("KTO", dict(use_ref_model=use_ref_model, beta=0.2, average_log_prob=average_log_prob), _kto_args())


def _grpo_args(*, ref_head=False, ratio=None, old=True, padding=True, bias=True, dtype=torch.float32):
    """Liger's GRPO call: (_input, lin_weight, ids, attention_mask, advantages, bias, ref_logps, old_logps, ref head,
    vllm_is_ratio); cached log-probs near the policy's, so that some ratios clip."""
    hidden, weight, b = _head((2 * B, T), bias, dtype=dtype)
    ids, mask = torch.randint(0, V, (2 * B, T)), torch.ones(2 * B, T, dtype=torch.long)
    if padding:
        mask[0, -2:], mask[2, -5:] = 0, 0
    with torch.no_grad():
        logp = fused_linear_logprob(hidden, weight, ids, b)
    ref_logp, old_logp = logp + 0.3 * torch.randn_like(logp), logp + 0.2 * torch.randn_like(logp)
    shapes = {None: None, "[B, T]": (2 * B, T), "[B]": (2 * B,), "[B, 1]": (2 * B, 1)}
    vllm = None if ratio is None else torch.rand(shapes[ratio]) + 0.5
    if ratio == "[B, T]":
        vllm[mask == 0] = 1.0  # Liger sums vespo's log ratios over padding too
    head = _head((2 * B, T), grad=False, dtype=dtype) if ref_head else [None] * 3
    return [
        hidden,
        weight,
        ids,
        mask,
        torch.randn(2 * B),
        b,
        None if ref_head else ref_logp,
        old_logp if old else None,
        *head,
        vllm,
    ]


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"])
def test_grpo_matches_liger_for_every_loss_type(loss_type):
    ctor = dict(
        loss_type=loss_type,
        max_completion_length=T + 2 if loss_type == "dr_grpo" else None,
        epsilon_high=3.0 if loss_type == "cispo" else 0.25,
        beta=0.1,
    )
    # Liger's token-level luspo sums padding (documented difference): compare it without padding.
    _assert_same("GRPO", ctor, _grpo_args(padding=loss_type != "luspo"))


GRPO_CASES = {
    "sequence level, bias-corrected KL, delta": (
        dict(importance_sampling_level="sequence", loss_type="grpo", use_bias_correction_kl=True, delta=1.5),
        {},
    ),
    "reference head, temperature": (dict(temperature=0.7), dict(ref_head=True)),
    "no reference model": (dict(use_ref_model=False), {}),
    "beta 0": (dict(beta=0.0), dict(bias=False)),
    "vllm ratio [B, T]": ({}, dict(ratio="[B, T]")),
    "vllm ratio [B], on-policy": ({}, dict(ratio="[B]", old=False)),
    "vespo, vllm ratio [B, 1]": (dict(loss_type="vespo"), dict(ratio="[B, 1]")),
    "vespo, vllm ratio [B, T], on-policy": (dict(loss_type="vespo"), dict(ratio="[B, T]", old=False)),
}


@pytest.mark.parametrize("case", list(GRPO_CASES))
def test_grpo_matches_liger_with_options(case):
    ctor, args = GRPO_CASES[case]
    _assert_same("GRPO", ctor, _grpo_args(**args))


def test_bf16_dpo_and_grpo_match_liger_at_bf16_tolerance():
    _assert_same("DPO", dict(compute_nll_loss=True), _pair_args(dtype=torch.bfloat16), dtype=torch.bfloat16)
    # on-policy: Liger rounds bf16 logits to bf16, so an off-policy ratio near a clip edge may flip either way
    _assert_same("GRPO", {}, _grpo_args(ref_head=True, old=False, dtype=torch.bfloat16), dtype=torch.bfloat16)


def _jsd_args(teacher_v=V, teacher_d=D):
    """Liger's JSD call: student rows [N, D] then the teacher head, labels [N] with ignored rows."""
    hidden, weight, b = _head((13,))
    teacher = [torch.randn(13, teacher_d), torch.randn(teacher_v, teacher_d) / teacher_d**0.5, torch.randn(teacher_v)]
    labels = torch.randint(0, V, (13,))
    labels[:4] = IGNORE
    return [hidden, weight, teacher[0], teacher[1], labels, b, teacher[2]]


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_jsd_matches_liger_with_soft_and_hard_losses(beta):
    _assert_same("JSD", dict(beta=beta, temperature=2.0, weight_hard_loss=0.3, return_soft_hard_loss=True), _jsd_args())


def test_jsd_matches_liger_with_a_larger_teacher_vocabulary_and_hidden_size():
    _assert_same("JSD", dict(weight_hard_loss=0.0, weight_soft_loss=0.7), _jsd_args(teacher_v=V + 5, teacher_d=D + 4))


@pytest.mark.parametrize("name", CLASSES)
def test_constructor_and_forward_take_liger_arguments_in_liger_order_with_liger_defaults(name):
    ours, theirs = getattr(compat, f"LigerFusedLinear{name}Loss"), getattr(chunked, f"LigerFusedLinear{name}Loss")
    for method in ("__init__", "forward"):
        mine = list(inspect.signature(getattr(ours, method)).parameters.values())
        liger = list(inspect.signature(getattr(theirs, method)).parameters.values())
        assert [(p.name, p.default, p.kind) for p in mine[: len(liger)]] == [(p.name, p.default, p.kind) for p in liger]
        assert all(p.kind == p.KEYWORD_ONLY for p in mine[len(liger) :]), (
            f"{name}.{method}: extras must be keyword-only"
        )
    module = ours()
    assert all(
        getattr(module, p) == v.default for p, v in inspect.signature(theirs.__init__).parameters.items() if p != "self"
    )


def test_ipo_works_and_matches_the_float64_reference_where_liger_raises():
    with pytest.raises((ValueError, NotImplementedError)):
        chunked.LigerFusedLinearDPOLoss(loss_type="ipo")
    weight, hidden, target, bias, *ref = _pair_args()
    upstream = 0.5 + torch.rand(())
    loss, aux = compat.LigerFusedLinearDPOLoss(loss_type="ipo", beta=0.5)(weight, hidden, target, bias, *ref)
    grads = torch.autograd.grad(loss * upstream, (hidden, weight, bias))
    leaves = [x.detach().double().requires_grad_(True) for x in (hidden, weight, bias)]
    expect = reference_fused_linear_dpo_loss(
        *leaves[:2], target, leaves[2], ref_hidden=ref[0], ref_weight=ref[1], ref_bias=ref[2], loss_type="ipo", beta=0.5
    )
    assert_close(loss, expect.loss, torch.float32, "ipo loss")
    for name, g, r in zip(
        ("hidden", "weight", "bias"), grads, torch.autograd.grad(expect.loss * upstream.double(), leaves)
    ):
        assert_close(g, r, torch.float32, f"ipo grad {name}")
    assert_close(
        torch.stack((aux[0].mean(), aux[1].mean())),
        torch.stack((expect.metrics["logps/chosen"], expect.metrics["logps/rejected"])),
        torch.float32,
    )


def test_sigmoid_label_smoothing_is_applied_where_liger_ignores_it():
    args = _pair_args()

    def reference(eps):
        weight, hidden, target, bias, *ref = args
        return reference_fused_linear_dpo_loss(
            hidden.detach(),
            weight.detach(),
            target,
            bias.detach(),
            ref_hidden=ref[0],
            ref_weight=ref[1],
            ref_bias=ref[2],
            label_smoothing=eps,
            beta=2.0,
        ).loss

    ours = compat.LigerFusedLinearDPOLoss(label_smoothing=0.2, beta=2.0)(*args)[0]
    theirs = chunked.LigerFusedLinearDPOLoss(label_smoothing=0.2, beta=2.0, compiled=False)(*args)[0]
    assert_close(ours, reference(0.2), torch.float32, "cDPO")
    assert_close(theirs, reference(0.0), torch.float32, "Liger = plain DPO")
    assert relative_error(reference(0.2), reference(0.0)) > 1e-3


@pytest.mark.parametrize("average_log_prob", [False, True])
def test_dpo_cached_reference_log_probs_equal_the_reference_head(average_log_prob):
    weight, hidden, target, bias, ref_hidden, ref_weight, ref_bias = _pair_args()
    ref_seq = fused_linear_logprob(ref_hidden, ref_weight, target, ref_bias).sum(-1)
    if average_log_prob:
        ref_seq = ref_seq / (target != IGNORE).sum(-1)
    loss_fn = compat.LigerFusedLinearDPOLoss(average_log_prob=average_log_prob, compute_nll_loss=True)
    head = _run(loss_fn, [weight, hidden, target, bias, ref_hidden, ref_weight, ref_bias], {}, 1.0)
    cached = _run(
        loss_fn, [weight, hidden, target, bias], dict(ref_chosen_logps=ref_seq[:B], ref_rejected_logps=ref_seq[B:]), 1.0
    )
    for i, (a, b) in enumerate(zip(_flat(head[0]) + list(head[1]), _flat(cached[0]) + list(cached[1]))):
        assert _error(a, b) <= 1e-5, f"element {i}: error {_error(a, b):.2e}"


@pytest.mark.parametrize("average_log_prob", [False, True])
def test_kto_cached_reference_log_probs_equal_the_reference_head(average_log_prob):
    hidden, weight, target, bias, labels, ref_hidden, ref_weight, ref_bias, kl = _kto_args()
    loss_fn = compat.LigerFusedLinearKTOLoss(use_ref_model=True, average_log_prob=average_log_prob)
    head = _run(loss_fn, [hidden, weight, target, bias, labels, ref_hidden, ref_weight, ref_bias, kl], {}, 1.0)
    ref_logps = fused_linear_logprob(ref_hidden, ref_weight, target, ref_bias).sum(-1)
    if average_log_prob:  # cached in the form the class returns
        ref_logps = ref_logps / (target != IGNORE).sum(-1)
    cached = _run(loss_fn, [hidden, weight, target, bias, labels, None, None, None, kl], dict(ref_logps=ref_logps), 1.0)
    for i, (a, b) in enumerate(zip(_flat(head[0]) + list(head[1]), _flat(cached[0]) + list(cached[1]))):
        assert _error(a, b) <= 1e-5, f"element {i}: error {_error(a, b):.2e}"


@pytest.mark.parametrize("kl_estimator", ["k1", "k2"])
def test_grpo_kl_estimator_option_matches_the_float64_reference(kl_estimator):
    hidden, weight, ids, mask, adv, bias, ref_logp, old_logp, *_ = _grpo_args()
    loss, (kl, clipped) = compat.LigerFusedLinearGRPOLoss(beta=0.5, kl_estimator=kl_estimator)(
        hidden, weight, ids, mask, adv, bias, ref_logp, old_logp
    )
    grads = torch.autograd.grad(loss, (hidden, weight))
    leaves = [x.detach().double().requires_grad_(True) for x in (hidden, weight)]
    expect = reference_fused_linear_grpo_loss(
        *leaves,
        ids,
        bias.detach(),
        advantages=adv,
        mask=mask.bool(),
        ref_logp=ref_logp,
        old_logp=old_logp,
        beta=0.5,
        kl_estimator=kl_estimator,
    )
    for name, value, exact in (("loss", loss, expect.loss), ("kl", kl, expect.metrics["kl"])):
        assert _error(value, exact) <= 1e-5, f"{name}: error {_error(value, exact):.2e}"  # k1 and A: signed terms
    assert_close(clipped, expect.metrics["clip_ratio/region_mean"], torch.float32, "clip ratio")
    for g, r in zip(grads, torch.autograd.grad(expect.loss, leaves)):
        assert_close(g, r, torch.float32, "grad")


def test_unsupported_or_missing_arguments_raise_naming_them():
    with pytest.raises(ValueError, match="loss_type"):
        compat.LigerFusedLinearDPOLoss(loss_type="orpo")
    with pytest.raises(ValueError, match="label_smoothing"):
        compat.LigerFusedLinearDPOLoss(loss_type="exo_pair")
    with pytest.raises(ValueError, match="sapo"):
        compat.LigerFusedLinearGRPOLoss(sapo_temperature_neg=0.0)
    with pytest.raises(ValueError, match="ref_input"):
        compat.LigerFusedLinearDPOLoss()(*_pair_args(ref=False))
    hidden, weight, target, bias, labels, *_ = _kto_args()
    with pytest.raises(ValueError, match="kl"):
        compat.LigerFusedLinearKTOLoss()(hidden, weight, target, bias, labels, kl=torch.zeros(2 * B))
    with pytest.raises(ValueError, match="preference_labels"):
        compat.LigerFusedLinearKTOLoss()(hidden, weight, target, bias)
    with pytest.raises(ValueError, match="use_ref_model=False"):
        compat.LigerFusedLinearKTOLoss()(hidden, weight, target, bias, labels, ref_logps=torch.zeros(2 * B))
    args = _grpo_args(ratio="[B]")
    args[-1] = torch.ones(3)
    with pytest.raises(ValueError, match="vllm_is_ratio"):
        compat.LigerFusedLinearGRPOLoss()(*args)
