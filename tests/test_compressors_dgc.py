"""DGC: warm-up schedule, momentum correction against the paper's recurrence, momentum
factor masking, selection near k and of the largest |v|, the exact re-threshold, local
gradient clipping, narrow value dtypes."""
from __future__ import annotations

import math

import pytest
import torch

from hvdcomp.compressors.dgc import DGCCompressor

from tensor_ranks import Ranks


def test_warmup_schedule_follows_the_paper():
    comp = DGCCompressor(warmup_steps=10)
    # 75 % -> 93.75 % -> 98.4375 % -> 99.6 % -> 99.9 % sparsity, two steps per stage
    expected = [0.25, 0.25, 0.0625, 0.0625, 0.015625, 0.015625, 0.004, 0.004, 0.001, 0.001]
    assert [comp.ratio_at(t) for t in range(10)] == expected
    assert comp.ratio_at(10) == comp.ratio_at(10_000) == 0.001
    # uneven split: stage = floor(step * 5 / steps)
    comp = DGCCompressor(ratio=0.002, warmup_steps=7)
    assert [comp.ratio_at(t) for t in range(8)] == [0.25, 0.25, 0.0625, 0.015625, 0.015625, 0.004, 0.002, 0.002]
    # a target less sparse than a stage caps the stage; custom stages
    comp = DGCCompressor(ratio=0.01, warmup_steps=4, warmup_ratios=(0.5, 0.1, 0.02, 0.001))
    assert [comp.ratio_at(t) for t in range(5)] == [0.5, 0.1, 0.02, 0.01, 0.01]
    assert DGCCompressor(ratio=0.05, warmup_steps=0).ratio_at(0) == 0.05  # no warm-up
    assert DGCCompressor(ratio=0.05).ratio_at(0) == 0.25  # the default: 1000 warm-up steps
    assert comp.k(1000, 0) == 500 and comp.k(1000, 3) == 10 and comp.k(3, 3) == 1


def test_warmup_sends_more_early():
    comp = DGCCompressor(ratio=0.001, warmup_steps=5, momentum=0.0)
    ranks = Ranks(comp, (20_000,))
    counts = []
    for t in range(6):
        ex = ranks.step([torch.randn(20_000, generator=torch.Generator().manual_seed(t))])
        counts.append(comp.selected_count(ex.sizes[0], ranks.infos[0]))
    for t, c in enumerate(counts):
        k = comp.k(20_000, t)
        assert k / 2 <= c <= 2 * k, (t, c, k)
    assert counts == sorted(counts, reverse=True) and counts[0] > 100 * counts[-1]


def test_momentum_correction_and_factor_masking_match_the_recurrence():
    m = 0.9
    comp = DGCCompressor(ratio=0.05, momentum=m, warmup_steps=0)
    n = 300
    ranks = Ranks(comp, (n,))
    u = torch.zeros(n, dtype=torch.float64)
    v = torch.zeros(n, dtype=torch.float64)
    for t in range(6):
        g = torch.randn(n, generator=torch.Generator().manual_seed(t))
        ex = ranks.step([g])
        u = m * u + g.double()  # eq. (2)
        v = v + u
        sent = ex.total.double()
        idx = sent.nonzero().squeeze(1)
        assert len(idx) == comp.k(n, t)  # small tensor: exact threshold
        # the largest |v| are sent, with their accumulated value
        assert v.abs()[idx].min() >= v.abs()[sent == 0].max()
        torch.testing.assert_close(sent[idx], v[idx], rtol=1e-5, atol=1e-5)
        u[idx] = 0  # momentum factor masking
        v[idx] = 0
        torch.testing.assert_close(ranks.states[0]["u"].double(), u, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ranks.states[0]["v"].double(), v, rtol=1e-5, atol=1e-5)
        assert (ranks.states[0]["u"][idx] == 0).all() and (ranks.states[0]["v"][idx] == 0).all()


def test_selection_on_a_large_tensor_is_near_k_and_takes_the_largest():
    comp = DGCCompressor(ratio=0.001, sample_ratio=0.01, momentum=0.0, warmup_steps=0)
    n = 200_000
    g = torch.randn(n, generator=torch.Generator().manual_seed(1)) * torch.rand(n, generator=torch.Generator().manual_seed(2))
    ranks = Ranks(comp, (n,))
    ex = ranks.step([g])
    k = comp.k(n, 0)
    m = comp.selected_count(ex.sizes[0], ranks.infos[0])
    assert k // 2 <= m <= 2 * k
    assert ex.sizes[0] == 8 * m
    sent = ex.total != 0
    assert g.abs()[sent].min() >= g.abs()[~sent].max()
    assert 4 * n / ex.sizes[0] > 1 / (2 * 0.001) / 2.5  # ~500x, within the selection spread


