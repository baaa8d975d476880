"""The oracle of the kernel tests: what every operation of ``hvdcomp.kernels`` must return,
written as plainly as the contract reads, for the tests only. Both backends (the Triton
kernels and the CPU backend) are checked against it.

Clarity over speed: no sampling, no NumPy shortcuts, no caches. Loops run over ranks and
bins where that reads best; element-wise work is whole-tensor torch so that the tests'
large cases stay quick. Every function takes the operation's arguments and returns new
tensors on the CPU (the inputs are left alone), so a test compares ``got.cpu()`` with it.
The random streams are defined here from their specifications: Philox-4x32-10 in exact
unsigned arithmetic (NumPy's uint64; torch has no unsigned 64-bit shifts), checked against
the published known-answer vectors, and NumPy's PCG64 generator, which defines TernGrad's
CPU stream.
"""
from __future__ import annotations

import math

import numpy as np
import torch

Tensor = torch.Tensor
F32 = torch.float32


def _f32(t: Tensor) -> Tensor:
    return t.detach().cpu().to(F32)


# ---- residual and momentum -------------------------------------------------------------------


def ef_accumulate(residual: Tensor, grad: Tensor) -> Tensor:
    """``r + g`` in fp32."""
    return _f32(residual) + _f32(grad)


def dgc_momentum(u: Tensor, v: Tensor, grad: Tensor, momentum: float) -> tuple[Tensor, Tensor]:
    """``(u', v') = (m*u + g, v + u')`` in fp32, each operation rounded (no fused multiply-add)."""
    u_new = _f32(u) * momentum + _f32(grad)
    return u_new, _f32(v) + u_new


# ---- AdaComp ---------------------------------------------------------------------------------


def _bins(n: int, bin_size: int) -> list[range]:
    return [range(start, min(start + bin_size, n)) for start in range(0, n, bin_size)]


def adacomp_selected(x: Tensor, g: Tensor, bin_size: int) -> Tensor:
    """bool [n]: ``|x + g| >= max over x's bin of |x|`` and ``x != 0``."""
    x, g = _f32(x), _f32(g)
    ax = x.abs()
    bin_max = torch.empty_like(x)
    for b in _bins(x.numel(), bin_size):
        bin_max[b.start:b.stop] = ax[b.start:b.stop].max()
    return ((x + g).abs() >= bin_max) & (x != 0)


def adacomp_select_stats(x: Tensor, g: Tensor, bin_size: int) -> tuple[Tensor, Tensor]:
    """``(selected count per bin int32, sum of the selected |x| fp64 [1])``, the sum exactly
    rounded (``math.fsum``)."""
    sel = adacomp_selected(x, g, bin_size)
    counts = torch.tensor([int(sel[b.start:b.stop].sum()) for b in _bins(sel.numel(), bin_size)],
                          dtype=torch.int32)
    total = math.fsum(_f32(x).abs()[sel].double().tolist())
    return counts, torch.tensor([total], dtype=torch.float64)


def adacomp_pack(x: Tensor, g: Tensor, bin_size: int, scale: Tensor) -> tuple[Tensor, Tensor]:
    """``(codes int64 [selected], new x fp32 [n])``: selected elements in index order (bin by
    bin, increasing offset), code ``(i % bin_size) << 2 | (1 if x_i > 0 else 2)``, and
    ``x_i - scale`` / ``x_i + scale`` for the sent positives / negatives."""
    x = _f32(x)
    sel = adacomp_selected(x, g, bin_size)
    idx = sel.nonzero().squeeze(1)
    positive = x[idx] > 0
    codes = ((idx % bin_size) << 2) | torch.where(positive, 1, 2)
    s = _f32(scale).reshape(())
    new_x = x.clone()
    new_x[idx] = torch.where(positive, x[idx] - s, x[idx] + s)
    return codes, new_x


