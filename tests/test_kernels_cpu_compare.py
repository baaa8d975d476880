"""The CPU backend's NumPy compares and ``nonzero`` (``kernels/cpu/compare.py``) return exactly
what the plain torch expression in each docstring returns: NaN, ±inf, ±0, strided and
unaligned views, fp16/bf16 (torch's path), and bounds the tensor's dtype cannot hold."""
import math

import pytest
import torch

from hvdcomp.kernels.cpu import compare


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 63, 64, 1000, 100_003])
@pytest.mark.parametrize("density", [0.0, 0.001, 0.05, 0.5, 1.0])
def test_nonzero_sparse_is_nonzero(n, density):
    m = torch.rand(n, generator=torch.Generator().manual_seed(n)) < density
    assert torch.equal(compare.nonzero_sparse(m), m.nonzero().squeeze(1))
    assert torch.equal(compare.nonzero_sparse(m[3:]), m[3:].nonzero().squeeze(1))  # unaligned
    assert torch.equal(compare.nonzero_sparse(m[::3]), m[::3].nonzero().squeeze(1))  # strided


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_magnitude_and_plain_compares_equal_torchs(dtype):
    x = torch.randn(5000, generator=torch.Generator().manual_seed(2)).to(dtype)
    x[:6] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 0.5])
    for bound in (0.0, 0.5, 1.25, math.inf):
        assert torch.equal(compare.magnitude_at_least(x, bound), x.abs() >= bound)
        assert torch.equal(compare.magnitude_at_least(x[::2], bound), x[::2].abs() >= bound)
        assert torch.equal(compare.at_least(x, bound), x >= bound)
    key = x.float().view(torch.int32) & 0x7FFFFFFF
    t = int(key[100])
    assert torch.equal(compare.at_least(key, t), key >= t)
    ints = torch.arange(-5, 6, dtype=torch.int32)  # a fractional bound against integers
    assert torch.equal(compare.at_least(ints, 2.5), ints >= 2.5)
    assert torch.equal(compare.less(ints, -0.5), ints < -0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int32])
def test_less_equals_torchs(dtype):
    a = (torch.randn(3001, generator=torch.Generator().manual_seed(8)) * 10).to(dtype)
    b = (torch.randn(3001, generator=torch.Generator().manual_seed(9)) * 10).to(dtype)
    if dtype.is_floating_point:
        a[:3] = torch.tensor([float("nan"), float("inf"), -0.0])
        b[:3] = torch.tensor([1.0, float("nan"), 0.0])
    assert torch.equal(compare.less(a, b), a < b)
    assert torch.equal(compare.less(a, 0), a < 0)
    assert torch.equal(compare.less(a[::2], b[::2]), a[::2] < b[::2])
