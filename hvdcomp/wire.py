"""Byte layout of packed payloads.

A payload is a uint8 tensor holding several typed fields back to back (e.g. AdaComp:
``scale fp32 [1] | bin_counts uint8 [nbins] | codes uint8 [m]``). Each field starts at a
multiple of its item size, so typed views need no copy; the transport starts every
payload at a multiple of :data:`ALIGN` bytes. Field lengths are host integers: the
writer knows them after the bucket's one size read, the reader derives them from the
payload's exact byte length, which the transport exchanges with the payload.
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import kernels

Tensor = torch.Tensor
ALIGN = 8
Field = tuple[torch.dtype, int]  # (dtype, number of elements)


def itemsize(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``."""
    return torch.empty((), dtype=dtype).element_size()


def layout(fields: Sequence[Field]) -> tuple[list[int], int]:
    """Byte offset of each field and the payload's exact length (no trailing padding)."""
    offsets, pos = [], 0
    for dtype, count in fields:
        if count < 0:
            raise ValueError(f"negative field length {count}")
        size = itemsize(dtype)
        pos = (pos + size - 1) // size * size
        offsets.append(pos)
        pos += size * count
    return offsets, pos


def nbytes(fields: Sequence[Field]) -> int:
    """Exact length in bytes of a payload with these fields."""
    return layout(fields)[1]


def padded(n: int) -> int:
    """``n`` rounded up to :data:`ALIGN` (where the next payload may start)."""
    return (n + ALIGN - 1) // ALIGN * ALIGN


def views(buffer: Tensor, fields: Sequence[Field]) -> list[Tensor]:
    """Typed views into a uint8 ``buffer`` laid out as ``fields`` (no copy).

    buffer: uint8 [>= nbytes(fields)] whose start is aligned to :data:`ALIGN`.
    """
    offsets, total = layout(fields)
    if buffer.dtype != torch.uint8 or buffer.dim() != 1:
        raise TypeError(f"payload must be a 1-D uint8 tensor, got {buffer.dtype} {tuple(buffer.shape)}")
    if buffer.numel() < total:
        raise ValueError(f"payload has {buffer.numel()} bytes, layout needs {total}")
    out = []
    for (dtype, count), off in zip(fields, offsets):
        size = itemsize(dtype)
        out.append(buffer[off : off + size * count].view(dtype))
    return out


def trailing_count(payload_nbytes: int, header: Sequence[Field], dtype: torch.dtype) -> int:
    """Number of ``dtype`` elements in the variable-length field that ends a payload.

    Used by readers: a payload is ``header`` fields then one field of unknown length;
    given the exact payload length, return that length (raises if it does not divide).
    """
    start = layout(list(header) + [(dtype, 0)])[0][-1]
    rest = payload_nbytes - start
    size = itemsize(dtype)
    if rest < 0 or rest % size:
        raise ValueError(f"corrupt payload: {payload_nbytes} bytes do not fit header + {dtype} field")
    return rest // size


def concat_offsets(sizes: Sequence[int]) -> tuple[list[int], int]:
    """Where each payload starts when several are packed into one buffer (each at an
    :data:`ALIGN` boundary), and the buffer's length. The length is at least one ALIGN so
    that no rank ever contributes an empty tensor to a collective."""
    offsets, pos = [], 0
    for n in sizes:
        offsets.append(pos)
        pos += padded(n)
    return offsets, max(pos, ALIGN)


def pack_uint(values: Tensor, bits: int) -> Tensor:
    """Pack non-negative integers < 2**bits, ``bits`` each, little-endian bit order.

    values: int [m]. Returns uint8 [ceil(m * bits / 8)]. Element i occupies stream bits
    ``[i*bits, (i+1)*bits)``; stream bit j is bit ``j % 8`` of byte ``j // 8``.
    """
    shifts = torch.arange(bits, device=values.device)
    stream = ((values.to(torch.int64).view(-1, 1) >> shifts) & 1).reshape(-1)
    return kernels.pack_bits(stream.to(torch.uint8))


def unpack_uint(packed: Tensor, numel: int, bits: int) -> Tensor:
    """Inverse of :func:`pack_uint`: int64 [numel]."""
    stream = kernels.unpack_bits(packed, numel * bits).to(torch.int64).view(numel, bits)
    weights = (1 << torch.arange(bits, device=packed.device)).to(torch.int64)
    return (stream * weights).sum(dim=1)
