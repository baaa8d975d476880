"""TernGrad's documented CPU stream (``rng="auto"`` on a CPU), written out independently of
:func:`hvdcomp.kernels.reference.terngrad_ternarize_fast_rng`: NumPy only, no torch op of
the implementation, so that a test comparing the two checks the docstring's definition."""
from __future__ import annotations

import math

import numpy as np
import torch


def documented_codes(g: torch.Tensor, scale: float, clip: float, seed: int) -> torch.Tensor:
    """Codes (uint8 [n], 0 / 1 = +s / 2 = -s) of the documented stream for fp32 ``g`` [n].

    Below 32768 elements, one fp32 uniform ``u`` per element: kept iff ``u * scale <
    min(|g|, clip)``. From 32768 on: ``Q = clamp(g * fp32(128 / scale), +-fp32(clip * 128 / scale))``; ``V`` = low 7 bits of
    the bytes of ``PCG64(seed).random_raw(ceil(n / 8))``; kept where ``V < floor|Q|``, or
    where ``V == floor|Q|`` (capped at 127) and the next fp32 uniform of the same generator
    (in index order) is below ``|Q| - V``; code ``1 + [Q < 0]`` where kept.
    """
    x = g.detach().reshape(-1).to(torch.float32).numpy()
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
    codes = np.where(keep, np.where(q < 0, 2, 1), 0).astype(np.uint8)
    return torch.from_numpy(codes)
