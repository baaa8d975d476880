"""Triton threshold selection (count, compaction, sampled threshold, exact top-k) against
the reference. Every result here is exact: counts, indices, thresholds and gathered values.

Top-k is a radix select over the bits of ``|x|`` (3 passes of 11/10/10 bits) followed by a
tie fill in index order that crosses block boundaries; the cases below put ties inside and
across the 4096-element blocks, distinct keys that differ only in the lowest mantissa bits
(decided by the last pass), signed zeros and infinities.
"""

import pytest
import torch

from conftest import KERNEL_DEVICE, kernel_scalar, kernel_vector, requires_triton, spy_on_triton
from hvdcomp import kernels
from hvdcomp.kernels import reference

pytestmark = requires_triton

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [0, 1, 7, 1000, 4099]
BLOCK = 4096  # kernels/topk.py's program size: cases below straddle it


def _impl(name):
    return kernels.triton_impl(name)


def _check_topk(x, k):
    got = _impl("topk_indices")(x, k)
    want = reference.topk_indices(x, k)
    assert got.dtype == torch.int64 and got.shape == (k,)
    assert torch.equal(got, want), (x.numel(), k)


@pytest.fixture(params=["local", "atomic"])
def histogram_path(request, monkeypatch):
    """Both ways of building the radix histograms (tl.histogram per program, or one atomic
    per element)."""
    from hvdcomp.kernels import topk

    local = request.param == "local"
    if local and not topk._LOCAL_HISTOGRAM:
        pytest.skip("tl.histogram with a mask is not available in this Triton")
    monkeypatch.setattr(topk, "_LOCAL_HISTOGRAM", local)
    yield request.param
    # A failed tl.histogram launch falls back to atomics silently (with a warning): the
    # "local" cases must really have run the local path.
    assert topk._LOCAL_HISTOGRAM == local


