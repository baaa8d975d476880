"""AdaComp: bin sizes by shape and name, selection and quantization against a brute-force
per-bin computation, the wire layout byte by byte, compression ratio, edge cases."""
from __future__ import annotations

import struct

import pytest
import torch

from hvdcomp.compressor import TensorInfo
from hvdcomp.compressors.adacomp import AdaCompCompressor

from tensor_ranks import Ranks, decode_one


def info(shape, name="w"):
    return TensorInfo(name=name, shape=torch.Size(shape), dtype=torch.float32, device=torch.device("cpu"))


def test_bin_size_by_shape_name_and_global_override():
    comp = AdaCompCompressor()
    assert comp.bin_size_for(info((16, 3, 3, 3))) == 50  # conv
    assert comp.bin_size_for(info((16, 3, 3))) == 50  # conv1d weight
    assert comp.bin_size_for(info((64, 128))) == 500  # FC / LSTM
    assert comp.bin_size_for(info((64,))) == 500  # bias
    comp = AdaCompCompressor(conv_bin_size=20, fc_bin_size=300, bin_sizes={"lstm.w": 40, "conv.w": 1000})
    assert comp.bin_size_for(info((16, 3, 3, 3))) == 20
    assert comp.bin_size_for(info((64, 128))) == 300
    assert comp.bin_size_for(info((64, 128), "lstm.w")) == 40
    assert comp.bin_size_for(info((16, 3, 3, 3), "conv.w")) == 1000
    comp = AdaCompCompressor(bin_size=7, bin_sizes={"lstm.w": 40})
    for shape, name in (((16, 3, 3, 3), "a"), ((64, 128), "lstm.w"), ((5,), "b")):
        assert comp.bin_size_for(info(shape, name)) == 7


def brute_force(r, g, bin_size):
    """Per bin, in plain Python: AdaComp's selection, scale, sent values and new residual."""
    x = [a + b for a, b in zip(r, g)]
    selected = []
    for start in range(0, len(x), bin_size):
        m = max(abs(v) for v in x[start:start + bin_size])
        for i in range(start, min(start + bin_size, len(x))):
            if abs(x[i] + g[i]) >= m and x[i] != 0:
                selected.append(i)
    scale = sum(abs(x[i]) for i in selected) / len(selected) if selected else 0.0
    sent = [0.0] * len(x)
    for i in selected:
        sent[i] = scale if x[i] > 0 else -scale
    return selected, scale, sent, [a - b for a, b in zip(x, sent)]


