"""TernGrad: unbiasedness (statistical, fixed seeds), scale sharing, clipping, the wire
against an independent ternarization, the compressed-allreduce codec and the dense path."""
from __future__ import annotations

import math

import pytest
import torch

from hvdcomp.core.compressed_allreduce import byte_range, chunk_bounds
from hvdcomp import horovod_contract
from hvdcomp.compressors.terngrad import TernGradCompressor

from tensor_ranks import Ranks, decode_one
import kernel_oracle as oracle

VALUES = torch.tensor([1.0, -0.9, 0.5, -0.3, 0.1, 0.02, -0.005, 0.0])
REPEAT = 500


def repeated_gradient():
    """8 distinct values, each at 500 positions (interleaved): one step gives 500 draws per
    value, each from its own Philox counter."""
    return VALUES.repeat(REPEAT)


def group_means(samples: torch.Tensor) -> torch.Tensor:
    return samples.view(-1, REPEAT, len(VALUES)).mean(dim=(0, 1))


def assert_unbiased(mean, target, scale, draws):
    # each draw is s*sign*Bernoulli(|g|/s): variance s|g| - g^2; allow 5 standard errors
    se = torch.sqrt((scale * target.abs() - target**2).clamp(min=0) / draws)
    assert ((mean - target).abs() <= 5 * se + 1e-6).all(), (mean, target, se)


def test_unbiased_single_rank():
    comp = TernGradCompressor(clip=None, seed=1)
    g = repeated_gradient()
    ranks = Ranks(comp, g.shape)
    steps = 20
    samples = torch.stack([ranks.step([g]).total for _ in range(steps)])
    assert set(samples.unique().tolist()) <= {-1.0, 0.0, 1.0}  # s = max|g| = 1
    assert_unbiased(group_means(samples), VALUES, 1.0, steps * REPEAT)
    # a biased quantizer (e.g. deterministic rounding to the nearest level) is far off:
    assert (VALUES.abs() > 0.4).sum() < (group_means(samples) != torch.round(VALUES)).sum()


def test_unbiased_with_a_larger_shared_scale_and_scale_on_the_wire():
    comp = TernGradCompressor(clip=None, seed=2)
    g = repeated_gradient()
    ranks = Ranks(comp, g.shape)
    steps = 20
    samples = []
    for _ in range(steps):
        ex = ranks.step([g], shared_scale=3.0)
        assert ex.payloads[0][:4].view(torch.float32).item() == 3.0
        samples.append(ex.total)
    samples = torch.stack(samples)
    assert set(samples.unique().tolist()) <= {-3.0, 0.0, 3.0}
    assert_unbiased(group_means(samples), VALUES, 3.0, steps * REPEAT)
    # density is |g| / s: a larger scale sends fewer non-zeros
    density = (samples != 0).float().mean()
    assert density == pytest.approx(VALUES.abs().sum().item() / len(VALUES) / 3.0, rel=0.05)


def test_sum_over_ranks_is_unbiased_and_the_scale_is_shared():
    comp = TernGradCompressor(clip=None, seed=3)
    grads = [repeated_gradient() * f for f in (1.0, -2.0, 0.5)]
    ranks = Ranks(comp, grads[0].shape, nranks=3)
    steps = 20
    samples = []
    for _ in range(steps):
        ex = ranks.step(grads)
        scales = [p[:4].view(torch.float32).item() for p in ex.payloads]
        assert scales == [2.0, 2.0, 2.0]  # max over ranks of max|g|, not each rank's own
        samples.append(ex.total)
    mean = group_means(torch.stack(samples))
    target = VALUES * (1.0 - 2.0 + 0.5)
    se = torch.sqrt(sum((2.0 * (VALUES * f).abs() - (VALUES * f) ** 2) for f in (1.0, -2.0, 0.5)) / (steps * REPEAT))
    assert ((mean - target).abs() <= 5 * se + 1e-6).all()
    assert [float(comp.local_scale(g, i)) for g, i in zip(grads, ranks.infos)] == [1.0, 2.0, 0.5]


