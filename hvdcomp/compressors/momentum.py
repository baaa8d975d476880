"""Local momentum for the tensors that DGC does not compress.

Deep Gradient Compression (Lin, Han, Mao, Wang and Dally, "Deep Gradient Compression:
Reducing the Communication Bandwidth for Distributed Training", ICLR 2018) moves momentum
from the optimizer into the compressor: each rank k keeps ``u_k = m u_k + g_k`` (eq. 2) and
the optimizer runs without momentum. The tensors below ``min_compress_numel`` (biases,
norm weights) travel uncompressed through ``small_compression``; with the optimizer's
momentum gone they would get none. :class:`DenseMomentum` gives them the same momentum,
locally and before the exchange::

    u_k <- m u_k + g_k            (per rank, fp32)
    send u_k through the inner dense compressor (none / fp16), sum over ranks

Since the sum is linear, ``sum_k u_k`` is exactly the velocity that momentum SGD keeps on
the summed gradient (eq. 1 of the paper: ``u_t = m u_{t-1} + sum_k g_{k,t}``), so for an
exact inner compressor (``none``) the update equals SGD(momentum=m, dampening=0,
nesterov=False) up to floating-point summation order. :mod:`hvdcomp.recipes` installs it;
it is rarely built by hand.
"""
from __future__ import annotations

from typing import Any

import torch

from ..compressor import Compressor, IndexBroadcast, SharedScale, State, TensorInfo

Tensor = torch.Tensor


class DenseMomentum(Compressor):
    """``u = m u + g`` per rank, then the inner dense compressor sends ``u``.

    inner: an allreduce compressor without index broadcast or shared scale (``none``,
        ``fp16``): the payload of ``u``. momentum: m in [0, 1).

    State: ``{"momentum_u": fp32 [n]}`` (checkpointed) plus the inner compressor's state.
    Gradients of any float dtype and shape; ``decode_dense`` returns fp32 of the shape.
    """

    transport = "allreduce"

    def __init__(self, inner: Compressor, momentum: float):
        if not isinstance(inner, Compressor) or inner.transport != "allreduce" or isinstance(
                inner, (IndexBroadcast, SharedScale, DenseMomentum)):
            raise ValueError("DenseMomentum needs a dense allreduce compressor to send the velocity "
                             f"(e.g. hvdcomp.Compression.none() or fp16()), got {inner!r}")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
            raise ValueError(f"DenseMomentum momentum must be in [0, 1), got {momentum!r}")
        self.inner = inner
        self.momentum = float(momentum)
        self.name = f"momentum+{inner.name}"
        self.linear = inner.linear

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "momentum": self.momentum, "inner": self.inner.config()}

    def init_state(self, info: TensorInfo) -> State:
        state = self.inner.init_state(info)
        state["momentum_u"] = torch.zeros(info.numel, dtype=torch.float32, device=info.device)
        return state

    def encode_dense(self, grad: Tensor, state: State, info: TensorInfo, step: int) -> tuple[Tensor, Any]:
        u = state["momentum_u"]
        u.mul_(self.momentum).add_(grad.reshape(-1).to(torch.float32))
        # A copy: the dense chain may divide its payload in place before the sum.
        return self.inner.encode_dense(u.clone().view(info.shape), state, info, step)

    def decode_dense(self, summed: Tensor, ctx: Any, state: State, info: TensorInfo) -> Tensor:
        return self.inner.decode_dense(summed, ctx, state, info)

    def compress(self, tensor: Tensor):
        raise TypeError("DenseMomentum keeps per-parameter state: use it through hvdcomp.DistributedOptimizer, "
                        "the DDP hook or hvdcomp.inprocess, not hvd.DistributedOptimizer")
