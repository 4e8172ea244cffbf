"""Group advantages (GRPO, Dr. GRPO) and RLOO vs per-group float64 loops."""

import pytest
import torch

from hotloop.kernels.losses.advantages import (
    group_advantages,
    reference_group_advantages,
    reference_rloo_advantages,
    rloo_advantages,
)
from tests.helpers import assert_close


@pytest.mark.parametrize("scale", ["std", "none"])
@pytest.mark.parametrize("layout", ["flat", "2d"])
def test_group_advantages_match_per_group_reference(scale, layout):
    r = torch.randn(7 * 5)
    inp = r if layout == "flat" else r.view(7, 5)
    out = group_advantages(inp, 5, scale=scale, eps=1e-4)
    assert_close(out, reference_group_advantages(r, 5, scale, 1e-4), torch.float32, scale)


def test_group_with_equal_rewards_gives_zero_advantages_not_nan():
    r = torch.randn(4).repeat_interleave(3)
    out = group_advantages(r, 3)
    assert torch.isfinite(out).all() and out.abs().max() < 1e-5


def test_rloo_matches_leave_one_out_reference():
    r = torch.randn(6 * 4)
    assert_close(rloo_advantages(r, 4), reference_rloo_advantages(r, 4), torch.float32, "rloo")


def test_bad_group_size_is_an_error():
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.randn(10), 3)
    with pytest.raises(ValueError, match="group_size"):
        rloo_advantages(torch.randn(10), 1)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.randn(10), 5, scale="max")
