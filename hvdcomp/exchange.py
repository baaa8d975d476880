"""The packed-payload steps every front end shares (Horovod optimizer, DDP hook, benches).

One bucket of tensors travels as one uint8 buffer: :func:`encode_packed` encodes every
tensor, reads all payload sizes to the host at once (the bucket's single device-to-host
copy), and packs the payloads at :data:`hvdcomp.wire.ALIGN` boundaries. After the
collective, :func:`split_packed` cuts the gathered buffer back into each rank's payloads
and :func:`decode_packed` sums them per tensor (one decode launch per tensor for all N).
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import wire

Tensor = torch.Tensor


def encode_packed(compressors: Sequence, grads: Sequence[Tensor], states: Sequence[dict], infos: Sequence,
                  step: int) -> tuple[Tensor, list[int]]:
    """Encode and pack a bucket: returns ``(buffer uint8 [total], exact payload sizes)``."""
    encoded = [c.encode(g, s, i, step) for c, g, s, i in zip(compressors, grads, states, infos)]
    sizes = torch.cat([e.nbytes.reshape(1) for e in encoded]).to("cpu", torch.int64).tolist()
    offsets, total = wire.concat_offsets(sizes)
    buffer = torch.zeros(total, dtype=torch.uint8, device=grads[0].device)
    for e, off, n in zip(encoded, offsets, sizes):
        e.pack(buffer[off:off + n])
    return buffer, sizes


def split_packed(gathered: Tensor, sizes_per_rank: Sequence[Sequence[int]],
                 rank_lengths: Sequence[int] | None = None) -> list[list[Tensor]]:
    """Views of every rank's payloads: ``[rank][tensor]``.

    gathered: the ranks' buffers back to back. sizes_per_rank: each rank's exact payload
    sizes. rank_lengths: each rank's buffer length in ``gathered`` when the collective
    padded them (torch's all_gather needs equal lengths); default: what
    :func:`hvdcomp.wire.concat_offsets` gives, as an allgather of variable sizes delivers.
    """
    start, out = 0, []
    for r, sizes in enumerate(sizes_per_rank):
        offsets, total = wire.concat_offsets(sizes)
        out.append([gathered[start + o:start + o + n] for o, n in zip(offsets, sizes)])
        start += total if rank_lengths is None else rank_lengths[r]
    if start != gathered.numel():
        raise RuntimeError(f"hvdcomp: gathered {gathered.numel()} bytes, the ranks' sizes announce {start}")
    return out


def decode_packed(compressors: Sequence, per_rank: Sequence[Sequence[Tensor]], states: Sequence[dict],
                  infos: Sequence) -> list[Tensor]:
    """Dense fp32 sum over the ranks of each tensor's payloads (``per_rank[r][j]``)."""
    return [c.decode_sum([payloads[j] for payloads in per_rank], s, i)
            for j, (c, s, i) in enumerate(zip(compressors, states, infos))]
