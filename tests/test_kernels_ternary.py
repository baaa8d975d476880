"""TernGrad, deterministic ternary and sign quantization, 1-bit SGD's residual update and the
decode+sum of N ranks' packed payloads: both backends against the oracle.

Packed bytes are exact, the stochastic ones included: the Triton kernel's ``tl.rand4x``, the
CPU backend's Philox emulation and the oracle's Philox draw the same bits for the same seed
(element i: word i % 4 of counter i // 4). TernGrad's CPU stream (NumPy's PCG64) is checked
against the oracle's reading of its documentation, and its law against the equation. Decoded
sums are exact where every partial sum is (dyadic scales); ``sign_pack``'s kernel scale is an
fp32 sum in another order, compared with a tight relative tolerance.
"""

import math

import pytest
import torch

import kernel_oracle as oracle
from conftest import BACKENDS, KERNEL_DEVICE, kernel_impl, kernel_scalar, kernel_vector, requires_triton
from hvdcomp import kernels

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [0, 1, 7, 1000, 4099]
INF = float("inf")


def _levels(packed, n):
    """Decoded ternary levels (+1, 0, -1) of a packed payload, via the oracle."""
    codes = oracle.unpack_2bit(packed, n).to(torch.int64)
    return (codes == 1).double() - (codes == 2).double()


