"""Triton 2-bit / 1-bit packing against the reference byte layout, and round trips."""

import pytest
import torch

from conftest import KERNEL_DEVICE, requires_triton, spy_on_triton
from hvdcomp import kernels
from hvdcomp.kernels import reference

pytestmark = requires_triton

SIZES = [0, 1, 7, 1000, 4099]


def _randint(high, n, stride=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    t = torch.randint(0, high, (n * stride,), generator=gen, dtype=torch.uint8).to(KERNEL_DEVICE)
    return t[::stride] if stride > 1 else t


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("stride", [1, 3])
def test_pack_2bit_matches_reference_and_round_trips(n, stride):
    codes = _randint(4, n, stride, seed=n)
    packed = kernels.triton_impl("pack_2bit")(codes)
    assert packed.dtype == torch.uint8 and packed.shape == ((n + 3) // 4,)
    assert torch.equal(packed, reference.pack_2bit(codes))
    assert torch.equal(kernels.triton_impl("unpack_2bit")(packed, n), codes)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("as_bool", [False, True])
def test_pack_bits_matches_reference_and_round_trips(n, stride, as_bool):
    bits = _randint(2, n, stride, seed=n + 1)
    if as_bool:
        bits = bits.bool()
    packed = kernels.triton_impl("pack_bits")(bits)
    assert packed.dtype == torch.uint8 and packed.shape == ((n + 7) // 8,)
    assert torch.equal(packed, reference.pack_bits(bits))
    assert torch.equal(kernels.triton_impl("unpack_bits")(packed, n), bits.to(torch.uint8))


@pytest.mark.parametrize("nbytes", [0, 1, 2, 1025])
@pytest.mark.parametrize("stride", [1, 2])
def test_unpack_arbitrary_bytes_matches_reference(nbytes, stride):
    """Every byte value, numel both a multiple of the per-byte count and a ragged one."""
    packed = _randint(256, nbytes, stride, seed=nbytes + 2)
    for numel in {4 * nbytes, max(4 * nbytes - 3, 0)}:
        want = reference.unpack_2bit(packed.contiguous(), numel)
        assert torch.equal(kernels.triton_impl("unpack_2bit")(packed, numel), want)
    for numel in {8 * nbytes, max(8 * nbytes - 5, 0)}:
        want = reference.unpack_bits(packed.contiguous(), numel)
        assert torch.equal(kernels.triton_impl("unpack_bits")(packed, numel), want)


def test_pack_every_code_at_every_position():
    """Each code value at each of the four slots of a byte lands on the right bits."""
    codes = torch.tensor([[c if j == slot else 0 for j in range(4)] for c in range(4) for slot in range(4)],
                         dtype=torch.uint8).reshape(-1).to(KERNEL_DEVICE)
    packed = kernels.triton_impl("pack_2bit")(codes)
    expected = torch.tensor([c << (2 * slot) for c in range(4) for slot in range(4)], dtype=torch.uint8)
    assert torch.equal(packed.cpu(), expected)
    bits = torch.eye(8, dtype=torch.uint8).reshape(-1).to(KERNEL_DEVICE)
    one_hot = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)
    assert torch.equal(kernels.triton_impl("pack_bits")(bits).cpu(), one_hot)


def test_large_round_trip():
    """>= 1M codes, a ragged tail in the last byte."""
    n = (1 << 20) + 5
    codes = _randint(4, n, seed=3)
    packed = kernels.triton_impl("pack_2bit")(codes)
    assert torch.equal(packed, reference.pack_2bit(codes))
    assert torch.equal(kernels.triton_impl("unpack_2bit")(packed, n), codes)


@pytest.mark.parametrize("name,per_byte", [("unpack_2bit", 4), ("unpack_bits", 8)])
def test_unpack_rejects_short_input(name, per_byte):
    with pytest.raises(ValueError):
        kernels.triton_impl(name)(torch.zeros(2, dtype=torch.uint8, device=KERNEL_DEVICE), 2 * per_byte + 1)


@pytest.mark.parametrize("name", ["pack_2bit", "unpack_2bit", "pack_bits", "unpack_bits"])
def test_env_forces_triton_dispatch(monkeypatch, name):
    calls = spy_on_triton(monkeypatch, name)
    args = (_randint(4, 1001, seed=4),) if name.startswith("pack") else (_randint(256, 251, seed=5), 1001)
    monkeypatch.setenv("HVDCOMP_KERNELS", "triton")
    assert torch.equal(getattr(kernels, name)(*args), getattr(reference, name)(*args))
    assert calls == [name]
    monkeypatch.setenv("HVDCOMP_KERNELS", "reference")
    getattr(kernels, name)(*args)
    assert calls == [name]
