"""ScaleCom: cyclic local top-k (CLT-k) with a low-pass-filtered error feedback.

Chen et al., "ScaleCom: Scalable Sparsified Gradient Compression for Communication-Efficient
Distributed Training", NeurIPS 2020. Per tensor and step ``t``:

1. ``x = r + g`` (error feedback);
2. the *leader* picks the top-k indices of its own ``x`` (exact, magnitude, ties to the
   lower index) and broadcasts them; the leader of the tensor with name-sorted index ``i``
   is rank ``(t + i) mod N`` — it rotates every step as CLT-k prescribes, and within a step
   the leaders are spread over the ranks so no single rank runs every top-k;
3. every rank gathers its own ``x[idx]`` (k values) and a plain sum-allreduce adds them:
   the payload has a fixed length, so it is allreduce-compatible and its traffic per rank
   does not grow with N (unlike allgather-based sparsification);
4. everyone scatters the (averaged) k values into a dense gradient;
5. memory update with the low-pass filter ``r <- (1 - beta) r + beta (x - sent)``, where
   ``sent`` is this rank's ``x`` on ``idx`` (zero elsewhere). ``beta = 1`` is plain error
   feedback.

Default ``beta = 1``: it keeps every bit of the residual, which is the error feedback that
top-k convergence results rely on; ``beta < 1`` forgets part of the residual each step, the
damping the paper uses against residual build-up with many learners and large batches.
Set it per run (the paper's large-scale runs use values well below 1).

Wire: k values (fp32, or fp16 with ``value_dtype=torch.float16``) through allreduce, plus
k int32 indices broadcast from the leader: ``4k + 4k`` bytes per tensor per step against
``4n`` dense (ratio ``n / 2k``, e.g. 50x at ``ratio=0.01``).
"""
from __future__ import annotations

import math

import torch

from .. import kernels
from ..compressor import Compressor, ErrorFeedback, IndexBroadcast, State, TensorInfo, staged
from .common import check_ratio

Tensor = torch.Tensor
_VALUE_DTYPES = (torch.float32, torch.float16)


class ScaleComCompressor(ErrorFeedback, IndexBroadcast, Compressor):
    """CLT-k with low-pass error feedback (see module docstring).

    ratio: fraction of elements sent, in (0, 1]; ``k = ceil(ratio * n)``.
    beta: low-pass filter coefficient of the memory update, in (0, 1].
    value_dtype: torch.float32 or torch.float16, dtype of the allreduced values.

    State: ``{"residual": fp32 [n]}``, staged (written whole each step).
    """

    name = "scalecom"
    transport = "allreduce"
    horovod_contract = "per_tensor"
    staged_state = ("residual",)

    def __init__(self, ratio: float, beta: float = 1.0, value_dtype: torch.dtype = torch.float32):
        ratio = check_ratio("scalecom", ratio)
        beta = check_ratio("scalecom", beta, "beta")
        if value_dtype not in _VALUE_DTYPES:
            raise ValueError(f"scalecom value_dtype must be torch.float32 or torch.float16, got {value_dtype}")
        self.ratio = float(ratio)
        self.beta = float(beta)
        self.value_dtype = value_dtype

    def config(self) -> dict:
        return {"name": self.name, "ratio": self.ratio, "beta": self.beta, "value_dtype": str(self.value_dtype)}

    def k(self, numel: int) -> int:
        """Number of elements sent for a tensor of ``numel`` elements."""
        return min(numel, max(1, math.ceil(self.ratio * numel))) if numel else 0

    def selected_count(self, payload_bytes: int, info: TensorInfo) -> int:
        return self.k(info.numel)

    @staticmethod
    def leader(info: TensorInfo, step: int) -> int:
        """Rank whose top-k indices every rank uses for this tensor at this step."""
        return (step + info.index) % info.size

    def init_state(self, info: TensorInfo) -> State:
        return {"residual": torch.zeros(info.numel, dtype=torch.float32, device=info.device)}

    # ---- the three phases ------------------------------------------------------------
    def propose(self, grad: Tensor, state: State, info: TensorInfo, step: int) -> Tensor:
        """Phase 1: ``x = r + g`` (kept for phase 2 in ``state["x"]``, a value of this step
        only); the leader's top-k indices (int32 [k]; zeros elsewhere), to be broadcast from
        :meth:`leader`."""
        x = staged(state, "residual")[0] + grad.reshape(-1).to(torch.float32)
        state["x"] = x
        k = self.k(info.numel)
        if info.rank == self.leader(info, step):
            return kernels.topk_indices(x, k).to(torch.int32)
        return torch.zeros(k, dtype=torch.int32, device=x.device)

    def encode_dense(self, grad: Tensor, state: State, info: TensorInfo, step: int):
        """Phase 2 (after the broadcast put the leader's indices in ``state["indices"]``):
        this rank's values at those indices, and the low-pass memory update."""
        x = state.pop("x")
        idx = state.pop("indices").to(torch.int64)
        sent = x.index_select(0, idx)
        before, residual = staged(state, "residual")
        # r <- (1-beta) r + beta (x - sent): x - sent is x with the sent entries zeroed.
        x.index_fill_(0, idx, 0.0)
        torch.mul(before, 1.0 - self.beta, out=residual).add_(x, alpha=self.beta)
        return sent.to(self.value_dtype), idx

    def decode_dense(self, summed: Tensor, ctx, state: State, info: TensorInfo) -> Tensor:
        """Phase 3: the summed values scattered into a dense fp32 gradient of ``info.shape``."""
        out = torch.zeros(info.numel, dtype=torch.float32, device=summed.device)
        return kernels.scatter_add_(out, ctx, summed.reshape(-1)).view(info.shape)
