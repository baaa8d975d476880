"""2-bit / 1-bit packing, both backends against the oracle's byte layout, and round trips."""

import pytest
import torch

import kernel_oracle as oracle
from conftest import BACKENDS, KERNEL_DEVICE, kernel_impl

SIZES = [0, 1, 4, 5, 7, 1000, 4099]


def _randint(high, n, stride=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    t = torch.randint(0, high, (n * stride,), generator=gen, dtype=torch.uint8).to(KERNEL_DEVICE)
    return t[::stride] if stride > 1 else t


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("stride", [1, 3])
def test_pack_2bit_matches_oracle_and_round_trips(backend, n, stride):
    codes = _randint(4, n, stride, seed=n)
    packed = kernel_impl(backend, "pack_2bit")(codes)
    assert packed.dtype == torch.uint8 and packed.shape == ((n + 3) // 4,)
    assert torch.equal(packed.cpu(), oracle.pack_2bit(codes))
    values = codes.cpu().tolist()
    assert packed.tolist() == [sum(c << (2 * j) for j, c in enumerate(values[i:i + 4])) for i in range(0, n, 4)]
    assert torch.equal(kernel_impl(backend, "unpack_2bit")(packed, n), codes)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("as_bool", [False, True])
def test_pack_bits_matches_oracle_and_round_trips(backend, n, stride, as_bool):
    bits = _randint(2, n, stride, seed=n + 1)
    if as_bool:
        bits = bits.bool()
    packed = kernel_impl(backend, "pack_bits")(bits)
    assert packed.dtype == torch.uint8 and packed.shape == ((n + 7) // 8,)
    assert torch.equal(packed.cpu(), oracle.pack_bits(bits))
    assert torch.equal(kernel_impl(backend, "unpack_bits")(packed, n), bits.to(torch.uint8))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nbytes", [0, 1, 2, 1025])
@pytest.mark.parametrize("stride", [1, 2])
def test_unpack_arbitrary_bytes_matches_oracle(backend, nbytes, stride):
    """Every byte value, numel both a multiple of the per-byte count and a ragged one."""
    packed = _randint(256, nbytes, stride, seed=nbytes + 2)
    for numel in {4 * nbytes, max(4 * nbytes - 3, 0)}:
        got = kernel_impl(backend, "unpack_2bit")(packed, numel)
        assert torch.equal(got.cpu(), oracle.unpack_2bit(packed, numel))
    for numel in {8 * nbytes, max(8 * nbytes - 5, 0)}:
        got = kernel_impl(backend, "unpack_bits")(packed, numel)
        assert torch.equal(got.cpu(), oracle.unpack_bits(packed, numel))


@pytest.mark.parametrize("backend", BACKENDS)
def test_pack_every_code_at_every_position(backend):
    """Each code value at each of the four slots of a byte lands on the right bits."""
    codes = torch.tensor([[c if j == slot else 0 for j in range(4)] for c in range(4) for slot in range(4)],
                         dtype=torch.uint8).reshape(-1).to(KERNEL_DEVICE)
    packed = kernel_impl(backend, "pack_2bit")(codes)
    expected = torch.tensor([c << (2 * slot) for c in range(4) for slot in range(4)], dtype=torch.uint8)
    assert torch.equal(packed.cpu(), expected)
    bits = torch.eye(8, dtype=torch.uint8).reshape(-1).to(KERNEL_DEVICE)
    one_hot = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)
    assert torch.equal(kernel_impl(backend, "pack_bits")(bits).cpu(), one_hot)
    assert torch.equal(kernel_impl(backend, "pack_bits")(bits.bool()).cpu(), one_hot)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pack_unaligned_and_strided_bool_views(backend):
    """Views that are not whole aligned words (an offset slice, a strided bool mask): the CPU
    backend copies them into a padded buffer before its word multiply."""
    base = _randint(4, 4103, seed=9)
    for codes in (base[3:], base[1::2], base[:4099]):
        assert torch.equal(kernel_impl(backend, "pack_2bit")(codes).cpu(), oracle.pack_2bit(codes))
    mask = _randint(2, 8 * 513, seed=10).bool()
    for bits in (mask[5:], mask[::3], mask[:4096]):
        assert torch.equal(kernel_impl(backend, "pack_bits")(bits).cpu(), oracle.pack_bits(bits))


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_round_trip(backend):
    """>= 1M codes, a ragged tail in the last byte."""
    n = (1 << 20) + 5
    codes = _randint(4, n, seed=3)
    packed = kernel_impl(backend, "pack_2bit")(codes)
    assert torch.equal(packed.cpu(), oracle.pack_2bit(codes))
    assert torch.equal(kernel_impl(backend, "unpack_2bit")(packed, n), codes)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,per_byte", [("unpack_2bit", 4), ("unpack_bits", 8)])
def test_unpack_rejects_short_input(backend, name, per_byte):
    with pytest.raises(ValueError):
        kernel_impl(backend, name)(torch.zeros(2, dtype=torch.uint8, device=KERNEL_DEVICE), 2 * per_byte + 1)
