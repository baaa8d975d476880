"""TernGrad: stochastic ternary gradients with a scaler shared across ranks
(Wen, Xu, Yan, Wu, Wang, Chen and Li, "TernGrad: Ternary Gradients to Reduce Communication
in Distributed Deep Learning", NeurIPS 2017).

Per tensor (layer-wise ternarizing) and step, on every rank:

1. gradient clipping, eq. (7): ``gc_i = clamp(g_i, -c*sigma, c*sigma)``, sigma the standard
   deviation of the tensor's g (``clip=None`` disables it; a constant tensor, sigma = 0, is
   left unclipped rather than zeroed);
2. scaler sharing: ``s = max over ranks of max|gc|`` (one small max-allreduce per bucket,
   done by the transport);
3. eq. (6): ``g~ = s * sign(gc) * b`` with ``b_i ~ Bernoulli(|gc_i| / s)``, an unbiased
   estimate of gc (``E[g~] = gc``) as long as ``s >= max|gc|``.

No error feedback by default: the estimate is unbiased, so nothing is kept between steps.
With ``error_feedback=True`` a worker error buffer (fp32 [n], ``state["residual"]``, staged:
written whole each step) sends
``C(x + e)`` and keeps ``e <- x + e - C(x + e)``, as 1-bit Adam does for its compressor
(Tang et al., ICML 2021): the frozen-v Adam recipe (:mod:`hvdcomp.recipes`) turns it on,
since its momentum messages need every coordinate delivered, not only in expectation.

With a shared s the sum of N ranks' values has only 2N+1 levels, which is what lets the
compressed allreduce (:mod:`hvdcomp.core.compressed_allreduce`) re-encode the sum in
``ceil(log2(2N+1))`` bits per element.
"""
from __future__ import annotations

import math
import numbers
import torch

from .. import kernels, wire
from ..compressor import ChunkCodec
from ..wire import pack_uint, unpack_uint
from ..compressor import Compressor, Encoded, SharedScale, State, TensorInfo, WorkerErrorFeedback
from ..kernels.memo import PerTensorVersion
from .common import check_seed, const_nbytes, derive_seed, exact_views, flat_grad

Tensor = torch.Tensor


