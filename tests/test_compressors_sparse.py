"""Top-k, random-k and 1-bit: selection, wire sizes and ratios, random-k's shared mask,
its Horovod-contract path, 1-bit's scale and residual, seed mixing."""
from __future__ import annotations

import math

import pytest
import torch

from hvdcomp.compressor import TensorInfo
from hvdcomp.compressors.onebit import OneBitCompressor
from hvdcomp.compressors.common import derive_seed, shared_random_indices
from hvdcomp.compressors.randomk import RandomKCompressor
from hvdcomp.compressors.topk import TopKCompressor

from tensor_ranks import Ranks, decode_one


# ---- top-k -------------------------------------------------------------------------------
def test_topk_bytes_and_ratio_on_a_known_tensor():
    comp = TopKCompressor(ratio=0.01)
    n = 100_000
    ranks = Ranks(comp, (100, 1000))
    g = torch.randn(100, 1000, generator=torch.Generator().manual_seed(0))
    ex = ranks.step([g])
    k = 1000
    assert ex.sizes[0] == 8 * k  # int32 index + fp32 value
    assert comp.selected_count(ex.sizes[0], ranks.infos[0]) == k
    assert 4 * n / ex.sizes[0] == 50.0
    idx = ex.payloads[0][: 4 * k].view(torch.int32).to(torch.int64)
    assert torch.equal(idx, torch.topk(g.reshape(-1).abs(), k).indices.sort().values)
    assert torch.equal(ex.payloads[0][4 * k:].view(torch.float32), g.reshape(-1)[idx])


@pytest.mark.parametrize("ratio,n,k", [(0.01, 5, 1), (0.5, 3, 2), (1.0, 7, 7), (0.3, 10, 3), (0.001, 1001, 2)])
def test_k_is_ceil_of_ratio_times_n_and_at_least_one(ratio, n, k):
    assert TopKCompressor(ratio).k(n) == k
    assert RandomKCompressor(ratio).k(n) == k


def test_topk_error_feedback_eventually_sends_everything():
    comp = TopKCompressor(ratio=0.1)
    g = torch.linspace(-1, 1, 50)
    ranks = Ranks(comp, g.shape)
    total = torch.zeros(50)
    steps = 400  # the smallest |g| (0.02) needs ~250 steps to reach the sending threshold (~5)
    for _ in range(steps):
        total += ranks.step([g]).total
    # what was sent plus what is still kept is the sum of the gradients
    torch.testing.assert_close(total + ranks.states[0]["residual"], steps * g, rtol=1e-5, atol=1e-3)
    assert (total != 0).all()  # every coordinate has been sent at least once
    assert ranks.states[0]["residual"].abs().max() < 10  # bounded, not growing with the steps


def test_topk_sum_over_ranks_adds_overlapping_indices():
    comp = TopKCompressor(ratio=0.25)
    grads = [torch.tensor([4.0, 0, 0, 1, 0, 0, 0, 0]), torch.tensor([3.0, 0, 0, 0, 0, 0, 0, -9.0])]
    ex = Ranks(comp, (8,), nranks=2).step(grads)
    torch.testing.assert_close(ex.total, torch.tensor([7.0, 0, 0, 1, 0, 0, 0, -9]))


# ---- random-k ------------------------------------------------------------------------------
def test_randomk_same_indices_on_every_rank_different_across_steps_and_tensors():
    comp = RandomKCompressor(ratio=0.1, seed=3)
    ranks = Ranks(comp, (20, 10), nranks=3)
    seen = []
    for t in range(4):
        grads = [torch.randn(20, 10, generator=torch.Generator().manual_seed(10 * t + r)) for r in range(3)]
        x = [ranks.states[r]["residual"] + grads[r].reshape(-1) for r in range(3)]
        idx = [comp.indices(info, t) for info in ranks.infos]
        ex = ranks.step(grads)
        assert all(torch.equal(i, idx[0]) for i in idx)
        assert len(set(idx[0].tolist())) == 20  # distinct
        assert all(p.dtype == torch.float32 and p.numel() == 20 for p in ex.payloads)
        assert ex.sizes == [80, 80, 80]  # only the values: 4k bytes, ratio n/k = 10
        expected = torch.zeros(200)
        expected[idx[0]] = sum(xr[idx[0]] for xr in x)
        for total in ex.totals:
            torch.testing.assert_close(total.reshape(-1), expected)
        seen.append(frozenset(idx[0].tolist()))
    assert len(set(seen)) == 4
    other = TensorInfo(name="b", shape=torch.Size([200]), dtype=torch.float32, device=torch.device("cpu"), index=1)
    assert set(comp.indices(other, 0).tolist()) != seen[0]
    assert set(RandomKCompressor(ratio=0.1, seed=4).indices(ranks.infos[0], 0).tolist()) != seen[0]


