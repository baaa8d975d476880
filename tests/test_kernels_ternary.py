"""Triton TernGrad / ternary / sign kernels against the reference.

Packed bytes are exact, the stochastic ones included: ``tl.rand4x`` and the reference's
``element_uniforms`` draw the same bits for the same seed (element i: word i % 4 of
Philox counter i // 4). Decoded sums
are exact where every partial sum is (dyadic scales); ``sign_pack``'s scale is an fp32
sum in another order than torch's, compared with a tight relative tolerance.
"""

import math

import pytest
import torch

from conftest import KERNEL_DEVICE, kernel_scalar, kernel_vector, requires_triton, spy_on_triton
from hvdcomp import kernels
from hvdcomp.kernels import reference

pytestmark = requires_triton

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [0, 1, 7, 1000, 4099]
INF = float("inf")


def _impl(name):
    return kernels.triton_impl(name)


def _levels(packed, n):
    """Decoded ternary levels (+1, 0, -1) of a packed payload, via the reference."""
    codes = reference.unpack_2bit(packed.cpu(), n).to(torch.int64)
    return (codes == 1).double() - (codes == 2).double()


class _CountLaunches:
    """Stands in for a @triton.jit kernel and records each launch's grid."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


# ---- terngrad_ternarize ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("stride", [1, 2])
def test_terngrad_matches_reference_bit_for_bit(dtype, n, stride):
    g = kernel_vector(n, dtype, stride, seed=n)
    scale = g.float().abs().max().reshape(1) if n else kernel_scalar(1.0)
    for clip, seed in [(INF, 7), (0.8, 2**40 + 12345)]:  # a seed with a nonzero high word too
        got = _impl("terngrad_ternarize")(g, scale, kernel_scalar(clip), seed)
        assert got.dtype == torch.uint8 and got.shape == ((n + 3) // 4,) and got.is_contiguous()
        assert torch.equal(got, reference.terngrad_ternarize(g, scale, kernel_scalar(clip), seed))


def test_terngrad_seed_edges_match_reference():
    """Seeds at the int32/uint32/int64 boundaries (Triton types an int argument by its value;
    Philox takes the low and high 32-bit words as its key)."""
    g = kernel_vector(1000, seed=2)
    s = g.abs().max().reshape(1)
    for seed in (0, 1, 2**31 - 1, 2**31 + 5, 2**32 - 1, 2**32, 2**63 - 1):
        got = _impl("terngrad_ternarize")(g, s, kernel_scalar(INF), seed)
        assert torch.equal(got, reference.terngrad_ternarize(g, s, kernel_scalar(INF), seed)), seed
    with pytest.raises(ValueError):
        _impl("terngrad_ternarize")(g, s, kernel_scalar(INF), -1)


def test_terngrad_large_matches_reference():
    """>= 1M elements (many programs), a ragged last byte."""
    n = (1 << 20) + 3
    g = kernel_vector(n, seed=5)
    scale, clip = kernel_scalar(2.5), kernel_scalar(2.5)
    got = _impl("terngrad_ternarize")(g, scale, clip, 987654321)
    assert torch.equal(got, reference.terngrad_ternarize(g, scale, clip, 987654321))


def test_terngrad_seed_changes_the_draw_and_zero_scale_decodes_to_zero():
    g = kernel_vector(4099, seed=1)
    s = g.abs().max().reshape(1)
    a = _impl("terngrad_ternarize")(g, s, kernel_scalar(INF), 1)
    b = _impl("terngrad_ternarize")(g, s, kernel_scalar(INF), 2)
    assert not torch.equal(a, b)
    assert torch.equal(a, _impl("terngrad_ternarize")(g, s, kernel_scalar(INF), 1))
    # s = 0: the reference's test u*s < |gc| keeps every nonzero element (codes are not
    # all zero), but every level decodes to 0 * (+-1) = 0.
    zero = kernel_scalar(0.0)
    packed = _impl("terngrad_ternarize")(g, zero, kernel_scalar(INF), 1)
    assert torch.equal(packed, reference.terngrad_ternarize(g, zero, kernel_scalar(INF), 1))
    assert not torch.any(_impl("ternary_decode_sum")(packed.view(1, -1), zero, g.numel()))


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
    decoded = s * _levels(_impl("terngrad_ternarize")(g, kernel_scalar(s), kernel_scalar(INF), 2024), g.numel())
    means = decoded.view(len(levels), reps).mean(dim=1)
    p = levels.double().abs() / s
    # floor 1e-12 only avoids a 0 bound for the deterministic levels p = 0 and p = 1.
    bound = 5 * s * torch.sqrt(p * (1 - p) / reps) + 1e-12
    assert torch.all((means - levels.double()).abs() <= bound), (means, levels)

    biased = s * torch.sign(levels.double()) * (p >= 0.5).double()
    assert torch.any((biased - levels.double()).abs() > bound)


def test_terngrad_clips_before_drawing():
    """gc = clamp(g, -c, c) (TernGrad eq. (7)): with g = +-10, c = 1 and s = 4 the keep
    probability is 1/4. Without clipping, p = 10/4 > 1 would keep every element, far
    outside the 5-sigma band checked here."""
    n = 16384
    g = torch.full((n,), 10.0, device=KERNEL_DEVICE)
    g[1::2] = -10.0
    levels = _levels(_impl("terngrad_ternarize")(g, kernel_scalar(4.0), kernel_scalar(1.0), 99), n)
    assert torch.all(levels[0::2] >= 0) and torch.all(levels[1::2] <= 0)
    kept = levels.abs().mean().item()
    assert abs(kept - 0.25) <= 5 * math.sqrt(0.25 * 0.75 / n)
    # With s = c every clipped element has p = 1: always sent, with its sign.
    levels = _levels(_impl("terngrad_ternarize")(g, kernel_scalar(1.0), kernel_scalar(1.0), 99), n)
    assert torch.equal(levels, torch.sign(g.cpu().double()))


def test_terngrad_round_trip_through_decode():
    g = kernel_vector(1000, seed=3)
    g[::7] = 0.0
    s = g.abs().max().reshape(1)
    packed = _impl("terngrad_ternarize")(g, s, kernel_scalar(INF), 5)
    dec = _impl("ternary_decode_sum")(packed.view(1, -1), s, g.numel())
    nz = dec != 0
    assert torch.all((dec.abs() == s) | ~nz)
    assert torch.equal(torch.sign(dec[nz]), torch.sign(g[nz]))
    assert not torch.any(nz[g == 0])
    # The largest element has p = 1: always sent.
    assert dec[g.abs().argmax()] == s * torch.sign(g[g.abs().argmax()])


# ---- ternary_quantize --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("stride", [1, 3])
def test_ternary_quantize_matches_reference(dtype, n, stride):
    x = kernel_vector(n, dtype, stride, seed=n + 1, ints=True)
    for t in (1.0, 2.5):  # 1.0 hits |x| == t exactly: the >= / <= boundary
        got = _impl("ternary_quantize")(x, kernel_scalar(t))
        assert got.shape == ((n + 3) // 4,)
        assert torch.equal(got, reference.ternary_quantize(x, kernel_scalar(t)))


def test_ternary_quantize_codes_at_the_threshold():
    x = torch.tensor([1.0, -1.0, 0.999, -0.999, 0.0, 3.0, -3.0], device=KERNEL_DEVICE)
    codes = reference.unpack_2bit(_impl("ternary_quantize")(x, kernel_scalar(1.0)).cpu(), 7)
    assert codes.tolist() == [1, 2, 0, 0, 0, 1, 2]


# ---- sign_pack ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("stride", [1, 2])
def test_sign_pack_matches_reference(dtype, n, stride):
    x = kernel_vector(n, dtype, stride, seed=n + 2)
    if n:
        x[0] = 0.0  # zero is not negative: bit 0
    bits, scale = _impl("sign_pack")(x)
    want_bits, want_scale = reference.sign_pack(x)
    assert bits.shape == ((n + 7) // 8,) and scale.shape == (1,) and scale.dtype == torch.float32
    assert torch.equal(bits, want_bits)
    torch.testing.assert_close(scale, want_scale, rtol=2e-6, atol=0)


def test_sign_pack_scale_is_deterministic():
    x = kernel_vector(5 * 4096 + 3, seed=8) * 1000  # several programs' partial sums
    scales = {_impl("sign_pack")(x)[1].item() for _ in range(3)}
    assert len(scales) == 1


def test_sign_pack_round_trip_keeps_l1_norm():
    x = kernel_vector(4099, seed=4)
    bits, scale = _impl("sign_pack")(x)
    dec = _impl("sign_decode_sum")(bits.view(1, -1), scale, x.numel())
    assert torch.equal(torch.sign(dec), torch.where(x < 0, -1.0, 1.0))
    torch.testing.assert_close(dec.abs().sum(), x.abs().sum(), rtol=1e-5, atol=0)


# ---- decode + sum of N ranks ---------------------------------------------------------------------------


@pytest.mark.parametrize("name,per_byte", [("ternary_decode_sum", 4), ("sign_decode_sum", 8)])
@pytest.mark.parametrize("nranks", [0, 1, 3, 8])
@pytest.mark.parametrize("numel", [0, 1, 7, 4099])
def test_decode_sum_matches_reference(name, per_byte, nranks, numel):
    gen = torch.Generator().manual_seed(nranks * 10007 + numel)
    nbytes = (numel + per_byte - 1) // per_byte
    # Every byte value (code 3 included, which decodes to 0); dyadic scales keep every
    # partial sum exact whatever the order, so the result must be bit-identical.
    packed = torch.randint(0, 256, (nranks, nbytes), generator=gen, dtype=torch.uint8).to(KERNEL_DEVICE)
    scales = (torch.randint(1, 64, (nranks,), generator=gen).float() / 16).to(KERNEL_DEVICE)
    got = _impl(name)(packed, scales, numel)
    assert got.dtype == torch.float32 and got.shape == (numel,)
    assert torch.equal(got, getattr(reference, name)(packed, scales, numel))
    # Arbitrary fp32 scales: ranks are summed in the same order, up to rounding.
    scales = torch.rand(nranks, generator=gen).to(KERNEL_DEVICE)
    torch.testing.assert_close(_impl(name)(packed, scales, numel),
                               getattr(reference, name)(packed, scales, numel), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name,per_byte", [("ternary_decode_sum", 4), ("sign_decode_sum", 8)])
def test_decode_sum_strided_payloads_and_one_launch(monkeypatch, name, per_byte):
    from hvdcomp.kernels import ternary

    nranks, numel = 5, 1000
    nbytes = (numel + per_byte - 1) // per_byte
    gen = torch.Generator().manual_seed(11)
    # Rows longer than needed, and a column stride of 2: neither is contiguous.
    big = torch.randint(0, 256, (nranks, 2 * nbytes + 6), generator=gen, dtype=torch.uint8).to(KERNEL_DEVICE)
    packed = big[:, ::2]
    scales = torch.tensor([0.5, 1.0, 2.0, 0.25, 4.0], device=KERNEL_DEVICE)[::1]
    spy = _CountLaunches(ternary._decode_sum_kernel)
    monkeypatch.setattr(ternary, "_decode_sum_kernel", spy)
    got = _impl(name)(packed, scales, numel)
    assert len(spy.grids) == 1  # all five ranks in one launch
    assert torch.equal(got, getattr(reference, name)(packed.contiguous(), scales, numel))


def test_decode_sum_sums_levels():
    """Hand-made case: rank levels (+1, -1, 0) with scales 1, 2, 4."""
    codes = torch.tensor([[1, 2, 0, 3], [1, 1, 2, 0], [2, 0, 0, 1]], dtype=torch.uint8)
    packed = torch.stack([reference.pack_2bit(c) for c in codes]).to(KERNEL_DEVICE)
    got = _impl("ternary_decode_sum")(packed, torch.tensor([1.0, 2.0, 4.0], device=KERNEL_DEVICE), 4)
    assert got.cpu().tolist() == [1 + 2 - 4, -1 + 2, -2.0, 4.0]


@pytest.mark.parametrize("name,per_byte", [("ternary_decode_sum", 4), ("sign_decode_sum", 8)])
def test_decode_sum_rejects_short_rows(name, per_byte):
    packed = torch.zeros(2, 3, dtype=torch.uint8, device=KERNEL_DEVICE)
    with pytest.raises(ValueError):
        _impl(name)(packed, torch.ones(2, device=KERNEL_DEVICE), 3 * per_byte + 1)


@pytest.mark.parametrize("name", ["terngrad_ternarize", "sign_pack", "ternary_decode_sum"])
def test_env_forces_triton_dispatch(monkeypatch, name):
    calls = spy_on_triton(monkeypatch, name)
    g = kernel_vector(100, torch.bfloat16, seed=12)
    args = {
        "terngrad_ternarize": (g, kernel_scalar(2.0), kernel_scalar(INF), 3),
        "sign_pack": (g,),
        "ternary_decode_sum": (torch.arange(50, dtype=torch.uint8, device=KERNEL_DEVICE).view(2, 25),
                               kernel_scalar(1.0).repeat(2), 100),
    }[name]
    monkeypatch.setenv("HVDCOMP_KERNELS", "triton")
    got = getattr(kernels, name)(*args)
    assert calls == [name]
    want = getattr(reference, name)(*args)
    assert torch.equal(got[0], want[0]) if name == "sign_pack" else torch.equal(got, want)
