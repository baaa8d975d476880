"""Top-k and random-k sparsification with error feedback (the baselines users expect).

Both keep a residual ``r`` per tensor (error feedback, as in Seide et al., "1-Bit Stochastic
Gradient Descent and its Application to Data-Parallel Distributed Training of Speech DNNs",
Interspeech 2014, and Stich, Cordonnier and Jaggi, "Sparsified SGD with Memory", NeurIPS
2018): ``x = r + g``; send
``C(x)``; ``r = x - decompress(C(x))``. They differ in how the k sent elements are chosen:

* :class:`TopKCompressor` sends the k largest ``|x|`` (exact, via ``kernels.topk_indices``),
  their indices and values; the index set differs per rank, so payloads travel by allgather.
* :class:`RandomKCompressor` sends ``x`` at k positions that every rank draws identically
  from a counter-based generator seeded by (seed, step, tensor): only the k values travel,
  and a plain sum-allreduce adds them (works in ``hvd.DistributedOptimizer`` too).

This module also holds the small helpers the other method modules share (seed mixing,
device-side sizes, shared random index draws).
"""
from __future__ import annotations

import math
import numbers

import torch

from .. import kernels, wire
from ..callorder import PositionKeyedState
from ..compressor import Compressor, Encoded, State, TensorInfo

Tensor = torch.Tensor

# --------------------------------------------------------------------------------------
# Shared helpers (used by adacomp, terngrad, dgc, onebit too)
# --------------------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    # Steele et al.'s SplitMix64 finaliser: a bijection on 64-bit ints with full avalanche,
    # so nearby inputs (step t and t+1, rank 0 and 1) give unrelated seeds.
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def derive_seed(*parts: int) -> int:
    """Deterministic 62-bit seed from host integers (e.g. ``(seed, step, rank, index)``).

    Each part is folded in with SplitMix64, so the result depends on every part and on their
    order. Returns an int in ``[0, 2**62)`` (the kernels accept seeds below ``2**63``).
    """
    h = 0
    for p in parts:
        h = _splitmix64(h ^ (int(p) & _MASK64))
    return h >> 2


def flat_grad(grad: Tensor, info: TensorInfo) -> Tensor:
    """``grad`` as a flat 1-D view/copy (any dtype kept), checked against ``info``."""
    if grad.numel() != info.numel:
        raise ValueError(f"gradient of {info.name!r} has {grad.numel()} elements, expected {info.numel} "
                         f"(shape {tuple(info.shape)})")
    return grad.reshape(-1)


def const_nbytes(n: int, device) -> Tensor:
    """int64 [1] on ``device`` holding the host int ``n`` (a fill, not a host sync)."""
    return torch.full((1,), int(n), dtype=torch.int64, device=device)


def shared_random_indices(numel: int, k: int, seed: int, device) -> Tensor:
    """k distinct indices in ``[0, numel)`` drawn from Philox with ``seed``: identical on every
    rank and device (CPU and CUDA draw the same bits, see ``kernels.philox_uniform``).

    Jittered systematic sampling: ``[0, numel)`` is cut into k strata of ``numel // k`` or
    ``numel // k + 1`` consecutive elements, one uniform index is drawn in each, and the whole
    set is rotated by a uniform random offset. Every element is then kept with probability
    exactly ``k / numel`` (up to the ``numel / 2**48`` bias of the offset), the k indices are
    distinct, and it costs O(k) work with no host synchronisation (a random permutation of
    all ``numel`` positions would cost O(numel) per tensor per step).

    Returns int64 [k] (not sorted).
    """
    if not 0 <= k <= numel:
        raise ValueError(f"k must be in [0, {numel}], got {k}")
    if k == 0:
        return torch.zeros(0, dtype=torch.int64, device=device)
    u = kernels.philox_uniform(seed, torch.arange(k + 2, device=device)).to(torch.float64)
    # 48 random bits for the rotation (one fp32 uniform has only 24 significant bits).
    hi = torch.floor(u[0] * 2.0**24).to(torch.int64)
    lo = torch.floor(u[1] * 2.0**24).to(torch.int64)
    offset = (hi * 2**24 + lo) % numel
    j = torch.arange(k, device=device, dtype=torch.int64)
    start = j * numel // k
    length = (j + 1) * numel // k - start  # >= 1 because k <= numel
    pick = start + torch.minimum(torch.floor(u[2:] * length).to(torch.int64), length - 1)
    return (pick + offset) % numel


def k_for(ratio: float, numel: int) -> int:
    """Elements sent for ``numel`` elements at ``ratio``: ``max(1, ceil(ratio * numel))``
    (at most ``numel``; 0 for an empty tensor)."""
    if numel <= 0:
        return 0
    return min(numel, max(1, math.ceil(ratio * numel)))


def check_ratio(owner: str, ratio: float, name: str = "ratio") -> float:
    """Validate a fraction in (0, 1] (ValueError naming the parameter and the range; strings
    and bools are refused, not converted)."""
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
        raise ValueError(f"{owner} {name} must be a number in (0, 1], got {ratio!r}")
    value = float(ratio)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{owner} {name} must be in (0, 1], got {ratio!r}")
    return value


