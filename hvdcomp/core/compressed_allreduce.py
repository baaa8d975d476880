"""Compressed allreduce: reduce-scatter of packed chunks by alltoall, local sum,
re-encode, allgather.

For compressors whose decoded payloads can be summed and the sum re-encoded compactly
(TernGrad's shared-scale levels, bf16), this keeps the bytes each rank sends and receives
nearly constant as ranks are added, where an allgather of payloads grows with N:

    allgather:            received = (N-1) * S
    compressed allreduce: received = (N-1)/N * S  +  (N-1)/N * S'

with ``S`` the payload and ``S'`` the re-encoded sum (bf16: ``S' = S``; TernGrad: ``2N+1``
levels need ``ceil(log2(2N+1))`` bits per element instead of 2).

A compressor takes part by mixing in :class:`~hvdcomp.compressor.ChunkCodec` (a declared
capability). Every size here is a host integer computed from the tensor sizes alone, so no
size exchange is needed.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch


Tensor = torch.Tensor

#: Chunk boundaries fall on multiples of this many elements, so that every chunk starts on a
#: byte boundary for any bit width (8 elements x b bits = b bytes).
CHUNK_GRANULE = 8


def chunk_bounds(numel: int, nranks: int) -> list[tuple[int, int]]:
    """Element range ``[lo, hi)`` of each rank's chunk: nearly equal, granule-aligned."""
    granules = math.ceil(numel / CHUNK_GRANULE)
    bounds = []
    for c in range(nranks):
        lo = min(numel, granules * c // nranks * CHUNK_GRANULE)
        hi = min(numel, granules * (c + 1) // nranks * CHUNK_GRANULE)
        bounds.append((lo, hi))
    return bounds


def byte_range(lo: int, hi: int, bits: int) -> tuple[int, int]:
    """Bytes holding elements ``[lo, hi)`` of a ``bits``-per-element encoding (lo granule-aligned)."""
    return lo * bits // 8, math.ceil(hi * bits / 8)


class CompressedAllreduce:
    """The local steps of one bucket's compressed allreduce, between its two collectives.

    ``encode_and_split`` -> alltoall (chunk c of every tensor to rank c) -> ``reduce_chunks``
    (sum my chunk of every tensor over the N ranks and re-encode it) -> allgather of the
    re-encoded sums -> ``decode_gathered``. No method communicates: the step protocol in
    :mod:`hvdcomp.core.chains` issues the collectives through whichever transport runs it.

    codecs/states/infos: one entry per tensor of the bucket (ChunkCodec compressors).
    """

    def __init__(self, codecs: Sequence, states: Sequence[dict], infos: Sequence, rank: int, nranks: int):
        self.codecs, self.states, self.infos = list(codecs), list(states), list(infos)
        self.rank, self.nranks = rank, nranks
        self.plans = [(c.bits_per_element(), chunk_bounds(i.numel, nranks), c.sum_bits(nranks))
                      for c, i in zip(self.codecs, self.infos)]
        self.encoded: list[Tensor] = []

    def encode_and_split(self, grads: Sequence[Tensor], step: int) -> tuple[Tensor, list[int]]:
        """Encode every tensor; returns the alltoall input (uint8: rank 0's chunks of every
        tensor, then rank 1's, ...) and the bytes destined to each rank (host ints)."""
        device = grads[0].device
        self.encoded = [c.encode_chunked(g, s, i, step) for c, g, s, i in zip(self.codecs, grads, self.states, self.infos)]
        send_parts, splits = [], []
        for c in range(self.nranks):
            part = [enc[slice(*byte_range(*bounds[c], bits))] for enc, (bits, bounds, _) in zip(self.encoded, self.plans)]
            splits.append(sum(p.numel() for p in part))
            send_parts.extend(part)
        send = torch.cat(send_parts) if send_parts else torch.zeros(0, dtype=torch.uint8, device=device)
        return send, splits

    def chunk_nbytes(self) -> int:
        """Bytes this rank receives from each rank in the alltoall (its chunk of every tensor)."""
        return sum(hi - lo for lo, hi in (byte_range(*bounds[self.rank], bits) for bits, bounds, _ in self.plans))

    def sum_nbytes(self, rank: int) -> int:
        """Bytes of ``rank``'s re-encoded sums (what it contributes to the allgather)."""
        return sum(math.ceil((bounds[rank][1] - bounds[rank][0]) * sbits / 8) for _, bounds, sbits in self.plans)

    def reduce_chunks(self, received: Tensor) -> Tensor:
        """The alltoall output (uint8 [N * chunk_nbytes()], source rank major) -> this rank's
        chunk of every tensor summed over the N ranks and re-encoded (uint8 [sum_nbytes(rank)])."""
        rank, nranks = self.rank, self.nranks
        mine = [byte_range(*bounds[rank], bits) for bits, bounds, _ in self.plans]
        per_source = sum(hi - lo for lo, hi in mine)
        if received.numel() != per_source * nranks:
            raise RuntimeError(f"compressed allreduce: received {received.numel()} bytes, expected {per_source * nranks}")
        blocks = received.view(nranks, per_source)
        reencoded, pos = [], 0
        for codec, state, info, (lo, hi), (bits, bounds, sbits) in zip(self.codecs, self.states, self.infos, mine, self.plans):
            n_chunk = bounds[rank][1] - bounds[rank][0]
            total = codec.chunk_sum(blocks[:, pos:pos + hi - lo], n_chunk, state, info)
            reencoded.append(codec.encode_sum(total, nranks, state, info))
            pos += hi - lo
        return torch.cat(reencoded)

    def decode_gathered(self, gathered: Tensor) -> tuple[list[Tensor], list[dict]]:
        """The allgather output (every rank's re-encoded sums, rank order, unpadded) ->
        ``(sums, traffic)``: fp32 sums of each info's shape, and per tensor this rank's
        ``{"payload_bytes", "sent_bytes", "received_bytes"}``."""
        nranks = self.nranks
        device = gathered.device
        sums = [torch.zeros(info.numel, dtype=torch.float32, device=device) for info in self.infos]
        pos = 0
        for c in range(nranks):
            for codec, state, info, out, (bits, bounds, sbits) in zip(self.codecs, self.states, self.infos, sums, self.plans):
                lo, hi = bounds[c]
                nbytes = math.ceil((hi - lo) * sbits / 8)
                out[lo:hi] = codec.decode_sum_chunk(gathered[pos:pos + nbytes], hi - lo, nranks, state, info)
                pos += nbytes
        if pos != gathered.numel():
            raise RuntimeError(f"compressed allreduce: gathered {gathered.numel()} bytes, expected {pos}")
        return [s.view(info.shape) for s, info in zip(sums, self.infos)], self._traffic()

    def _traffic(self) -> list[dict]:
        out = []
        others = [c for c in range(self.nranks) if c != self.rank]
        for enc, (bits, bounds, sbits) in zip(self.encoded, self.plans):
            chunk = [b - a for a, b in (byte_range(lo, hi, bits) for lo, hi in bounds)]
            summed = [math.ceil((hi - lo) * sbits / 8) for lo, hi in bounds]
            out.append({
                "payload_bytes": enc.numel(),
                "sent_bytes": float(sum(chunk[c] for c in others) + (self.nranks - 1) * summed[self.rank]),
                "received_bytes": float((self.nranks - 1) * chunk[self.rank] + sum(summed[c] for c in others)),
            })
        return out


def allgather_received_bytes(payload_bytes: int, nranks: int) -> float:
    """Bytes a rank receives when every rank allgathers a payload of ``payload_bytes``."""
    return float((nranks - 1) * payload_bytes)


def compressed_allreduce_received_bytes(numel: int, bits: int, sum_bits: int, nranks: int) -> float:
    """Bytes a rank receives by compressed allreduce (equal chunks, ignoring granule rounding)."""
    return (nranks - 1) / nranks * numel * (bits + sum_bits) / 8
