"""Property-based fuzzing (hypothesis) of the public kernel functions: random shapes (empty included),
dtypes, masks (bool, 0/1, fractional, int), ignore patterns, extreme logits and tensors on the wrong
device ("meta" stands in for a second device on a CPU-only machine). Every call either matches the
float64 reference at its dtype's tolerance or raises a ValueError/TypeError naming the argument."""

import pytest
import torch

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from hotloop.kernels import (
    dpo_loss,
    fused_linear_logprob,
    kl_penalty,
    policy_gradient_loss,
    reference_fused_linear_logprob,
    sft_loss,
)
from hotloop.kernels.losses.kl_penalty import reference_kl_per_token
from hotloop.kernels.losses.policy_gradient import reference_policy_gradient_loss
from hotloop.kernels.losses.sft import reference_sft_loss
from tests.faults.tally import case

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2}
FAULTS = ("none", "wrong_device", "wrong_dtype", "wrong_shape")


def close(got, want, dtype):
    want = torch.as_tensor(want, dtype=torch.float64)
    err = (got.double() - want).abs().max().item() if got.numel() else 0.0
    assert err <= TOL[dtype] * (1 + want.abs().max().item() if want.numel() else 1), err


def inject(fault, tensor, *, integer=False):
    """``tensor`` with one fault: on the meta device, of a wrong dtype, or of a wrong shape."""
    if fault == "wrong_device":
        return tensor.to("meta")
    if fault == "wrong_dtype":
        return tensor.to(torch.complex64) if not integer else tensor.to(torch.float32)
    if fault == "wrong_shape":
        return torch.cat([tensor, tensor[:1]]) if tensor.shape[0] else torch.zeros((1, *tensor.shape[1:]))
    return tensor


def call(fn, name, fault):
    """Run ``fn``; a fault must give a ValueError/TypeError naming ``name``; returns the result or None."""
    try:
        out = fn()
    except (ValueError, TypeError) as err:
        assert fault != "none" and name in str(err), f"{type(err).__name__}: {err}"
        case(clear_error=True)
        return None
    assert fault == "none" or (fault == "wrong_dtype" and name == "mask"), f"{fault} on {name} was accepted"
    case()
    return out


@st.composite
def token_batch(draw):
    b, t = draw(st.integers(0, 4)), draw(st.integers(1, 6))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    scale = draw(st.sampled_from([1.0, 30.0]))
    logp = -(torch.rand(b, t, generator=g, dtype=torch.float64) * scale).to(dtype)
    kind = draw(st.sampled_from(["bool", "01", "fraction", "int"]))
    raw = torch.rand(b, t, generator=g)
    mask = {"bool": raw > 0.3, "01": (raw > 0.3).float(), "fraction": raw * (raw > 0.3), "int": (raw > 0.3).long()}[
        kind
    ]
    return logp, mask, torch.randn(b, generator=g, dtype=torch.float64).to(dtype), g


@SETTINGS
@given(
    token_batch(),
    st.sampled_from(["token", "sequence"]),
    st.sampled_from(FAULTS),
    st.sampled_from(["advantages", "mask"]),
)
def test_policy_gradient_loss_is_right_or_names_the_argument(batch, normalize, fault, target):
    logp, mask, adv, _ = batch
    args = {"advantages": adv, "mask": mask}
    args[target] = inject(fault, args[target])
    out = call(lambda: policy_gradient_loss(logp, args["advantages"], args["mask"], normalize=normalize), target, fault)
    if out is not None:
        close(out.loss, reference_policy_gradient_loss(logp, adv, mask, normalize), logp.dtype)


@SETTINGS
@given(
    token_batch(), st.sampled_from(FAULTS), st.sampled_from(["ref_logp", "mask"]), st.sampled_from(["k1", "k2", "k3"])
)
def test_kl_penalty_is_right_or_names_the_argument(batch, fault, target, estimator):
    logp, mask, _, g = batch
    ref = logp + 0.1 * torch.randn(logp.shape, generator=g, dtype=torch.float64).to(logp.dtype)
    args = {"ref_logp": ref, "mask": mask}
    args[target] = inject(fault, args[target])
    out = call(lambda: kl_penalty(logp, args["mask"], ref_logp=args["ref_logp"], kl_estimator=estimator), target, fault)
    if out is not None:
        m = (mask != 0).double()
        want = (reference_kl_per_token(logp, ref, estimator) * m).sum() / m.sum().clamp_min(1.0)
        close(out, want, logp.dtype)


