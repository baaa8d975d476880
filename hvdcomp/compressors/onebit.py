"""1-bit SGD with error feedback (Seide et al. 2014), one scale per tensor.

Per tensor and step: ``x = r + g``; send ``sign(x)`` as one bit per element and the scale
``s = mean|x|`` (so ``s * sign(x)`` keeps x's L1 norm, as in EF-SignSGD); the residual
keeps the quantization error, ``r = x - s * sign(x)`` (with ``sign(0) = +1``, the bit
convention of ``kernels.sign_pack``).
"""
from __future__ import annotations

import torch

from .. import kernels, wire
from ..compressor import Compressor, Encoded, ErrorFeedback, State, TensorInfo
from .common import accumulate_residual, const_nbytes, exact_views, flat_grad

Tensor = torch.Tensor


def _fields(numel: int) -> list:
    return [(torch.float32, 1), (torch.uint8, (numel + 7) // 8)]


class OneBitCompressor(ErrorFeedback, Compressor):
    """1-bit quantization with error feedback.

    Wire (allgather): ``scale fp32 [1] | bits uint8 [ceil(n/8)]`` (bit i of the tensor at
    bit ``i % 8`` of byte ``i // 8``, 1 for negative): ``4 + ceil(n/8)`` bytes against 4n
    dense, ratio ``4n / (4 + ceil(n/8))`` (about 32x). The N payloads are decoded together by
    ``kernels.sign_decode_sum`` (``sum_r s_r * (1 - 2 * bit_r)``).

    State: ``{"residual": fp32 [n]}``, staged (written whole each step). Gradients fp32/fp16/bf16 of any shape.
    """

    name = "onebit"
    transport = "allgather"
    staged_state = ("residual",)

    def config(self) -> dict:
        """Settings that must match on every rank (there are none besides the name)."""
        return {"name": self.name}

    def init_state(self, info: TensorInfo) -> State:
        """``{"residual": fp32 [n] zeros}`` on ``info.device``."""
        return {"residual": torch.zeros(info.numel, dtype=torch.float32, device=info.device)}

    def encode(self, grad: Tensor, state: State, info: TensorInfo, step: int) -> Encoded:
        """x = r + g, its signs and scale; the size is fixed (4 + ceil(n/8) bytes)."""
        g = flat_grad(grad, info)
        x = accumulate_residual(state, g)
        bits, scale = kernels.sign_pack(x)
        fields = _fields(info.numel)

        def pack(out: Tensor) -> None:
            out_scale, out_bits = wire.views(out, fields)
            out_scale.copy_(scale)
            out_bits.copy_(bits)
            # r = x - s*sign(x), with sign = -1 exactly where the sent bit is 1 (x < 0).
            kernels.sign_residual_(x, scale)

        return Encoded(nbytes=const_nbytes(wire.nbytes(fields), x.device), pack=pack)

    def decode_sum(self, payloads: list, state: State, info: TensorInfo) -> Tensor:
        """Sum of the N ranks' payloads as fp32 of ``info.shape`` (one kernel launch)."""
        n = info.numel
        fields = _fields(n)
        if not payloads:
            return torch.zeros(info.shape, dtype=torch.float32, device=info.device)
        scales, bits = zip(*(exact_views(p, fields) for p in payloads))
        total = kernels.sign_decode_sum(torch.stack(bits), torch.cat(scales), n)
        return total.view(info.shape)
