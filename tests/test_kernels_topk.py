"""Threshold selection (count, compaction, sampled threshold, exact top-k), both backends
against the oracle. Every result here is exact: counts, indices, thresholds and gathered values.

The kernel's top-k is a radix select over the bits of ``|x|`` (3 passes of 11/10/10 bits)
followed by a tie fill in index order that crosses block boundaries; the cases below put ties
inside and across the 4096-element blocks, distinct keys that differ only in the lowest
mantissa bits (decided by the last pass), signed zeros and infinities. The CPU backend's
top-k searches candidates above a threshold taken from a sample of the keys (from 32768
elements on, for k up to n/16); its cases below cover a sample that misses the top k
(periodic tensors), masses of ties, NaNs and views.
"""

import functools

import pytest
import torch

import kernel_oracle as oracle
from conftest import BACKENDS, KERNEL_DEVICE, kernel_impl, kernel_scalar, kernel_vector, requires_triton

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [0, 1, 7, 1000, 4099]
BLOCK = 4096  # kernels/topk.py's program size: cases below straddle it


def _check_topk(backend, x, k):
    got = kernel_impl(backend, "topk_indices")(x, k)
    assert got.dtype == torch.int64 and got.shape == (k,)
    assert torch.equal(got.cpu(), oracle.topk_indices(x, k)), (x.numel(), k)


@pytest.fixture(params=["local", "atomic"])
def histogram_path(request, monkeypatch):
    """Both ways the kernel builds its radix histograms (tl.histogram per program, or one
    atomic per element)."""
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


