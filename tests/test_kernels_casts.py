"""Wire casts, both backends bit-for-bit against the oracle (torch's casts).

Non-NaN results are compared as integer bit patterns; NaN must stay NaN (torch's own NaN
bits differ between its CPU and CUDA conversions, so the bits of a NaN are not part of the
contract).
"""
import warnings

import pytest
import torch

import kernel_oracle as oracle
from conftest import BACKENDS, KERNEL_DEVICE, kernel_impl


def _f32(bits):
    """fp32 tensor from a list of uint32 bit patterns."""
    return torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32).to(KERNEL_DEVICE)


def _bits(t):
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


def _assert_same_bits(got, want):
    got, want = got.cpu(), want.cpu()
    assert got.dtype == want.dtype and got.shape == want.shape and got.is_contiguous()
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    mismatch = (_bits(got) != _bits(want)) & ~nan
    first = mismatch.nonzero()[:5].flatten().tolist()
    assert not mismatch.any(), f"{int(mismatch.sum())} mismatches, first at {first}"


SPECIAL = [
    0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFFFFFFF,  # quiet/signalling NaN, both signs
    0x7F800000, 0xFF800000, 0x00000000, 0x80000000,  # +-Inf, +-0
    0x00000001, 0x80000001, 0x007FFFFF, 0x00008000, 0x00018000,  # fp32 subnormals (ties too)
    0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F8000, 0x7F7F7FFF,  # max finite: overflows to Inf in bf16
    0x3F808000, 0x3F818000,  # halfway, even / odd kept mantissa: down / up
    0x3F808001, 0x3F807FFF, 0x3F817FFF, 0xBF818000,  # just above/below a tie, negative tie
    0x477FE000, 0x477FEFFF, 0x477FF000, 0xC77FF000,  # 65504, just below 65520, 65520 (fp16 Inf)
    0x33000000, 0x33000001, 0x33400000, 0x387FC000,  # fp16 subnormal ties: 2^-25, 1.5*2^-24
    0x38800000, 0x387FE000, 0x3C000000, 0x3F800000,  # fp16 min normal and its neighbours
]


def _random_fp32(n, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**31), 2**31, (n,), generator=gen, dtype=torch.int64).to(torch.int32).view(
        torch.float32).to(KERNEL_DEVICE)


def _ties(mantissa_bits):
    """fp32 values exactly halfway between consecutive values of a 16-bit float format,
    and their fp32 neighbours, for every pattern of the narrow format."""
    drop = 23 - mantissa_bits
    narrow = torch.arange(0, 1 << 16, dtype=torch.int64)
    if mantissa_bits == 7:  # bf16: its bits are the fp32 top half
        base = narrow << 16
    else:  # fp16: every finite fp16 value, widened exactly
        h = narrow.to(torch.int16).view(torch.float16)
        base = h[torch.isfinite(h)].float().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        base = base[(base & 0x7FFFFFFF) >= 0x38800000]  # normal fp16 only: ulp is 2^(e-10)
    half = 1 << (drop - 1)
    bits = torch.cat([base + half, base + half - 1, base + half + 1])
    return bits.to(torch.int32).view(torch.float32).to(KERNEL_DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["cast_bf16", "cast_fp16"])
def test_narrowing_special_values(backend, name):
    x = _f32(SPECIAL)
    with warnings.catch_warnings():
        # Overflow to Inf is data here, not an accident to warn about (the interpreter's
        # numpy cast would warn if the kernel let it overflow).
        warnings.simplefilter("error", RuntimeWarning)
        got = kernel_impl(backend, name)(x)
    _assert_same_bits(got, getattr(oracle, name)(x))


def test_bf16_test_data_distinguishes_rounding_from_truncation():
    """The tie cases must make truncation (the interpreter's own cast) fail this suite."""
    x = _f32(SPECIAL)
    truncated = (x.view(torch.int32) >> 16).to(torch.int16)
    finite = torch.isfinite(x)
    assert (truncated[finite] != oracle.cast_bf16(x).view(torch.int16).to(x.device)[finite]).sum() >= 3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,mantissa", [("cast_bf16", 7), ("cast_fp16", 10)])
def test_narrowing_every_tie(backend, name, mantissa):
    x = _ties(mantissa)
    _assert_same_bits(kernel_impl(backend, name)(x), getattr(oracle, name)(x))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["cast_bf16", "cast_fp16"])
@pytest.mark.parametrize("n,stride", [(0, 1), (1, 1), (7, 1), (4099, 1), (4099, 3), (200_000, 1)])
def test_narrowing_random_bit_patterns(backend, name, n, stride):
    """Random 32-bit patterns cover every exponent: huge, tiny, subnormal, NaN, Inf."""
    x = _random_fp32(n * stride, seed=n + stride)[::stride]
    _assert_same_bits(kernel_impl(backend, name)(x), getattr(oracle, name)(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_cast_bf16_of_gaussian_values(backend):
    x = torch.randn(4099, generator=torch.Generator().manual_seed(1)).to(KERNEL_DEVICE) * 1e3
    _assert_same_bits(kernel_impl(backend, "cast_bf16")(x), x.to(torch.bfloat16))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("stride", [1, 2])
def test_widening_every_pattern(backend, dtype, stride):
    """All 65536 bit patterns of the 16-bit format, widened exactly."""
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).repeat_interleave(stride)
    x = x.view(dtype).to(KERNEL_DEVICE)[::stride]
    _assert_same_bits(kernel_impl(backend, "cast_fp32")(x), oracle.cast_fp32(x))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["cast_bf16", "cast_fp16", "cast_fp32"])
def test_fp32_round_trip_and_empty(backend, name):
    fn = kernel_impl(backend, name)
    x = torch.randn(1000, generator=torch.Generator().manual_seed(2)).to(KERNEL_DEVICE)
    if name == "cast_fp32":
        for dt in (torch.bfloat16, torch.float16):
            assert torch.equal(fn(x.to(dt)).to(dt), x.to(dt))
    else:
        back = kernel_impl(backend, "cast_fp32")(fn(x))
        assert torch.equal(back.cpu(), getattr(oracle, name)(x).float())
    empty = fn(torch.empty(0, device=KERNEL_DEVICE))
    assert empty.shape == (0,) and empty.dtype == getattr(oracle, name)(torch.empty(0)).dtype
