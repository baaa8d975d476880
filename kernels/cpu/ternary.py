"""TernGrad's ternarization (its two random streams and the clipping bound's sigma),
deterministic ternary and 1-bit sign quantization with 1-bit SGD's residual update, and the
dense decode+sum of N ranks' packed payloads."""
from __future__ import annotations

import math

import numpy as np
import torch

from .compare import less, nonzero_sparse, numpy_comparable
from .packing import pack_2bit, pack_bits
from .random_streams import element_uniforms, fast_uniforms, pcg64_bytes, pcg64_more_uniforms, pcg64_uniforms

Tensor = torch.Tensor

#: Tensors from this size on get :func:`population_std`'s one-pass moments on a CPU; below
#: it the exact two-pass standard deviation costs nothing worth saving.
_MOMENTS_MIN_NUMEL = 1 << 16
_MOMENTS_ROW = 4096


def population_std(x: Tensor) -> Tensor:
    """Large CPU tensors (n >= 65536): ``sqrt(E[x^2] - E[x]^2)`` from one ``sum`` and one pass
    of fp32 norms over 4096-element rows, accumulated in fp64: two passes fewer than
    torch's ``std`` (the priciest pass of TernGrad's CPU step after the draw). The sums
    carry a relative error e (~1e-7) of ``E[x^2]``, which the subtraction magnifies by
    ``E[x^2] / sigma^2``; while ``E[x]^2 <= E[x^2] / 2`` (the mean no larger than sigma,
    as in gradients, whose mean drifts from 0 as training goes on) that is at most 2e.
    Beyond it the subtraction would cancel digits (a constant tensor is the extreme case),
    and there, on other devices and for smaller tensors, the exact ``std(x - x[0])``
    (shifted: sigma is shift-invariant, and a constant tensor gives exactly 0 instead of a
    rounding residue). Host reads on the CPU path only.
    """
    n = x.numel()
    if x.device.type == "cpu" and n >= _MOMENTS_MIN_NUMEL and x.is_contiguous():
        body = n // _MOMENTS_ROW * _MOMENTS_ROW
        rows = torch.linalg.vector_norm(x[:body].view(-1, _MOMENTS_ROW), dim=1).to(torch.float64)
        tail = x[body:].to(torch.float64)
        mean_sq = (float(rows.square().sum()) + float(tail.square().sum())) / n
        mean = float(x.sum()) / n
        if mean * mean <= 0.5 * mean_sq:
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
    """Element i draws ``element_uniforms(seed, n)[i]`` (the Triton kernel's Philox stream,
    emulated in int64 torch arithmetic) and is kept iff ``u * scale < min(|g|, clip)``."""
    return _ternarize(g, scale, clip, element_uniforms(seed, g.numel(), device=g.device))


