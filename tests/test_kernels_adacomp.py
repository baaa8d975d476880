"""Triton AdaComp kernels (select+stats, pack+residual, decode+sum) against the reference.

Selection counts, codes, residuals and single-rank decodes are exact; ``abs_sum`` is an
fp32 atomic sum whose order differs from torch's, so it gets a tight relative tolerance.
"""

import pytest
import torch

from conftest import KERNEL_DEVICE, requires_triton, spy_on_triton
from hvdcomp import kernels
from hvdcomp.kernels import reference

pytestmark = requires_triton

BIN_SIZES = [2, 50, 64, 65, 500, 16384]
SIZES = [0, 1, 7, 1000, 4099]


def _impl(name):
    return kernels.triton_impl(name)


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


def _compress(impl, x, g, bin_size):
    """One AdaComp step with ``impl`` (a function name -> callable): (counts, scale, codes);
    ``x`` becomes the new residual."""
    counts, abs_sum = impl("adacomp_select_stats")(x, g, bin_size)
    total = int(counts.sum())
    scale = (abs_sum / max(total, 1)).to(torch.float32)
    codes = torch.empty(total, dtype=reference.adacomp_code_dtype(bin_size), device=x.device)
    impl("adacomp_pack_")(x, g, bin_size, _offsets(counts), scale, codes)
    return counts, scale, codes


@pytest.mark.parametrize("bin_size", BIN_SIZES)
@pytest.mark.parametrize("n", SIZES)
def test_select_stats_and_pack_match_reference(n, bin_size):
    for ties in (False, True):
        x, g = _inputs(n, seed=n + bin_size, ties=ties)
        counts, abs_sum = _impl("adacomp_select_stats")(x, g, bin_size)
        counts_ref, abs_sum_ref = reference.adacomp_select_stats(x, g, bin_size)
        assert counts.dtype == torch.int32 and counts.shape == (reference.num_bins(n, bin_size),)
        assert torch.equal(counts, counts_ref)
        torch.testing.assert_close(abs_sum, abs_sum_ref, rtol=1e-6, atol=0)

        scale = (abs_sum_ref / max(int(counts_ref.sum()), 1)).to(torch.float32)
        x_ref = x.clone()
        codes_ref = torch.empty(int(counts_ref.sum()), dtype=reference.adacomp_code_dtype(bin_size),
                                device=x.device)
        reference.adacomp_pack_(x_ref, g, bin_size, _offsets(counts_ref), scale, codes_ref)
        codes = torch.full_like(codes_ref, 0x55)
        out = _impl("adacomp_pack_")(x, g, bin_size, _offsets(counts_ref), scale, codes)
        assert out is codes
        assert torch.equal(codes, codes_ref)
        assert torch.equal(x, x_ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bin_size", [50, 500])
def test_low_precision_strided_gradient(dtype, bin_size):
    """fp16/bf16 gradients and non-contiguous x and g: the residual is updated through the view."""
    x, g = _inputs(4099, dtype, stride=2, seed=7)
    x_ref = x.clone()
    counts_ref, scale_ref, codes_ref = _compress(lambda name: getattr(reference, name), x_ref, g, bin_size)
    base = x._base if x._base is not None else x
    base_odd = base[1::2].clone()
    counts, scale, codes = _compress(_impl, x, g, bin_size)
    assert torch.equal(counts, counts_ref)
    torch.testing.assert_close(scale, scale_ref, rtol=1e-6, atol=0)
    assert torch.equal(codes, codes_ref)
    # Residuals agree up to the scale's last-bit difference (atomic sum order).
    torch.testing.assert_close(x, x_ref, rtol=1e-6, atol=1e-6 * float(scale_ref))
    assert torch.equal(base[1::2], base_odd)


@pytest.mark.parametrize("bin_size,n", [(50, 4099), (64, 1000), (65, 1000), (500, 4099), (16384, 40000)])
def test_error_feedback_invariant(bin_size, n):
    """decode(codes) + new residual == x: what is not sent stays in the residual."""
    x, g = _inputs(n, seed=bin_size, ties=bin_size == 64)
    x0 = x.clone()
    counts, scale, codes = _compress(_impl, x, g, bin_size)
    assert codes.numel() > 0
    if bin_size > 8192:
        assert (codes < 0).any(), "no int16 code above 0x7FFF: the unsigned read is untested"
    sent = _impl("adacomp_decode_sum")(codes, counts.view(1, -1), scale, bin_size, n)
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
    nb = reference.num_bins(numel, bin_size)
    bin_len = torch.full((nb,), bin_size)
    bin_len[-1] = numel - (nb - 1) * bin_size
    counts = torch.randint(0, 4, (nranks, nb), generator=gen, dtype=torch.int32)
    counts[:, ::3] = 0  # empty bins between full ones
    lens = bin_len.repeat(nranks).repeat_interleave(counts.reshape(-1).to(torch.int64))
    offs = (torch.rand(lens.numel(), generator=gen) * lens).to(torch.int64)
    signs = torch.randint(1, 3, (lens.numel(),), generator=gen)
    codes = ((offs << 2) | signs).to(reference.adacomp_code_dtype(bin_size))
    return codes.to(KERNEL_DEVICE), counts.to(KERNEL_DEVICE)


@pytest.mark.parametrize("bin_size,numel", [(2, 7), (50, 1000), (65, 4099), (16384, 40000)])
@pytest.mark.parametrize("nranks", [1, 2, 5])
def test_decode_sum_matches_reference(nranks, bin_size, numel):
    codes, counts = _synthetic_payload(nranks, bin_size, numel, seed=nranks * bin_size)
    # Dyadic scales: every partial sum is exact, so atomic order cannot matter.
    scales = (torch.arange(1, nranks + 1, dtype=torch.float32) * 0.375).to(KERNEL_DEVICE)
    out = _impl("adacomp_decode_sum")(codes, counts, scales, bin_size, numel)
    want = reference.adacomp_decode_sum(codes, counts, scales, bin_size, numel)
    assert out.dtype == torch.float32 and out.shape == (numel,)
    assert torch.equal(out, want)
    # Irrational-looking scales: rounding depends on summation order, so a tight tolerance.
    scales = torch.rand(nranks, generator=torch.Generator().manual_seed(3)).to(KERNEL_DEVICE) + 0.1
    out = _impl("adacomp_decode_sum")(codes, counts, scales, bin_size, numel)
    want = reference.adacomp_decode_sum(codes, counts, scales, bin_size, numel)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)


