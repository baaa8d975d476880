"""Dense casts: no compression, fp16 and bf16 (Kalamkar et al. 2019, round-to-nearest-even).

``none`` and ``fp16`` are plain Horovod compressors (the payload is summed by allreduce).
``bf16`` is special: Horovod 0.28.1 has no bfloat16 type, so its allreduce cannot carry bf16
bytes. Through :class:`hvdcomp.DistributedOptimizer` the bf16 bits travel for real (as
int16 through allgather, 2 bytes per element) and are summed in fp32 on arrival; through
Horovod's own ``hvd.DistributedOptimizer`` the values are rounded to bf16 and summed in
fp32 (same numerics, fp32 wire), with a one-time warning saying so.
"""
from __future__ import annotations

import warnings

import torch

from .. import kernels, wire
from ..compressor import ChunkCodec
from ..compressor import Compressor, Encoded, State, TensorInfo

Tensor = torch.Tensor


def _flat_fp32(t: Tensor) -> Tensor:
    return t.reshape(-1).to(torch.float32)


class NoneCompressor(Compressor):
    """No compression: the gradient is allreduced as it is. Wire: the gradient's dtype."""

    name = "none"
    transport = "allreduce"
    horovod_contract = "stateless"

    def encode_dense(self, grad: Tensor, state: State, info: TensorInfo, step: int):
        return grad, None

    def decode_dense(self, summed: Tensor, ctx, state: State, info: TensorInfo) -> Tensor:
        return summed.to(torch.float32)

    def compress(self, tensor: Tensor):
        return tensor, None

    def decompress(self, tensor: Tensor, ctx) -> Tensor:
        return tensor


class FP16Compressor(Compressor):
    """Cast to fp16 (round-to-nearest-even) for the allreduce, back to the gradient's dtype
    after it. Wire: 2 bytes per element (2x against fp32). Values beyond fp16's range
    (|x| > 65504) become inf, as with Horovod's ``hvd.Compression.fp16``."""

    name = "fp16"
    transport = "allreduce"
    horovod_contract = "stateless"

    def encode_dense(self, grad: Tensor, state: State, info: TensorInfo, step: int):
        if grad.dtype is torch.float16:
            return grad, None
        if not kernels.use_triton(grad):
            # The CPU path is torch's one cast, done on the tensor as it is (torch's
            # CPU copy of a flattened view is slower) by ``half()``, which parses fewer
            # arguments than ``to(torch.float16)``: per-call overhead is most of a small
            # tensor's cast.
            return grad.half(), None
        return kernels.cast_fp16(_flat_fp32(grad)).view(grad.shape), None

    def decode_dense(self, summed: Tensor, ctx, state: State, info: TensorInfo) -> Tensor:
        return kernels.cast_fp32(summed.reshape(-1)).view(info.shape)


class BF16Compressor(ChunkCodec, Compressor):
    """Round to bf16 (round-to-nearest-even, NaN/Inf kept) before the exchange.

    Wire (hvdcomp.DistributedOptimizer): the bf16 bits, 2 bytes per element, via allgather
    (each rank sums the N ranks' values in fp32) or, from 3 ranks on, by compressed
    allreduce (each rank sums one chunk of all ranks' bf16 values in fp32, rounds the sum to
    bf16 and allgathers it: within one bf16 rounding of the sum). Through
    ``hvd.DistributedOptimizer``: fp32 wire (Horovod has no bf16 allreduce), bf16 numerics.
    """

    name = "bf16"
    transport = "allgather"
    horovod_contract = "stateless"

    _warned_fp32_wire = False

    # -- hvdcomp's transports: real bf16 bytes ------------------------------------------
    def encode(self, grad: Tensor, state: State, info: TensorInfo, step: int) -> Encoded:
        numel = info.numel
        bits = kernels.cast_bf16(_flat_fp32(grad)) if grad.dtype != torch.bfloat16 else grad.reshape(-1)

        def pack(out: Tensor) -> None:
            (field,) = wire.views(out, [(torch.int16, numel)])
            field.copy_(bits.view(torch.int16))

        nbytes = torch.full((1,), wire.nbytes([(torch.int16, numel)]), dtype=torch.int64, device=grad.device)
        return Encoded(nbytes=nbytes, pack=pack)

    def decode_sum(self, payloads: list[Tensor], state: State, info: TensorInfo) -> Tensor:
        numel = info.numel
        stacked = torch.stack([wire.views(p, [(torch.int16, numel)])[0] for p in payloads])
        total = kernels.cast_fp32(stacked.view(torch.bfloat16).reshape(-1)).view(len(payloads), numel).sum(dim=0)
        return total.view(info.shape)

    # -- compressed allreduce (ChunkCodec) ----------------------------------------------
    def bits_per_element(self) -> int:
        return 16

    def sum_bits(self, nranks: int) -> int:
        return 16

    def encode_chunked(self, grad: Tensor, state: State, info: TensorInfo, step: int) -> Tensor:
        bits = kernels.cast_bf16(_flat_fp32(grad)) if grad.dtype != torch.bfloat16 else grad.reshape(-1)
        return bits.contiguous().view(torch.uint8)

    def chunk_sum(self, payloads: Tensor, numel: int, state: State, info: TensorInfo) -> Tensor:
        values = payloads.contiguous().view(torch.bfloat16)  # [N, numel]
        return kernels.cast_fp32(values.reshape(-1)).view(payloads.shape[0], numel).sum(dim=0)

    def encode_sum(self, total: Tensor, nranks: int, state: State, info: TensorInfo) -> Tensor:
        return kernels.cast_bf16(total).view(torch.uint8)

    def decode_sum_chunk(self, payload: Tensor, numel: int, nranks: int, state: State, info: TensorInfo) -> Tensor:
        return kernels.cast_fp32(payload.contiguous().view(torch.bfloat16))

    # -- Horovod's own optimizer: bf16 numerics over an fp32 allreduce ------------------
    def encode_dense(self, grad: Tensor, state: State, info: TensorInfo, step: int):
        rounded = kernels.cast_bf16(_flat_fp32(grad)) if grad.dtype != torch.bfloat16 else grad.reshape(-1)
        return kernels.cast_fp32(rounded).view(grad.shape), None

    def decode_dense(self, summed: Tensor, ctx, state: State, info: TensorInfo) -> Tensor:
        return summed.to(torch.float32)

    def compress(self, tensor: Tensor):
        if not BF16Compressor._warned_fp32_wire:
            BF16Compressor._warned_fp32_wire = True
            warnings.warn(
                "Horovod has no bfloat16 allreduce: under hvd.DistributedOptimizer, "
                "hvdcomp.Compression.bf16() rounds gradients to bf16 but sends fp32. Use "
                "hvdcomp.DistributedOptimizer to send 2 bytes per element.",
                stacklevel=2,
            )
        info = TensorInfo(name="", shape=tensor.shape, dtype=tensor.dtype, device=tensor.device)
        return self.encode_dense(tensor, {}, info, 0)[0], info

    def decompress(self, tensor: Tensor, ctx) -> Tensor:
        return tensor.to(ctx.dtype)
