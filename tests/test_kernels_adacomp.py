"""AdaComp (select+stats, pack+residual, decode+sum), both backends against the oracle.

Selection counts, codes, residuals and single-rank decodes are exact; ``abs_sum`` is a
floating-point sum whose order is each backend's own (the kernel's an fp32 atomic one), so
it gets a relative tolerance against the oracle's exactly rounded sum.
"""

import pytest
import torch

import kernel_oracle as oracle
from conftest import BACKENDS, KERNEL_DEVICE, kernel_impl
from hvdcomp.kernels import adacomp_code_dtype, num_bins

BIN_SIZES = [2, 50, 64, 65, 500, 16384]
SIZES = [0, 1, 7, 1000, 4099]


def _inputs(n, dtype=torch.float32, stride=1, seed=0, ties=False):
    """(x, g): x fp32 with zeros; g in ``dtype``. ``ties`` draws small integers so that
    ``|x + g|`` often equals the bin max exactly (the ``>=`` boundary) and x is often 0."""
    gen = torch.Generator().manual_seed(seed)
    if ties:
        x = torch.randint(-3, 4, (n * stride,), generator=gen).float()
        g = torch.randint(-2, 3, (n * stride,), generator=gen).float()
    else:
        x = torch.randn(n * stride, generator=gen)
        g = 2.0 * torch.randn(n * stride, generator=gen)
        x[::5] = 0.0  # zeros are never sent, even where |g| is large
    if n:
        # A large value deep inside a big bin, surely selected (|x + 0| = max): its int16
        # code is above 0x7FFF (negative as int16).
        x[min(n * stride - 1, 15000 * stride)] = -50.0
        g[min(n * stride - 1, 15000 * stride)] = 0.0
    x, g = x.to(KERNEL_DEVICE), g.to(dtype).to(KERNEL_DEVICE)
    return (x[::stride], g[::stride]) if stride > 1 else (x, g)


def _offsets(counts):
    c = counts.to(torch.int64)
    return torch.cumsum(c, 0) - c


def _compress(backend, x, g, bin_size):
    """One AdaComp step of ``backend``: (counts, scale, codes); ``x`` becomes the new residual."""
    counts, abs_sum = kernel_impl(backend, "adacomp_select_stats")(x, g, bin_size)
    total = int(counts.sum())
    scale = (abs_sum / max(total, 1)).to(torch.float32)
    codes = torch.empty(total, dtype=adacomp_code_dtype(bin_size), device=x.device)
    kernel_impl(backend, "adacomp_pack_")(x, g, bin_size, _offsets(counts), scale, codes)
    return counts, scale, codes


