"""The CPU (torch reference) fast paths against brute force, without Triton: the sampled
candidate search of top-k, the NumPy nonzero and compares and the uint8 2-bit packing are
exact; TernGrad's CPU stream (PCG64 bytes, refined) is the documented one, with its law."""
import functools
import math

import pytest
import torch

from hvdcomp.kernels import reference

from terngrad_stream import documented_codes


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
    nans = torch.randn(n, generator=g)
    nans[::7] = float("nan")  # the sample's threshold is a NaN's key: the keys' compare
    out += [(periodic, 200), (periodic, 2000), (periodic, 30_000),
            (torch.randint(0, 4, (n,), generator=g).float(), 2000),  # masses of ties
            (torch.ones(n), 500), (special, 3), (special, 500), (nans, 100), (nans, 40_000),
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
    assert torch.equal(reference.nonzero_sparse(m[::3]), m[::3].nonzero().squeeze(1))  # strided


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_magnitude_and_plain_compares_equal_torchs(dtype):
    x = torch.randn(5000, generator=torch.Generator().manual_seed(2)).to(dtype)
    x[:6] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 0.5])
    for bound in (0.0, 0.5, 1.25, math.inf):
        assert torch.equal(reference.magnitude_at_least(x, bound), x.abs() >= bound)
        assert torch.equal(reference.magnitude_at_least(x[::2], bound), x[::2].abs() >= bound)
        assert torch.equal(reference.at_least(x, bound), x >= bound)
    key = reference._magnitude_key(x.float())
    t = int(key[100])
    assert torch.equal(reference.at_least(key, t), key >= t)
    ints = torch.arange(-5, 6, dtype=torch.int32)  # a fractional bound against integers
    assert torch.equal(reference.at_least(ints, 2.5), ints >= 2.5)
    assert torch.equal(reference.less(ints, -0.5), ints < -0.5)


