"""segment_sum and unpack over packed sequences vs slice-per-segment loops."""

import pytest
import torch

from hotloop.kernels.losses.segments import reference_segment_sum, reference_unpack, segment_sum, unpack
from tests.helpers import assert_close


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_matches_reference_with_empty_segments_and_trailing_padding(dtype, index_dtype):
    cu = torch.tensor([0, 5, 5, 12, 13, 20], dtype=index_dtype)
    values = torch.randn(23).to(dtype).requires_grad_()
    out = segment_sum(values, cu)
    assert_close(out, reference_segment_sum(values.detach(), cu), dtype, "segment sums")
    g = torch.randn(5)
    (grad,) = torch.autograd.grad(out, values, g.to(dtype))
    expect = torch.cat([g.to(dtype).repeat_interleave((cu[1:] - cu[:-1]).long()), torch.zeros(3, dtype=dtype)])
    torch.testing.assert_close(grad, expect)


def test_bad_cu_seqlens_is_an_error():
    with pytest.raises(ValueError, match="cu_seqlens"):
        segment_sum(torch.randn(4), torch.tensor([0.0, 4.0]))


def test_unpack_pads_each_segment_and_is_differentiable():
    cu = torch.tensor([0, 4, 4, 9, 10], dtype=torch.int32)
    values, mask = torch.randn(12, requires_grad=True), torch.rand(12) > 0.3
    padded, padded_mask, none = unpack(cu, ("values", "mask", "x"), values, mask, None)
    assert none is None and padded.shape == (4, 5) and padded_mask.dtype == torch.bool
    torch.testing.assert_close(padded, reference_unpack(values.detach(), cu))
    assert torch.equal(padded_mask, reference_unpack(mask, cu))
    g = torch.randn(4, 5)
    (grad,) = torch.autograd.grad(padded, values, g)
    torch.testing.assert_close(grad, torch.cat([g[0, :4], g[2, :5], g[3, :1], torch.zeros(2)]))


def test_unpack_checks_shapes_and_boundaries():
    with pytest.raises(ValueError, match="mask"):
        unpack(torch.tensor([0, 3]), ("logp", "mask"), torch.randn(4), torch.ones(3))
    with pytest.raises(ValueError, match="cu_seqlens"):
        unpack(torch.tensor([0, 5]), ("logp",), torch.randn(4))
    with pytest.raises(ValueError, match="cu_seqlens"):
        unpack(torch.tensor([0, 3, 2]), ("logp",), torch.randn(4))
