"""Helpers shared by the tests: dtype tolerances, relative error, poisoning, scalar checks, equal run states."""

import torch

from hotloop.kernels._fused_linear_common import reference_padded

# Relative error ‖out − ref‖ / ‖ref‖ allowed against a float64 reference, by input dtype.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 5e-3, torch.float64: 1e-10}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / max(‖ref‖, tiny), in float64; NaN or Inf anywhere gives inf."""
    out64, ref64 = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out64).all():
        return float("inf")
    return ((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30)).item()


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    """Assert ``out`` matches the float64 ``ref`` within the tolerance for ``dtype``."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    err = relative_error(out, ref)
    assert err <= TOLERANCE[dtype], f"{what}: relative error {err:.3e} > {TOLERANCE[dtype]:.0e} ({dtype})"


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` with NaN (floats) or a sentinel (ints) so unwritten outputs cannot pass."""
    return t.fill_(float("nan") if t.is_floating_point() else -(2**31))


def assert_scalar_close(out, ref, dtype, what, scale=1.0):
    """Scalar within the dtype tolerance of max(|ref|, scale): rewards are differences of O(10) log-prob sums, so
    fp32 sums (absolute error ~1e-6) leave ~1e-6 absolute error however small the difference is."""
    err = abs(out.item() - ref.item()) / max(abs(ref.item()), scale)
    assert err <= TOLERANCE[dtype], f"{what}: error {err:.3e} > {TOLERANCE[dtype]:.0e} ({dtype})"


def logit_scale(hidden, weight, bias, targets, mask=None, cu_seqlens=None, temperature=1.0, **_):
    """(mean, total) over active tokens of mean_v |logits| / temperature, float64: the size of the summands of the
    logits metrics. With zero-mean random weights the mean logit cancels to far below it, where no fp32 sum gets
    a relative 1e-5 of the result; the metrics are held to 1e-5 of max(|exact|, this scale)."""
    h, _, m = reference_padded(hidden.detach().double(), targets, mask, cu_seqlens, -100)
    x = h @ weight.detach().double().T + (0.0 if bias is None else bias.detach().double())
    total = ((x / temperature).abs().mean(-1) * m).sum().item()
    return total / max(m.sum().item(), 1.0), total


def assert_same_final_state(state: tuple[dict, list[dict]], reference: tuple[dict, list[dict]], steps: int) -> None:
    """Two runs' ``(weights by checkpoint file, metric records)`` are equal: every step logged, tensors bit-equal."""
    (weights, records), (ref_weights, ref_records) = state, reference
    assert [r["step"] for r in records] == list(range(steps))
    assert records == ref_records
    for name, tensors in ref_weights.items():
        assert tensors.keys() == weights[name].keys()
        for key, tensor in tensors.items():
            assert torch.equal(weights[name][key], tensor), f"{name}.{key}"
