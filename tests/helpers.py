"""Numerical helpers shared by the tests: dtype tolerances, relative error, poisoning."""

import torch

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