@pytest.mark.parametrize("bin_size,n", [(4, 10), (3, 3), (5, 2), (2, 9)])
def test_selection_scale_and_residual_match_brute_force(bin_size, n):
    comp = AdaCompCompressor(bin_size=bin_size)
    ranks = Ranks(comp, (n,))
    gen = torch.Generator().manual_seed(bin_size * 100 + n)
    for _ in range(4):  # later steps have a non-zero residual
        r = ranks.states[0]["residual"].clone()
        g = torch.randn(n, generator=gen)
        ex = ranks.step([g])
        selected, scale, sent, residual = brute_force(r.tolist(), g.tolist(), bin_size)
        assert (ex.total != 0).nonzero().squeeze(1).tolist() == selected
        assert comp.selected_count(ex.sizes[0], ranks.infos[0]) == len(selected)
        assert struct.unpack("<f", bytes(ex.payloads[0][:4].tolist()))[0] == pytest.approx(scale, rel=1e-6)
        torch.testing.assert_close(ex.total, torch.tensor(sent), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(ranks.states[0]["residual"], torch.tensor(residual), rtol=1e-5, atol=1e-6)


def test_scale_does_not_overflow_near_fp32_max():
    """Every element selected at 3e38: Σ|x| overflows fp32, its mean does not; every value
    comes back as ±3e38, not inf."""
    g = torch.full((100,), 3.0e38)
    g[::2] = -3.0e38
    ex = Ranks(AdaCompCompressor(bin_size=2), (100,)).step([g])
    assert torch.isfinite(ex.total).all()
    torch.testing.assert_close(ex.total, g, rtol=1e-6, atol=0)


def test_bin_maximum_is_sent_when_the_gradient_agrees_in_sign():
    # |x + g| >= max|x| holds for the bin's max whenever g has x's sign: every non-empty bin
    # sends at least its maximum (and at most the elements above half of it on step 1).
    comp = AdaCompCompressor(bin_size=50)
    g = torch.randn(5000, generator=torch.Generator().manual_seed(0))
    ranks = Ranks(comp, g.shape)
    ex = ranks.step([g])
    per_bin = (ex.total != 0).view(100, 50)
    assert per_bin.any(dim=1).all()
    argmax = g.abs().view(100, 50).argmax(dim=1)
    assert per_bin[torch.arange(100), argmax].all()
    # step 1: x = g, so selected <=> 2|g| >= max|g| in the bin
    expected = 2 * g.abs().view(100, 50) >= g.abs().view(100, 50).amax(dim=1, keepdim=True)
    assert torch.equal(per_bin, expected)


def test_wire_layout_byte_by_byte_small_bins():
    comp = AdaCompCompressor(bin_size=4)
    g = torch.tensor([0.0, 3.0, -0.1, 2.0, -5.0, 0.2, 0.1, 4.0, 1.0])  # bins [0:4] [4:8] [8:9]
    ex = Ranks(comp, g.shape).step([g])
    p = ex.payloads[0]
    # step 1: x = g; bin 0 max 3: |2g| >= 3 -> idx 1 (+), 3 (+); bin 1 max 5: idx 4 (-), 7 (+);
    # bin 2: idx 8 (+). scale = (3 + 2 + 5 + 4 + 1) / 5 = 3
    assert ex.sizes[0] == 4 + 3 + 5  # scale | 3 uint8 counts | 5 uint8 codes
    assert struct.unpack("<f", bytes(p[:4].tolist()))[0] == 3.0
    assert p[4:7].tolist() == [2, 2, 1]
    assert p[7:12].tolist() == [(1 << 2) | 1, (3 << 2) | 1, (0 << 2) | 2, (3 << 2) | 1, (0 << 2) | 1]
    torch.testing.assert_close(ex.total, torch.tensor([0, 3.0, 0, 3, -3, 0, 0, 3, 3]))


def test_wire_layout_int16_counts_and_codes():
    comp = AdaCompCompressor(bin_size=300)  # counts int16 (> 255), codes int16 (> 64)
    g = torch.zeros(700)
    g[299], g[450], g[650] = -2.0, 1.0, 0.5  # one per bin, at the last offset of bin 0
    ex = Ranks(comp, g.shape).step([g])
    p = ex.payloads[0]
    # scale fp32 at 0 | 3 int16 counts at 4..10 | 3 int16 codes at 10..16
    assert ex.sizes[0] == 16
    assert p[4:10].view(torch.int16).tolist() == [1, 1, 1]
    codes = (p[10:16].view(torch.int16).to(torch.int64) & 0xFFFF).tolist()
    assert codes == [(299 << 2) | 2, (150 << 2) | 1, (50 << 2) | 1]
    scale = (2.0 + 1.0 + 0.5) / 3
    expected = torch.zeros(700)
    expected[299], expected[450], expected[650] = -scale, scale, scale
    torch.testing.assert_close(ex.total, expected)


def test_mid_size_bins_use_uint8_counts_and_int16_codes():
    comp = AdaCompCompressor(bin_size=100)
    g = torch.zeros(250)
    g[99] = 1.0
    ex = Ranks(comp, g.shape).step([g])
    # 4 | 3 uint8 counts (4..7) | pad to 8 | one int16 code
    assert ex.sizes[0] == 10
    assert ex.payloads[0][4:7].tolist() == [1, 0, 0]
    assert ex.payloads[0][8:10].view(torch.int16).item() == (99 << 2) | 1


def test_largest_bin_offsets_survive_int16():
    comp = AdaCompCompressor(bin_size=16384)
    g = torch.zeros(20000)
    g[16383], g[16384 + 3615] = 1.0, -1.0  # the largest offset (code 65533 > int16 max)
    ex = Ranks(comp, g.shape).step([g])
    assert (ex.total != 0).nonzero().squeeze(1).tolist() == [16383, 19999]
    assert ex.total[16383] == 1.0 and ex.total[19999] == -1.0


def test_compression_ratio_one_selected_per_bin():
    # a spike per bin and small noise: exactly one element per bin is selected
    n, L = 50_000, 50
    g = torch.full((n,), 0.01)
    g[::L] = 1.0
    ranks = Ranks(AdaCompCompressor(), (1000, 2, 5, 5))  # conv: L_T = 50
    ex = ranks.step([g.view(1000, 2, 5, 5)])
    nbins = n // L
    assert ranks.comp.selected_count(ex.sizes[0], ranks.infos[0]) == nbins
    assert ex.sizes[0] == 4 + nbins + nbins  # scale + uint8 count + uint8 code per bin
    assert 4 * n / ex.sizes[0] == pytest.approx(99.8, abs=0.1)
    # FC (L_T = 500: int16 counts and codes): 4 + 2*100 + 2*100 bytes
    ranks = Ranks(AdaCompCompressor(), (100, 500))
    g2 = torch.full((100, 500), 0.01)
    g2[:, 0] = 1.0
    ex = ranks.step([g2])
    assert ex.sizes[0] == 4 + 200 + 200
    assert 4 * 50_000 / ex.sizes[0] == pytest.approx(495.0, abs=0.1)


def test_a_rank_that_selects_nothing():
    comp = AdaCompCompressor(bin_size=10)
    ranks = Ranks(comp, (95,), nranks=3)
    g = [torch.randn(95, generator=torch.Generator().manual_seed(r)) for r in range(3)]
    g[1] = torch.zeros(95)
    ex = ranks.step(g)
    assert ex.sizes[1] == 4 + 10  # scale and ten zero counts, no codes
    assert ex.payloads[1][4:14].tolist() == [0] * 10
    assert struct.unpack("<f", bytes(ex.payloads[1][:4].tolist()))[0] == 0.0
    expected = decode_one(comp, ex.payloads[0], ranks.infos[0]) + decode_one(comp, ex.payloads[2], ranks.infos[2])
    torch.testing.assert_close(ex.total, expected)


def test_tensor_smaller_than_one_bin():
    comp = AdaCompCompressor()
    ranks = Ranks(comp, (3,), nranks=2)
    ex = ranks.step([torch.tensor([1.0, -0.2, 0.6]), torch.tensor([0.0, 0.0, -4.0])])
    # rank 0 sends 1 and 0.6 (scale 0.8), rank 1 sends -4
    torch.testing.assert_close(ex.total, torch.tensor([0.8, 0.0, 0.8 - 4.0]))
    assert ex.sizes == [4 + 2 + 2 * 2, 4 + 2 + 2]  # L_T = 500: one int16 count, int16 codes


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_gradient_selects_like_its_fp32_value(dtype):
    g = torch.randn(4, 6, 3, 3, generator=torch.Generator().manual_seed(3)).to(dtype)
    a = Ranks(AdaCompCompressor(), g.shape)
    b = Ranks(AdaCompCompressor(), g.shape)
    for _ in range(2):
        ea, eb = a.step([g]), b.step([g.float()])
        assert torch.equal(ea.payloads[0], eb.payloads[0])
        assert torch.equal(a.states[0]["residual"], b.states[0]["residual"])
