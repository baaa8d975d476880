"""Horovod's own compressors (``hvd.Compression.none``, ``hvd.Compression.fp16``, or any
object with Horovod's ``compress``/``decompress`` pair) as hvdcomp compressors.

A user moving from ``hvd.DistributedOptimizer`` passes ``compression=hvd.Compression.fp16``
(the class itself, whose methods are static). Horovod's optimizer calls
``tensor_c, ctx = compression.compress(grad)`` before its allreduce and
``compression.decompress(reduced, ctx)`` after it (horovod/torch/optimizer.py:195, 279,
299), so every such compressor's payload is a dense tensor that the allreduce combines:
transport ``"allreduce"``, ``linear`` (Horovod applies ``op=Average`` to the payload).
:class:`HorovodCompressor` makes exactly those two calls.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from ..compressor import Compressor, State, TensorInfo

Tensor = torch.Tensor


@runtime_checkable
class HorovodStyleCompressor(Protocol):
    """Horovod's compressor interface (``horovod.torch.compression.Compressor``): a class
    with static methods, or an instance."""

    def compress(self, tensor: Tensor) -> tuple[Tensor, Any]: ...

    def decompress(self, tensor: Tensor, ctx: Any) -> Tensor: ...


class HorovodCompressor(Compressor):
    """Wraps a Horovod-style compressor ``inner`` (class or instance).

    encode_dense: ``inner.compress(grad)`` -> (payload, ctx), the payload of any shape and
    dtype ``inner`` chooses (fp16 for ``hvd.Compression.fp16`` on floating-point gradients,
    the gradient itself for ``none``). decode_dense: ``inner.decompress(summed, ctx)`` as
    fp32 of ``info.shape``. Stateless. ``config()`` names ``inner``'s class, so ranks
    using different Horovod compressors are told apart.
    """

    name = "horovod"
    transport = "allreduce"
    horovod_contract = "stateless"
    linear = True

    def __init__(self, inner: HorovodStyleCompressor):
        if isinstance(inner, Compressor):
            raise ValueError(f"{inner!r} is already an hvdcomp compressor: pass it as it is")
        if isinstance(inner, type) and issubclass(inner, Compressor):
            raise ValueError(f"{inner.__name__} is an hvdcomp compressor class: pass an instance, "
                             "e.g. hvdcomp.Compression.fp16()")
        if not isinstance(inner, HorovodStyleCompressor):
            raise ValueError("expected a Horovod compressor with compress(tensor) -> (tensor, ctx) and "
                             f"decompress(tensor, ctx), e.g. hvd.Compression.fp16; got {inner!r}")
        self.inner = inner

    @property
    def inner_name(self) -> str:
        """``module.QualName`` of the wrapped compressor's class."""
        cls = self.inner if isinstance(self.inner, type) else type(self.inner)
        return f"{cls.__module__}.{cls.__qualname__}"

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "compressor": self.inner_name}

    def encode_dense(self, grad: Tensor, state: State, info: TensorInfo, step: int) -> tuple[Tensor, Any]:
        return self.inner.compress(grad)

    def decode_dense(self, summed: Tensor, ctx: Any, state: State, info: TensorInfo) -> Tensor:
        return self.inner.decompress(summed, ctx).to(torch.float32).reshape(info.shape)

    # Horovod's contract: the wrapped compressor's own calls, unchanged.
    def compress(self, tensor: Tensor) -> tuple[Tensor, Any]:
        return self.inner.compress(tensor)

    def decompress(self, tensor: Tensor, ctx: Any) -> Tensor:
        return self.inner.decompress(tensor, ctx)


def as_hvdcomp_compressor(compression) -> Compressor:
    """``compression`` itself if it is an hvdcomp compressor, else a Horovod-style
    compressor wrapped in :class:`HorovodCompressor` (ValueError for anything else)."""
    if isinstance(compression, Compressor):
        return compression
    return HorovodCompressor(compression)