def adacomp_decode_sum(codes: Tensor, bin_counts: Tensor, scales: Tensor, bin_size: int, numel: int) -> Tensor:
    """Rank by rank, bin by bin: each code adds ``±scale_rank`` at ``bin * bin_size + (code >>
    2)`` (int16 codes read as unsigned), in the order the codes come."""
    codes = codes.detach().cpu().to(torch.int64) & 0xFFFF
    counts, scales = bin_counts.cpu().tolist(), _f32(scales)
    out = torch.zeros(numel, dtype=F32)
    j = 0
    for rank, rank_counts in enumerate(counts):
        for b, count in enumerate(rank_counts):
            c = codes[j:j + count]
            j += count
            sign = torch.where((c & 3) == 1, 1.0, -1.0)
            out.index_add_(0, b * bin_size + (c >> 2), sign * scales[rank])
    return out


# ---- Philox-4x32-10 and the uniforms Triton's tl.rand draws ------------------------------------

_M0, _M1 = 0xD2511F53, 0xCD9E8D57  # round multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85  # key increments
_MASK = 0xFFFFFFFF


def philox4x32_10(counter, key):
    """Philox-4x32-10 (Salmon et al., "Parallel Random Numbers: As Easy as 1, 2, 3", SC 2011):
    ten rounds of two 32x32 -> 64-bit products, the key bumped after each. ``counter`` is four
    words, ``key`` two; each word a Python int or a NumPy uint64 array (values < 2**32)."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        p0, p1 = c0 * _M0, c2 * _M1  # exact: < 2**64
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & _MASK, (p0 >> 32) ^ c3 ^ k1, p0 & _MASK
        k0, k1 = (k0 + _W0) & _MASK, (k1 + _W1) & _MASK
    return c0, c1, c2, c3


def _uniform_of_word(word: np.ndarray) -> Tensor:
    # tl.rand: the word as int32, negatives folded (-w - 1), times 4.6566127342e-10 in fp32.
    signed = torch.from_numpy(word.astype(np.int64))
    signed = torch.where(signed >= 2**31, signed - 2**32, signed)
    folded = torch.where(signed < 0, -signed - 1, signed)
    return folded.to(F32) * torch.tensor(4.6566127342e-10, dtype=F32)


def philox_uniform4(seed: int, counters: Tensor) -> Tensor:
    """``tl.rand4x(seed, c)``: the four words of counter ``(c, 0, 0, 0)`` under key
    ``(seed mod 2**32, seed >> 32)`` as uniforms, fp32 [m, 4]."""
    c = counters.detach().cpu().numpy().astype(np.uint64) & np.uint64(_MASK)
    zero = np.zeros_like(c)
    words = philox4x32_10((c, zero, zero, zero), (seed & _MASK, (seed >> 32) & _MASK))
    return torch.stack([_uniform_of_word(w) for w in words], dim=1)


def philox_uniform(seed: int, offsets: Tensor) -> Tensor:
    """``tl.rand(seed, offsets)``: the first word of each counter, fp32 [n]."""
    return philox_uniform4(seed, offsets)[:, 0]


def element_uniforms(seed: int, numel: int) -> Tensor:
    """TernGrad's Philox stream: element i draws word ``i % 4`` of counter ``i // 4``."""
    return philox_uniform4(seed, torch.arange((numel + 3) // 4)).reshape(-1)[:numel]


# ---- TernGrad, ternary and sign quantization ---------------------------------------------------


def _pack(codes: Tensor, width: int) -> Tensor:
    per_byte = 8 // width
    c = codes.detach().cpu().reshape(-1).to(torch.int64)
    padded = torch.zeros(-(-c.numel() // per_byte) * per_byte, dtype=torch.int64)
    padded[:c.numel()] = c
    fields = padded.view(-1, per_byte)
    return sum(fields[:, j] << (width * j) for j in range(per_byte)).to(torch.uint8).reshape(-1)


def _unpack(packed: Tensor, numel: int, width: int) -> Tensor:
    per_byte = 8 // width
    p = packed.detach().cpu().reshape(-1).to(torch.int64)
    fields = torch.stack([(p >> (width * j)) & ((1 << width) - 1) for j in range(per_byte)], dim=1)
    return fields.reshape(-1)[:numel].to(torch.uint8)


def pack_2bit(codes: Tensor) -> Tensor:
    """Code i (0..3) at bits ``2*(i % 4)`` of byte ``i // 4``; pad codes 0."""
    return _pack(codes, 2)


def unpack_2bit(packed: Tensor, numel: int) -> Tensor:
    return _unpack(packed, numel, 2)


def pack_bits(bits: Tensor) -> Tensor:
    """Bit i at bit ``i % 8`` of byte ``i // 8``: byte = ``sum_j b_(8k+j) << j`` mod 256."""
    return _pack(bits, 1)


def unpack_bits(packed: Tensor, numel: int) -> Tensor:
    return _unpack(packed, numel, 1)


def ternary_codes(g: Tensor, scale: Tensor, clip: Tensor, u: Tensor) -> Tensor:
    """TernGrad's codes for the uniforms ``u``: kept iff ``u * scale < |clamp(g, ±clip)|``
    (Bernoulli(|gc| / scale)), code 1 for a kept positive, 2 for a kept negative, else 0."""
    gc = torch.clamp(_f32(g), -float(clip), float(clip))
    kept = u * _f32(scale).reshape(()) < gc.abs()
    return torch.where(kept, torch.where(gc > 0, 1, 2), 0).to(torch.uint8)


def terngrad_ternarize(g: Tensor, scale: Tensor, clip: Tensor, seed: int) -> Tensor:
    """TernGrad eq. (6)-(7) on the Philox stream, packed four per byte."""
    return pack_2bit(ternary_codes(g, scale, clip, element_uniforms(seed, g.numel())))


def terngrad_pcg64_codes(g: Tensor, scale: float, clip: float, seed: int) -> Tensor:
    """Codes (uint8 [n], unpacked) of TernGrad's CPU stream for fp32 ``g`` [n], as
    ``hvdcomp.kernels.terngrad_ternarize_fast_rng`` documents it, in NumPy only.

    Below 32768 elements, one fp32 uniform ``u`` per element: kept iff ``u * scale <
    min(|g|, clip)``. From 32768 on: ``Q = clamp(g * fp32(128 / scale), ±fp32(clip * 128 /
    scale))``; ``V`` = low 7 bits of the bytes of ``PCG64(seed).random_raw(ceil(n / 8))``;
    kept where ``V < floor|Q|``, or where ``V == floor|Q|`` (capped at 127) and the next fp32
    uniform of the same generator (in index order) is below ``|Q| - V``; code ``1 + [Q < 0]``
    where kept.
    """
    x = g.detach().reshape(-1).to(F32).cpu().numpy()
    n = x.size
    if n < 32768:  # one fp32 uniform per element
        u = np.random.Generator(np.random.PCG64(seed)).random(n, dtype=np.float32)
        keep = u * np.float32(scale) < np.minimum(np.abs(x), np.float32(clip))
        return torch.from_numpy(np.where(keep, np.where(x < 0, 2, 1), 0).astype(np.uint8))
    bits = np.random.PCG64(seed)
    v = bits.random_raw((n + 7) // 8).view(np.uint8)[:n] & 127
    inv = 128.0 / scale
    q = x * np.float32(inv)
    if clip < math.inf:
        bound = np.float32(clip * inv)
        q = np.clip(q, -bound, bound)
    level = np.minimum(np.floor(np.abs(q)), 127).astype(np.uint8)
    keep = v < level
    tie = np.flatnonzero(v == level)
    w = np.random.Generator(bits).random(tie.size, dtype=np.float32)
    keep[tie] = w < np.abs(q[tie]) - v[tie].astype(np.float32)
    return torch.from_numpy(np.where(keep, np.where(q < 0, 2, 1), 0).astype(np.uint8))


def population_std(x: Tensor) -> float:
    """sigma with ``correction=0``, in fp64."""
    return float(torch.std(_f32(x).double(), correction=0))


def ternary_quantize(x: Tensor, threshold: Tensor) -> Tensor:
    """Code 1 where ``x >= t``, 2 where ``x <= -t``, else 0; packed four per byte."""
    x, t = _f32(x), float(threshold)
    return pack_2bit(torch.where(x >= t, 1, torch.where(x <= -t, 2, 0)))


def sign_pack(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(bits of x < 0 packed eight per byte, mean |x| as fp32 [1])``, the mean as torch's
    fp32 sum divided by n (0 for an empty x)."""
    x = _f32(x)
    return pack_bits(x < 0), (x.abs().sum() / max(x.numel(), 1)).reshape(1)


def sign_residual(x: Tensor, scale: Tensor) -> Tensor:
    """``x - scale`` where ``x >= 0`` (zeros included), ``x + scale`` where ``x < 0``."""
    x, s = _f32(x), _f32(scale).reshape(())
    return torch.where(x < 0, x + s, x - s)


def _decode_sum(levels_of_rank, scales: Tensor, numel: int) -> Tensor:
    out = torch.zeros(numel, dtype=F32)
    for rank, s in enumerate(_f32(scales).tolist()):
        out = out + levels_of_rank(rank) * torch.tensor(s, dtype=F32)
    return out


def sign_decode_sum(bits: Tensor, scales: Tensor, numel: int) -> Tensor:
    """``sum_r scale_r * (1 - 2*bit_r)``, rank 0 first, in fp32."""
    return _decode_sum(lambda r: 1.0 - 2.0 * unpack_bits(bits[r], numel).to(F32), scales, numel)


def ternary_decode_sum(packed: Tensor, scales: Tensor, numel: int) -> Tensor:
    """``sum_r scale_r * level_r`` (code 1 -> +1, 2 -> -1, 0 and 3 -> 0), rank 0 first, in fp32."""
    def levels(r):
        codes = unpack_2bit(packed[r], numel)
        return (codes == 1).to(F32) - (codes == 2).to(F32)

    return _decode_sum(levels, scales, numel)


# ---- selection by threshold ------------------------------------------------------------------


def magnitude_key(x: Tensor) -> Tensor:
    """The order of top-k: the fp32 bit pattern of ``|x|`` (``bits & 0x7FFFFFFF``), int64. It
    orders non-negative floats like their values and puts NaN above inf."""
    return (_f32(x).contiguous().view(torch.int32) & 0x7FFFFFFF).to(torch.int64)


def topk_indices(x: Tensor, k: int) -> Tensor:
    """The k largest keys, ties to the lower index, in increasing index order: int64 [k]."""
    order = torch.sort(magnitude_key(x), descending=True, stable=True).indices  # ties keep index order
    return torch.sort(order[:k]).values


def sampled_threshold(x: Tensor, ratio: float, sample_idx: Tensor) -> Tensor:
    """The ``ceil(ratio * s)``-th largest ``|x[sample_idx]|`` (negative indices from the end), fp32 [1]."""
    sample = _f32(x).abs()[sample_idx.cpu().to(torch.int64)]
    k = min(sample.numel(), max(1, math.ceil(ratio * sample.numel())))
    return torch.sort(sample, descending=True).values[k - 1].reshape(1)


def count_above(x: Tensor, threshold: Tensor) -> Tensor:
    """``#{i : |x_i| >= t}``, int64 [1]."""
    return (_f32(x).abs() >= float(threshold)).sum().reshape(1)


def compact_above(x: Tensor, threshold: Tensor) -> tuple[Tensor, Tensor]:
    """``(indices int32, values fp32)`` of ``|x| >= t`` in index order."""
    x = _f32(x)
    idx = (x.abs() >= float(threshold)).nonzero().squeeze(1)
    return idx.to(torch.int32), x[idx]


# ---- decode and casts --------------------------------------------------------------------------


def scatter_add(out: Tensor, indices: Tensor, values: Tensor) -> Tensor:
    """``out[indices[j]] += values[j]`` for j in order, in fp32."""
    result = _f32(out).clone()
    return result.index_add_(0, indices.cpu().to(torch.int64), _f32(values))


def cast_bf16(x: Tensor) -> Tensor:
    """torch's round-to-nearest-even cast."""
    return _f32(x).to(torch.bfloat16)


def cast_fp16(x: Tensor) -> Tensor:
    return _f32(x).to(torch.float16)


def cast_fp32(x: Tensor) -> Tensor:
    return _f32(x)
