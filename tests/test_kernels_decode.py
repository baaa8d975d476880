"""Triton scatter_add_ (dense decode of N ranks' sparse payloads) against the reference.

Repeated indices meet in fp32 atomics whose order is not fixed. With values that are
small multiples of 1/4 every partial sum is exact, so those results must be bit-identical;
arbitrary values get a tolerance of a few ulps of the sum.
"""

import pytest
import torch

from conftest import KERNEL_DEVICE, requires_triton, spy_on_triton
from hvdcomp import kernels
from hvdcomp.kernels import reference

pytestmark = requires_triton

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [1, 7, 1000, 4099]


def _scatter(out, idx, vals):
    return kernels.triton_impl("scatter_add_")(out, idx, vals)


def _payload(n, m, idx_dtype, dtype, stride=1, seed=0, exact=True):
    """m (index, value) pairs into [0, n), repeats likely (as N ranks' concatenated payloads)."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (m * stride,), generator=gen).to(idx_dtype)
    if exact:
        vals = torch.randint(-40, 40, (m * stride,), generator=gen).float() / 4
    else:
        vals = torch.randn(m * stride, generator=gen)
    idx, vals = idx.to(KERNEL_DEVICE), vals.to(dtype).to(KERNEL_DEVICE)
    return (idx[::stride], vals[::stride]) if stride > 1 else (idx, vals)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("stride", [1, 2])
def test_scatter_add_matches_reference(dtype, idx_dtype, n, stride):
    m = 3 * n  # like three ranks each sending n entries: every element hit ~3 times
    idx, vals = _payload(n, m, idx_dtype, dtype, stride, seed=n)
    base = torch.randint(-8, 8, (n,)).float().to(KERNEL_DEVICE)
    out = base.clone()
    assert _scatter(out, idx, vals) is out
    assert torch.equal(out, reference.scatter_add_(base.clone(), idx, vals))


@pytest.mark.parametrize("dtype", DTYPES)
def test_scatter_add_arbitrary_values(dtype):
    n, m = 4099, 3 * 4099
    idx, vals = _payload(n, m, torch.int64, dtype, seed=1, exact=False)
    out = _scatter(torch.zeros(n, device=KERNEL_DEVICE), idx, vals)
    want = reference.scatter_add_(torch.zeros(n, device=KERNEL_DEVICE), idx, vals)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)


def test_scatter_add_into_a_strided_view():
    """``out`` a view with stride 3: updates land through it, its neighbours stay put."""
    n = 1000
    buf = torch.randn(3 * n, device=KERNEL_DEVICE)
    untouched = buf.clone()
    out = buf[::3]
    idx, vals = _payload(n, 2 * n, torch.int32, torch.float32, seed=2)
    _scatter(out, idx, vals)
    assert torch.equal(out, reference.scatter_add_(untouched[::3].clone(), idx, vals))
    others = torch.ones(3 * n, dtype=torch.bool, device=KERNEL_DEVICE)
    others[::3] = False
    assert torch.equal(buf[others], untouched[others])


def test_scatter_add_empty_and_out_of_range():
    out = torch.ones(5, device=KERNEL_DEVICE)
    empty_idx = torch.zeros(0, dtype=torch.int64, device=KERNEL_DEVICE)
    empty_vals = torch.zeros(0, device=KERNEL_DEVICE)
    assert torch.equal(_scatter(out, empty_idx, empty_vals), torch.ones(5, device=KERNEL_DEVICE))
    assert _scatter(torch.zeros(0, device=KERNEL_DEVICE), empty_idx, empty_vals).numel() == 0
    # The reference raises on an index outside [0, n); the kernel drops it and keeps the rest,
    # without touching memory beside ``out``.
    buf = torch.zeros(9, device=KERNEL_DEVICE)
    out = buf[2:7]
    idx = torch.tensor([0, 5, -1, 4, 1000], device=KERNEL_DEVICE)
    _scatter(out, idx, torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], device=KERNEL_DEVICE))
    assert buf.cpu().tolist() == [0, 0, 1, 0, 0, 0, 4, 0, 0]


def test_scatter_add_rejects_bad_arguments():
    out = torch.zeros(4, device=KERNEL_DEVICE)
    idx, vals = torch.zeros(1, dtype=torch.int64, device=KERNEL_DEVICE), torch.zeros(1, device=KERNEL_DEVICE)
    with pytest.raises(ValueError):
        _scatter(out, idx.repeat(3), vals.repeat(2))
    with pytest.raises(TypeError):
        _scatter(out.double(), idx, vals)
    with pytest.raises(TypeError):
        _scatter(out, vals, vals)  # float indices


def test_scatter_add_large():
    """>= 1M entries of four ranks' payloads concatenated, one launch."""
    n, m = 1 << 20, (1 << 20) + 9
    idx, vals = _payload(n, m, torch.int32, torch.float32, seed=4)
    out = _scatter(torch.zeros(n, device=KERNEL_DEVICE), idx, vals)
    assert torch.equal(out, reference.scatter_add_(torch.zeros(n, device=KERNEL_DEVICE), idx, vals))


def test_env_forces_triton_dispatch(monkeypatch):
    calls = spy_on_triton(monkeypatch, "scatter_add_")
    idx, vals = _payload(50, 100, torch.int64, torch.bfloat16, seed=5)
    monkeypatch.setenv("HVDCOMP_KERNELS", "triton")
    got = kernels.scatter_add_(torch.zeros(50, device=KERNEL_DEVICE), idx, vals)
    assert calls == ["scatter_add_"]
    assert torch.equal(got, reference.scatter_add_(torch.zeros(50, device=KERNEL_DEVICE), idx, vals))