def test_oracle_topk_is_the_k_largest_with_ties_to_the_lower_index():
    x = torch.tensor([1.0, -3.0, 2.0, 3.0, float("nan"), -0.0, float("inf"), 2.0])
    assert oracle.topk_indices(x, 3).tolist() == [1, 4, 6]  # NaN, inf, then the first of the 3s
    assert oracle.topk_indices(x, 5).tolist() == [1, 2, 3, 4, 6]  # the first 2 of the tied 2s
    assert oracle.topk_indices(x, 0).tolist() == []


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 7, 1000, 4099])
@pytest.mark.parametrize("stride", [1, 2])
def test_topk_matches_oracle(backend, dtype, n, stride):
    x = kernel_vector(n, dtype, stride, seed=n)
    for k in sorted({0, 1, n // 3, n}):
        _check_topk(backend, x, k)


@requires_triton
@pytest.mark.parametrize("n", [1000, 3 * BLOCK + 5])
def test_topk_kernel_ties_fill_in_index_order(histogram_path, n):
    """Magnitudes in {0..3} (many equal, signs mixed): the k-th magnitude has thousands of
    ties spread over several blocks, and the cut falls inside a block."""
    x = kernel_vector(n, seed=n + 1, ints=True)
    for k in sorted({1, n // 5, n // 2, n - 3, n}):
        _check_topk("triton", x, k)
    _check_topk("triton", x.to(torch.bfloat16), n // 2)


@requires_triton
def test_topk_kernel_equal_magnitudes_and_signed_zeros(histogram_path):
    n = 2 * BLOCK + 100
    x = torch.where(torch.arange(n) % 3 == 0, -1.0, 1.0).to(KERNEL_DEVICE)  # all |x| = 1
    fn = kernel_impl("triton", "topk_indices")
    for k in (1, BLOCK - 1, BLOCK + 1, n):
        assert torch.equal(fn(x, k).cpu(), torch.arange(k))
    zeros = torch.zeros(n, device=KERNEL_DEVICE)
    zeros[1::2] = -0.0
    for k in (0, 1, n // 2, n):
        assert torch.equal(fn(zeros, k).cpu(), torch.arange(k))


@requires_triton
def test_topk_kernel_keys_differing_in_low_mantissa_bits(histogram_path):
    """1 + j ulp for a permutation of j: all keys share their top 19 bits, so the order is
    decided by the second and third radix passes."""
    n = 5000
    gen = torch.Generator().manual_seed(3)
    j = torch.randperm(n, generator=gen)
    x = (torch.tensor(1.0).view(torch.int32) + j.to(torch.int32)).view(torch.float32).to(KERNEL_DEVICE)
    x[::2] = -x[::2]
    for k in (1, 2, 777, n - 1):
        _check_topk("triton", x, k)
        assert torch.equal(oracle.topk_indices(x, k), torch.sort(torch.argsort(j, descending=True)[:k]).values)


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_special_values(backend):
    x = torch.tensor([0.0, -float("inf"), 1e-45, 3.4e38, -1e-40, float("inf"), 2.0, -0.0, 1e-45, float("nan")],
                     device=KERNEL_DEVICE)
    for k in range(x.numel() + 1):
        _check_topk(backend, x, k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_large(backend):
    """>= 1M elements, k = 1 %: the ScaleCom / top-k setting."""
    n = (1 << 20) + 7
    x = kernel_vector(n, seed=9)
    got = kernel_impl(backend, "topk_indices")(x, n // 100)
    assert torch.equal(got.cpu(), oracle.topk_indices(x, n // 100))
    assert torch.all(got[1:] > got[:-1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_rejects_bad_k(backend):
    x = kernel_vector(10)
    fn = kernel_impl(backend, "topk_indices")
    for k in (-1, 11):
        with pytest.raises(ValueError):
            fn(x, k)
    assert fn(x[:0], 0).shape == (0,)


@functools.lru_cache(maxsize=1)
def _search_cases():
    """(x, k) on the CPU: sizes and k around the candidate search's limits, and the tensors
    that could fool a sample."""
    g = torch.Generator().manual_seed(0)
    n = 200_000
    out = []
    for size in (1000, 40_000, 2_359_296 // 8):
        x = torch.randn(size, generator=g)
        out += [(x, k) for k in (1, max(1, size // 1000), size // 100, size // 20, size // 3)]
    periodic = torch.zeros(n)
    periodic[::9] = torch.randn(len(periodic[::9]), generator=g) * 100  # aliasing a strided sample
    special = torch.randn(n, generator=g)
    special[5], special[77], special[1000] = float("nan"), float("inf"), -float("inf")
    nans = torch.randn(n, generator=g)
    nans[::7] = float("nan")  # the sample's threshold is a NaN's key: the keys' compare
    out += [(periodic, 200), (periodic, 2000), (periodic, 30_000),
            (torch.randint(0, 4, (n,), generator=g).float(), 2000),  # masses of ties
            (torch.ones(n), 500), (special, 3), (special, 500), (nans, 100), (nans, 40_000),
            (torch.linspace(0, 1, n), 1000), (torch.randn(n, generator=g).to(torch.bfloat16), 500),
            (torch.randn(2 * n, generator=g)[::2], 700)]  # a strided view
    return out


@pytest.mark.parametrize("case", range(len(_search_cases())))
def test_cpu_topk_candidate_search_is_exact(case):
    x, k = _search_cases()[case]
    _check_topk("cpu", x, k)


# ---- count_above / compact_above ------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("stride", [1, 2])
def test_count_and_compact_match_oracle(backend, dtype, n, stride):
    x = kernel_vector(n, dtype, stride, seed=n + 5, ints=n % 2 == 1)
    if n > 3:
        x[1], x[2] = float("nan"), -float("inf")  # NaN is never selected, -inf always
    # 1.0 equals many elements of the integer inputs (the >= boundary); 0 selects all but NaN.
    for t in (1.0, 0.7, 0.0):
        thr = kernel_scalar(t)
        count = kernel_impl(backend, "count_above")(x, thr)
        assert count.dtype == torch.int64 and count.shape == (1,)
        assert torch.equal(count.cpu(), oracle.count_above(x, thr))
        idx, vals = kernel_impl(backend, "compact_above")(x, thr, int(count))
        want_idx, want_vals = oracle.compact_above(x, thr)
        assert idx.dtype == torch.int32 and vals.dtype == torch.float32
        assert torch.equal(idx.cpu(), want_idx) and torch.equal(vals.cpu(), want_vals)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compact_large(backend):
    """>= 1M elements, DGC-like 0.5 % selection over 257 blocks."""
    n = (1 << 20) + 11
    x = kernel_vector(n, seed=6)
    thr = kernel_scalar(2.8)
    count = int(kernel_impl(backend, "count_above")(x, thr))
    assert count == int(oracle.count_above(x, thr))
    idx, vals = kernel_impl(backend, "compact_above")(x, thr, count)
    want_idx, want_vals = oracle.compact_above(x, thr)
    assert torch.equal(idx.cpu(), want_idx) and torch.equal(vals.cpu(), want_vals)


@requires_triton
def test_compact_kernel_with_a_short_count_writes_the_first_ones():
    """A count below the real selection writes the first ``count`` in order and nothing past
    the end (the CPU backend raises instead, see below)."""
    x = kernel_vector(3 * BLOCK + 11, seed=6)
    thr = kernel_scalar(1.5)
    want_idx, want_vals = oracle.compact_above(x, thr)
    count = want_idx.numel() // 2
    idx, vals = kernel_impl("triton", "compact_above")(x, thr, count)
    assert torch.equal(idx.cpu(), want_idx[:count]) and torch.equal(vals.cpu(), want_vals[:count])


def test_compact_on_the_cpu_raises_on_a_wrong_count():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="count"):
        kernel_impl("cpu", "compact_above")(x, torch.tensor([1.0]), 3)


def test_cpu_compact_reuses_the_count_mask_only_for_the_same_tensor_version():
    from hvdcomp.kernels.cpu import topk

    count_above, compact_above = kernel_impl("cpu", "count_above"), kernel_impl("cpu", "compact_above")
    x = torch.randn(70000, generator=torch.Generator().manual_seed(4))
    thr = torch.tensor([1.0])
    count = int(count_above(x, thr))
    x.mul_(0.5)  # written in between: the remembered mask must not be used
    idx, vals = compact_above(x, thr, int(oracle.count_above(x, thr)))
    want_idx, want_vals = oracle.compact_above(x, thr)
    assert torch.equal(idx, want_idx) and torch.equal(vals, want_vals)
    assert count == int((x.abs() >= 0.5).sum())
    # same version: the count's mask serves the compaction, and is dropped after it
    count = int(count_above(x, thr))
    assert compact_above(x, thr, count)[0].numel() == count
    assert id(x) not in topk._ABOVE_MASKS.entries


# ---- sampled_threshold ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 7, 1000, 4099])
@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32])
def test_sampled_threshold_matches_oracle(backend, dtype, n, idx_dtype):
    x = kernel_vector(2 * n, dtype, seed=n + 7)[::2]
    gen = torch.Generator().manual_seed(n)
    for s in sorted({1, max(1, n // 100), n}):
        # Negative indices count from the end, as indexing does.
        idx = torch.randint(-n, n, (s,), generator=gen).to(idx_dtype).to(KERNEL_DEVICE)
        for ratio in (0.001, 0.01, 0.3, 1.0):
            got = kernel_impl(backend, "sampled_threshold")(x, ratio, idx)
            assert got.dtype == torch.float32 and got.shape == (1,)
            assert torch.equal(got.cpu(), oracle.sampled_threshold(x, ratio, idx))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampled_threshold_is_the_kth_largest_of_the_sample(backend):
    x = torch.arange(100, dtype=torch.float32, device=KERNEL_DEVICE) - 50  # |x| = 50, 49, ..., 0, ..., 49
    idx = torch.arange(0, 100, 2, device=KERNEL_DEVICE)  # |x| = 50, 48, ..., 2, 0, 2, ..., 48
    # ceil(0.1 * 50) = 5th largest of {50, 48, 48, 46, 46, ...} is 46.
    assert kernel_impl(backend, "sampled_threshold")(x, 0.1, idx).item() == 46.0


# ---- host synchronisation ---------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs are observable on CUDA only")
def test_no_host_synchronisation_on_cuda():
    impl = lambda name: kernel_impl("triton", name)  # noqa: E731
    x = kernel_vector(100_000, seed=13)
    thr = kernel_scalar(2.0)
    idx = torch.randint(0, x.numel(), (1000,), device="cuda")
    impl("topk_indices")(x, 1000)  # compile outside the checked region
    count = int(impl("count_above")(x, thr))
    impl("compact_above")(x, thr, count)
    impl("sampled_threshold")(x, 0.01, idx)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        impl("topk_indices")(x, 1000)
        impl("count_above")(x, thr)
        impl("compact_above")(x, thr, count)
        impl("sampled_threshold")(x, 0.01, idx)
    finally:
        torch.cuda.set_sync_debug_mode("default")
