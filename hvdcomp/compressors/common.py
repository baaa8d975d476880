"""Helpers the compressor modules share: seed mixing, device-side payload sizes, shared
random index draws, argument checks, and the sparse ``int32 indices | values`` payload that
top-k and DGC both send.
"""
from __future__ import annotations

import math
import numbers

import torch

from .. import kernels, wire
from ..compressor import State, TensorInfo, staged

Tensor = torch.Tensor

_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    # Steele et al.'s SplitMix64 finaliser: a bijection on 64-bit ints with full avalanche,
    # so nearby inputs (step t and t+1, rank 0 and 1) give unrelated seeds.
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def derive_seed(*parts: int) -> int:
    """Deterministic 62-bit seed from host integers (e.g. ``(seed, step, rank, index)``).

    Each part is folded in with SplitMix64, so the result depends on every part and on their
    order. Returns an int in ``[0, 2**62)`` (the kernels accept seeds below ``2**63``).
    """
    h = 0
    for p in parts:
        h = _splitmix64(h ^ (int(p) & _MASK64))
    return h >> 2


def flat_grad(grad: Tensor, info: TensorInfo) -> Tensor:
    """``grad`` as a flat 1-D view/copy (any dtype kept), checked against ``info``."""
    if grad.numel() != info.numel:
        raise ValueError(f"gradient of {info.name!r} has {grad.numel()} elements, expected {info.numel} "
                         f"(shape {tuple(info.shape)})")
    return grad.reshape(-1)


def accumulate_residual(state: State, grad: Tensor) -> Tensor:
    """``x = r + g`` (fp32 [n]) written as this step's ``state["residual"]``, a staged key
    (:func:`~hvdcomp.compressor.staged`): the previous residual is only read. The
    compressor then edits x in place into the new residual (``r = x - sent``)."""
    before, after = staged(state, "residual")
    return kernels.ef_accumulate_(before, grad, out=after)


def const_nbytes(n: int, device) -> Tensor:
    """int64 [1] on ``device`` holding the host int ``n`` (a fill, not a host sync)."""
    return torch.full((1,), int(n), dtype=torch.int64, device=device)


def shared_random_indices(numel: int, k: int, seed: int, device) -> Tensor:
    """k distinct indices in ``[0, numel)`` drawn from Philox with ``seed``: identical on every
    rank and device (CPU and CUDA draw the same bits, see ``kernels.philox_uniform``).

    Jittered systematic sampling: ``[0, numel)`` is cut into k strata of ``numel // k`` or
    ``numel // k + 1`` consecutive elements, one uniform index is drawn in each, and the whole
    set is rotated by a uniform random offset. Every element is then kept with probability
    exactly ``k / numel`` (up to the ``numel / 2**48`` bias of the offset), the k indices are
    distinct, and it costs O(k) work with no host synchronisation (a random permutation of
    all ``numel`` positions would cost O(numel) per tensor per step).

    Returns int64 [k] (not sorted).
    """
    if not 0 <= k <= numel:
        raise ValueError(f"k must be in [0, {numel}], got {k}")
    if k == 0:
        return torch.zeros(0, dtype=torch.int64, device=device)
    u = kernels.philox_uniform(seed, torch.arange(k + 2, device=device)).to(torch.float64)
    # 48 random bits for the rotation (one fp32 uniform has only 24 significant bits).
    hi = torch.floor(u[0] * 2.0**24).to(torch.int64)
    lo = torch.floor(u[1] * 2.0**24).to(torch.int64)
    offset = (hi * 2**24 + lo) % numel
    j = torch.arange(k, device=device, dtype=torch.int64)
    start = j * numel // k
    length = (j + 1) * numel // k - start  # >= 1 because k <= numel
    pick = start + torch.minimum(torch.floor(u[2:] * length).to(torch.int64), length - 1)
    return (pick + offset) % numel


def k_for(ratio: float, numel: int) -> int:
    """Elements sent for ``numel`` elements at ``ratio``: ``max(1, ceil(ratio * numel))``
    (at most ``numel``; 0 for an empty tensor)."""
    if numel <= 0:
        return 0
    return min(numel, max(1, math.ceil(ratio * numel)))


def check_ratio(owner: str, ratio: float, name: str = "ratio") -> float:
    """Validate a fraction in (0, 1] (ValueError naming the parameter and the range; strings
    and bools are refused, not converted)."""
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
        raise ValueError(f"{owner} {name} must be a number in (0, 1], got {ratio!r}")
    value = float(ratio)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{owner} {name} must be in (0, 1], got {ratio!r}")
    return value


def check_seed(owner: str, seed: int) -> int:
    """Validate an RNG seed: a non-negative integer."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"{owner} seed must be a non-negative integer, got {seed!r}")
    return seed


def exact_views(payload: Tensor, fields) -> list:
    """``wire.views`` for a payload that must be exactly as long as ``fields`` (a longer
    one means a sender with different settings: fail instead of decoding garbage)."""
    expected = wire.nbytes(fields)
    if payload.numel() != expected:
        raise ValueError(f"corrupt payload: {payload.numel()} bytes, the layout needs exactly {expected}")
    return wire.views(payload, fields)


def sparse_fields(count: int, value_dtype: torch.dtype = torch.float32) -> list:
    """Wire layout ``indices int32 [count] | values value_dtype [count]`` (no padding: the
    values start at ``4 * count``, a multiple of every value itemsize up to 4)."""
    return [(torch.int32, count), (value_dtype, count)]


def sparse_count(payload_nbytes: int, value_dtype: torch.dtype = torch.float32) -> int:
    """Elements in an ``indices | values`` payload of exactly ``payload_nbytes`` bytes."""
    per = 4 + wire.itemsize(value_dtype)
    if payload_nbytes % per:
        raise ValueError(f"corrupt payload: {payload_nbytes} bytes is not a multiple of {per} "
                         "(int32 index + value per element)")
    return payload_nbytes // per


def sparse_decode_sum(payloads: list, info: TensorInfo, value_dtype: torch.dtype = torch.float32) -> Tensor:
    """Dense fp32 sum (of ``info.shape``) of N ``indices int32 | values`` payloads: one
    ``kernels.scatter_add_`` over all ranks' concatenated indices and values."""
    out = torch.zeros(info.numel, dtype=torch.float32, device=payloads[0].device if payloads else info.device)
    idx_parts, val_parts = [], []
    for p in payloads:
        m = sparse_count(p.numel(), value_dtype)
        idx, vals = wire.views(p, sparse_fields(m, value_dtype))
        idx_parts.append(idx)
        val_parts.append(vals)
    if idx_parts:
        kernels.scatter_add_(out, torch.cat(idx_parts), torch.cat(val_parts))
    return out.view(info.shape)
