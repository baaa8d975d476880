"""Exact top-k sparsification with error feedback (the baseline users expect): Seide et al.,
"1-Bit Stochastic Gradient Descent and its Application to Data-Parallel Distributed Training
of Speech DNNs", Interspeech 2014, for error feedback; Stich, Cordonnier and Jaggi,
"Sparsified SGD with Memory", NeurIPS 2018, for top-k with memory.

``x = r + g``; send the k largest ``|x|`` (exact, via ``kernels.topk_indices``) as their
indices and values; ``r = x - decompress(C(x))``. The index set differs per rank, so the
payloads travel by allgather.
"""
from __future__ import annotations

import torch

from .. import kernels, wire
from ..compressor import Compressor, Encoded, ErrorFeedback, SparseSelection, State, TensorInfo
from .common import (accumulate_residual, check_ratio, const_nbytes, flat_grad, k_for, sparse_count,
                     sparse_decode_sum, sparse_fields)

Tensor = torch.Tensor


class TopKCompressor(ErrorFeedback, Compressor, SparseSelection):
    """Exact top-k sparsification with error feedback.

    Per tensor of n elements and step: ``x = r + g``; ``idx`` = the ``k = max(1,
    ceil(ratio * n))`` largest ``|x|`` (ties to the lower index, increasing order);
    send ``(idx, x[idx])``; ``r = x`` with ``r[idx] = 0`` (so sent + residual == x exactly).

    ratio: fraction of elements sent, in (0, 1].

    Wire (allgather): ``indices int32 [k] | values fp32 [k]``, 8k bytes against 4n dense:
    ratio ``n / (2k)`` (about ``1 / (2 * ratio)``: 50x at ratio=0.01).
    State: ``{"residual": fp32 [n]}``, staged (written whole each step). Gradients fp32/fp16/bf16 of any shape.
    """

    name = "topk"
    transport = "allgather"
    staged_state = ("residual",)

    def __init__(self, ratio: float):
        self.ratio = check_ratio("topk", ratio)

    def config(self) -> dict:
        """Settings that must match on every rank."""
        return {"name": self.name, "ratio": self.ratio}

    def k(self, numel: int) -> int:
        """Elements sent for a tensor of ``numel`` elements."""
        return k_for(self.ratio, numel)

    def selected_count(self, payload_bytes: int, info: TensorInfo) -> int:
        """Sent elements in a payload of ``payload_bytes``."""
        return sparse_count(payload_bytes)

    def init_state(self, info: TensorInfo) -> State:
        """``{"residual": fp32 [n] zeros}`` on ``info.device``."""
        return {"residual": torch.zeros(info.numel, dtype=torch.float32, device=info.device)}

    def encode(self, grad: Tensor, state: State, info: TensorInfo, step: int) -> Encoded:
        """x = r + g and its top-k (no host sync: k is a host int, the size is 8k)."""
        g = flat_grad(grad, info)
        k = self.k(info.numel)
        x = accumulate_residual(state, g)
        idx = kernels.topk_indices(x, k)
        fields = sparse_fields(k)

        def pack(out: Tensor) -> None:
            out_idx, out_val = wire.views(out, fields)
            out_idx.copy_(idx)
            torch.index_select(x, 0, idx, out=out_val)  # (advanced indexing x[idx] is slower on a CPU)
            # r = x - sent: exactly zero where sent, x elsewhere.
            x.index_fill_(0, idx, 0.0)

        return Encoded(nbytes=const_nbytes(wire.nbytes(fields), x.device), pack=pack)

    def decode_sum(self, payloads: list, state: State, info: TensorInfo) -> Tensor:
        """Sum of the N ranks' sparse payloads as fp32 of ``info.shape``."""
        return sparse_decode_sum(payloads, info)

    # ---- sparse allreduce (SparseSelection) ------------------------------------------------
    def select(self, grad: Tensor, state: State, info: TensorInfo, step: int) -> tuple[Tensor, Tensor]:
        """``x = r + g`` (kept in the residual until :meth:`commit`) and its top-k."""
        x = accumulate_residual(state, flat_grad(grad, info))
        idx = kernels.topk_indices(x, self.k(info.numel))
        return idx, torch.index_select(x, 0, idx)

    def commit(self, state: State, info: TensorInfo, applied: Tensor) -> None:
        """``r = x - applied``: zero where applied, the rest of the selection stays."""
        state["residual"].index_fill_(0, applied, 0.0)

    def target_count(self, info: TensorInfo, step: int) -> int:
        return self.k(info.numel)