@pytest.mark.parametrize("n", [0, 1, 4, 5, 4099])
def test_pack_2bit_round_trips(n):
    codes = torch.randint(0, 4, (n,), generator=torch.Generator().manual_seed(n), dtype=torch.uint8)
    packed = reference.pack_2bit(codes)
    assert packed.shape == ((n + 3) // 4,)
    assert torch.equal(reference.unpack_2bit(packed, n), codes)
    assert packed.tolist() == [sum(int(c) << (2 * j) for j, c in enumerate(codes[i:i + 4])) for i in range(0, n, 4)]


@pytest.mark.parametrize("n, clip", [(1001, 1.5), (5, 0.1), (32768, 1.5), (70001, math.inf)])
def test_terngrad_cpu_stream_is_the_documented_one(n, clip):
    g = torch.randn(n, generator=torch.Generator().manual_seed(3))
    g[: n // 3] *= 1e-3  # most elements far below the scale, as in a real gradient
    scale = g.abs().clamp(max=clip).max().reshape(1)
    got = reference.terngrad_ternarize_fast_rng(g, scale, torch.tensor([clip]), 12345)
    want = documented_codes(g, float(scale), clip, 12345)
    assert torch.equal(reference.unpack_2bit(got, n), want)
    # the Philox reference (the Triton kernel's oracle) is a different stream of the same law
    if n > 100:
        assert not torch.equal(got, reference.terngrad_ternarize(g, scale, torch.tensor([clip]), 12345))


def test_terngrad_cpu_stream_law_is_exact():
    """P(kept) = min(|g|, clip) / scale: the coarse byte and the refinement draw together."""
    values = torch.tensor([1.0, -0.75, 0.3, -0.01, 0.0078125, 0.004, -1e-4, 0.0])
    reps = 20000  # 160,000 elements: the coarse draw
    g = values.repeat(reps)
    codes = reference.unpack_2bit(reference.terngrad_ternarize_fast_rng(g, torch.tensor([1.0]), torch.tensor([0.8]), 7),
                                  g.numel()).view(reps, -1)
    level = (codes == 1).double() - (codes == 2).double()
    p = values.abs().clamp(max=0.8).double()
    se = torch.sqrt(p * (1 - p) / reps)
    assert ((level.mean(0) - values.clamp(-0.8, 0.8).double()).abs() <= 5 * se + 1e-12).all()


@pytest.mark.parametrize("n", [0, 1, 8, 9, 4099])
def test_pack_bits_round_trips(n):
    bits = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.5
    packed = reference.pack_bits(bits)
    assert torch.equal(packed, reference.pack_bits(bits.to(torch.uint8)))
    assert torch.equal(reference.unpack_bits(packed, n), bits.to(torch.uint8))
    assert packed.tolist() == [sum(int(b) << j for j, b in enumerate(bits[i:i + 8])) for i in range(0, n, 8)]


def test_compact_reuses_the_count_mask_only_for_the_same_tensor_version():
    x = torch.randn(70000, generator=torch.Generator().manual_seed(4))
    thr = torch.tensor([1.0])
    count = int(reference.count_above(x, thr))
    x.mul_(0.5)  # written in between: the remembered mask must not be used
    idx, vals = reference.compact_above(x, thr, int((x.abs() >= 1.0).sum()))
    assert torch.equal(idx.to(torch.int64), (x.abs() >= 1.0).nonzero().squeeze(1))
    assert torch.equal(vals, x[idx.to(torch.int64)])
    assert count == int((x.abs() >= 0.5).sum())
    # same version: the count's mask serves the compaction, and is dropped after it
    count = int(reference.count_above(x, thr))
    assert reference.compact_above(x, thr, count)[0].numel() == count
    assert id(x) not in reference._ABOVE_MASKS.entries


def test_sign_residual_is_x_minus_the_sent_sign_times_scale():
    x = torch.randn(10001, generator=torch.Generator().manual_seed(6))
    x[:4] = torch.tensor([0.0, -0.0, 1e-30, -1e-30])
    scale = torch.tensor([0.37])
    want = x - torch.where(x < 0, -scale, scale)
    got = reference.sign_residual_(x.clone(), scale)
    assert torch.equal(got, want)
    strided = x.clone()[::2]  # a strided view, written through in place
    assert torch.equal(reference.sign_residual_(strided, scale), x[::2] - torch.where(x[::2] < 0, -scale, scale))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int32])
def test_less_equals_torchs(dtype):
    a = (torch.randn(3001, generator=torch.Generator().manual_seed(8)) * 10).to(dtype)
    b = (torch.randn(3001, generator=torch.Generator().manual_seed(9)) * 10).to(dtype)
    if dtype.is_floating_point:
        a[:3] = torch.tensor([float("nan"), float("inf"), -0.0])
        b[:3] = torch.tensor([1.0, float("nan"), 0.0])
    assert torch.equal(reference.less(a, b), a < b)
    assert torch.equal(reference.less(a, 0), a < 0)
    assert torch.equal(reference.less(a[::2], b[::2]), a[::2] < b[::2])


def test_one_mode_reads_the_variable_once_and_nests(monkeypatch):
    from hvdcomp import kernels

    monkeypatch.setenv("HVDCOMP_KERNELS", "reference")
    with kernels.one_mode():
        monkeypatch.setenv("HVDCOMP_KERNELS", "triton")  # changed inside: not seen until the scope ends
        assert kernels.backend_mode() == "reference"
        with kernels.one_mode():
            assert kernels.backend_mode() == "reference"
        assert kernels.backend_mode() == "reference"
    assert kernels.backend_mode() == "triton"
    monkeypatch.setenv("HVDCOMP_KERNELS", "bogus")
    with pytest.raises(ValueError, match="HVDCOMP_KERNELS"):
        with kernels.one_mode():
            pass
    assert kernels._SCOPE.mode is None
