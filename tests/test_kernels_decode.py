"""scatter_add_ (dense decode of N ranks' sparse payloads), both backends against the oracle.

In the kernel, repeated indices meet in fp32 atomics whose order is not fixed. With values
that are small multiples of 1/4 every partial sum is exact, so those results must be
bit-identical; arbitrary values get a tolerance of a few ulps of the sum (the CPU backend
adds in index order, as the oracle does, and must match it exactly).
"""

import pytest
import torch

import kernel_oracle as oracle
from conftest import BACKENDS, KERNEL_DEVICE, kernel_impl, requires_triton

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [1, 7, 1000, 4099]


def _scatter(out, idx, vals, backend="triton"):
    return kernel_impl(backend, "scatter_add_")(out, idx, vals)


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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("stride", [1, 2])
def test_scatter_add_matches_oracle(backend, dtype, idx_dtype, n, stride):
    m = 3 * n  # like three ranks each sending n entries: every element hit ~3 times
    idx, vals = _payload(n, m, idx_dtype, dtype, stride, seed=n)
    base = torch.randint(-8, 8, (n,)).float().to(KERNEL_DEVICE)
    out = base.clone()
    assert _scatter(out, idx, vals, backend) is out
    assert torch.equal(out.cpu(), oracle.scatter_add(base, idx, vals))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_scatter_add_arbitrary_values(backend, dtype):
    n, m = 4099, 3 * 4099
    idx, vals = _payload(n, m, torch.int64, dtype, seed=1, exact=False)
    out = _scatter(torch.zeros(n, device=KERNEL_DEVICE), idx, vals, backend).cpu()
    want = oracle.scatter_add(torch.zeros(n), idx, vals)
    if backend == "cpu":
        assert torch.equal(out, want)
    else:
        torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scatter_add_into_a_strided_view(backend):
    """``out`` a view with stride 3: updates land through it, its neighbours stay put."""
    n = 1000
    buf = torch.randn(3 * n, device=KERNEL_DEVICE)
    untouched = buf.clone()
    out = buf[::3]
    idx, vals = _payload(n, 2 * n, torch.int32, torch.float32, seed=2)
    _scatter(out, idx, vals, backend)
    assert torch.equal(out.cpu(), oracle.scatter_add(untouched[::3], idx, vals))
    others = torch.ones(3 * n, dtype=torch.bool, device=KERNEL_DEVICE)
    others[::3] = False
    assert torch.equal(buf[others], untouched[others])


@pytest.mark.parametrize("backend", BACKENDS)
def test_scatter_add_empty(backend):
    out = torch.ones(5, device=KERNEL_DEVICE)
    empty_idx = torch.zeros(0, dtype=torch.int64, device=KERNEL_DEVICE)
    empty_vals = torch.zeros(0, device=KERNEL_DEVICE)
    assert torch.equal(_scatter(out, empty_idx, empty_vals, backend), torch.ones(5, device=KERNEL_DEVICE))
    assert _scatter(torch.zeros(0, device=KERNEL_DEVICE), empty_idx, empty_vals, backend).numel() == 0


def test_scatter_add_out_of_range_raises_on_the_cpu_backend():
    with pytest.raises((IndexError, RuntimeError)):
        _scatter(torch.zeros(5), torch.tensor([0, 5]), torch.tensor([1.0, 2.0]), "cpu")


@requires_triton
def test_scatter_add_kernel_drops_out_of_range():
    # The CPU backend raises on an index outside [0, n); the kernel drops it and keeps the rest,
    # without touching memory beside ``out``.
    buf = torch.zeros(9, device=KERNEL_DEVICE)
    out = buf[2:7]
    idx = torch.tensor([0, 5, -1, 4, 1000], device=KERNEL_DEVICE)
    _scatter(out, idx, torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], device=KERNEL_DEVICE))
    assert buf.cpu().tolist() == [0, 0, 1, 0, 0, 0, 4, 0, 0]


@requires_triton
def test_scatter_add_kernel_rejects_bad_arguments():
    out = torch.zeros(4, device=KERNEL_DEVICE)
    idx, vals = torch.zeros(1, dtype=torch.int64, device=KERNEL_DEVICE), torch.zeros(1, device=KERNEL_DEVICE)
    with pytest.raises(ValueError):
        _scatter(out, idx.repeat(3), vals.repeat(2))
    with pytest.raises(TypeError):
        _scatter(out.double(), idx, vals)
    with pytest.raises(TypeError):
        _scatter(out, vals, vals)  # float indices


@pytest.mark.parametrize("backend", BACKENDS)
def test_scatter_add_large(backend):
    """>= 1M entries of four ranks' payloads concatenated, one launch."""
    n, m = 1 << 20, (1 << 20) + 9
    idx, vals = _payload(n, m, torch.int32, torch.float32, seed=4)
    out = _scatter(torch.zeros(n, device=KERNEL_DEVICE), idx, vals, backend)
    assert torch.equal(out.cpu(), oracle.scatter_add(torch.zeros(n), idx, vals))
