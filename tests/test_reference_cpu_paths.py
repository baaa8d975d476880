"""The CPU (torch reference) fast paths against brute force, without Triton: the sampled
candidate search of top-k, the word-wise sparse nonzero and the uint8 2-bit packing are
exact; TernGrad's CPU stream (PCG64) is the documented one."""
import functools

import numpy as np
import pytest
import torch

from hvdcomp.kernels import reference


def brute_topk(x, k):
    """k largest |x| (NaN above inf), ties to the lower index, in increasing index order."""
    key = reference._magnitude_key(x).to(torch.int64)
    n = x.numel()
    order = torch.sort(-key * (n + 1) + torch.arange(n), stable=True).indices
    return torch.sort(order[:k]).values


@functools.lru_cache(maxsize=1)
def cases():
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
    out += [(periodic, 200), (periodic, 2000), (periodic, 30_000),
            (torch.randint(0, 4, (n,), generator=g).float(), 2000),  # masses of ties
            (torch.ones(n), 500), (special, 3), (special, 500),
            (torch.linspace(0, 1, n), 1000), (torch.randn(n, generator=g).to(torch.bfloat16), 500),
            (torch.randn(2 * n, generator=g)[::2], 700)]  # a strided view
    return out


@pytest.mark.parametrize("case", range(len(cases())))
def test_topk_indices_is_exact(case):
    x, k = cases()[case]
    assert torch.equal(reference.topk_indices(x, k), brute_topk(x, k))


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 63, 64, 1000, 100_003])
@pytest.mark.parametrize("density", [0.0, 0.001, 0.05, 0.5, 1.0])
def test_nonzero_sparse_is_nonzero(n, density):
    m = torch.rand(n, generator=torch.Generator().manual_seed(n)) < density
    assert torch.equal(reference.nonzero_sparse(m), m.nonzero().squeeze(1))
    assert torch.equal(reference.nonzero_sparse(m[3:]), m[3:].nonzero().squeeze(1))  # unaligned


@pytest.mark.parametrize("n", [0, 1, 4, 5, 4099])
def test_pack_2bit_round_trips(n):
    codes = torch.randint(0, 4, (n,), generator=torch.Generator().manual_seed(n), dtype=torch.uint8)
    packed = reference.pack_2bit(codes)
    assert packed.shape == ((n + 3) // 4,)
    assert torch.equal(reference.unpack_2bit(packed, n), codes)
    assert packed.tolist() == [sum(int(c) << (2 * j) for j, c in enumerate(codes[i:i + 4])) for i in range(0, n, 4)]


def test_terngrad_torch_rng_is_the_documented_stream():
    g = torch.randn(1001, generator=torch.Generator().manual_seed(3))
    scale, clip = g.abs().max().reshape(1), torch.tensor([1.5])
    u = torch.from_numpy(np.random.Generator(np.random.PCG64(12345)).random(1001, dtype=np.float32))
    keep = u * scale < g.abs().clamp(max=1.5)
    want = torch.where(keep, torch.where(g > 0, 1, 2), 0).to(torch.uint8)
    got = reference.terngrad_ternarize_fast_rng(g, scale, clip, 12345)
    assert torch.equal(reference.unpack_2bit(got, 1001), want)
    # the Philox reference (the Triton kernel's oracle) is a different stream of the same law
    assert not torch.equal(got, reference.terngrad_ternarize(g, scale, clip, 12345))


@pytest.mark.parametrize("n", [0, 1, 8, 9, 4099])
def test_pack_bits_round_trips(n):
    bits = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.5
    packed = reference.pack_bits(bits)
    assert torch.equal(packed, reference.pack_bits(bits.to(torch.uint8)))
    assert torch.equal(reference.unpack_bits(packed, n), bits.to(torch.uint8))
    assert packed.tolist() == [sum(int(b) << j for j, b in enumerate(bits[i:i + 8])) for i in range(0, n, 8)]