def check_seed(owner: str, seed: int) -> int:
    """Validate an RNG seed: a non-negative integer."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"{owner} seed must be a non-negative integer, got {seed!r}")
    return seed


def exact_views(payload: Tensor, fields) -> list:
    """``wire.views`` for a payload that must be exactly as long as ``fields`` (a longer
    one means a sender with different settings: fail instead of decoding garbage)."""
    expected = wire.nbytes(fields)
    if payload.numel() != expected:
        raise ValueError(f"corrupt payload: {payload.numel()} bytes, the layout needs exactly {expected}")
    return wire.views(payload, fields)


def sparse_fields(count: int, value_dtype: torch.dtype = torch.float32) -> list:
    """Wire layout ``indices int32 [count] | values value_dtype [count]`` (no padding: the
    values start at ``4 * count``, a multiple of every value itemsize up to 4)."""
    return [(torch.int32, count), (value_dtype, count)]


def sparse_count(payload_nbytes: int, value_dtype: torch.dtype = torch.float32) -> int:
    """Elements in an ``indices | values`` payload of exactly ``payload_nbytes`` bytes."""
    per = 4 + wire.itemsize(value_dtype)
    if payload_nbytes % per:
        raise ValueError(f"corrupt payload: {payload_nbytes} bytes is not a multiple of {per} "
                         "(int32 index + value per element)")
    return payload_nbytes // per


def sparse_decode_sum(payloads: list, info: TensorInfo, value_dtype: torch.dtype = torch.float32) -> Tensor:
    """Dense fp32 sum (of ``info.shape``) of N ``indices int32 | values`` payloads: one
    ``kernels.scatter_add_`` over all ranks' concatenated indices and values."""
    out = torch.zeros(info.numel, dtype=torch.float32, device=payloads[0].device if payloads else info.device)
    idx_parts, val_parts = [], []
    for p in payloads:
        m = sparse_count(p.numel(), value_dtype)
        idx, vals = wire.views(p, sparse_fields(m, value_dtype))
        idx_parts.append(idx)
        val_parts.append(vals)
    if idx_parts:
        kernels.scatter_add_(out, torch.cat(idx_parts), torch.cat(val_parts))
    return out.view(info.shape)


# --------------------------------------------------------------------------------------
# Top-k
# --------------------------------------------------------------------------------------


class TopKCompressor(Compressor):
    """Exact top-k sparsification with error feedback.

    Per tensor of n elements and step: ``x = r + g``; ``idx`` = the ``k = max(1,
    ceil(ratio * n))`` largest ``|x|`` (ties to the lower index, increasing order);
    send ``(idx, x[idx])``; ``r = x`` with ``r[idx] = 0`` (so sent + residual == x exactly).

    ratio: fraction of elements sent, in (0, 1].

    Wire (allgather): ``indices int32 [k] | values fp32 [k]``, 8k bytes against 4n dense:
    ratio ``n / (2k)`` (about ``1 / (2 * ratio)``: 50x at ratio=0.01).
    State: ``{"residual": fp32 [n]}``. Gradients fp32/fp16/bf16 of any shape.
    """

    name = "topk"
    transport = "allgather"

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
        x = kernels.ef_accumulate_(state["residual"], g)
        idx = kernels.topk_indices(x, k)
        fields = sparse_fields(k)

        def pack(out: Tensor) -> None:
            out_idx, out_val = wire.views(out, fields)
            out_idx.copy_(idx)
            torch.index_select(x, 0, idx, out=out_val)  # (x[idx] measured 4x slower on a CPU)
            # r = x - sent: exactly zero where sent, x elsewhere.
            x.index_fill_(0, idx, 0.0)

        return Encoded(nbytes=const_nbytes(wire.nbytes(fields), x.device), pack=pack)

    def decode_sum(self, payloads: list, state: State, info: TensorInfo) -> Tensor:
        """Sum of the N ranks' sparse payloads as fp32 of ``info.shape``."""
        return sparse_decode_sum(payloads, info)


# --------------------------------------------------------------------------------------
# Random-k
# --------------------------------------------------------------------------------------


class RandomKCompressor(PositionKeyedState, Compressor):
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

    Wire (allreduce): ``values fp32 [k]`` only, the indices are never sent: ratio ``n / k``
    (100x at ratio=0.01), and the traffic per rank does not grow with the number of ranks.
    Works in ``hvd.DistributedOptimizer`` (state keyed by gradient order, see
    :mod:`hvdcomp.callorder`) and in :class:`hvdcomp.DistributedOptimizer` (keyed by name).
    """

    name = "randomk"
    transport = "allreduce"

    def __init__(self, ratio: float, seed: int = 0):
        self.ratio = check_ratio("randomk", ratio)
        self.seed = check_seed("randomk", seed)
        self._reset_positions()

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
        x = kernels.ef_accumulate_(state["residual"], g)
        idx = self.indices(info, step, x.device)
        sent = x.index_select(0, idx)
        x.index_fill_(0, idx, 0.0)  # r = x - sent
        return sent, idx

    def decode_dense(self, summed: Tensor, ctx, state: State, info: TensorInfo) -> Tensor:
        """The summed k values scattered into a dense fp32 tensor of ``info.shape``."""
        out = torch.zeros(info.numel, dtype=torch.float32, device=summed.device)
        return kernels.scatter_add_(out, ctx, summed.reshape(-1)).view(info.shape)

    # ---- Horovod's own optimizer ---------------------------------------------------------
    def compress(self, tensor: Tensor):
        """Horovod contract: residuals keyed by the call's position in the step (identical on
        every rank for a static graph; a changed order raises, see CallOrderKeys)."""
        step, position = self._call_order.on_compress(tensor)
        info = TensorInfo(name=f"hvd.{position}", shape=tensor.shape, dtype=tensor.dtype,
                          device=tensor.device, index=position)
        state = self._position_state(position, info)
        values, idx = self.encode_dense(tensor, state, info, step)
        return values, (idx, info)

    def decompress(self, tensor: Tensor, ctx) -> Tensor:
        """Horovod contract: the summed values scattered densely, in the gradient's dtype."""
        self._call_order.on_decompress()
        idx, info = ctx
        return self.decode_dense(tensor.to(torch.float32), idx, {}, info).to(info.dtype)

