"""Pure-torch reference implementations of every fused operation in ``hvdcomp.kernels``.

Each function here has exactly the signature of its Triton twin in ``kernels/<op>.py``.
They are the CPU path that users without a GPU get, and the oracle the kernel tests
compare against. All of them are vectorized torch (no Python loop over elements, bins
or ranks) and none of them synchronises with the host except where a docstring says so.

Conventions shared with the Triton kernels:

* Flat 1-D tensors. Callers pass ``t.reshape(-1)``; functions accept non-contiguous
  1-D views and never assume contiguity of inputs (outputs are always contiguous).
* Accumulators (residual ``r``, DGC momentum ``u`` and velocity ``v``) are fp32 whatever
  the gradient dtype; gradients may be fp32, fp16 or bf16 and are upcast on load.
* Scalars that live on the device (scales, thresholds, sums) are 1-element fp32 tensors,
  so no host synchronisation is needed to pass them from one kernel to the next.
* Ternary and sign codes are 2-bit values: 0 = zero, 1 = +1, 2 = -1 (3 is unused).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .cpu_compare import numpy_comparable, at_least, less, magnitude_at_least, nonzero_sparse  # noqa: F401
from .memo import PerTensorVersion

Tensor = torch.Tensor

# Philox-4x32-10 constants, as used by Triton's ``tl.rand`` (so both paths draw the same bits).
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_U32 = 0xFFFFFFFF

# Bin-local offset width by code width (AdaComp wire format).
ADACOMP_MAX_BIN_8BIT = 64  # 6-bit offset + 2-bit sign in a uint8
ADACOMP_MAX_BIN_16BIT = 16384  # 14-bit offset + 2-bit sign in an int16


def num_bins(numel: int, bin_size: int) -> int:
    """Number of AdaComp bins of ``bin_size`` elements covering ``numel`` (last may be short)."""
    return (numel + bin_size - 1) // bin_size


def adacomp_code_dtype(bin_size: int) -> torch.dtype:
    """Code dtype for a bin size: uint8 up to 64 elements per bin, int16 up to 16384."""
    if not 2 <= bin_size <= ADACOMP_MAX_BIN_16BIT:
        raise ValueError(f"AdaComp bin_size must be in [2, {ADACOMP_MAX_BIN_16BIT}], got {bin_size}")
    return torch.uint8 if bin_size <= ADACOMP_MAX_BIN_8BIT else torch.int16


# --------------------------------------------------------------------------------------
# 1. Error feedback and DGC momentum correction
# --------------------------------------------------------------------------------------


def ef_accumulate_(residual: Tensor, grad: Tensor) -> Tensor:
    """Error-feedback accumulation in place: ``r <- r + g`` (so ``r`` now holds ``x``).

    residual: fp32 [n], modified in place. grad: fp32/fp16/bf16 [n], upcast to fp32.
    Returns ``residual``. (Error feedback: ``x = r + g``, then ``r = x - sent``.)
    """
    return residual.add_(grad.to(torch.float32))


def dgc_momentum_(u: Tensor, v: Tensor, grad: Tensor, momentum: float) -> Tensor:
    """DGC momentum correction in place: ``u <- m*u + g``; ``v <- v + u``.

    u, v: fp32 [n], modified in place. grad: fp32/fp16/bf16 [n]. Returns ``v``.
    (Lin et al., DGC, Sec. 3.2, eq. (5)-(6).)
    """
    u.mul_(momentum).add_(grad.to(torch.float32))
    return v.add_(u)


# --------------------------------------------------------------------------------------
# 2. AdaComp: bin-max self-adjusting selection, ternary quantization, residual update
# --------------------------------------------------------------------------------------


def _adacomp_mask(x: Tensor, g: Tensor, bin_size: int) -> Tensor:
    """Selection mask: ``|x + g| >= max_bin |x|`` and ``x != 0`` (a zero sends nothing)."""
    n = x.numel()
    nb = num_bins(n, bin_size)
    ax = x.abs()
    padded = torch.zeros(nb * bin_size, dtype=torch.float32, device=x.device)
    padded[:n] = ax
    bin_max = padded.view(nb, bin_size).amax(dim=1)
    per_elem_max = bin_max.repeat_interleave(bin_size)[:n]
    h = (x + g.to(torch.float32)).abs()
    return (h >= per_elem_max) & (x != 0)


def adacomp_select_stats(x: Tensor, g: Tensor, bin_size: int) -> tuple[Tensor, Tensor]:
    """AdaComp pass 1: per-bin selected counts and the sum of ``|x|`` over selected elements.

    x: fp32 [n], the accumulated residue ``r + g``. g: fp32/fp16/bf16 [n], this step's
    gradient. bin_size: L_T in [2, 16384]. An element is selected when
    ``|x + g| >= max_{bin}|x|`` (i.e. ``|r + 2g|`` reaches the bin's max residue; AdaComp,
    Chen et al. 2018, Sec. 3) and ``x != 0``.

    Returns ``(bin_counts int32 [nbins], abs_sum fp64 [1])``; the tensor's ternary scale is
    ``abs_sum / bin_counts.sum()`` rounded to fp32 (the mean magnitude of what is sent, which
    minimises the squared quantization error for a fixed sign pattern). The sum is fp64 so
    that it cannot overflow for finite fp32 inputs (an fp32 sum of a few values near 1e38
    would be inf, and so would every value sent), and the mean it gives always fits fp32.
    """
    adacomp_code_dtype(bin_size)
    n = x.numel()
    nb = num_bins(n, bin_size)
    mask = _adacomp_mask(x, g, bin_size)
    padded = torch.zeros(nb * bin_size, dtype=torch.int32, device=x.device)
    padded[:n] = mask.to(torch.int32)
    counts = padded.view(nb, bin_size).sum(dim=1, dtype=torch.int32)
    abs_sum = torch.where(mask, x.abs(), torch.zeros((), device=x.device)).sum(dtype=torch.float64)
    return counts, abs_sum.reshape(1)


def adacomp_pack_(
    x: Tensor, g: Tensor, bin_size: int, bin_offsets: Tensor, scale: Tensor, codes: Tensor
) -> Tensor:
    """AdaComp pass 2: write the packed codes and turn ``x`` into the new residual, in place.

    x: fp32 [n], accumulated residue (in) -> residual ``x - sign(x)*scale*selected`` (out).
    g: [n] as in :func:`adacomp_select_stats` (the selection is recomputed identically).
    bin_offsets: int64 [nbins], exclusive prefix sum of the bin counts (where each bin's
    codes start). scale: fp32 [1]. codes: output, [total selected], dtype from
    :func:`adacomp_code_dtype`: ``(offset_in_bin << 2) | sign_code`` with sign_code 1 for
    positive and 2 for negative; codes of bin b are written at ``bin_offsets[b]`` onward in
    increasing offset order. Returns ``codes``. The reference checks that ``codes`` has
    exactly one slot per selected element (a host read); kernels never write past its end.
    x and g must be finite: a NaN makes its bin's maximum undefined (the reference then
    selects nothing in that bin, a kernel may still select its other elements).
    """
    mask = _adacomp_mask(x, g, bin_size)
    idx = nonzero_sparse(mask)
    if idx.numel() != codes.numel():
        raise ValueError(f"codes has {codes.numel()} slots but {idx.numel()} elements are selected")
    vals = x.index_select(0, idx)
    sign_code = torch.where(vals > 0, 1, 2)
    code = ((idx % bin_size) << 2) | sign_code
    codes.copy_(code.to(codes.dtype))
    s = scale.to(torch.float32).reshape(())
    x.index_copy_(0, idx, vals - torch.sign(vals) * s)
    return codes


def adacomp_decode_sum(
    codes: Tensor, bin_counts: Tensor, scales: Tensor, bin_size: int, numel: int
) -> Tensor:
    """Sum of N ranks' AdaComp payloads, densely: ``sum_r scale_r * ternary_r``.

    codes: uint8/int16 [sum of all counts], the N ranks' codes concatenated in rank order.
    bin_counts: int32 [N, nbins], each rank's counts. scales: fp32 [N]. Returns fp32 [numel].
    Codes must address elements below ``numel`` (the reference raises on one that does
    not; a kernel drops it).
    """
    nranks, nb = bin_counts.shape
    out = torch.zeros(numel, dtype=torch.float32, device=codes.device)
    if codes.numel() == 0:
        return out
    flat_counts = bin_counts.reshape(-1).to(torch.int64)
    bin_of_code = torch.arange(nranks * nb, device=codes.device).repeat_interleave(flat_counts) % nb
    rank_of_code = torch.arange(nranks, device=codes.device).repeat_interleave(
        bin_counts.to(torch.int64).sum(dim=1)
    )
    c = codes.to(torch.int64) & 0xFFFF  # int16 codes read as unsigned
    index = bin_of_code * bin_size + (c >> 2)
    sign = torch.where((c & 3) == 1, 1.0, -1.0)
    return out.index_add_(0, index, sign * scales.to(torch.float32)[rank_of_code])


# --------------------------------------------------------------------------------------
# 3. Ternarization (TernGrad) and sign quantization (1-bit SGD)
# --------------------------------------------------------------------------------------


def _mulhilo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    # int64 multiply wraps modulo 2**64, which keeps the low 64 bits of the 32x32 product exact.
    prod = b * a
    return (prod >> 32) & _U32, prod & _U32


def _philox_words(seed: int, counters: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox-4x32-10 of counter ``(c, 0, 0, 0)`` with key ``(seed_lo, seed_hi)``: the four
    output words (int64 holding uint32), as Triton's ``tl.randint4x(seed, c)``."""
    c0 = counters.to(torch.int64) & _U32
    c1 = torch.zeros_like(c0)
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0 = seed & _U32
    k1 = (seed >> 32) & _U32
    for _ in range(10):
        hi_b, lo_b = _mulhilo(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _U32
        k1 = (k1 + _PHILOX_KEY_B) & _U32
    return c0, c1, c2, c3


def _uniform(word: Tensor) -> Tensor:
    # tl.rand's mapping: reinterpret as int32, fold negatives, scale by 2**-31 (fp32 multiply).
    signed = torch.where(word >= 2**31, word - 2**32, word)
    folded = torch.where(signed < 0, -signed - 1, signed)
    return folded.to(torch.float32) * 4.6566127342e-10


def philox_uniform(seed: int, offsets: Tensor) -> Tensor:
    """Uniform floats in [0, 1), bit-identical to Triton's ``tl.rand(seed, offsets)``.

    offsets: int64 [n] (each < 2**32). Returns fp32 [n] (the first Philox word of each).
    """
    return _uniform(_philox_words(seed, offsets)[0])


def philox_uniform4(seed: int, counters: Tensor) -> Tensor:
    """All four uniforms of each Philox counter, as ``tl.rand4x(seed, counters)``: fp32 [m, 4]."""
    return torch.stack([_uniform(w) for w in _philox_words(seed, counters)], dim=1)


def element_uniforms(seed: int, numel: int, device=None) -> Tensor:
    """One uniform per element: element i takes word ``i % 4`` of counter ``i // 4``, so one
    Philox evaluation serves four elements (on the GPU and here). fp32 [numel].

    Computed in chunks so the int64 temporaries of the ten rounds stay in cache.
    """
    counters = (numel + 3) // 4
    out = torch.empty(counters * 4, dtype=torch.float32, device=device)
    chunk = 1 << 15
    for start in range(0, counters, chunk):
        stop = min(counters, start + chunk)
        c = torch.arange(start, stop, dtype=torch.int64, device=device)
        out[4 * start:4 * stop] = philox_uniform4(seed, c).reshape(-1)
    return out[:numel]


def fast_uniforms(seed: int, numel: int, device=None) -> Tensor:
    """One uniform in [0, 1) per element from torch's generator of ``device`` seeded with
    ``seed`` (the fast stream of non-CPU tensors without a Triton kernel; CPU tensors take
    :func:`terngrad_ternarize_fast_rng`'s two-stage draw instead). fp32 [numel]."""
    gen = torch.Generator(device=device).manual_seed(int(seed))
    return torch.rand(numel, generator=gen, device=device, dtype=torch.float32)


#: Tensors from this size on get :func:`population_std`'s one-pass moments on a CPU; below
#: it the exact two-pass standard deviation costs nothing worth saving.
_MOMENTS_MIN_NUMEL = 1 << 16
_MOMENTS_ROW = 4096


def population_std(x: Tensor) -> Tensor:
    """Standard deviation with ``correction=0`` of x (fp32 [n], n >= 1) as fp32 [1]; exactly 0
    for a constant tensor (TernGrad's clipping bound ``c * sigma``, eq. (7)).

    Large CPU tensors (n >= 65536): ``sqrt(E[x^2] - E[x]^2)`` from one ``sum`` and one pass of
    fp32 norms over 4096-element rows, accumulated in fp64: relative error ~1e-7 on
    gradients, two passes cheaper than torch's ``std`` (the priciest pass of TernGrad's CPU
    step after the draw). Where ``E[x]^2 > E[x^2] / 100`` the subtraction would cancel
    digits (a constant tensor is the extreme case), and there, on other devices and for
    smaller tensors, the exact ``std(x - x[0])`` (shifted: sigma is shift-invariant, and a
    constant tensor gives exactly 0 instead of a rounding residue). Host reads on the CPU
    path only.
    """
    n = x.numel()
    if x.device.type == "cpu" and n >= _MOMENTS_MIN_NUMEL and x.is_contiguous():
        body = n // _MOMENTS_ROW * _MOMENTS_ROW
        rows = torch.linalg.vector_norm(x[:body].view(-1, _MOMENTS_ROW), dim=1).to(torch.float64)
        tail = x[body:].to(torch.float64)
        mean_sq = (float(rows.square().sum()) + float(tail.square().sum())) / n
        mean = float(x.sum()) / n
        if mean * mean <= 0.01 * mean_sq:
            return torch.tensor([math.sqrt(mean_sq - mean * mean)], dtype=torch.float32)
    return torch.std(x - x[0], correction=0).reshape(1)


def _ternarize(g: Tensor, scale: Tensor, clip: Tensor, u: Tensor) -> Tensor:
    # keep_i = u_i * s < |clamp(g_i)| = min(|g_i|, clip), code = 1 << (g_i < 0) where kept:
    # the same decision as clamping first (clip > 0, so the sign survives the clamp), in
    # fewer passes, with the codes built in uint8 and never widened.
    a = g.to(torch.float32).abs().clamp_(max=clip)  # in place: one n-element temporary, not two
    keep = less(u.mul_(scale.to(torch.float32)), a).view(torch.uint8)
    neg = less(g, 0).view(torch.uint8)
    return pack_2bit(keep << neg)  # 1 << [g < 0] where kept: 1 or 2


def terngrad_ternarize(g: Tensor, scale: Tensor, clip: Tensor, seed: int) -> Tensor:
    """TernGrad stochastic ternarization to 2-bit codes (Wen et al. 2017, eq. (6)).

    ``gc = clamp(g, -clip, clip)``; ``b ~ Bernoulli(|gc| / scale)``; the code is 1 (+1) or
    2 (-1) by ``sign(gc)`` where ``b = 1``, else 0. Decoded, ``scale*sign(gc)*b`` is an
    unbiased estimate of ``gc`` provided ``scale >= max|gc|``.

    g: fp32/fp16/bf16 [n]. scale: fp32 [1], the (rank-shared) scaler ``s``; 0 decodes to all
    zeros. clip: fp32 [1], the clipping bound ``c*sigma`` (``inf`` for none), > 0. seed: int
    in [0, 2**63), derived by the caller from (seed, step, rank, tensor); element i draws
    ``element_uniforms(seed, n)[i]`` (word i % 4 of Philox counter i // 4), the stream of the
    Triton kernel. Returns the codes packed four per byte (see :func:`pack_2bit`): uint8
    [ceil(n/4)]. (The CPU path of ``TernGradCompressor`` uses
    :func:`terngrad_ternarize_fast_rng` instead, see there.)
    """
    return _ternarize(g, scale, clip, element_uniforms(seed, g.numel(), device=g.device))


#: From this size on :func:`terngrad_ternarize_fast_rng` draws a byte per element, below it a
#: float (its ~40 small ops would cost more than the draw they save: measured crossover ~40k).
_COARSE_MIN_NUMEL = 1 << 15
#: Levels of the coarse draw of :func:`terngrad_ternarize_fast_rng`: 7 bits, so that every
#: full-length pass after the first is a byte-wide integer op (torch's CPU compares of floats
#: into bool cost ~10x a byte op).
_COARSE_LEVELS = 128


def _coarse_levels(g: Tensor, scale: float, clip: float, cap: float) -> Tensor:
    # Q = clamp(g * (128 / scale), -L, L), L = min(clip * 128 / scale, cap), fp32: the same
    # operations for the whole tensor and for the elements refined later, so both see the
    # same Q. One multiply by the fp32 reciprocal (two steps when it would overflow).
    inv = _COARSE_LEVELS / scale
    q = g.to(torch.float32)
    q = q * inv if inv < 3.0e38 else q / scale * _COARSE_LEVELS
    bound = min(clip * inv, cap) if clip < math.inf else cap
    return q.clamp_(-bound, bound)


def terngrad_ternarize_fast_rng(g: Tensor, scale: Tensor, clip: Tensor, seed: int) -> Tensor:
    """:func:`terngrad_ternarize` (same arguments, same equation, same law of the codes) with
    a random stream that is cheap on a CPU; not bit-identical to the GPU kernel's Philox,
    whose emulation in torch costs ~100 passes over the tensor.

    Element i is kept with probability ``p_i = min(|g_i|, clip) / scale`` (to fp32
    rounding) by comparing ``Q_i = 128 p_i`` with ``V_i + W_i``: ``V_i`` a uniform 7-bit
    integer, ``W_i`` a uniform fp32 in [0, 1) (24 bits), so ``(V_i + W_i) / 128`` is uniform
    on [0, 1) to 31 bits. Kept when ``V_i < floor(Q_i)``, dropped when ``V_i > floor(Q_i)``,
    and only when they are equal (probability 1/128) is ``W_i`` drawn: kept iff
    ``W_i < Q_i - V_i``. So P(kept) = ``floor(Q)/128 + (Q - floor(Q))/128 = p_i`` exactly,
    for one random byte per element instead of a float (the draw was the largest cost of the
    step) and byte-wide integer ops after the first pass.

    The stream, for CPU tensors of n >= 32768 elements: ``bits = numpy.random.PCG64(seed)``;
    ``V`` is the low 7 bits of the little-endian bytes of ``bits.random_raw(ceil(n / 8))``, one
    byte per element; then the ``W`` of the elements that need one, in increasing index
    order, are ``numpy.random.Generator(bits).random(count, float32)``. Smaller CPU tensors
    (where a few small ops cost more than the draw): ``u = Generator(PCG64(seed)).random(n,
    float32)``, kept iff ``u * scale < min(|g|, clip)``. Reproducible for the same seed and
    NumPy version. Other devices: :func:`fast_uniforms`. Host reads: ``scale`` and ``clip``
    (CPU, nothing to wait for). A NaN gradient gets an unspecified code (the front ends drop
    a step with a non-finite gradient).
    """
    n = g.numel()
    if g.device.type != "cpu":
        return _ternarize(g, scale, clip, fast_uniforms(seed, n, device=g.device))
    if n < _COARSE_MIN_NUMEL:
        u = np.random.Generator(np.random.PCG64(int(seed))).random(n, dtype=np.float32)
        return _ternarize(g, scale, clip, torch.from_numpy(u))
    s, c = float(scale.reshape(-1)[0]), float(clip.reshape(-1)[0])
    if not s > 0:  # scale 0 (an all-zero gradient) decodes to zeros: send zeros
        return torch.zeros((n + 3) // 4, dtype=torch.uint8)
    bits = np.random.PCG64(int(seed))
    coarse = torch.from_numpy(bits.random_raw((n + 7) // 8).view(np.uint8)[:n])
    coarse = coarse.bitwise_and_(_COARSE_LEVELS - 1).view(torch.int8)
    # floor(|Q|) with Q's sign, as int8 (truncation toward zero); |Q| >= 127 becomes 127,
    # which the refinement below decides exactly.
    floor_q = _coarse_levels(g, s, c, _COARSE_LEVELS - 1.0).to(torch.int8)
    level = floor_q.abs()
    keep = (coarse < level).view(torch.uint8)
    neg = floor_q.view(torch.uint8) >> 7  # the sign bit (floor 0 has none: refined below)
    codes = keep << neg  # 1 << [g < 0] where kept: 1 or 2
    refine = nonzero_sparse(coarse == level)
    if refine.numel():
        q = _coarse_levels(g.index_select(0, refine), s, c, math.inf)
        w = torch.from_numpy(np.random.Generator(bits).random(refine.numel(), dtype=np.float32))
        kept = (w < q.abs() - coarse.index_select(0, refine).to(torch.float32)).to(torch.uint8)
        codes.index_put_((refine,), kept << (q < 0).to(torch.uint8))
    return pack_2bit(codes)


def ternary_quantize(x: Tensor, threshold: Tensor) -> Tensor:
    """Deterministic ternary codes: 1 where ``x >= threshold``, 2 where ``x <= -threshold``.

    x: fp32/fp16/bf16 [n]. threshold: fp32 [1] (> 0; elements with ``|x| < threshold`` get
    code 0). Returns the codes packed four per byte: uint8 [ceil(n/4)].
    """
    xf = x.to(torch.float32)
    t = threshold.to(torch.float32)
    return pack_2bit(torch.where(xf >= t, 1, torch.where(xf <= -t, 2, 0)).to(torch.uint8))


def sign_pack(x: Tensor) -> tuple[Tensor, Tensor]:
    """1-bit quantization with scale (1-bit SGD with error feedback, Seide et al. 2014;
    per-tensor scale as in EF-SignSGD): bit i is 1 where ``x_i < 0``; the scale is
    ``mean|x|`` so that ``scale * sign(x)`` keeps the L1 norm.

    x: fp32/fp16/bf16 [n]. Returns ``(bits uint8 [ceil(n/8)], scale fp32 [1])``; bit i sits
    at bit ``i % 8`` of byte ``i // 8`` (little-endian within the byte).
    """
    xf = x.to(torch.float32)
    n = xf.numel()
    scale = (xf.abs().sum() / max(n, 1)).reshape(1)
    return pack_bits(less(xf, 0)), scale


def sign_residual_(x: Tensor, scale: Tensor) -> Tensor:
    """1-bit error feedback in place: ``x <- x - scale * sign(x)`` with sign = -1 exactly
    where ``x < 0`` (where :func:`sign_pack`'s bit is 1) and +1 elsewhere, zeros included.

    x: fp32 [n], updated in place. scale: fp32 [1]. Returns x. On a CPU the signed scale is
    built from the compare's bits (``(x < 0) << 31 | bits(scale)``) in NumPy: a quarter of
    ``torch.where``'s time here, the same single rounding of ``x -+ scale``.
    """
    if numpy_comparable(x) and x.dtype == torch.float32:
        v = x.numpy()
        signed = (v < 0).astype(np.uint32)
        signed <<= np.uint32(31)
        signed |= np.float32(float(scale.reshape(-1)[0])).view(np.uint32)
        v -= signed.view(np.float32)
        return x
    return x.sub_(torch.where(x < 0, -scale, scale))


def sign_decode_sum(bits: Tensor, scales: Tensor, numel: int) -> Tensor:
    """Sum of N ranks' 1-bit payloads: ``sum_r scale_r * (1 - 2*bit_r)``.

    bits: uint8 [N, ceil(numel/8)]. scales: fp32 [N]. Returns fp32 [numel].
    """
    nranks = bits.shape[0]
    if bits.shape[1] * 8 < numel:
        raise ValueError(f"rows of {bits.shape[1]} bytes hold {bits.shape[1] * 8} bits, {numel} asked for")
    if nranks == 0:
        return torch.zeros(numel, dtype=torch.float32, device=bits.device)
    signs = 1.0 - 2.0 * unpack_bits(bits.reshape(-1), nranks * bits.shape[1] * 8).view(nranks, -1)[
        :, :numel
    ].to(torch.float32)
    return (signs * scales.to(torch.float32).view(nranks, 1)).sum(dim=0)


def ternary_decode_sum(packed: Tensor, scales: Tensor, numel: int) -> Tensor:
    """Sum of N ranks' 2-bit ternary payloads: ``sum_r scale_r * level_r``.

    packed: uint8 [N, ceil(numel/4)] (see :func:`pack_2bit`). scales: fp32 [N].
    Returns fp32 [numel].
    """
    nranks = packed.shape[0]
    if packed.shape[1] * 4 < numel:
        raise ValueError(f"rows of {packed.shape[1]} bytes hold {packed.shape[1] * 4} codes, {numel} asked for")
    if nranks == 0:
        return torch.zeros(numel, dtype=torch.float32, device=packed.device)
    codes = unpack_2bit(packed.reshape(-1), nranks * packed.shape[1] * 4).view(nranks, -1)[:, :numel]
    levels = (codes == 1).to(torch.float32) - (codes == 2).to(torch.float32)
    return (levels * scales.to(torch.float32).view(nranks, 1)).sum(dim=0)


# --------------------------------------------------------------------------------------
# 4. Top-k by threshold
# --------------------------------------------------------------------------------------


def _magnitude_key(x: Tensor) -> Tensor:
    # |x| as an ordered integer: the bit pattern of a non-negative float orders like its value,
    # and NaN (exponent all ones, mantissa non-zero) lands above inf.
    return x.to(torch.float32).contiguous().view(torch.int32) & 0x7FFFFFFF


#: Below this many elements, or above this fraction kept, ``torch.topk`` on every key is as
#: cheap as the candidate search (which only pays when the candidates are few).
_TOPK_SEARCH_MIN_NUMEL = 1 << 15
_TOPK_SEARCH_MAX_FRACTION = 1.0 / 16
#: The sample holds about this many elements above the k-th largest key (see _topk_candidates).
_TOPK_SAMPLE_HITS = 64


def _weyl_sample(numel: int, size: int, device) -> Tensor:
    # Positions frac(j * phi) * numel, j < size: a low-discrepancy spread over the whole tensor
    # with no period a conv weight's layout could alias with (a plain stride could keep
    # hitting the same kernel tap), deterministic and free of RNG state.
    j = torch.arange(size, dtype=torch.float64, device=device)
    return torch.clamp((torch.frac(j * 0.6180339887498949) * numel).to(torch.int64), max=numel - 1)


_SAMPLES: dict = {}


def _sample_positions(numel: int, size: int, device) -> Tensor:
    key = (numel, size, str(device))
    pos = _SAMPLES.get(key)
    if pos is None:
        if len(_SAMPLES) >= 256:  # a bounded cache: models have a few dozen distinct sizes
            _SAMPLES.clear()
        pos = _SAMPLES[key] = _weyl_sample(numel, size, device)
    return pos


#: The key of +inf: every key above it is a NaN's.
_INF_KEY = 0x7F800000


def _candidate_mask(x: Tensor, t: int) -> Tensor:
    # ``key(x) >= t`` as bool [n]. For fp32 on a CPU without writing the keys: t is at most
    # inf's key, so it is the key of a float tf and key(x) >= t  <=>  |x| >= tf, or x is NaN
    # (a NaN's key is above every other): three NumPy compares, no n-element int32 pass.
    if numpy_comparable(x) and x.dtype == torch.float32 and t <= _INF_KEY:
        mask = magnitude_at_least(x, float(np.array(t, dtype=np.int32).view(np.float32)))
        in_place = mask.numpy()  # the same memory
        in_place |= np.isnan(x.numpy())
        return mask
    return at_least(_magnitude_key(x), t)


def _topk_candidates(x: Tensor, k: int) -> Tensor | None:
    """Increasing positions of every element whose key is ``>= t`` for a ``t`` at most the
    k-th largest key, so the top k are among them; None when the search does not pay (or
    fails: fewer than k candidates, then ``t`` was too high and the caller falls back to all
    keys).

    ``t`` is the j-th largest of a sample of s keys, with ``j = p*s + 4*sqrt(p*s) + 2``
    (p = k/n): the sample holds about ``p*s`` keys at or above the k-th largest, with a spread
    of ``sqrt(p*s)``, so ``t`` lies below it except with probability ~1e-5, and about
    ``n*j/s`` (a small multiple of k) elements pass. Exact either way: with at least k
    candidates ``t`` cannot exceed the k-th largest key.
    """
    n = x.numel()
    if n < _TOPK_SEARCH_MIN_NUMEL or k > n * _TOPK_SEARCH_MAX_FRACTION:
        return None
    s = min(n, max(4096, math.ceil(_TOPK_SAMPLE_HITS * n / k)))
    if s > n // 4:
        return None
    hits = k * s / n
    j = min(s, math.ceil(hits + 4.0 * math.sqrt(hits) + 2.0))
    sample = _magnitude_key(x.index_select(0, _sample_positions(n, s, x.device)))
    t = int(torch.topk(sample, j, sorted=False).values.min())  # host read: nothing to wait for
    cand = nonzero_sparse(_candidate_mask(x, t))
    return cand if cand.numel() >= k else None


def topk_indices(x: Tensor, k: int) -> Tensor:
    """Exact top-k by magnitude: indices of the k largest ``|x|``, ties to the lower index,
    returned in increasing index order.

    x: fp32/fp16/bf16 [n]; 0 <= k <= n. Returns int64 [k], always k of them: a NaN ranks
    above inf, as in ``torch.topk`` and the Triton kernel (magnitudes are compared as the
    bit patterns of ``|x|``, which order non-negative floats and put NaN last). (ScaleCom's
    leader selection, top-k.) O(n): a threshold from a sample of the keys keeps a few times k
    candidates in one compare pass (see :func:`_topk_candidates`; all keys when that does not
    pay); ``torch.topk`` over the candidates' keys finds the k-th largest key ``t``; every
    candidate above ``t`` is kept, and the first ones equal to ``t`` (in index order) fill
    the rest.
    """
    n = x.numel()
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    if k == 0:
        return torch.zeros(0, dtype=torch.int64, device=x.device)
    cand = _topk_candidates(x, k)
    sub = _magnitude_key(x if cand is None else x.index_select(0, cand))
    kth = torch.topk(sub, k, sorted=False).values.min()
    above = sub > kth
    fill = k - int(above.sum())  # host read: the CPU path has no device to wait for
    ties = nonzero_sparse(sub == kth)[:fill]
    picked = torch.sort(torch.cat([nonzero_sparse(above), ties])).values
    return picked if cand is None else cand.index_select(0, picked)


def sampled_threshold(x: Tensor, ratio: float, sample_idx: Tensor) -> Tensor:
    """DGC's threshold from a sample (Lin et al. 2018, Sec. 3.1 / Alg. 1): the
    ``ceil(ratio * len(sample))``-th largest ``|x|`` among ``x[sample_idx]``.

    x: fp32 [n]. ratio: fraction to keep in (0, 1]. sample_idx: int64 [s] (s >= 1).
    Returns fp32 [1].
    """
    # Negative positions count from the end; index_select after the wrap, not x[idx]
    # (measured 4x slower on a CPU: advanced indexing checks and wraps element by element).
    sample = x.index_select(0, sample_idx.remainder(max(1, x.numel()))).to(torch.float32).abs()
    k = max(1, min(sample.numel(), int(-(-ratio * sample.numel() // 1))))
    return torch.topk(sample, k, sorted=False).values.min().reshape(1)


#: count_above's mask of each tensor, reused by compact_above for the same tensor version and
#: threshold (on a CPU the mask is the priciest pass of DGC's selection; the front end asks
#: for the count at encode and the compaction at pack, with nothing written in between).
_ABOVE_MASKS = PerTensorVersion()


def _above_mask(x: Tensor, threshold: Tensor, last_use: bool) -> Tensor:
    bound = float(threshold)  # host read: the CPU path has no device to wait for
    lookup = _ABOVE_MASKS.take if last_use else _ABOVE_MASKS
    return lookup(x, bound, lambda: magnitude_at_least(x.to(torch.float32), bound))


def count_above(x: Tensor, threshold: Tensor) -> Tensor:
    """Number of elements with ``|x| >= threshold`` (threshold fp32 [1]). Returns int64 [1]."""
    # count_nonzero, not sum: a bool sum widens every element to int64 first (10x slower).
    return torch.count_nonzero(_above_mask(x, threshold, last_use=False)).reshape(1)


def compact_above(x: Tensor, threshold: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """Stream compaction: indices and values of ``|x| >= threshold`` in index order.

    x: fp32 [n]. threshold: fp32 [1]. count: the number selected (from :func:`count_above`,
    read on the host by the caller, once per bucket). Returns ``(indices int32 [count],
    values fp32 [count])``.
    """
    idx = nonzero_sparse(_above_mask(x, threshold, last_use=True))
    if idx.numel() != count:
        raise ValueError(f"count={count} but {idx.numel()} elements pass the threshold")
    return idx.to(torch.int32), x.index_select(0, idx).to(torch.float32)


# --------------------------------------------------------------------------------------
# 5. Packing
# --------------------------------------------------------------------------------------


def _padded_bytes(codes: Tensor, multiple: int) -> Tensor:
    # uint8 [n rounded up to `multiple`], contiguous and 8-byte aligned so that it can be
    # read as int32/int64 words (pad values are 0).
    n = codes.numel()
    flat = codes.reshape(-1)
    flat = flat.view(torch.uint8) if flat.dtype == torch.bool and flat.stride(0) == 1 else flat.to(torch.uint8)
    if n % multiple or n == 0 or flat.stride(0) != 1 or flat.storage_offset() % 8:
        padded = torch.zeros((n + multiple - 1) // multiple * multiple, dtype=torch.uint8, device=codes.device)
        padded[:n] = flat
        return padded
    return flat


#: Multipliers that move the low bits of every byte of a little-endian word into its top byte:
#: ``w * m`` adds ``c_j * 2**(8j + e_i)`` for every byte j and term ``2**e_i`` of m; the terms
#: with i = j land on the top byte's fields, the others on distinct lower bits (no carry can
#: reach the top byte) or beyond the word (dropped: unsigned arithmetic is modular).
_GATHER_2BIT = np.uint32((1 << 24) + (1 << 18) + (1 << 12) + (1 << 6))  # code j -> bits 24 + 2j
_GATHER_1BIT = np.uint64(0x0102040810204080)  # bit j -> bit 56 + j


def _top_bytes(words: Tensor, np_dtype, magic) -> Tensor:
    # The top byte of every ``word * magic``, uint8 [words]: in NumPy's unsigned (modular)
    # arithmetic on a CPU, one multiply and one shift; elsewhere the same in torch's signed
    # words (two's-complement wrap-around, the low byte of the shifted word is the same).
    bits = 8 * np.dtype(np_dtype).itemsize - 8
    if words.device.type == "cpu":
        w = words.numpy().view(np_dtype) * magic
        w >>= np_dtype(bits)
        return torch.from_numpy(w.astype(np.uint8))
    w = words * int(magic.astype(np.int64 if bits == 56 else np.int32))
    return (w >> bits).to(torch.uint8)


def pack_2bit(codes: Tensor) -> Tensor:
    """Pack 2-bit codes four per byte: code i at bits ``2*(i%4)`` of byte ``i//4``.

    codes: uint8 [n] with values in 0..3. Returns uint8 [ceil(n/4)] (pad codes are 0).
    """
    # Four codes are the bytes of one int32 word, little-endian as on every platform torch
    # ships for (x86-64, ARM64, CUDA memory); one multiply gathers them into the top byte
    # (see _GATHER_2BIT): two contiguous word ops instead of strided bytes.
    return _top_bytes(_padded_bytes(codes, 4).view(torch.int32), np.uint32, _GATHER_2BIT)


def unpack_2bit(packed: Tensor, numel: int) -> Tensor:
    """Inverse of :func:`pack_2bit`: uint8 [ceil(numel/4)] -> uint8 [numel]."""
    if packed.numel() * 4 < numel:
        raise ValueError(f"{packed.numel()} bytes hold {packed.numel() * 4} 2-bit codes, {numel} asked for")
    p = packed.to(torch.int32).view(-1, 1)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int32, device=packed.device)
    return ((p >> shifts) & 3).reshape(-1)[:numel].to(torch.uint8)


def pack_bits(bits: Tensor) -> Tensor:
    """Pack 0/1 values eight per byte: bit i at bit ``i%8`` of byte ``i//8``.

    bits: uint8/bool [n]. Returns uint8 [ceil(n/8)].
    """
    if bits.dtype != torch.bool:
        # uint8 values: the weighted sum, which is what every implementation computes for
        # values other than 0/1 too (the fold below is exact for 0/1 only).
        n = bits.numel()
        padded = torch.zeros((n + 7) // 8 * 8, dtype=torch.int32, device=bits.device)
        padded[:n] = bits.reshape(-1).to(torch.int32)
        weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.int32, device=bits.device)
        return (padded.view(-1, 8) * weights).sum(dim=1).to(torch.uint8)
    # bool: eight bits are the bytes of one little-endian int64 word (bit j at bit 8j); one
    # multiply gathers them into the top byte (see _GATHER_1BIT), as pack_2bit does.
    return _top_bytes(_padded_bytes(bits, 8).view(torch.int64), np.uint64, _GATHER_1BIT)


def unpack_bits(packed: Tensor, numel: int) -> Tensor:
    """Inverse of :func:`pack_bits`: uint8 [ceil(numel/8)] -> uint8 [numel] of 0/1."""
    if packed.numel() * 8 < numel:
        raise ValueError(f"{packed.numel()} bytes hold {packed.numel() * 8} bits, {numel} asked for")
    p = packed.to(torch.int32).view(-1, 1)
    shifts = torch.arange(8, dtype=torch.int32, device=packed.device)
    return ((p >> shifts) & 1).reshape(-1)[:numel].to(torch.uint8)


# --------------------------------------------------------------------------------------
# 6. Decode and accumulate
# --------------------------------------------------------------------------------------


def scatter_add_(out: Tensor, indices: Tensor, values: Tensor) -> Tensor:
    """Dense accumulation of sparse payloads: ``out[indices[j]] += values[j]`` for all j.

    out: fp32 [n], in place. indices: int32/int64 [m] (repeats allowed: N ranks' payloads
    concatenated). values: fp32/fp16/bf16 [m], upcast. Returns ``out``.
    """
    return out.index_add_(0, indices.to(torch.int64), values.to(torch.float32))


# --------------------------------------------------------------------------------------
# 7. Casts
# --------------------------------------------------------------------------------------


def cast_bf16(x: Tensor) -> Tensor:
    """fp32 -> bf16 with round-to-nearest-even, NaN/Inf preserved (bit-exact with torch's
    ``x.to(torch.bfloat16)`` for every non-NaN input; Kalamkar et al. 2019, Sec. 3). A NaN
    stays NaN, its payload bits unspecified (torch's own CPU and CUDA casts disagree on
    them). x: fp32 [n]. Returns bf16 [n]."""
    return x.to(torch.float32).to(torch.bfloat16)


def cast_fp16(x: Tensor) -> Tensor:
    """fp32 -> fp16 with round-to-nearest-even (torch's cast). x: fp32 [n]. Returns fp16 [n]."""
    return x.to(torch.float32).to(torch.float16)


def cast_fp32(x: Tensor) -> Tensor:
    """fp16/bf16 -> fp32 (exact). x: [n]. Returns fp32 [n]."""
    return x.to(torch.float32)
