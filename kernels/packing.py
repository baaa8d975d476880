"""Bit packing of 2-bit codes (four per byte) and 0/1 flags (eight per byte).

Same signatures, layouts and semantics as :mod:`hvdcomp.kernels` (little-endian
within the byte: element i sits at bit ``w*(i % (8/w))`` of byte ``i // (8/w)``). Inputs may
be strided 1-D views; outputs are contiguous.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import BLOCK, NUM_WARPS, check_1d, grid_1d


@triton.jit
def _pack_kernel(src_ptr, src_stride, out_ptr, n, n_out, WIDTH: tl.constexpr, BLOCK: tl.constexpr):
    PER_BYTE: tl.constexpr = 8 // WIDTH
    byte = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for k in tl.static_range(PER_BYTE):
        i = byte * PER_BYTE + k
        # & 0xFF: a wider integer input wraps as the CPU backend's copy into uint8 does.
        v = tl.load(src_ptr + i * src_stride, mask=i < n, other=0).to(tl.int32) & 0xFF
        if WIDTH == 2:
            # OR: exact for codes 0..3, the contract (on larger values, outside it, the
            # backends differ: the CPU backend's word multiply adds them).
            acc = acc | (v << (2 * k))
        else:
            # +, as the CPU backend's weighted sum does (only differs from | on values > 1).
            acc = acc + (v << k)
    tl.store(out_ptr + byte, (acc & 0xFF).to(tl.uint8), mask=byte < n_out)


@triton.jit
def _unpack_kernel(src_ptr, src_stride, out_ptr, numel, WIDTH: tl.constexpr, BLOCK: tl.constexpr):
    PER_BYTE: tl.constexpr = 8 // WIDTH
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < numel
    b = tl.load(src_ptr + (i // PER_BYTE) * src_stride, mask=mask, other=0).to(tl.int32) & 0xFF
    shift = ((i % PER_BYTE) * WIDTH).to(tl.int32)
    tl.store(out_ptr + i, ((b >> shift) & ((1 << WIDTH) - 1)).to(tl.uint8), mask=mask)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    # bool has no arithmetic in Triton's loads; its bytes are 0/1, so a uint8 view is exact.
    return t.view(torch.uint8) if t.dtype == torch.bool else t


def _pack(src: torch.Tensor, width: int) -> torch.Tensor:
    check_1d(src)
    if src.dtype.is_floating_point or src.dtype.is_complex:
        raise TypeError(f"packing takes integer or bool codes, got {src.dtype}")
    n = src.numel()
    per_byte = 8 // width
    n_out = (n + per_byte - 1) // per_byte
    out = torch.empty(n_out, dtype=torch.uint8, device=src.device)
    if n == 0:
        return out
    s = _as_bytes(src)
    _pack_kernel[grid_1d(n_out)](s, s.stride(0), out, n, n_out, WIDTH=width, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out


def _unpack(packed: torch.Tensor, numel: int, width: int) -> torch.Tensor:
    check_1d(packed)
    per_byte = 8 // width
    if packed.numel() * per_byte < numel:
        raise ValueError(
            f"{packed.numel()} bytes hold {packed.numel() * per_byte} {width}-bit values, not {numel}"
        )
    out = torch.empty(numel, dtype=torch.uint8, device=packed.device)
    if numel == 0:
        return out
    p = _as_bytes(packed)
    _unpack_kernel[grid_1d(numel)](p, p.stride(0), out, numel, WIDTH=width, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out


def pack_2bit(codes: torch.Tensor) -> torch.Tensor:
    """Pack 2-bit codes four per byte: code i at bits ``2*(i%4)`` of byte ``i//4``.

    codes: uint8 [n] (any stride) with values 0..3. Returns uint8 [ceil(n/4)], pad codes 0.
    Contract: :func:`hvdcomp.kernels.pack_2bit` (TernGrad's 2-bit wire format).
    """
    return _pack(codes, 2)


def unpack_2bit(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_2bit`: uint8 [>= ceil(numel/4)] -> uint8 [numel] in 0..3.

    Raises ValueError when ``packed`` is too short for ``numel`` codes. Contract:
    :func:`hvdcomp.kernels.unpack_2bit`.
    """
    return _unpack(packed, numel, 2)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack 0/1 values eight per byte: bit i at bit ``i%8`` of byte ``i//8``.

    bits: uint8/bool [n] (any stride). Returns uint8 [ceil(n/8)]. Contract:
    :func:`hvdcomp.kernels.pack_bits` (1-bit SGD, Seide et al. 2014).
    """
    return _pack(bits, 1)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 [>= ceil(numel/8)] -> uint8 [numel] of 0/1.

    Raises ValueError when ``packed`` is too short for ``numel`` bits. Contract:
    :func:`hvdcomp.kernels.unpack_bits`.
    """
    return _unpack(packed, numel, 1)