@SETTINGS
@given(token_batch(), st.sampled_from(FAULTS), st.sampled_from(["mask", "weights"]))
def test_sft_loss_is_right_or_names_the_argument(batch, fault, target):
    logp, mask, weights, _ = batch
    args = {"mask": mask, "weights": weights.abs()}
    args[target] = inject(fault, args[target])
    out = call(lambda: sft_loss(logp, args["mask"], weights=args["weights"]), target, fault)
    if out is not None:
        close(out.loss, reference_sft_loss(logp, mask, weights.abs(), "token"), logp.dtype)


@SETTINGS
@given(
    st.integers(0, 5),
    st.sampled_from([torch.float32, torch.float64]),
    st.sampled_from(FAULTS),
    st.sampled_from(["rejected_logps", "ref_chosen_logps"]),
    st.integers(0, 2**31),
)
def test_dpo_loss_is_right_or_names_the_argument_and_an_empty_batch_is_zero(n, dtype, fault, target, seed):
    g = torch.Generator().manual_seed(seed)
    x = {
        k: -torch.rand(n, generator=g, dtype=torch.float64).to(dtype) * 5
        for k in ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
    }
    policy = x["chosen_logps"].clone().requires_grad_(True)
    args = dict(x, chosen_logps=policy)
    args[target] = inject(fault, args[target])
    out = call(lambda: dpo_loss(**args, beta=0.1), target, fault)
    if out is not None:
        rho = 0.1 * ((x["chosen_logps"] - x["ref_chosen_logps"]) - (x["rejected_logps"] - x["ref_rejected_logps"]))
        want = -torch.nn.functional.logsigmoid(rho.double()).mean() if n else torch.zeros((), dtype=torch.float64)
        close(out.loss, want, dtype)
        out.loss.backward()
        assert torch.isfinite(policy.grad).all() and (n or policy.grad.numel() == 0)


@SETTINGS
@given(
    st.integers(0, 3),
    st.integers(1, 4),
    st.integers(1, 9),
    st.sampled_from([torch.float32, torch.bfloat16]),
    st.sampled_from([1.0, 80.0]),
    st.floats(0.0, 1.0),
    st.sampled_from(FAULTS + ("masked_vocab",)),
    st.integers(0, 2**31),
)
def test_fused_linear_logprob_is_right_or_names_the_argument(b, t, v, dtype, scale, ignored, fault, seed):
    g = torch.Generator().manual_seed(seed)
    d = 4
    hidden = (torch.randn(b, t, d, generator=g) * scale).to(dtype).requires_grad_(True)
    weight = torch.randn(v, d, generator=g).to(dtype)
    targets = torch.randint(0, v, (b, t), generator=g)
    targets[torch.rand(b, t, generator=g) < ignored] = -100
    bias = torch.zeros(v, dtype=dtype)
    if fault == "masked_vocab":  # a bias that rules out all but the first token: -inf logits everywhere else
        bias[1:] = float("-inf")
        targets[targets > 0] = 0
        fault = "none"
    args = {"targets": targets, "bias": bias}
    target = "targets" if seed % 2 else "bias"
    args[target] = inject(fault, args[target], integer=target == "targets")
    out = call(
        lambda: fused_linear_logprob(hidden, weight, args["targets"], args["bias"], return_entropy=True), target, fault
    )
    if out is not None:
        logp, entropy = out
        want_logp, want_entropy = reference_fused_linear_logprob(hidden, weight, targets, bias, return_entropy=True)
        close(logp, want_logp, dtype)
        close(entropy, torch.nan_to_num(want_entropy), dtype)
        (logp.sum() + entropy.sum()).backward()
        assert hidden.grad is None or torch.isfinite(hidden.grad).all()
