"""segment_sum over packed sequences vs a slice-per-segment float64 loop."""

import pytest
import torch

from hotloop.kernels.losses.segments import reference_segment_sum, segment_sum
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
