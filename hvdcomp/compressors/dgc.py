"""Deep Gradient Compression (Lin, Han, Mao, Wang and Dally, "Deep Gradient Compression:
Reducing the Communication Bandwidth for Distributed Training", ICLR 2018, Sec. 3).

Per tensor and step, on every rank k:

1. local gradient clipping (optional): rescale g so that ``||g||_2 <= clip_norm * N^(-1/2)``
   (the gradients of N ranks are summed, so each rank gets a 1/sqrt(N) share of the norm
   budget), done before accumulation as the paper prescribes;
2. momentum correction, eq. (2): ``u = m*u + g``; ``v = v + u`` (accumulate the *velocity*,
   not the gradient);
3. sparsify v, eq. (3): send the elements with ``|v| >= thr``, where thr is the
   ``ratio``-quantile of ``|v|`` estimated on a random sample (no full sort); if the sampled
   thr is too low (it under-estimates the quantile) so that more than 2k elements pass, thr
   is recomputed exactly on the candidates (the k-th largest of them);
4. momentum factor masking: ``u = 0`` and ``v = 0`` where sent (stale momentum would keep
   pushing a coordinate whose update has already been applied);
5. warm-up: during the first ``warmup_steps`` steps the kept fraction falls exponentially,
   ``0.25 -> 0.0625 -> 0.015625 -> 0.004 -> 0.001`` (75 % -> 99.9 % sparsity), then ``ratio``.
   The paper spends its first epochs on it; the default, :data:`DEFAULT_WARMUP_STEPS` = 1000
   steps (200 per stage), needs no epoch length from the user (pass ``warmup_steps`` to
   follow an epoch count, 0 to switch it off).

The sum over ranks of the sent ``v`` is the update direction, so the momentum must be
applied once, here or in the optimizer. The default ``momentum=None`` follows the optimizer
(:mod:`hvdcomp.recipes`, applied by every transport that is given the optimizer): with
``torch.optim.SGD(momentum=m)`` DGC takes over m and the optimizer runs without momentum;
with Adam/AdamW (whose first moment is the momentum) the correction is off. A compressor
used where no optimizer is known treats None as 0 (the optimizer keeps its own momentum).
"""
from __future__ import annotations

import copy
import math
from typing import Sequence

import torch

from .. import kernels, wire
from ..compressor import Compressor, Encoded, SparseSelection, State, TensorInfo, staged
from .common import (check_ratio, check_seed, derive_seed, flat_grad, k_for, sparse_count, sparse_decode_sum,
                     sparse_fields)

Tensor = torch.Tensor

#: The paper's warm-up: the kept fraction divided by 4 at each stage (sparsity 75 % ... 99.9 %).
PAPER_WARMUP_RATIOS = (0.25, 0.0625, 0.015625, 0.004, 0.001)
#: Default warm-up length in steps (200 per stage of :data:`PAPER_WARMUP_RATIOS`): the paper
#: warms up over its first epochs; a step count needs no epoch length from the user.
DEFAULT_WARMUP_STEPS = 1000
_SMALLEST_POSITIVE = float(torch.finfo(torch.float32).smallest_normal) * 2.0**-23  # fp32's smallest subnormal
_VALUE_DTYPES = {torch.float32: "torch.float32", torch.float16: "torch.float16", torch.bfloat16: "torch.bfloat16"}