def test_too_many_candidates_are_rethresholded_exactly():
    class CoarseSample(DGCCompressor):
        min_sample = 16  # 16 samples: the threshold is their max, far too low for k = 20
        min_sample_hits = 0.016

    comp = CoarseSample(ratio=0.001, sample_ratio=0.0001, momentum=0.0, warmup_steps=0)
    n = 20_000
    g = torch.randn(n, generator=torch.Generator().manual_seed(3))
    ranks = Ranks(comp, (n,))
    assert comp.sample_size(n) == 16
    ex = ranks.step([g])
    sent = (ex.total != 0).nonzero().squeeze(1)
    assert len(sent) == comp.k(n, 0) == 20
    assert torch.equal(sent, torch.topk(g.abs(), 20).indices.sort().values)


def test_sample_size():
    comp = DGCCompressor(ratio=0.01, sample_ratio=0.01, warmup_steps=0)
    assert comp.sample_size(500) == 500  # small: exact
    assert comp.sample_size(50_000) == 3200  # 32 expected hits at ratio 0.01
    assert comp.sample_size(1_000_000) == 10_000  # sample_ratio
    comp = DGCCompressor(ratio=0.001, sample_ratio=0.01, warmup_steps=5)
    assert comp.sample_size(1_000_000, step=0) == 10_000
    assert comp.sample_size(1_000_000, step=5) == 32_000
    assert comp.sample_size(10_000, step=0) == 1024


def test_local_gradient_clipping_uses_the_per_rank_share_of_the_norm():
    comp = DGCCompressor(ratio=1.0, momentum=0.0, clip_norm=1.0, warmup_steps=0)
    g = torch.randn(4, 25, generator=torch.Generator().manual_seed(4)) * 10
    ranks = Ranks(comp, g.shape, nranks=4)
    ex = ranks.step([g] * 4)
    per_rank = ex.total / 4
    assert float(per_rank.norm()) == pytest.approx(1.0 / math.sqrt(4), rel=1e-4)
    torch.testing.assert_close(per_rank / per_rank.norm(), g / g.norm())
    # small gradients are not scaled up
    small = g / 1000
    ex = Ranks(comp, g.shape, nranks=4).step([small] * 4)
    torch.testing.assert_close(ex.total / 4, small)


@pytest.mark.parametrize("dtype,bytes_per", [(torch.float16, 6), (torch.bfloat16, 6), (torch.float32, 8)])
def test_value_dtypes(dtype, bytes_per):
    comp = DGCCompressor(ratio=0.1, momentum=0.5, value_dtype=dtype, warmup_steps=0)
    n = 400
    ranks = Ranks(comp, (n,))
    g = torch.randn(n, generator=torch.Generator().manual_seed(5)) / 3
    v_full = g.clone()
    ex = ranks.step([g])
    m = comp.selected_count(ex.sizes[0], ranks.infos[0])
    assert m == 40 and ex.sizes[0] == bytes_per * m
    sent = ex.total
    idx = sent.nonzero().squeeze(1)
    assert torch.equal(sent[idx], v_full[idx].to(dtype).float())  # rounded once, on the wire
    # the rounding error stays in v: nothing is lost
    torch.testing.assert_close(sent + ranks.states[0]["v"], v_full, rtol=0, atol=1e-7)
    assert (ranks.states[0]["u"][idx] == 0).all()


def test_ranks_draw_different_samples_deterministically():
    comp = DGCCompressor(ratio=0.001, momentum=0.0, warmup_steps=0)
    n = 300_000
    g = torch.randn(n, generator=torch.Generator().manual_seed(6))
    a = Ranks(comp, (n,), nranks=2)
    b = Ranks(DGCCompressor(ratio=0.001, momentum=0.0, warmup_steps=0), (n,), nranks=2)
    ea, eb = a.step([g, g]), b.step([g, g])
    assert ea.sizes == eb.sizes and all(torch.equal(x, y) for x, y in zip(ea.payloads, eb.payloads))
    assert ea.sizes[0] != ea.sizes[1]  # same data, different sample -> (almost surely) different threshold


def test_fp16_values_beyond_range_stay_in_v():
    comp = DGCCompressor(ratio=0.5, momentum=0.0, value_dtype=torch.float16, warmup_steps=0)
    g = torch.tensor([1e6, -3.0, 0.5, -2e5])
    ranks = Ranks(comp, g.shape)
    ex = ranks.step([g])
    assert torch.isfinite(ex.total).all() and torch.isfinite(ranks.states[0]["v"]).all()
    assert ex.total.tolist() == [65504.0, 0.0, 0.0, -65504.0]
    torch.testing.assert_close(ex.total + ranks.states[0]["v"], g)