# ---- topk_indices ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 7, 1000, 4099])
@pytest.mark.parametrize("stride", [1, 2])
def test_topk_matches_reference(dtype, n, stride):
    x = kernel_vector(n, dtype, stride, seed=n)
    for k in sorted({0, 1, n // 3, n}):
        _check_topk(x, k)


@pytest.mark.parametrize("n", [1000, 3 * BLOCK + 5])
def test_topk_ties_fill_in_index_order(histogram_path, n):
    """Magnitudes in {0..3} (many equal, signs mixed): the k-th magnitude has thousands of
    ties spread over several blocks, and the cut falls inside a block."""
    x = kernel_vector(n, seed=n + 1, ints=True)
    for k in sorted({1, n // 5, n // 2, n - 3, n}):
        _check_topk(x, k)
    _check_topk(x.to(torch.bfloat16), n // 2)


def test_topk_equal_magnitudes_and_signed_zeros(histogram_path):
    n = 2 * BLOCK + 100
    x = torch.where(torch.arange(n) % 3 == 0, -1.0, 1.0).to(KERNEL_DEVICE)  # all |x| = 1
    for k in (1, BLOCK - 1, BLOCK + 1, n):
        got = _impl("topk_indices")(x, k)
        assert torch.equal(got.cpu(), torch.arange(k))
    zeros = torch.zeros(n, device=KERNEL_DEVICE)
    zeros[1::2] = -0.0
    for k in (0, 1, n // 2, n):
        assert torch.equal(_impl("topk_indices")(zeros, k).cpu(), torch.arange(k))


def test_topk_keys_differing_in_low_mantissa_bits(histogram_path):
    """1 + j ulp for a permutation of j: all keys share their top 19 bits, so the order is
    decided by the second and third radix passes."""
    n = 5000
    gen = torch.Generator().manual_seed(3)
    j = torch.randperm(n, generator=gen)
    x = (torch.tensor(1.0).view(torch.int32) + j.to(torch.int32)).view(torch.float32).to(KERNEL_DEVICE)
    x[::2] = -x[::2]
    for k in (1, 2, 777, n - 1):
        got = _impl("topk_indices")(x, k)
        assert torch.equal(got, reference.topk_indices(x, k))
        assert torch.equal(got.cpu(), torch.sort(torch.argsort(j, descending=True)[:k]).values)


def test_topk_special_values():
    x = torch.tensor([0.0, -float("inf"), 1e-45, 3.4e38, -1e-40, float("inf"), 2.0, -0.0, 1e-45],
                     device=KERNEL_DEVICE)
    for k in range(x.numel() + 1):
        _check_topk(x, k)


def test_topk_large():
    """>= 1M elements, k = 1 %: the ScaleCom / top-k setting."""
    n = (1 << 20) + 7
    x = kernel_vector(n, seed=9)
    got = _impl("topk_indices")(x, n // 100)
    assert torch.equal(got, reference.topk_indices(x, n // 100))
    assert torch.all(got[1:] > got[:-1])


def test_topk_rejects_bad_k():
    x = kernel_vector(10)
    for k in (-1, 11):
        with pytest.raises(ValueError):
            _impl("topk_indices")(x, k)
    assert _impl("topk_indices")(x[:0], 0).shape == (0,)


# ---- count_above / compact_above ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("stride", [1, 2])
def test_count_and_compact_match_reference(dtype, n, stride):
    x = kernel_vector(n, dtype, stride, seed=n + 5, ints=n % 2 == 1)
    # 1.0 equals many elements of the integer inputs (the >= boundary); 0 selects all.
    for t in (1.0, 0.7, 0.0):
        thr = kernel_scalar(t)
        count = _impl("count_above")(x, thr)
        assert count.dtype == torch.int64 and count.shape == (1,)
        assert torch.equal(count, reference.count_above(x, thr))
        idx, vals = _impl("compact_above")(x, thr, int(count))
        want_idx, want_vals = reference.compact_above(x.float(), thr, int(count))
        assert idx.dtype == torch.int32 and vals.dtype == torch.float32
        assert torch.equal(idx, want_idx) and torch.equal(vals, want_vals)


def test_compact_large_and_short_count():
    """>= 1M elements, DGC-like 0.5 % selection over 257 blocks; a count below the real
    selection writes the first ``count`` in order and nothing past the end."""
    n = (1 << 20) + 11
    x = kernel_vector(n, seed=6)
    thr = kernel_scalar(2.8)
    count = int(_impl("count_above")(x, thr))
    assert count == int(reference.count_above(x, thr))
    idx, vals = _impl("compact_above")(x, thr, count)
    want_idx, want_vals = reference.compact_above(x, thr, count)
    assert torch.equal(idx, want_idx) and torch.equal(vals, want_vals)
    idx, vals = _impl("compact_above")(x, thr, count // 2)
    assert torch.equal(idx, want_idx[:count // 2]) and torch.equal(vals, want_vals[:count // 2])


# ---- sampled_threshold ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 7, 1000, 4099])
@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32])
def test_sampled_threshold_matches_reference(dtype, n, idx_dtype):
    x = kernel_vector(2 * n, dtype, seed=n + 7)[::2]
    gen = torch.Generator().manual_seed(n)
    for s in sorted({1, max(1, n // 100), n}):
        # Negative indices count from the end, as indexing does.
        idx = torch.randint(-n, n, (s,), generator=gen).to(idx_dtype).to(KERNEL_DEVICE)
        for ratio in (0.001, 0.01, 0.3, 1.0):
            got = _impl("sampled_threshold")(x, ratio, idx)
            assert got.dtype == torch.float32 and got.shape == (1,)
            assert torch.equal(got, reference.sampled_threshold(x, ratio, idx.to(torch.int64)))


def test_sampled_threshold_is_the_kth_largest_of_the_sample():
    x = torch.arange(100, dtype=torch.float32, device=KERNEL_DEVICE) - 50  # |x| = 50, 49, ..., 0, ..., 49
    idx = torch.arange(0, 100, 2, device=KERNEL_DEVICE)  # |x| = 50, 48, ..., 2, 0, 2, ..., 48
    # ceil(0.1 * 50) = 5th largest of {50, 48, 48, 46, 46, ...} is 46.
    assert _impl("sampled_threshold")(x, 0.1, idx).item() == 46.0


# ---- dispatch and host synchronisation ------------------------------------------------------------------


def test_env_forces_triton_dispatch(monkeypatch):
    calls = spy_on_triton(monkeypatch, "topk_indices")
    x = kernel_vector(100, torch.bfloat16, seed=12)
    monkeypatch.setenv("HVDCOMP_KERNELS", "triton")
    assert torch.equal(kernels.topk_indices(x, 10), reference.topk_indices(x, 10))
    assert calls == ["topk_indices"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs are observable on CUDA only")
def test_no_host_synchronisation_on_cuda():
    x = kernel_vector(100_000, seed=13)
    thr = kernel_scalar(2.0)
    idx = torch.randint(0, x.numel(), (1000,), device="cuda")
    _impl("topk_indices")(x, 1000)  # compile outside the checked region
    count = int(_impl("count_above")(x, thr))
    _impl("compact_above")(x, thr, count)
    _impl("sampled_threshold")(x, 0.01, idx)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _impl("topk_indices")(x, 1000)
        _impl("count_above")(x, thr)
        _impl("compact_above")(x, thr, count)
        _impl("sampled_threshold")(x, 0.01, idx)
    finally:
        torch.cuda.set_sync_debug_mode("default")