def test_randomk_marginal_inclusion_probability_is_k_over_n():
    n, k, steps = 97, 10, 3000
    counts = torch.zeros(n)
    for t in range(steps):
        idx = shared_random_indices(n, k, derive_seed(0, t), "cpu")
        assert idx.unique().numel() == k and idx.min() >= 0 and idx.max() < n
        counts[idx] += 1
    p = k / n
    se = math.sqrt(p * (1 - p) / steps)
    assert ((counts / steps - p).abs() <= 5 * se).all()
    # the first and last positions (stratum edges) are not favoured either
    assert abs(counts[:10].mean() / steps - p) < 3 * se


@pytest.mark.parametrize("n,k", [(1, 1), (5, 5), (10, 3), (1000, 999), (12345, 17)])
def test_shared_random_indices_distinct_in_range(n, k):
    idx = shared_random_indices(n, k, 123456789, "cpu")
    assert idx.dtype == torch.int64 and idx.numel() == k
    assert idx.unique().numel() == k and int(idx.min()) >= 0 and int(idx.max()) < n


def test_randomk_horovod_contract_keeps_residuals_by_call_order():
    comp = RandomKCompressor(ratio=0.25, seed=1)
    a, b = torch.randn(8, generator=torch.Generator().manual_seed(1)), torch.randn(3, 4).to(torch.float16)
    for step in range(3):
        pa, ca = comp.compress(a)
        pb, cb = comp.compress(b)
        assert pa.numel() == 2 and pb.numel() == 3
        da, db = comp.decompress(pa, ca), comp.decompress(pb, cb)
        assert da.dtype == torch.float32 and db.dtype == torch.float16 and db.shape == (3, 4)
    sd = comp.state_dict()
    assert sd["step"] == 2 and set(sd["states"]) == {0, 1}
    # every compress of `a` put a in: sent + residual == 3a
    fresh = RandomKCompressor(ratio=0.25, seed=1)
    sent = torch.zeros(8)
    for step in range(3):
        p, c = fresh.compress(a)
        q, d = fresh.compress(b)
        sent += fresh.decompress(p, c)
        fresh.decompress(q, d)
    torch.testing.assert_close(sent + fresh.state_dict()["states"][0]["residual"], 3 * a)
    restored = RandomKCompressor(ratio=0.25, seed=1)
    restored.load_state_dict(sd)
    p1, _ = restored.compress(a)
    p2, _ = comp.compress(a)
    assert torch.equal(p1, p2)
    with pytest.raises(RuntimeError, match="order"):
        comp.compress(torch.ones(5))  # position 1 had shape (3, 4)


# ---- 1-bit -----------------------------------------------------------------------------------
def test_onebit_wire_scale_and_residual():
    comp = OneBitCompressor()
    g = torch.tensor([0.5, -1.5, 0.0, 2.0, -0.25, 1.0, -3.0, 0.75, 4.0, -0.5])
    ranks = Ranks(comp, g.shape)
    ex = ranks.step([g])
    assert ex.sizes[0] == 4 + 2
    scale = g.abs().mean()
    p = ex.payloads[0]
    assert p[:4].view(torch.float32).item() == pytest.approx(float(scale))
    # bit i = (x_i < 0), little-endian within the byte
    assert p[4:].tolist() == [0b01010010, 0b10]
    expected = torch.where(g < 0, -scale, scale)  # sign(0) = +1
    torch.testing.assert_close(ex.total, expected)
    torch.testing.assert_close(ranks.states[0]["residual"], g - expected)


def test_onebit_ratio_and_multi_rank_sum():
    comp = OneBitCompressor()
    n = 80_000
    grads = [torch.randn(n, generator=torch.Generator().manual_seed(r)) for r in range(3)]
    ex = Ranks(comp, (n,), nranks=3).step(grads)
    assert ex.sizes == [4 + n // 8] * 3
    assert 4 * n / ex.sizes[0] == pytest.approx(32, rel=1e-3)
    expected = sum(torch.where(g < 0, -g.abs().mean(), g.abs().mean()) for g in grads)
    torch.testing.assert_close(ex.total, expected)


def test_onebit_odd_sizes_decode_only_real_elements():
    comp = OneBitCompressor()
    for n in (1, 7, 9, 17):
        g = -torch.arange(1, n + 1, dtype=torch.float32)
        ex = Ranks(comp, (n,)).step([g])
        assert ex.sizes[0] == 4 + math.ceil(n / 8)
        torch.testing.assert_close(decode_one(comp, ex.payloads[0], Ranks(comp, (n,)).infos[0]),
                                   torch.full((n,), -g.abs().mean().item()))


def test_derive_seed_mixes_every_part():
    seeds = {derive_seed(s, t, r, i) for s in range(2) for t in range(3) for r in range(3) for i in range(3)}
    assert len(seeds) == 54 and all(0 <= s < 2**62 for s in seeds)
    assert derive_seed(1, 2) != derive_seed(2, 1)
    assert derive_seed(0, -1) == derive_seed(0, 2**64 - 1)