@pytest.mark.parametrize("rng", ["auto", "philox"])
def test_payload_matches_an_independent_ternarization(rng):
    comp = TernGradCompressor(clip=None, seed=4, rng=rng)
    g = torch.randn(3, 37, generator=torch.Generator().manual_seed(0))
    ranks = Ranks(comp, g.shape, nranks=2)
    grads = [g, -0.5 * g]
    ex = ranks.step(grads, step=11)
    s = g.abs().max()
    assert ex.sizes == [4 + math.ceil(111 / 4)] * 2
    for r in range(2):
        info = ranks.infos[r]
        seed = comp.stream_seed(info, 11)
        x = grads[r].reshape(-1)
        if rng == "philox":  # word i % 4 of Philox counter i // 4, straight from philox_uniform4
            u = oracle.philox_uniform4(seed, torch.arange((111 + 3) // 4)).reshape(-1)[:111]
            expected = torch.where(u * s < x.abs(), s * torch.sign(x), torch.zeros(()))
        else:  # the documented CPU stream, written out independently
            codes = oracle.terngrad_pcg64_codes(x, float(s), math.inf, seed)
            expected = s * ((codes == 1).float() - (codes == 2).float())
        assert torch.equal(decode_one(comp, ex.payloads[r], info).reshape(-1), expected)
    # the noise differs between ranks, steps and tensors, and repeats for the same ones
    seeds = {comp.stream_seed(i, t) for i in ranks.infos for t in (0, 1)}
    assert len(seeds) == 4 and all(0 <= x < 2**63 for x in seeds)
    assert comp.stream_seed(ranks.infos[0], 3) == TernGradCompressor(seed=4).stream_seed(ranks.infos[0], 3)


def test_the_cpu_stream_is_reproducible_and_philox_stays_available():
    """rng="auto" on a CPU: PCG64 bytes refined by PCG64 floats, the same codes for the same
    seed; rng="philox": the GPU kernel's stream (a different draw of the same distribution)."""
    g = torch.randn(4099, generator=torch.Generator().manual_seed(1))
    info = Ranks(TernGradCompressor(), g.shape).infos[0]
    payloads = {}
    for rng in ("auto", "philox"):
        comp = TernGradCompressor(seed=9, rng=rng)
        first, again = (comp._codes(g, comp.local_scale(g, info), info, 5) for _ in range(2))
        assert torch.equal(first, again)
        payloads[rng] = first
    assert not torch.equal(payloads["auto"], payloads["philox"])
    assert TernGradCompressor(rng="philox").config()["rng"] == "philox"
    with pytest.raises(ValueError, match="rng"):
        TernGradCompressor(rng="mt19937")


def test_clipping_at_c_sigma():
    g = torch.randn(1000, generator=torch.Generator().manual_seed(5))
    g[0] = 100.0
    info = Ranks(TernGradCompressor(), g.shape).infos[0]
    sigma = g.std(correction=0)
    clipped = TernGradCompressor(clip=2.5)
    assert float(clipped.local_scale(g, info)) == pytest.approx(2.5 * float(sigma), rel=1e-6)
    assert float(TernGradCompressor(clip=None).local_scale(g, info)) == 100.0
    assert float(TernGradCompressor(clip=1000.0).local_scale(g, info)) == 100.0
    # the outlier's expectation is the clipped value, the others are unchanged
    ranks = Ranks(clipped, g.shape)
    mean = torch.stack([ranks.step([g]).total for _ in range(200)]).mean(dim=0)
    assert mean[0] == pytest.approx(2.5 * float(sigma), rel=1e-6)  # |gc| = s: always sent
    assert (mean[1:] - g[1:]).abs().mean() < 0.15


def test_constant_gradient_is_not_clipped_to_zero():
    g = torch.full((2, 7), -0.3)
    ex = Ranks(TernGradCompressor(), g.shape).step([g])
    torch.testing.assert_close(ex.total, g)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_gradients(dtype):
    g = torch.randn(5, 9, generator=torch.Generator().manual_seed(6)).to(dtype)
    a = Ranks(TernGradCompressor(seed=9), g.shape).step([g], step=4)
    b = Ranks(TernGradCompressor(seed=9), g.shape).step([g.float()], step=4)
    assert torch.equal(a.payloads[0], b.payloads[0])
    assert a.total.dtype == torch.float32


@pytest.mark.parametrize("nranks", [1, 2, 3, 4])
def test_compressed_allreduce_codec_equals_allgather_decode(nranks):
    comp = TernGradCompressor(seed=7)
    n = 1001  # not a multiple of the 8-element chunk granule
    grads = [torch.randn(n, generator=torch.Generator().manual_seed(20 + r)) * (r + 1) for r in range(nranks)]
    ranks = Ranks(comp, (n,), nranks)
    step = 5
    expected = ranks.step(grads, step=step).total
    shared = torch.stack([comp.local_scale(g, i) for g, i in zip(grads, ranks.infos)]).max().reshape(1)
    assert comp.bits_per_element() == 2
    assert comp.sum_bits(nranks) == math.ceil(math.log2(2 * nranks + 1))
    states = [{"shared_scale": shared.clone()} for _ in grads]  # encode_chunked keeps the scale for the sums
    encoded = [comp.encode_chunked(g, st, i, step) for g, st, i in zip(grads, states, ranks.infos)]
    assert all(e.dtype == torch.uint8 and e.numel() == math.ceil(n / 4) for e in encoded)
    out = torch.zeros(n)
    for lo, hi in chunk_bounds(n, nranks):
        b0, b1 = byte_range(lo, hi, 2)
        blocks = torch.stack([e[b0:b1] for e in encoded])
        total = comp.chunk_sum(blocks, hi - lo, states[0], ranks.infos[0])
        packed = comp.encode_sum(total, nranks, states[0], ranks.infos[0])
        assert packed.numel() == math.ceil((hi - lo) * comp.sum_bits(nranks) / 8)
        out[lo:hi] = comp.decode_sum_chunk(packed, hi - lo, nranks, states[0], ranks.infos[0])
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    levels = out / shared
    assert torch.equal(levels, levels.round()) and levels.abs().max() <= nranks


def test_compressed_allreduce_needs_the_shared_scale_on_several_ranks():
    comp = TernGradCompressor()
    info = Ranks(comp, (10,), nranks=2).infos[0]
    with pytest.raises(RuntimeError, match="shared_scale"):
        comp.encode_chunked(torch.ones(10), {}, info, 0)


def test_dense_levels_sum_like_the_packed_payloads():
    comp = TernGradCompressor(seed=8)
    grads = [torch.randn(4, 25, generator=torch.Generator().manual_seed(30 + r)) for r in range(3)]
    ranks = Ranks(comp, (4, 25), nranks=3)
    expected = ranks.step(grads, step=2).total
    shared = torch.stack([comp.local_scale(g, i) for g, i in zip(grads, ranks.infos)]).max().reshape(1)
    payloads, ctxs = zip(*(comp.encode_dense(g, {"shared_scale": shared.clone()}, i, 2) for g, i in zip(grads, ranks.infos)))
    assert all(p.dtype == torch.float16 and p.shape == (4, 25) for p in payloads)
    assert set(torch.cat([p.reshape(-1) for p in payloads]).unique().tolist()) <= {-1.0, 0.0, 1.0}
    total = comp.decode_dense(torch.stack(payloads).sum(dim=0), ctxs[0], {}, ranks.infos[0])
    torch.testing.assert_close(total, expected)


class FakeHorovod:
    """Stands in for horovod.torch: one other rank whose scale is twice ours."""

    Max = "max"

    def __init__(self):
        self.calls = []

    def rank(self):
        return 0

    def size(self):
        return 2

    def allreduce(self, tensor, op=None, name=None):
        self.calls.append((op, name))
        return tensor * 2


def test_horovod_compress_shares_the_scale_and_round_trips(monkeypatch):
    fake = FakeHorovod()
    monkeypatch.setattr(horovod_contract, "hvd", lambda: fake)
    comp = TernGradCompressor(clip=None)
    g = torch.tensor([[0.5, -1.0, 0.25], [0.0, 0.75, -0.1]], dtype=torch.bfloat16)
    payload, ctx = comp.compress(g)
    assert fake.calls == [("max", "hvdcomp.terngrad.scale.0")]
    assert payload.dtype == torch.float16 and payload.shape == g.shape
    out = comp.decompress(payload, ctx)
    assert out.dtype == torch.bfloat16 and out.shape == g.shape
    assert set(out.float().reshape(-1).tolist()) <= {-2.0, 0.0, 2.0}
    # next step: a new position count, a new noise stream
    payloads = [comp.compress(g)[0]]
    comp.decompress(payloads[0], ctx)
    assert fake.calls[-1] == ("max", "hvdcomp.terngrad.scale.0")
    means = []
    for _ in range(300):
        p, c = comp.compress(g)
        means.append(comp.decompress(p, c).float())
    torch.testing.assert_close(torch.stack(means).mean(0), g.float(), atol=0.25, rtol=0)