class _CountLaunches:
    """Stands in for a @triton.jit kernel and records each launch's grid."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


# ---- terngrad_ternarize (the Philox stream) -----------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("stride", [1, 2])
def test_terngrad_matches_oracle_bit_for_bit(backend, dtype, n, stride):
    g = kernel_vector(n, dtype, stride, seed=n)
    if n > 3:
        g[1], g[2] = float("nan"), 0.0  # a NaN is never kept, nor is a zero
    scale = g.float().nan_to_num(0.0).abs().max().reshape(1) if n else kernel_scalar(1.0)
    for clip, seed in [(INF, 7), (0.8, 2**40 + 12345)]:  # a seed with a nonzero high word too
        got = kernel_impl(backend, "terngrad_ternarize")(g, scale, kernel_scalar(clip), seed)
        assert got.dtype == torch.uint8 and got.shape == ((n + 3) // 4,) and got.is_contiguous()
        assert torch.equal(got.cpu(), oracle.terngrad_ternarize(g, scale, kernel_scalar(clip), seed))


@pytest.mark.parametrize("backend", BACKENDS)
def test_terngrad_seed_edges_match_oracle(backend):
    """Seeds at the int32/uint32/int64 boundaries (Triton types an int argument by its value;
    Philox takes the low and high 32-bit words as its key)."""
    g = kernel_vector(1000, seed=2)
    s = g.abs().max().reshape(1)
    fn = kernel_impl(backend, "terngrad_ternarize")
    for seed in (0, 1, 2**31 - 1, 2**31 + 5, 2**32 - 1, 2**32, 2**63 - 1):
        assert torch.equal(fn(g, s, kernel_scalar(INF), seed).cpu(), oracle.terngrad_ternarize(g, s, INF, seed)), seed


@requires_triton
def test_terngrad_kernel_rejects_a_negative_seed():
    g = kernel_vector(10, seed=2)
    with pytest.raises(ValueError):
        kernel_impl("triton", "terngrad_ternarize")(g, kernel_scalar(1.0), kernel_scalar(INF), -1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_terngrad_large_matches_oracle(backend):
    """>= 1M elements (many programs), a ragged last byte."""
    n = (1 << 20) + 3
    g = kernel_vector(n, seed=5)
    scale, clip = kernel_scalar(2.5), kernel_scalar(2.5)
    got = kernel_impl(backend, "terngrad_ternarize")(g, scale, clip, 987654321)
    assert torch.equal(got.cpu(), oracle.terngrad_ternarize(g, scale, clip, 987654321))


@requires_triton
def test_terngrad_seed_changes_the_draw_and_zero_scale_decodes_to_zero():
    impl = lambda name: kernel_impl("triton", name)  # noqa: E731
    g = kernel_vector(4099, seed=1)
    s = g.abs().max().reshape(1)
    a = impl("terngrad_ternarize")(g, s, kernel_scalar(INF), 1)
    b = impl("terngrad_ternarize")(g, s, kernel_scalar(INF), 2)
    assert not torch.equal(a, b)
    assert torch.equal(a, impl("terngrad_ternarize")(g, s, kernel_scalar(INF), 1))
    # s = 0: the test u*s < |gc| keeps every nonzero element (codes are not all zero), but
    # every level decodes to 0 * (+-1) = 0.
    zero = kernel_scalar(0.0)
    packed = impl("terngrad_ternarize")(g, zero, kernel_scalar(INF), 1)
    assert torch.equal(packed.cpu(), oracle.terngrad_ternarize(g, zero, INF, 1))
    assert not torch.any(impl("ternary_decode_sum")(packed.view(1, -1), zero, g.numel()))


@requires_triton
def test_terngrad_is_unbiased():
    """TernGrad eq. (6): E[s * sign(gc) * b] = gc. Eight levels of gc, each repeated 8192
    times, one seed: the mean decoded value per level must be within 5 standard errors
    ``s * sqrt(p (1 - p) / 8192)`` (p = |gc|/s) of gc.

    A biased quantizer fails the bound, as checked at the end: rounding p to 0/1 (keep iff
    p >= 1/2) turns the level 0.1 into 0, 0.1 / SE(0.1) ~ 30 standard errors off.
    """
    s, reps = 1.0, 8192
    levels = torch.tensor([0.1, -0.1, 0.37, -0.5, 0.73, -0.9, 1.0, 0.0])
    g = levels.repeat_interleave(reps).to(KERNEL_DEVICE)
    packed = kernel_impl("triton", "terngrad_ternarize")(g, kernel_scalar(s), kernel_scalar(INF), 2024)
    decoded = s * _levels(packed, g.numel())
    means = decoded.view(len(levels), reps).mean(dim=1)
    p = levels.double().abs() / s
    # floor 1e-12 only avoids a 0 bound for the deterministic levels p = 0 and p = 1.
    bound = 5 * s * torch.sqrt(p * (1 - p) / reps) + 1e-12
    assert torch.all((means - levels.double()).abs() <= bound), (means, levels)

    biased = s * torch.sign(levels.double()) * (p >= 0.5).double()
    assert torch.any((biased - levels.double()).abs() > bound)


@requires_triton
def test_terngrad_clips_before_drawing():
    """gc = clamp(g, -c, c) (TernGrad eq. (7)): with g = +-10, c = 1 and s = 4 the keep
    probability is 1/4. Without clipping, p = 10/4 > 1 would keep every element, far
    outside the 5-sigma band checked here."""
    n = 16384
    g = torch.full((n,), 10.0, device=KERNEL_DEVICE)
    g[1::2] = -10.0
    fn = kernel_impl("triton", "terngrad_ternarize")
    levels = _levels(fn(g, kernel_scalar(4.0), kernel_scalar(1.0), 99), n)
    assert torch.all(levels[0::2] >= 0) and torch.all(levels[1::2] <= 0)
    kept = levels.abs().mean().item()
    assert abs(kept - 0.25) <= 5 * math.sqrt(0.25 * 0.75 / n)
    # With s = c every clipped element has p = 1: always sent, with its sign.
    levels = _levels(fn(g, kernel_scalar(1.0), kernel_scalar(1.0), 99), n)
    assert torch.equal(levels, torch.sign(g.cpu().double()))


@requires_triton
def test_terngrad_round_trip_through_decode():
    impl = lambda name: kernel_impl("triton", name)  # noqa: E731
    g = kernel_vector(1000, seed=3)
    g[::7] = 0.0
    s = g.abs().max().reshape(1)
    packed = impl("terngrad_ternarize")(g, s, kernel_scalar(INF), 5)
    dec = impl("ternary_decode_sum")(packed.view(1, -1), s, g.numel())
    nz = dec != 0
    assert torch.all((dec.abs() == s) | ~nz)
    assert torch.equal(torch.sign(dec[nz]), torch.sign(g[nz]))
    assert not torch.any(nz[g == 0])
    # The largest element has p = 1: always sent.
    assert dec[g.abs().argmax()] == s * torch.sign(g[g.abs().argmax()])


# ---- terngrad_ternarize_fast_rng (the CPU stream) and TernGrad's sigma -------------------------------


@pytest.mark.parametrize("n, clip", [(0, 1.5), (1, 1.5), (1001, 1.5), (5, 0.1), (32767, INF), (32768, 1.5),
                                     (70001, INF)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_terngrad_cpu_stream_is_the_documented_one(n, clip, dtype):
    """Below 32768 elements one float per element, from 32768 on the coarse bytes refined by
    a float where they tie: both as ``kernels.terngrad_ternarize_fast_rng`` documents them."""
    g = torch.randn(n, generator=torch.Generator().manual_seed(3)).to(dtype)
    g[: n // 3] *= 1e-3  # most elements far below the scale, as in a real gradient
    scale = g.float().abs().clamp(max=clip).max().reshape(1) if n else torch.ones(1)
    got = kernels.terngrad_ternarize_fast_rng(g, scale, torch.tensor([clip]), 12345)
    want = oracle.terngrad_pcg64_codes(g, float(scale), clip, 12345)
    assert torch.equal(oracle.unpack_2bit(got, n), want)
    # the Philox stream (the Triton kernel's) is a different stream of the same law
    if n > 100:
        assert not torch.equal(got, oracle.terngrad_ternarize(g, scale, clip, 12345))


def test_terngrad_cpu_stream_of_a_zero_scale_sends_zeros():
    g = torch.zeros(40000)
    assert not kernels.terngrad_ternarize_fast_rng(g, torch.zeros(1), torch.tensor([INF]), 3).any()


def test_terngrad_cpu_stream_law_is_exact():
    """P(kept) = min(|g|, clip) / scale: the coarse byte and the refinement draw together."""
    values = torch.tensor([1.0, -0.75, 0.3, -0.01, 0.0078125, 0.004, -1e-4, 0.0])
    reps = 20000  # 160,000 elements: the coarse draw
    g = values.repeat(reps)
    packed = kernels.terngrad_ternarize_fast_rng(g, torch.tensor([1.0]), torch.tensor([0.8]), 7)
    codes = oracle.unpack_2bit(packed, g.numel()).view(reps, -1)
    level = (codes == 1).double() - (codes == 2).double()
    p = values.abs().clamp(max=0.8).double()
    se = torch.sqrt(p * (1 - p) / reps)
    assert ((level.mean(0) - values.clamp(-0.8, 0.8).double()).abs() <= 5 * se + 1e-12).all()


@pytest.mark.parametrize("n", [1, 5, 4099, 65535, 65536, 300_001])
@pytest.mark.parametrize("shape", ["gradient", "drifted", "offset", "constant", "strided"])
def test_population_std_matches_oracle(n, shape):
    """Small tensors take the exact two-pass std, large contiguous ones the one-pass moments
    (unless the mean would cancel digits): within fp32 precision of the fp64 value, and
    exactly 0 for a constant tensor. "drifted": a mean of 0.9 sigma, as a trained layer's
    gradient has."""
    x = torch.randn(2 * n, generator=torch.Generator().manual_seed(n))
    x = {"gradient": x[:n] * 1e-3, "drifted": (x[:n] + 0.9) * 1e-3, "offset": x[:n] + 30.0,
         "constant": torch.full((n,), 3.3), "strided": x[::2]}[shape]
    got = kernels.population_std(x)
    assert got.dtype == torch.float32 and got.shape == (1,)
    want = oracle.population_std(x)
    if shape == "constant" or n == 1:
        assert float(got) == 0.0
    else:
        assert abs(float(got) - want) <= 1e-6 * want



@pytest.mark.parametrize("mean_over_sigma, exact", [(0.0, False), (0.9, False), (1.1, True), (30.0, True)])
def test_population_std_takes_the_moments_while_the_mean_is_below_sigma(monkeypatch, mean_over_sigma, exact):
    """A large CPU tensor gets the one-pass moments while ``|mean| <= sigma`` (where the
    subtraction loses at most a factor 2 of the sums' precision), the exact ``std`` beyond."""
    x = (torch.randn(300_001, generator=torch.Generator().manual_seed(3)) + mean_over_sigma) * 1e-3
    calls = []
    real_std = torch.std
    monkeypatch.setattr(torch, "std", lambda *a, **k: calls.append(1) or real_std(*a, **k))
    kernels.population_std(x)
    assert bool(calls) == exact

# ---- ternary_quantize ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("stride", [1, 3])
def test_ternary_quantize_matches_oracle(backend, dtype, n, stride):
    x = kernel_vector(n, dtype, stride, seed=n + 1, ints=True)
    for t in (1.0, 2.5):  # 1.0 hits |x| == t exactly: the >= / <= boundary
        got = kernel_impl(backend, "ternary_quantize")(x, kernel_scalar(t))
        assert got.shape == ((n + 3) // 4,)
        assert torch.equal(got.cpu(), oracle.ternary_quantize(x, kernel_scalar(t)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ternary_quantize_codes_at_the_threshold(backend):
    x = torch.tensor([1.0, -1.0, 0.999, -0.999, 0.0, 3.0, -3.0], device=KERNEL_DEVICE)
    codes = oracle.unpack_2bit(kernel_impl(backend, "ternary_quantize")(x, kernel_scalar(1.0)), 7)
    assert codes.tolist() == [1, 2, 0, 0, 0, 1, 2]


# ---- sign_pack and sign_residual_ ---------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("stride", [1, 2])
def test_sign_pack_matches_oracle(backend, dtype, n, stride):
    x = kernel_vector(n, dtype, stride, seed=n + 2)
    if n > 1:
        x[0], x[1] = 0.0, -0.0  # zeros are not negative: bit 0
    bits, scale = kernel_impl(backend, "sign_pack")(x)
    want_bits, want_scale = oracle.sign_pack(x)
    assert bits.shape == ((n + 7) // 8,) and scale.shape == (1,) and scale.dtype == torch.float32
    assert torch.equal(bits.cpu(), want_bits)
    if backend == "cpu":
        assert torch.equal(scale.cpu(), want_scale)
    else:
        torch.testing.assert_close(scale.cpu(), want_scale, rtol=2e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sign_pack_of_special_values(backend):
    """NaN (of either sign) is not negative; ±inf reach the scale, and so does a NaN."""
    x = torch.tensor([float("nan"), -float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1.0, -1.0, -2.0],
                     device=KERNEL_DEVICE)
    bits, scale = kernel_impl(backend, "sign_pack")(x)
    assert torch.equal(bits.cpu(), oracle.sign_pack(x)[0])
    assert oracle.unpack_bits(bits, 9).tolist() == [0, 0, 0, 1, 0, 0, 0, 1, 1]
    assert torch.isnan(scale).all()
    assert float(kernel_impl(backend, "sign_pack")(x[2:])[1]) == float("inf")


@requires_triton
def test_sign_pack_scale_is_deterministic():
    x = kernel_vector(5 * 4096 + 3, seed=8) * 1000  # several programs' partial sums
    scales = {kernel_impl("triton", "sign_pack")(x)[1].item() for _ in range(3)}
    assert len(scales) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_sign_pack_round_trip_keeps_l1_norm(backend):
    x = kernel_vector(4099, seed=4)
    bits, scale = kernel_impl(backend, "sign_pack")(x)
    dec = kernel_impl(backend, "sign_decode_sum")(bits.view(1, -1), scale, x.numel())
    assert torch.equal(torch.sign(dec), torch.where(x < 0, -1.0, 1.0))
    torch.testing.assert_close(dec.abs().sum(), x.abs().sum(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("n", [0, 1, 5, 4099, 10001])
def test_sign_residual_matches_oracle(n):
    """x - scale * sign(x), sign -1 exactly where x < 0 (+0, -0 and tiny values included), in
    place, through contiguous, strided and unaligned views."""
    x = kernel_vector(n, seed=6)
    if n >= 4:
        x[:4] = torch.tensor([0.0, -0.0, 1e-30, -1e-30])
    scale = kernel_scalar(0.37)
    for view in (x.clone(), x.clone()[::2], x.clone()[1:]):
        want = oracle.sign_residual(view, scale)
        assert kernels.sign_residual_(view, scale) is view
        assert torch.equal(view.cpu(), want)


# ---- decode + sum of N ranks ------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,per_byte", [("ternary_decode_sum", 4), ("sign_decode_sum", 8)])
@pytest.mark.parametrize("nranks", [0, 1, 3, 8])
@pytest.mark.parametrize("numel", [0, 1, 7, 4099])
def test_decode_sum_matches_oracle(backend, name, per_byte, nranks, numel):
    gen = torch.Generator().manual_seed(nranks * 10007 + numel)
    nbytes = (numel + per_byte - 1) // per_byte
    # Every byte value (code 3 included, which decodes to 0); dyadic scales keep every
    # partial sum exact whatever the order, so the result must be bit-identical.
    packed = torch.randint(0, 256, (nranks, nbytes), generator=gen, dtype=torch.uint8).to(KERNEL_DEVICE)
    scales = (torch.randint(1, 64, (nranks,), generator=gen).float() / 16).to(KERNEL_DEVICE)
    fn = kernel_impl(backend, name)
    got = fn(packed, scales, numel)
    assert got.dtype == torch.float32 and got.shape == (numel,)
    assert torch.equal(got.cpu(), getattr(oracle, name)(packed, scales, numel))
    # Arbitrary fp32 scales: ranks are summed in the oracle's order, up to rounding.
    scales = torch.rand(nranks, generator=gen).to(KERNEL_DEVICE)
    torch.testing.assert_close(fn(packed, scales, numel).cpu(), getattr(oracle, name)(packed, scales, numel),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,per_byte", [("ternary_decode_sum", 4), ("sign_decode_sum", 8)])
def test_decode_sum_strided_payloads(backend, name, per_byte):
    nranks, numel = 5, 1000
    nbytes = (numel + per_byte - 1) // per_byte
    gen = torch.Generator().manual_seed(11)
    # Rows longer than needed, and a column stride of 2: neither is contiguous.
    big = torch.randint(0, 256, (nranks, 2 * nbytes + 6), generator=gen, dtype=torch.uint8).to(KERNEL_DEVICE)
    packed = big[:, ::2]
    scales = torch.tensor([0.5, 1.0, 2.0, 0.25, 4.0], device=KERNEL_DEVICE)
    got = kernel_impl(backend, name)(packed, scales, numel)
    assert torch.equal(got.cpu(), getattr(oracle, name)(packed, scales, numel))


@requires_triton
@pytest.mark.parametrize("name", ["ternary_decode_sum", "sign_decode_sum"])
def test_decode_sum_kernel_is_one_launch(monkeypatch, name):
    from hvdcomp.kernels import ternary

    spy = _CountLaunches(ternary._decode_sum_kernel)
    monkeypatch.setattr(ternary, "_decode_sum_kernel", spy)
    packed = torch.zeros(5, 250, dtype=torch.uint8, device=KERNEL_DEVICE)
    kernel_impl("triton", name)(packed, torch.ones(5, device=KERNEL_DEVICE), 1000)
    assert len(spy.grids) == 1  # all five ranks in one launch


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_sum_sums_levels(backend):
    """Hand-made case: rank levels (+1, -1, 0) with scales 1, 2, 4."""
    codes = torch.tensor([[1, 2, 0, 3], [1, 1, 2, 0], [2, 0, 0, 1]], dtype=torch.uint8)
    packed = torch.stack([oracle.pack_2bit(c) for c in codes]).to(KERNEL_DEVICE)
    got = kernel_impl(backend, "ternary_decode_sum")(packed, torch.tensor([1.0, 2.0, 4.0], device=KERNEL_DEVICE), 4)
    assert got.cpu().tolist() == [1 + 2 - 4, -1 + 2, -2.0, 4.0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,per_byte", [("ternary_decode_sum", 4), ("sign_decode_sum", 8)])
def test_decode_sum_rejects_short_rows(backend, name, per_byte):
    packed = torch.zeros(2, 3, dtype=torch.uint8, device=KERNEL_DEVICE)
    with pytest.raises(ValueError):
        kernel_impl(backend, name)(packed, torch.ones(2, device=KERNEL_DEVICE), 3 * per_byte + 1)