#: From this size on :func:`terngrad_ternarize_fast_rng` draws a byte per element, below it a
#: float (its few dozen small ops would cost more than the draw they save).
_COARSE_MIN_NUMEL = 1 << 15
#: Levels of the coarse draw of :func:`terngrad_ternarize_fast_rng`: 7 bits, so that every
#: full-length pass after the first is a byte-wide integer op (torch's CPU compares of floats
#: into bool cost several times a byte op).
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
    """Element i is kept with probability ``p_i = min(|g_i|, clip) / scale`` (to fp32
    rounding) by comparing ``Q_i = 128 p_i`` with ``V_i + W_i``: ``V_i`` a uniform 7-bit
    integer, ``W_i`` a uniform fp32 in [0, 1) (24 bits), so ``(V_i + W_i) / 128`` is uniform
    on [0, 1) to 31 bits. Kept when ``V_i < floor(Q_i)``, dropped when ``V_i > floor(Q_i)``,
    and only when they are equal (probability 1/128) is ``W_i`` drawn: kept iff
    ``W_i < Q_i - V_i``. So P(kept) = ``floor(Q)/128 + (Q - floor(Q))/128 = p_i`` exactly,
    for one random byte per element instead of a float (the draw was the largest cost of the
    step) and byte-wide integer ops after the first pass. The stream is the one
    :func:`hvdcomp.kernels.terngrad_ternarize_fast_rng` documents.
    """
    n = g.numel()
    if g.device.type != "cpu":
        return _ternarize(g, scale, clip, fast_uniforms(seed, n, device=g.device))
    if n < _COARSE_MIN_NUMEL:
        return _ternarize(g, scale, clip, pcg64_uniforms(seed, n))
    s, c = float(scale.reshape(-1)[0]), float(clip.reshape(-1)[0])
    if not s > 0:  # scale 0 (an all-zero gradient) decodes to zeros: send zeros
        return torch.zeros((n + 3) // 4, dtype=torch.uint8)
    coarse, bits = pcg64_bytes(seed, n)
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
        w = pcg64_more_uniforms(bits, refine.numel())
        kept = (w < q.abs() - coarse.index_select(0, refine).to(torch.float32)).to(torch.uint8)
        codes.index_put_((refine,), kept << (q < 0).to(torch.uint8))
    return pack_2bit(codes)


def ternary_quantize(x: Tensor, threshold: Tensor) -> Tensor:
    """Two compares against the threshold, then :func:`pack_2bit`."""
    xf = x.to(torch.float32)
    t = threshold.to(torch.float32)
    return pack_2bit(torch.where(xf >= t, 1, torch.where(xf <= -t, 2, 0)).to(torch.uint8))


def sign_pack(x: Tensor) -> tuple[Tensor, Tensor]:
    """The bits by a NumPy compare and :func:`pack_bits`; the scale by torch's fp32 sum."""
    xf = x.to(torch.float32)
    n = xf.numel()
    scale = (xf.abs().sum() / max(n, 1)).reshape(1)
    return pack_bits(less(xf, 0)), scale


def sign_residual_(x: Tensor, scale: Tensor) -> Tensor:
    """On a CPU the signed scale is built from the compare's bits (``(x < 0) << 31 |
    bits(scale)``) in NumPy: a fraction of ``torch.where``'s cost, the same single rounding
    of ``x -+ scale``. Elsewhere ``x.sub_(torch.where(x < 0, -scale, scale))``."""
    if numpy_comparable(x) and x.dtype == torch.float32:
        v = x.numpy()
        signed = (v < 0).astype(np.uint32)
        signed <<= np.uint32(31)
        signed |= np.float32(float(scale.reshape(-1)[0])).view(np.uint32)
        v -= signed.view(np.float32)
        return x
    return x.sub_(torch.where(x < 0, -scale, scale))


def _byte_levels(per_byte: int, level_of_field) -> Tensor:
    """fp32 [256, per_byte]: row b holds the levels of byte b's fields, lowest bits first
    (the order :func:`pack_2bit` / :func:`pack_bits` store them in)."""
    width = 8 // per_byte
    fields = (torch.arange(256, dtype=torch.int32).view(256, 1) >> (width * torch.arange(per_byte))) & (2**width - 1)
    return level_of_field(fields)


#: 1-bit SGD's levels ``1 - 2 bit`` and TernGrad's (code 1 -> +1, 2 -> -1, 0 and 3 -> 0), by byte.
_SIGN_LEVELS = _byte_levels(8, lambda b: 1.0 - 2.0 * b.to(torch.float32))
_TERNARY_LEVELS = _byte_levels(4, lambda c: (c == 1).to(torch.float32) - (c == 2).to(torch.float32))


def _decode_sum(packed: Tensor, scales: Tensor, numel: int, per_byte: int, what: str, levels: Tensor) -> Tensor:
    # ``level * scale`` of every field of every rank, summed over ranks (dim 0). Each byte
    # picks its row of a table of its fields' levels already multiplied by its rank's scale
    # (the same fp32 products), one gather for all ranks: unpacking the fields and
    # converting them one operation at a time cost ten times as much.
    nranks, nbytes = packed.shape[0], packed.shape[1]
    if nbytes * per_byte < numel:
        raise ValueError(f"rows of {nbytes} bytes hold {nbytes * per_byte} {what}, {numel} asked for")
    if nranks == 0:
        return torch.zeros(numel, dtype=torch.float32, device=packed.device)
    table = (levels.to(packed.device).view(1, 256, per_byte) * scales.to(torch.float32).view(nranks, 1, 1))
    rows = packed.to(torch.int64) + 256 * torch.arange(nranks, device=packed.device).view(nranks, 1)
    fields = table.view(nranks * 256, per_byte).index_select(0, rows.reshape(-1)).view(nranks, -1)
    return fields[:, :numel].contiguous().sum(dim=0)


def sign_decode_sum(bits: Tensor, scales: Tensor, numel: int) -> Tensor:
    """All rows at once by byte tables, ``(1 - 2 bit) * scale`` summed over ranks (dim 0)."""
    return _decode_sum(bits, scales, numel, 8, "bits", _SIGN_LEVELS)


def ternary_decode_sum(packed: Tensor, scales: Tensor, numel: int) -> Tensor:
    """All rows at once by byte tables, ``level * scale`` summed over ranks (dim 0)."""
    return _decode_sum(packed, scales, numel, 4, "codes", _TERNARY_LEVELS)
