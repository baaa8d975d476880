"""Random-k sparsification with a mask every rank draws identically, and error feedback
(Stich, Cordonnier and Jaggi, "Sparsified SGD with Memory", NeurIPS 2018).

``x = r + g``; the k positions come from a counter-based generator seeded by (seed, step,
tensor), the same on every rank, so only the k values travel and a plain sum-allreduce adds
them (it works in ``hvd.DistributedOptimizer`` too).
"""
from __future__ import annotations

import torch

from .. import kernels
from ..compressor import Compressor, ErrorFeedback, State, TensorInfo
from .common import accumulate_residual, check_ratio, check_seed, derive_seed, flat_grad, k_for, shared_random_indices

Tensor = torch.Tensor


class RandomKCompressor(ErrorFeedback, Compressor):
    """Random-k sparsification with a mask shared by all ranks, and error feedback.

    Per tensor and step: ``x = r + g``; the k = ``max(1, ceil(ratio * n))`` positions
    ``idx`` are drawn from Philox seeded by ``(seed, step, info.index)`` -- not by rank, so
    every rank draws the *same* positions (see :func:`shared_random_indices`: each element is
    kept with probability exactly k/n, independently of the data). Each rank sends
    ``x[idx]``; a plain sum-allreduce adds the N value vectors; everyone scatters the sum
    into a dense gradient; ``r = x`` with ``r[idx] = 0``.

    Because the mask is random and data-independent, ``(n/k) * C(x)`` would be an unbiased
    estimate of ``x``; with error feedback the unscaled values are sent and what is not sent
    stays in the residual, so nothing is lost, only delayed.

    ratio: fraction of elements sent, in (0, 1]. seed: non-negative int (must match on all
    ranks; it is part of :meth:`config`).

    State: ``{"residual": fp32 [n]}``, staged (written whole each step).

    Wire (allreduce): ``values fp32 [k]`` only, the indices are never sent: ratio ``n / k``
    (100x at ratio=0.01), and the traffic per rank does not grow with the number of ranks.
    Works in ``hvd.DistributedOptimizer`` (state keyed by gradient order by
    :mod:`hvdcomp.horovod_contract`) and in :class:`hvdcomp.DistributedOptimizer` (keyed by name).
    """

    name = "randomk"
    transport = "allreduce"
    staged_state = ("residual",)
    horovod_contract = "per_tensor"

    def __init__(self, ratio: float, seed: int = 0):
        self.ratio = check_ratio("randomk", ratio)
        self.seed = check_seed("randomk", seed)

    def config(self) -> dict:
        """Settings that must match on every rank."""
        return {"name": self.name, "ratio": self.ratio, "seed": self.seed}

    def k(self, numel: int) -> int:
        """Elements sent for a tensor of ``numel`` elements."""
        return k_for(self.ratio, numel)

    def selected_count(self, payload_bytes: int, info: TensorInfo) -> int:
        """Sent elements in a payload of ``payload_bytes``."""
        return self.k(info.numel)

    def init_state(self, info: TensorInfo) -> State:
        """``{"residual": fp32 [n] zeros}`` on ``info.device``."""
        return {"residual": torch.zeros(info.numel, dtype=torch.float32, device=info.device)}

    def indices(self, info: TensorInfo, step: int, device=None) -> Tensor:
        """The shared positions of tensor ``info`` at ``step`` (int64 [k]; rank-independent)."""
        seed = derive_seed(self.seed, step, info.index)
        return shared_random_indices(info.numel, self.k(info.numel), seed, device or info.device)

    def encode_dense(self, grad: Tensor, state: State, info: TensorInfo, step: int):
        """Payload ``x[idx]`` (fp32 [k]) and ``idx`` as the context; updates the residual."""
        g = flat_grad(grad, info)
        x = accumulate_residual(state, g)
        idx = self.indices(info, step, x.device)
        sent = x.index_select(0, idx)
        x.index_fill_(0, idx, 0.0)  # r = x - sent
        return sent, idx

    def decode_dense(self, summed: Tensor, ctx, state: State, info: TensorInfo) -> Tensor:
        """The summed k values scattered into a dense fp32 tensor of ``info.shape``."""
        out = torch.zeros(info.numel, dtype=torch.float32, device=summed.device)
        return kernels.scatter_add_(out, ctx, summed.reshape(-1)).view(info.shape)
