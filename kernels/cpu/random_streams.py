"""The random streams of the CPU backend.

* Philox-4x32-10 (Salmon et al., "Parallel Random Numbers: As Easy as 1, 2, 3", SC 2011) in
  int64 torch arithmetic, bit-identical to Triton's ``tl.rand`` / ``tl.rand4x``, so that the
  CPU backend and the kernels draw the same numbers: :func:`philox_uniform`,
  :func:`philox_uniform4`, :func:`element_uniforms`. About a hundred passes over the output;
  the CPU paths that do not need the kernels' stream take one of the cheaper ones below.
* torch's generator of a device (:func:`fast_uniforms`).
* NumPy's PCG64, as bytes or floats (:func:`pcg64_uniforms`, :func:`pcg64_bytes`,
  :func:`pcg64_more_uniforms`): TernGrad's CPU stream.
"""
from __future__ import annotations

import numpy as np
import torch

Tensor = torch.Tensor

# Philox-4x32-10 constants, as used by Triton's ``tl.rand`` (so both paths draw the same bits).
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_U32 = 0xFFFFFFFF


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
    """``tl.rand(seed, offsets)``: fp32 [n], the first Philox word of each offset (int64 [n])."""
    return _uniform(_philox_words(seed, offsets)[0])


def philox_uniform4(seed: int, counters: Tensor) -> Tensor:
    """``tl.rand4x(seed, counters)``: all four words of each counter (int64 [m]), fp32 [m, 4]."""
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
    ``seed``: fp32 [numel]."""
    gen = torch.Generator(device=device).manual_seed(int(seed))
    return torch.rand(numel, generator=gen, device=device, dtype=torch.float32)


def pcg64_uniforms(seed: int, numel: int) -> Tensor:
    """``numpy.random.Generator(PCG64(seed)).random(numel, float32)`` as a CPU tensor."""
    return torch.from_numpy(np.random.Generator(np.random.PCG64(int(seed))).random(numel, dtype=np.float32))


def pcg64_bytes(seed: int, numel: int) -> tuple[Tensor, np.random.PCG64]:
    """One random byte per element: the little-endian bytes of
    ``PCG64(seed).random_raw(ceil(numel / 8))``, uint8 [numel] (a CPU tensor), and the bit
    generator, which continues the stream (:func:`pcg64_more_uniforms`)."""
    bits = np.random.PCG64(int(seed))
    return torch.from_numpy(bits.random_raw((numel + 7) // 8).view(np.uint8)[:numel]), bits


def pcg64_more_uniforms(bits: np.random.PCG64, count: int) -> Tensor:
    """The next ``count`` fp32 uniforms of the stream of ``bits``:
    ``numpy.random.Generator(bits).random(count, float32)`` as a CPU tensor."""
    return torch.from_numpy(np.random.Generator(bits).random(count, dtype=np.float32))