def _fields(numel: int) -> list:
    return [(torch.float32, 1), (torch.uint8, (numel + 3) // 4)]


def _check_clip(clip) -> float | None:
    if clip is None:
        return None
    if isinstance(clip, bool) or not isinstance(clip, numbers.Real) or not (clip > 0 and math.isfinite(clip)):
        raise ValueError(f"terngrad clip must be a finite number > 0 (or None to disable), got {clip!r}")
    return float(clip)


class TernGradCompressor(WorkerErrorFeedback, SharedScale, ChunkCodec, Compressor):
    """TernGrad (see the module docstring for the equations).

    clip: the c of ``c * sigma`` gradient clipping, > 0, or None for no clipping (paper:
    2.5). seed: non-negative int; element i of tensor ``info`` at ``step`` on ``rank`` draws
    its Bernoulli from a generator seeded by ``derive_seed(seed, step, rank, info.index)``
    (:meth:`stream_seed`). rng: which generator (see below), ``"auto"`` or ``"philox"``.

    **Random stream.** ``rng="philox"``: element i takes word ``i % 4`` of Philox-4x32-10 counter
    ``i // 4``, the stream of Triton's ``tl.rand``, on every device (CPU and GPU codes
    bit-identical; on a CPU that emulation costs ~100 passes over the gradient, several times an
    eager TernGrad's whole step). ``rng="auto"`` (default): that Philox stream wherever the
    Triton kernel runs (CUDA), and on the torch path (:func:`hvdcomp.kernels.terngrad_ternarize_fast_rng`)
    NumPy's PCG64 seeded with :meth:`stream_seed` for CPU tensors (one random byte per element,
    refined by a float where the byte ties; torch's generator for other devices): the same
    equation and exactly the same law, reproducible for the same seed and NumPy version, but a
    different stream than a GPU run. The noise is independent per rank either way (the rank is
    part of the seed), so nothing has to agree between ranks.

    **Scale sharing (transport protocol).** As a :class:`~hvdcomp.compressor.SharedScale`
    it has the transport call, for every tensor of a bucket, :meth:`local_scale` ``(grad, info)`` (fp32
    [1]: this rank's ``max|clipped g|``), max-allreduce those scales in one collective, and
    put each tensor's result in ``state["shared_scale"]`` (fp32 [1]) before calling
    :meth:`encode` / :meth:`encode_chunked` with the same gradient. ``encode`` consumes
    (pops) the entry. Without it, a rank uses its local scale: still unbiased and correctly
    decoded through allgather (each payload carries its scale), but the compressed allreduce
    needs the shared one and raises without it on more than one rank.

    Wire (allgather): ``scale fp32 [1] | codes uint8 [ceil(n/4)]`` (2-bit codes, four per
    byte, element i at bits ``2*(i%4)`` of byte ``i//4``; 0 = 0, 1 = +s, 2 = -s):
    ``4 + ceil(n/4)`` bytes against 4n dense, ratio about 16x. Compressed allreduce
    (:class:`hvdcomp.compressor.ChunkCodec`): 2 bits per element out, the summed levels
    ``ceil(log2(2N+1))`` bits per element back. Horovod's ``hvd.DistributedOptimizer``
    (:meth:`compress`): the levels as fp16 integers (2 bytes per element), the scale shared by
    a blocking max-allreduce in the hook.

    Gradients fp32/fp16/bf16 of any shape. State: none, or with ``error_feedback`` the worker
    error buffer ``{"residual": fp32 [n]}`` (staged: written whole each step).
    """

    name = "terngrad"
    transport = "allgather"
    staged_state = ("residual",)
    horovod_contract = "per_tensor"
    #: Values of ``rng`` (see the class docstring).
    RNGS = ("auto", "philox")

    def __init__(self, clip: float | None = 2.5, seed: int = 0, rng: str = "auto", error_feedback: bool = False):
        if not isinstance(error_feedback, bool):
            raise ValueError(f"terngrad error_feedback must be True or False, got {error_feedback!r}")
        self.error_feedback = error_feedback
        self.clip = _check_clip(clip)
        self.seed = check_seed("terngrad", seed)
        if rng not in self.RNGS:
            raise ValueError(f"terngrad rng must be one of {self.RNGS}, got {rng!r}")
        self.rng = rng
        # The transport asks for the clip bound twice per tensor (local_scale, then encode).
        self._clip_memo = PerTensorVersion()

    def config(self) -> dict:
        """Settings that must match on every rank (name, clip, seed, rng, and error_feedback
        when on)."""
        config = {"name": self.name, "clip": self.clip, "seed": self.seed, "rng": self.rng}
        return {**config, "error_feedback": True} if self.error_feedback else config

    def init_state(self, info: TensorInfo) -> State:
        """The worker error buffer (fp32 [n] zeros) with ``error_feedback``, else nothing."""
        if not self.error_feedback:
            return {}
        return {"residual": torch.zeros(info.numel, dtype=torch.float32, device=info.device)}

    def _keep_error(self, x: Tensor, own: Tensor, state: State) -> None:
        """``e <- x - C(x)`` (x: what was encoded, the residual included; own: its decoding)."""
        if self.error_feedback:
            torch.sub(x.reshape(-1).to(torch.float32), own.reshape(-1), out=state["residual"])

    def stream_seed(self, info: TensorInfo, step: int) -> int:
        """Generator seed of tensor ``info`` at ``step`` on ``info.rank`` (rank-dependent, so the
        ranks' rounding noise is independent)."""
        return derive_seed(self.seed, step, info.rank, info.index)

    # ---- clipping and the scaler ------------------------------------------------------
    def clip_bound(self, grad: Tensor) -> Tensor:
        """``c * sigma`` of ``grad`` as fp32 [1] (``inf`` when clipping is off or sigma = 0)."""
        g = grad.reshape(-1)
        inf = torch.full((1,), math.inf, dtype=torch.float32, device=g.device)
        if self.clip is None or g.numel() == 0:
            return inf
        # Exactly 0 for a constant tensor (no clipping then, rather than clipping to ~0).
        sigma = kernels.population_std(g.to(torch.float32))
        return torch.where(sigma > 0, sigma * self.clip, inf)

    def _clip_of(self, grad: Tensor) -> Tensor:
        return self._clip_memo(grad, None, lambda: self.clip_bound(grad))

    def local_scale(self, grad: Tensor, info: TensorInfo) -> Tensor:
        """This rank's scaler ``max|clip(g)|`` (fp32 [1]), to be max-allreduced by the front
        end into ``state["shared_scale"]`` (see the class docstring)."""
        g = flat_grad(grad, info)
        if g.numel() == 0:
            return torch.zeros(1, dtype=torch.float32, device=g.device)
        low, high = torch.aminmax(g.to(torch.float32))  # max|g| in one pass, no |g| written
        return torch.minimum(torch.maximum(-low, high).reshape(1), self._clip_of(grad))

    def _scale(self, grad: Tensor, state: State, info: TensorInfo) -> Tensor:
        shared = state.pop("shared_scale", None)
        if shared is None:
            return self.local_scale(grad, info)
        return shared.reshape(1).to(device=grad.device, dtype=torch.float32)

    def _codes(self, grad: Tensor, scale: Tensor, info: TensorInfo, step: int) -> Tensor:
        """2-bit codes of ``grad`` (any shape) with the scale ``scale``: Philox or torch's
        generator by :attr:`rng` (see the class docstring)."""
        args = (flat_grad(grad, info), scale, self._clip_of(grad), self.stream_seed(info, step))
        if self.rng == "auto" and not kernels.use_triton(grad):
            return kernels.terngrad_ternarize_fast_rng(*args)
        return kernels.terngrad_ternarize(*args)

    # ---- packed (allgather) path -------------------------------------------------------
    def encode(self, grad: Tensor, state: State, info: TensorInfo, step: int) -> Encoded:
        """Fixed-size payload ``4 + ceil(n/4)`` bytes; pops ``state["shared_scale"]``."""
        flat_grad(grad, info)  # checks the size
        scale = self._scale(grad, state, info)
        fields = _fields(info.numel)

        def pack(out: Tensor) -> None:
            out_scale, out_codes = wire.views(out, fields)
            out_scale.copy_(scale)
            out_codes.copy_(self._codes(grad, scale, info, step))
            if self.error_feedback:
                self._keep_error(grad, self.decode_sum([out], state, info), state)

        return Encoded(nbytes=const_nbytes(wire.nbytes(fields), grad.device), pack=pack)

    def decode_sum(self, payloads: list, state: State, info: TensorInfo) -> Tensor:
        """``sum_r s_r * level_r`` as fp32 of ``info.shape`` (one ``ternary_decode_sum``)."""
        n = info.numel
        if not payloads:
            return torch.zeros(info.shape, dtype=torch.float32, device=info.device)
        scales, codes = zip(*(exact_views(p, _fields(n)) for p in payloads))
        return kernels.ternary_decode_sum(torch.stack(codes), torch.cat(scales), n).view(info.shape)

    # ---- compressed allreduce (ChunkCodec) ---------------------------------------------
    def bits_per_element(self) -> int:
        """2: one ternary code per element on the compressed-allreduce wire."""
        return 2

    def sum_bits(self, nranks: int) -> int:
        """``ceil(log2(2N+1))``: the sum of N levels in {-1, 0, 1} has 2N+1 values."""
        return max(1, (2 * nranks).bit_length())

    def encode_chunked(self, grad: Tensor, state: State, info: TensorInfo, step: int) -> Tensor:
        """The 2-bit codes of the whole tensor (uint8 [ceil(n/4)]), with the shared scale."""
        flat_grad(grad, info)  # checks the size
        if "shared_scale" not in state and info.size > 1:
            raise RuntimeError("terngrad: the compressed allreduce needs state['shared_scale'] (the "
                               "max-allreduced local_scale) on every rank; see TernGradCompressor")
        scale = self._scale(grad, state, info)
        state["chunk_scale"] = scale  # this step's shared scale, for the chunk sums below
        codes = self._codes(grad, scale, info, step)
        if self.error_feedback:
            self._keep_error(grad, self.chunk_sum(codes.reshape(1, -1), info.numel, state, info), state)
        return codes

    def chunk_sum(self, payloads: Tensor, numel: int, state: State, info: TensorInfo) -> Tensor:
        """N ranks' codes of one chunk (uint8 [N, nbytes]) -> ``s * sum of levels`` (fp32)."""
        scale = state["chunk_scale"]
        ones = torch.ones(payloads.shape[0], dtype=torch.float32, device=payloads.device)
        return kernels.ternary_decode_sum(payloads.contiguous(), ones, numel) * scale

    def encode_sum(self, total: Tensor, nranks: int, state: State, info: TensorInfo) -> Tensor:
        """``s * L`` (L integer in [-N, N]) -> ``L + N`` in :meth:`sum_bits` bits each."""
        scale = state["chunk_scale"]
        levels = torch.where(scale > 0, torch.round(total / torch.where(scale > 0, scale, 1.0)),
                             torch.zeros_like(total))
        return pack_uint(levels.clamp(-nranks, nranks).to(torch.int64) + nranks, self.sum_bits(nranks))

    def decode_sum_chunk(self, payload: Tensor, numel: int, nranks: int, state: State, info: TensorInfo) -> Tensor:
        """Inverse of :meth:`encode_sum`: fp32 [numel] = ``s * L``."""
        scale = state["chunk_scale"]
        levels = unpack_uint(payload, numel, self.sum_bits(nranks)) - nranks
        return levels.to(torch.float32) * scale

    # ---- dense levels (Horovod's own optimizer) --------------------------------------------
    def encode_dense(self, grad: Tensor, state: State, info: TensorInfo, step: int):
        """Levels in {-1, 0, 1} as fp16 of the gradient's shape (exact, and their sum over up
        to 2048 ranks too) and the scale as context. The scale must be shared
        (``state["shared_scale"]``) for the allreduced sum to be decoded with one scale."""
        if self.error_feedback:
            raise ValueError("terngrad(error_feedback=True) runs in hvdcomp's own transports "
                             "(hvdcomp.DistributedOptimizer, the DDP hook), not in hvd.DistributedOptimizer")
        flat_grad(grad, info)  # checks the size
        scale = self._scale(grad, state, info)
        codes = kernels.unpack_2bit(self._codes(grad, scale, info, step), info.numel)
        levels = (codes == 1).to(torch.float16) - (codes == 2).to(torch.float16)
        return levels.view(grad.shape), scale

    def decode_dense(self, summed: Tensor, ctx, state: State, info: TensorInfo) -> Tensor:
        """Summed levels times the shared scale, fp32 of ``info.shape``."""
        return (summed.reshape(-1).to(torch.float32) * ctx).view(info.shape)