def sample_positions(v: Tensor, s: int, seed: int, rng: str) -> Tensor:
    """int64 [s]: the positions of ``|v|`` (fp32 [n]) sampled for DGC's threshold, uniform
    with replacement, from a generator seeded by ``seed`` (derived from (seed, step, rank,
    index) by the caller).

    ``rng="philox"``, or ``"auto"`` wherever the Triton kernels run: Philox-4x32-10, all four
    words of each counter (``philox_uniform4``), the same positions on CPU and GPU.
    ``rng="auto"`` on the torch path: ``torch.randint`` from torch's own generator with the
    same seed (equally uniform and reproducible, another stream): the emulated Philox is ~120
    small torch calls per tensor, which on a CPU cost more than the selection.
    """
    n, device = v.numel(), v.device
    if rng == "auto" and not kernels.use_triton(v):
        gen = torch.Generator(device=device).manual_seed(seed)
        return torch.randint(n, (s,), generator=gen, device=device)
    u = kernels.philox_uniform4(seed, torch.arange((s + 3) // 4, device=device)).reshape(-1)[:s]
    return torch.clamp(torch.floor(u.to(torch.float64) * n).to(torch.int64), max=n - 1)


def momentum_correction(g: Tensor, state: State, momentum: float) -> tuple[Tensor, Tensor]:
    """Eq. (2), ``u = m*u + g``, ``v = v + u``, from the previous u and v (fp32 [n]) into this
    step's, which are staged (:func:`~hvdcomp.compressor.staged`: written whole); returns
    the new (u, v)."""
    (u_before, u), (v_before, v) = staged(state, "u"), staged(state, "v")
    kernels.dgc_momentum_(u_before, v_before, g, momentum, out=(u, v))
    return u, v


def _refine(v: Tensor, thr: Tensor, k: int, cap: int) -> Tensor:
    # Compact the first `cap` candidates (|v| >= thr) into a buffer without knowing their
    # number on the host (prefix sum + scatter), and take the k-th largest of them. With
    # at most `cap` candidates this is the exact top-k threshold; with more it is the k-th
    # largest of the first `cap`, still >= thr, so the selection shrinks towards k
    # without ever dropping below it.
    a = v.abs()
    mask = a >= thr
    pos = torch.cumsum(mask, 0) - 1
    slot = torch.where(mask & (pos < cap), pos, cap)
    buf = torch.zeros(cap + 1, dtype=torch.float32, device=v.device).scatter_(0, slot, a)[:cap]
    kth = torch.topk(buf, min(k, cap), sorted=False).values.min().reshape(1)
    return torch.maximum(thr, kth)


def _check_momentum(momentum) -> float:
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
        raise ValueError(f"dgc momentum must be in [0, 1) (or None: follow the optimizer), got {momentum!r}")
    return float(momentum)


class _DGCSparseSelection(SparseSelection):
    """DGC's side of the sparse allreduce (:class:`~hvdcomp.compressor.SparseSelection`):
    the selection is the entries of v above DGC's threshold, and what was applied is masked
    out of u and v (momentum factor masking); mixed into :class:`DGCCompressor`, whose
    clipping, momentum and threshold it uses."""

    def select(self, grad: Tensor, state: State, info: TensorInfo, step: int) -> tuple[Tensor, Tensor]:
        """Momentum correction and the threshold as :meth:`encode`; returns the entries of v
        above it (one host read of their number). u and v are masked by :meth:`commit`."""
        g = flat_grad(grad, info)
        if self.clip_norm is not None:
            g = self._clip(g, info.size)
        u, v = momentum_correction(g, state, self.effective_momentum)
        if info.numel == 0:
            return torch.zeros(0, dtype=torch.int64, device=v.device), torch.zeros(0, device=v.device)
        thr, count = self._threshold_and_count(v, info, step)
        idx, vals = kernels.compact_above(v, thr, int(count))
        return idx.to(torch.int64), vals

    def commit(self, state: State, info: TensorInfo, applied: Tensor) -> None:
        """Momentum factor masking where applied (fp32 values: nothing of them stays in v)."""
        state["u"].index_fill_(0, applied, 0.0)
        state["v"].index_fill_(0, applied, 0.0)

    def target_count(self, info: TensorInfo, step: int) -> int:
        return self.k(info.numel, step)

    def sparse_allreduce_refusal(self) -> str | None:
        if self.value_dtype != torch.float32:
            return (f"dgc with value_dtype={_VALUE_DTYPES[self.value_dtype]} cannot travel by sparse allreduce "
                    "(its sums travel as fp32); use value_dtype=torch.float32 or collective='allgather'")
        return None


class DGCCompressor(Compressor, _DGCSparseSelection):
    """DGC: momentum correction, local clipping, sampled threshold, momentum factor masking
    and warm-up (see the module docstring).

    ratio: fraction of elements sent after warm-up, in (0, 1] (paper: 0.001).
    momentum: m of the momentum correction, in [0, 1), or None (default): follow the wrapped
        optimizer (:func:`hvdcomp.recipes.apply_recipe`; 0 where no optimizer is known).
    sample_ratio: fraction of ``|v|`` sampled for the threshold, in (0, 1] (paper: 0.1-1 %);
        the sample has at least ``min_sample`` (1024) and ``32 / ratio`` elements (see
        :meth:`sample_size`), and small tensors are thresholded exactly on all elements.
    clip_norm: L2 bound of the local gradient clipping (the global bound; each rank uses
        ``clip_norm / sqrt(N)``), > 0, or None for no clipping.
    warmup_steps: steps of warm-up, >= 0, split evenly among the stages of ``warmup_ratios``
        (default :data:`DEFAULT_WARMUP_STEPS`; 0: no warm-up).
    warmup_ratios: kept fractions of the warm-up stages, each in (0, 1]; a stage never keeps
        fewer than ``ratio`` (see :meth:`ratio_at`).
    value_dtype: torch.float32, torch.float16 or torch.bfloat16, the dtype of the sent
        values (their rounding error, and any excess beyond their range, stays in v).
    seed: non-negative int for the sample positions.
    rng: ``"auto"`` (default) or ``"philox"``, the generator of the sample positions (see
        :func:`sample_positions`: ``"philox"`` gives the same positions on CPU and GPU).

    Wire (allgather): ``indices int32 [m] | values value_dtype [m]``, m the number above the
    threshold (about k = ``max(1, ceil(ratio_at(step) * n))``, at most 2k unless ties), m
    derived from the exact payload length. ``m * (4 + b)`` bytes (b = 4 or 2) against 4n
    dense: ratio ``4n / (m (4 + b))``, about ``1 / (2 * ratio)`` for fp32 values (500x at
    ratio=0.001) and ``1 / (1.5 * ratio)`` for fp16.

    State: ``{"u": fp32 [n], "v": fp32 [n]}`` (momentum and accumulated velocity), both
    staged (:attr:`~hvdcomp.compressor.Compressor.staged_state`): each step writes them whole.
    Gradients fp32/fp16/bf16 of any shape.
    """

    name = "dgc"
    transport = "allgather"
    staged_state = ("u", "v")
    #: Smallest threshold sample: below it the sampled quantile is too coarse to be useful.
    min_sample = 1024
    #: The sample is also large enough to hold this many elements above the threshold: the
    #: count the threshold lets through then has a relative spread of about 1/sqrt(32), so it
    #: falls outside [k/2, 2k] with probability below 1e-3 (with 2 order statistics, as a bare
    #: 1 % sample gives at ratio 0.001 below 200k elements, it often does).
    min_sample_hits = 32

    def __init__(self, ratio: float = 0.001, momentum: float | None = None, sample_ratio: float = 0.01,
                 clip_norm: float | None = None, warmup_steps: int = DEFAULT_WARMUP_STEPS,
                 warmup_ratios: Sequence[float] = PAPER_WARMUP_RATIOS,
                 value_dtype: torch.dtype = torch.float32, seed: int = 0, rng: str = "auto"):
        self.ratio = check_ratio("dgc", ratio)
        self.momentum = None if momentum is None else _check_momentum(momentum)
        self.sample_ratio = check_ratio("dgc", sample_ratio, "sample_ratio")
        if clip_norm is not None:
            if isinstance(clip_norm, bool) or not isinstance(clip_norm, (int, float)) or not (
                    clip_norm > 0 and math.isfinite(clip_norm)):
                raise ValueError(f"dgc clip_norm must be a finite number > 0 (or None to disable), got {clip_norm!r}")
            clip_norm = float(clip_norm)
        self.clip_norm = clip_norm
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"dgc warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        self.warmup_steps = warmup_steps
        ratios = tuple(warmup_ratios)
        if not ratios:
            raise ValueError("dgc warmup_ratios must hold at least one fraction in (0, 1]")
        self.warmup_ratios = tuple(check_ratio("dgc", r, "warmup_ratios entry") for r in ratios)
        if value_dtype not in _VALUE_DTYPES:
            raise ValueError(f"dgc value_dtype must be one of {', '.join(_VALUE_DTYPES.values())}, got {value_dtype!r}")
        self.value_dtype = value_dtype
        self.seed = check_seed("dgc", seed)
        if rng not in ("auto", "philox"):
            raise ValueError(f"dgc rng must be 'auto' or 'philox', got {rng!r}")
        self.rng = rng

    @property
    def effective_momentum(self) -> float:
        """The m the momentum correction uses: ``momentum``, or 0 when it is None."""
        return 0.0 if self.momentum is None else self.momentum

    def with_momentum(self, momentum: float) -> "DGCCompressor":
        """A copy of this compressor whose momentum is ``momentum`` (in [0, 1)): how
        :mod:`hvdcomp.recipes` resolves ``momentum=None`` from the optimizer."""
        other = copy.copy(self)
        other.momentum = _check_momentum(momentum)
        return other

    def config(self) -> dict:
        """Settings that must match on every rank (every constructor argument)."""
        return {"name": self.name, "ratio": self.ratio, "momentum": self.momentum,
                "sample_ratio": self.sample_ratio, "clip_norm": self.clip_norm,
                "warmup_steps": self.warmup_steps, "warmup_ratios": self.warmup_ratios,
                "value_dtype": _VALUE_DTYPES[self.value_dtype], "seed": self.seed, "rng": self.rng,
                "min_sample": self.min_sample,
                "min_sample_hits": self.min_sample_hits}

    # ---- schedule and sizes ------------------------------------------------------------
    def ratio_at(self, step: int) -> float:
        """Kept fraction at ``step``: stage ``floor(step * S / warmup_steps)`` of the S
        ``warmup_ratios`` while ``step < warmup_steps`` (but never below ``ratio``), then
        ``ratio``."""
        if 0 <= step < self.warmup_steps:
            stages = self.warmup_ratios
            stage = min(len(stages) - 1, step * len(stages) // self.warmup_steps)
            return max(stages[stage], self.ratio)
        return self.ratio

    def k(self, numel: int, step: int) -> int:
        """Target number of sent elements: ``max(1, ceil(ratio_at(step) * numel))``."""
        return k_for(self.ratio_at(step), numel)

    def sample_size(self, numel: int, step: int = 0) -> int:
        """Elements sampled for the threshold: ``ceil(sample_ratio * n)``, at least
        :attr:`min_sample` and ``min_sample_hits / ratio_at(step)``, at most n (then the
        threshold is exact)."""
        hits = math.ceil(self.min_sample_hits / self.ratio_at(step))
        return min(numel, max(self.min_sample, hits, math.ceil(self.sample_ratio * numel)))

    def selected_count(self, payload_bytes: int, info: TensorInfo) -> int:
        """Sent elements in a payload of ``payload_bytes`` (``bytes / (4 + value bytes)``)."""
        return sparse_count(payload_bytes, self.value_dtype)

    def init_state(self, info: TensorInfo) -> State:
        """``{"u": fp32 [n] zeros, "v": fp32 [n] zeros}`` on ``info.device``."""
        zeros = lambda: torch.zeros(info.numel, dtype=torch.float32, device=info.device)  # noqa: E731
        return {"u": zeros(), "v": zeros()}

    # ---- the step -------------------------------------------------------------------------
    def _clip(self, g: Tensor, nranks: int) -> Tensor:
        # torch.nn.utils.clip_grad_norm_'s rule (scale by bound / (norm + 1e-6), never up),
        # on the device: no host read of the norm.
        g = g.to(torch.float32)
        bound = self.clip_norm / math.sqrt(max(1, nranks))
        factor = torch.clamp(bound / (torch.linalg.vector_norm(g) + 1e-6), max=1.0)
        return g * factor

    def threshold(self, v: Tensor, info: TensorInfo, step: int) -> Tensor:
        """The selection threshold on ``|v|`` (fp32 [1]); see the module docstring, step 3."""
        return self._threshold_and_count(v, info, step)[0]

    def _threshold_and_count(self, v: Tensor, info: TensorInfo, step: int) -> tuple[Tensor, Tensor]:
        # The threshold and the number of |v| >= it (int64 [1]), counted once where possible.
        n = v.numel()
        ratio, k = self.ratio_at(step), self.k(n, step)
        s = self.sample_size(n, step)
        if s >= n:
            sample_idx = torch.arange(n, device=v.device)  # small tensor: exact k-th largest
        else:
            sample_idx = sample_positions(v, s, derive_seed(self.seed, step, info.rank, info.index), self.rng)
        thr = kernels.sampled_threshold(v, ratio, sample_idx)
        count = kernels.count_above(v, thr)
        # Too many candidates (the sampled threshold under-estimated the quantile): the exact k-th largest
        # |v| among them. On the CPU the branch is decided on the host for free; on a GPU that
        # would be a host sync per tensor, so the refinement is always computed and selected
        # on the device (identical result).
        if v.is_cuda or int(count) > 2 * k:
            # The sampled q-th largest (q = ceil(ratio * s)) lets about k + n/s elements
            # through on average; 8x that is exceeded with probability ~e^-8.
            cap = min(n, 8 * (k + math.ceil(n / s)))
            thr = torch.where(count > 2 * k, _refine(v, thr, k, cap), thr)
            count = None
        # A zero never carries information: |v| >= thr > 0 (all-zero v sends nothing).
        clamped = torch.clamp(thr, min=_SMALLEST_POSITIVE)
        if count is None or v.is_cuda or bool(clamped != thr):  # (host reads on the CPU only)
            count = kernels.count_above(v, clamped)
        return clamped, count

    def encode(self, grad: Tensor, state: State, info: TensorInfo, step: int) -> Encoded:
        """Momentum correction and the threshold; the size (``count * (4 + b)``) stays on the
        device. ``pack`` writes the selection and masks u and v where sent."""
        g = flat_grad(grad, info)
        if self.clip_norm is not None:
            g = self._clip(g, info.size)
        u, v = momentum_correction(g, state, self.effective_momentum)
        per = 4 + wire.itemsize(self.value_dtype)
        if info.numel == 0:
            return Encoded(nbytes=torch.zeros(1, dtype=torch.int64, device=v.device), pack=lambda out: None)
        thr, count = self._threshold_and_count(v, info, step)

        def pack(out: Tensor) -> None:
            m = sparse_count(out.numel(), self.value_dtype)
            idx, vals = kernels.compact_above(v, thr, m)
            out_idx, out_val = wire.views(out, sparse_fields(m, self.value_dtype))
            out_idx.copy_(idx)
            # Clamped to the value dtype's range: an fp16 overflow would send inf and leave
            # -inf in v; clamped, the excess simply stays in v for the next steps.
            limit = torch.finfo(self.value_dtype).max
            sent = vals.clamp(-limit, limit).to(self.value_dtype)
            out_val.copy_(sent)
            # Momentum factor masking; v keeps only the rounding error of a narrow value dtype
            # (zero for fp32), so sent + v stays equal to the accumulated velocity.
            u.index_fill_(0, idx.to(torch.int64), 0.0)
            v.index_copy_(0, idx.to(torch.int64), vals - sent.to(torch.float32))

        return Encoded(nbytes=count.to(torch.int64).reshape(1) * per, pack=pack)

    def decode_sum(self, payloads: list, state: State, info: TensorInfo) -> Tensor:
        """Sum of the N ranks' sparse velocities as fp32 of ``info.shape``."""
        return sparse_decode_sum(payloads, info, self.value_dtype)

