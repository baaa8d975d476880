"""2-bit codes four per byte and bits eight per byte. A code is a byte of a little-endian word
(as on every platform torch ships for: x86-64, ARM64, CUDA memory), and one multiply by a
constant gathers a word's codes into its top byte: two contiguous word ops instead of strided
byte ops."""
from __future__ import annotations

import numpy as np
import torch

Tensor = torch.Tensor


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
    """Four codes are the bytes of one int32 word; one multiply gathers them (see
    ``_GATHER_2BIT``)."""
    return _top_bytes(_padded_bytes(codes, 4).view(torch.int32), np.uint32, _GATHER_2BIT)


def unpack_2bit(packed: Tensor, numel: int) -> Tensor:
    """Each byte shifted by 0, 2, 4, 6 and masked."""
    if packed.numel() * 4 < numel:
        raise ValueError(f"{packed.numel()} bytes hold {packed.numel() * 4} 2-bit codes, {numel} asked for")
    p = packed.to(torch.int32).view(-1, 1)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int32, device=packed.device)
    return ((p >> shifts) & 3).reshape(-1)[:numel].to(torch.uint8)


def pack_bits(bits: Tensor) -> Tensor:
    """bool: eight bits are the bytes of one int64 word; one multiply gathers them (see
    ``_GATHER_1BIT``). uint8: the weighted sum of each group of eight, which is what every
    implementation computes for values other than 0/1 too (the gather is exact for 0/1
    only)."""
    if bits.dtype != torch.bool:
        n = bits.numel()
        padded = torch.zeros((n + 7) // 8 * 8, dtype=torch.int32, device=bits.device)
        padded[:n] = bits.reshape(-1).to(torch.int32)
        weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.int32, device=bits.device)
        return (padded.view(-1, 8) * weights).sum(dim=1).to(torch.uint8)
    return _top_bytes(_padded_bytes(bits, 8).view(torch.int64), np.uint64, _GATHER_1BIT)


def unpack_bits(packed: Tensor, numel: int) -> Tensor:
    """Each byte shifted by 0..7 and masked."""
    if packed.numel() * 8 < numel:
        raise ValueError(f"{packed.numel()} bytes hold {packed.numel() * 8} bits, {numel} asked for")
    p = packed.to(torch.int32).view(-1, 1)
    shifts = torch.arange(8, dtype=torch.int32, device=packed.device)
    return ((p >> shifts) & 1).reshape(-1)[:numel].to(torch.uint8)