def test_decode_sum_strided_inputs_and_edge_shapes():
    codes, counts = _synthetic_payload(3, 500, 4099, seed=11)
    scales = torch.tensor([0.5, 7.0, 1.25, 7.0, 2.0], device=KERNEL_DEVICE)[::2]
    doubled = torch.stack([codes, torch.zeros_like(codes)], dim=1).reshape(-1)
    strided = doubled[::2]
    assert not strided.is_contiguous()
    want = reference.adacomp_decode_sum(codes, counts, scales, 500, 4099)
    assert torch.equal(_impl("adacomp_decode_sum")(strided, counts, scales, 500, 4099), want)
    empty_codes = codes[:0]
    zero_counts = torch.zeros_like(counts)
    assert torch.equal(_impl("adacomp_decode_sum")(empty_codes, zero_counts, scales, 500, 4099),
                       torch.zeros(4099, device=KERNEL_DEVICE))
    assert _impl("adacomp_decode_sum")(empty_codes, zero_counts[:, :0], scales, 500, 0).shape == (0,)


@pytest.mark.parametrize("bin_size,dtype", [(50, torch.float32), (500, torch.bfloat16)])
def test_large_tensor_round(bin_size, dtype):
    """>= 1M elements through all three kernels, against the reference step."""
    n = (1 << 20) + 321
    x, g = _inputs(n, dtype, seed=bin_size)
    x_ref = x.clone()
    counts_ref, scale_ref, codes_ref = _compress(lambda name: getattr(reference, name), x_ref, g, bin_size)
    counts, scale, codes = _compress(_impl, x, g, bin_size)
    assert torch.equal(counts, counts_ref)
    torch.testing.assert_close(scale, scale_ref, rtol=1e-6, atol=0)
    assert torch.equal(codes, codes_ref)
    # Decode with the reference's scale so that the two decodes see identical inputs.
    sent = _impl("adacomp_decode_sum")(codes, counts.view(1, -1), scale_ref, bin_size, n)
    want = reference.adacomp_decode_sum(codes_ref, counts_ref.view(1, -1), scale_ref, bin_size, n)
    assert torch.equal(sent, want)
    torch.testing.assert_close(x, x_ref, rtol=1e-6, atol=1e-6 * float(scale_ref))


@pytest.mark.parametrize("bin_size", [1, 16385])
def test_rejects_bin_size_out_of_range(bin_size):
    x = torch.ones(10, device=KERNEL_DEVICE)
    with pytest.raises(ValueError):
        _impl("adacomp_select_stats")(x, x, bin_size)
    with pytest.raises(ValueError):
        reference.adacomp_select_stats(x, x, bin_size)


@pytest.mark.parametrize("impl_name", ["reference", "triton"])
def test_abs_sum_does_not_overflow_for_finite_inputs(impl_name):
    """Selected magnitudes near fp32's maximum: an fp32 sum would be inf (and so would the
    scale and every value sent); the fp64 sum is exact enough for a finite fp32 mean."""
    x = torch.full((600,), 3.0e38, device=KERNEL_DEVICE)
    x[1::2] = -3.0e38
    g = torch.zeros_like(x)
    stats = reference.adacomp_select_stats if impl_name == "reference" else _impl("adacomp_select_stats")
    counts, abs_sum = stats(x, g, 50)
    assert abs_sum.dtype == torch.float64 and int(counts.sum()) == 600
    scale = (abs_sum / 600).to(torch.float32)
    assert torch.isfinite(scale).all() and torch.allclose(scale.double(), torch.tensor([3.0e38], dtype=torch.float64))


@pytest.mark.parametrize("name", ["adacomp_select_stats", "adacomp_pack_", "adacomp_decode_sum"])
def test_env_forces_triton_dispatch(monkeypatch, name):
    calls = spy_on_triton(monkeypatch, name)
    x, g = _inputs(1000, seed=5)
    counts, abs_sum = reference.adacomp_select_stats(x, g, 50)
    scale = (abs_sum / int(counts.sum())).to(torch.float32)
    codes = torch.empty(int(counts.sum()), dtype=torch.uint8, device=KERNEL_DEVICE)
    reference.adacomp_pack_(x.clone(), g, 50, _offsets(counts), scale, codes)
    args = {
        "adacomp_select_stats": lambda: (x, g, 50),
        "adacomp_pack_": lambda: (x.clone(), g, 50, _offsets(counts), scale, torch.empty_like(codes)),
        "adacomp_decode_sum": lambda: (codes, counts.view(1, -1), scale, 50, 1000),
    }[name]

    monkeypatch.setenv("HVDCOMP_KERNELS", "triton")
    got = getattr(kernels, name)(*args())
    assert calls == [name]
    want = getattr(reference, name)(*args())
    for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)

    monkeypatch.setenv("HVDCOMP_KERNELS", "reference")
    getattr(kernels, name)(*args())
    assert calls == [name]