def _assert_step_matches_oracle(backend, x, g, bin_size):
    """Stats, then the pack with the oracle's scale: counts, codes and the residual exact,
    the sum within a relative 1e-6 (1e-12 on the CPU backend, which sums in fp64)."""
    x0 = x.clone()
    counts, abs_sum = kernel_impl(backend, "adacomp_select_stats")(x, g, bin_size)
    want_counts, want_sum = oracle.adacomp_select_stats(x, g, bin_size)
    assert counts.dtype == torch.int32 and counts.shape == (num_bins(x.numel(), bin_size),)
    assert abs_sum.dtype == torch.float64 and abs_sum.shape == (1,)
    assert torch.equal(counts.cpu(), want_counts)
    torch.testing.assert_close(abs_sum.cpu(), want_sum, rtol=1e-12 if backend == "cpu" else 1e-6, atol=0)
    scale = (want_sum / max(int(want_counts.sum()), 1)).to(torch.float32).to(x.device)
    want_codes, want_x = oracle.adacomp_pack(x0, g, bin_size, scale)
    codes = torch.full((want_codes.numel(),), 0x55, dtype=adacomp_code_dtype(bin_size), device=x.device)
    out = kernel_impl(backend, "adacomp_pack_")(x, g, bin_size, _offsets(counts), scale, codes)
    assert out is codes
    assert torch.equal(codes.cpu(), want_codes.to(codes.dtype))
    assert torch.equal(x.cpu(), want_x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bin_size", BIN_SIZES)
@pytest.mark.parametrize("n", SIZES)
def test_select_stats_and_pack_match_oracle(backend, n, bin_size):
    for ties in (False, True):
        x, g = _inputs(n, seed=n + bin_size, ties=ties)
        _assert_step_matches_oracle(backend, x, g, bin_size)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bin_size", [50, 500])
def test_low_precision_strided_gradient(backend, dtype, bin_size):
    """fp16/bf16 gradients and non-contiguous x and g: the residual is updated through the view."""
    x, g = _inputs(4099, dtype, stride=2, seed=7)
    base = x._base if x._base is not None else x
    base_odd = base[1::2].clone()
    _assert_step_matches_oracle(backend, x, g, bin_size)
    assert torch.equal(base[1::2], base_odd)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bin_size,n", [(50, 4099), (64, 1000), (65, 1000), (500, 4099), (16384, 40000)])
def test_error_feedback_invariant(backend, bin_size, n):
    """decode(codes) + new residual == x: what is not sent stays in the residual."""
    x, g = _inputs(n, seed=bin_size, ties=bin_size == 64)
    x0 = x.clone()
    counts, scale, codes = _compress(backend, x, g, bin_size)
    assert codes.numel() > 0
    if bin_size > 8192:
        assert (codes < 0).any(), "no int16 code above 0x7FFF: the unsigned read is untested"
    sent = kernel_impl(backend, "adacomp_decode_sum")(codes, counts.view(1, -1), scale, bin_size, n)
    s = float(scale)
    is_sent = sent != 0
    assert int(is_sent.sum()) == codes.numel()
    assert torch.equal(sent[is_sent].abs(), torch.full_like(sent[is_sent], s))
    assert torch.equal(torch.sign(sent[is_sent]), torch.sign(x0[is_sent]))
    assert torch.equal(x[~is_sent], x0[~is_sent])
    # x - sign*s rounds once; adding sign*s back is exact up to that rounding.
    tol = 2 * torch.finfo(torch.float32).eps * (x0.abs() + s)
    assert ((sent + x - x0).abs() <= tol).all()


def _synthetic_payload(nranks, bin_size, numel, seed):
    """Random valid payloads of ``nranks`` ranks: per bin any number of codes (repeats
    allowed) with offsets inside the (possibly short) last bin and signs 1/2."""
    gen = torch.Generator().manual_seed(seed)
    nb = num_bins(numel, bin_size)
    bin_len = torch.full((nb,), bin_size)
    bin_len[-1] = numel - (nb - 1) * bin_size
    counts = torch.randint(0, 4, (nranks, nb), generator=gen, dtype=torch.int32)
    counts[:, ::3] = 0  # empty bins between full ones
    lens = bin_len.repeat(nranks).repeat_interleave(counts.reshape(-1).to(torch.int64))
    offs = (torch.rand(lens.numel(), generator=gen) * lens).to(torch.int64)
    signs = torch.randint(1, 3, (lens.numel(),), generator=gen)
    codes = ((offs << 2) | signs).to(adacomp_code_dtype(bin_size))
    return codes.to(KERNEL_DEVICE), counts.to(KERNEL_DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bin_size,numel", [(2, 7), (50, 1000), (65, 4099), (16384, 40000)])
@pytest.mark.parametrize("nranks", [1, 2, 5])
def test_decode_sum_matches_oracle(backend, nranks, bin_size, numel):
    codes, counts = _synthetic_payload(nranks, bin_size, numel, seed=nranks * bin_size)
    decode = kernel_impl(backend, "adacomp_decode_sum")
    # Dyadic scales: every partial sum is exact, so atomic order cannot matter.
    scales = (torch.arange(1, nranks + 1, dtype=torch.float32) * 0.375).to(KERNEL_DEVICE)
    out = decode(codes, counts, scales, bin_size, numel)
    assert out.dtype == torch.float32 and out.shape == (numel,)
    assert torch.equal(out.cpu(), oracle.adacomp_decode_sum(codes, counts, scales, bin_size, numel))
    # Irrational-looking scales: rounding depends on summation order, so a tight tolerance.
    scales = torch.rand(nranks, generator=torch.Generator().manual_seed(3)).to(KERNEL_DEVICE) + 0.1
    torch.testing.assert_close(decode(codes, counts, scales, bin_size, numel).cpu(),
                               oracle.adacomp_decode_sum(codes, counts, scales, bin_size, numel), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_sum_strided_inputs_and_edge_shapes(backend):
    decode = kernel_impl(backend, "adacomp_decode_sum")
    codes, counts = _synthetic_payload(3, 500, 4099, seed=11)
    scales = torch.tensor([0.5, 7.0, 1.25, 7.0, 2.0], device=KERNEL_DEVICE)[::2]
    doubled = torch.stack([codes, torch.zeros_like(codes)], dim=1).reshape(-1)
    strided = doubled[::2]
    assert not strided.is_contiguous()
    want = oracle.adacomp_decode_sum(codes, counts, scales, 500, 4099)
    assert torch.equal(decode(strided, counts, scales, 500, 4099).cpu(), want)
    empty_codes = codes[:0]
    zero_counts = torch.zeros_like(counts)
    assert torch.equal(decode(empty_codes, zero_counts, scales, 500, 4099), torch.zeros(4099, device=KERNEL_DEVICE))
    assert decode(empty_codes, zero_counts[:, :0], scales, 500, 0).shape == (0,)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bin_size,dtype", [(50, torch.float32), (500, torch.bfloat16)])
def test_large_tensor_round(backend, bin_size, dtype):
    """>= 1M elements through all three operations, against the oracle's step."""
    n = (1 << 20) + 321
    x, g = _inputs(n, dtype, seed=bin_size)
    x0 = x.clone()
    _assert_step_matches_oracle(backend, x, g, bin_size)
    counts, _ = oracle.adacomp_select_stats(x0, g, bin_size)
    codes, _ = oracle.adacomp_pack(x0, g, bin_size, torch.ones(1))
    codes = codes.to(adacomp_code_dtype(bin_size)).to(KERNEL_DEVICE)
    scale = torch.tensor([0.75], device=KERNEL_DEVICE)
    sent = kernel_impl(backend, "adacomp_decode_sum")(codes, counts.view(1, -1).to(KERNEL_DEVICE), scale, bin_size, n)
    assert torch.equal(sent.cpu(), oracle.adacomp_decode_sum(codes, counts.view(1, -1), scale, bin_size, n))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bin_size", [1, 16385])
def test_rejects_bin_size_out_of_range(backend, bin_size):
    x = torch.ones(10, device=KERNEL_DEVICE)
    with pytest.raises(ValueError):
        kernel_impl(backend, "adacomp_select_stats")(x, x, bin_size)


@pytest.mark.parametrize("backend", BACKENDS)
def test_abs_sum_does_not_overflow_for_finite_inputs(backend):
    """Selected magnitudes near fp32's maximum: an fp32 sum would be inf (and so would the
    scale and every value sent); the fp64 sum is exact enough for a finite fp32 mean."""
    x = torch.full((600,), 3.0e38, device=KERNEL_DEVICE)
    x[1::2] = -3.0e38
    g = torch.zeros_like(x)
    counts, abs_sum = kernel_impl(backend, "adacomp_select_stats")(x, g, 50)
    assert abs_sum.dtype == torch.float64 and int(counts.sum()) == 600
    scale = (abs_sum / 600).to(torch.float32)
    assert torch.isfinite(scale).all() and torch.allclose(scale.double(), torch.tensor([3.0e38], dtype=torch.float64))


def test_cpu_selection_is_recomputed_for_another_gradient_of_the_same_residual():
    # select_stats keeps its positions for pack_ of the same x and g (same versions); another
    # g, or the same g written since, must get its own selection.
    from hvdcomp.kernels.cpu import adacomp as cpu_adacomp

    x = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    nonzero = int((x != 0).sum())
    zero = torch.zeros(1000)
    assert int(cpu_adacomp.adacomp_select_stats(x, zero, 50)[0].sum()) == 20  # one bin maximum each
    every = torch.full((1000,), 100.0)  # |x + g| beats every bin maximum
    assert int(cpu_adacomp.adacomp_select_stats(x, every, 50)[0].sum()) == nonzero
    assert int(cpu_adacomp.adacomp_select_stats(x, zero, 50)[0].sum()) == 20
    zero.fill_(100.0)  # the same tensor, written
    counts, _ = cpu_adacomp.adacomp_select_stats(x, zero, 50)
    assert int(counts.sum()) == nonzero
    codes = torch.empty(nonzero, dtype=torch.int16)
    cpu_adacomp.adacomp_pack_(x.clone(), zero, 50, None, torch.tensor(0.5), codes)  # a stale selection raises
