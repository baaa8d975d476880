"""Threshold selection for sparse compressors: count, stream compaction, DGC's sampled
threshold and exact top-k, without host synchronisation inside.

Same signatures and semantics as :mod:`hvdcomp.kernels` (its docstrings hold the
full contract). Inputs may be strided 1-D views in fp32/fp16/bf16 (upcast on load);
outputs are contiguous.

Variable-length output in index order, without a host synchronisation:
kernel 1 writes per-block counts, a one-program scan kernel turns them into per-block
offsets, kernel 2 writes each block's selected elements at its offset in index order
(in-block ranks by ``tl.cumsum`` of the mask). The result is deterministic.

Exact top-k is a radix select over the keys ``bits(|x|) & 0x7FFFFFFF``: for non-negative
floats the fp32 bit pattern read as int32 orders like the value, so the k-th largest
magnitude is found digit by digit, most significant first, in three histogram passes of
11, 10 and 10 bits. After each pass a one-program kernel picks the digit holding the k-th
largest key and writes ``(prefix, k remaining)`` to a 2-element device tensor that the next
pass reads, so the host never waits. The final state is ``(kth key, ties needed)``; the
selection then takes every key above the k-th and the first ``ties needed`` keys equal to
it in index order, which is exactly k elements, so the output size is known on the host.

Host synchronisations: none in any function here. ``count_above`` returns a device
tensor; the caller reads it once per bucket to size ``compact_above``'s output.
"""
from __future__ import annotations

import inspect
import warnings

import torch
import triton
import triton.language as tl

from ._launch import NUM_WARPS, check_1d, float_arg, load_f32

#: Elements per program of the streaming kernels.
_BLOCK = 4096
#: Blocks per step of the one-program scan kernel.
_SCAN_CHUNK = 1024
#: Radix-select passes over the 31-bit key, most significant digit first: (shift, bits).
_PASSES = ((20, 11), (10, 10), (0, 10))
_MAX_N = 2**31 - 1  # int32 counts, histograms and (for compact_above) indices

#: Build each program's histogram with ``tl.histogram`` and add it to the global one with
#: one atomic per non-empty bin. Gradients' top digits fall into a few dozen bins (the
#: exponents), so one global atomic per element would serialise on those addresses.
#: ``tl.histogram``'s mask argument exists from Triton 3.4; without it (or if the GPU
#: backend fails to compile it) the pass falls back to one atomic per element.
_LOCAL_HISTOGRAM = hasattr(tl, "histogram") and "mask" in inspect.signature(tl.histogram).parameters


@triton.jit
def _abs_key(x_ptr, offs, mask, X_BF16: tl.constexpr):
    x = load_f32(x_ptr, offs, mask, X_BF16)
    # Clearing the sign bit is |x| on the bits; -0.0 and 0.0 share key 0.
    return x.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _count_kernel(x_ptr, x_stride, thr_ptr, counts_ptr, n, X_BF16: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = load_f32(x_ptr, offs * x_stride, m, X_BF16)
    sel = m & (tl.abs(x) >= tl.load(thr_ptr))
    tl.store(counts_ptr + pid, tl.sum(sel.to(tl.int32), axis=0))


@triton.jit
def _block_offsets_kernel(
    counts_ptr, eq_ptr, state_ptr, off_ptr, eq_before_ptr, nblocks, TIES: tl.constexpr, CHUNK: tl.constexpr
):
    """Exclusive scan of the per-block counts (one program, carries across chunks).

    With TIES: block b takes ``clamp(need - eq_before_b, 0, eq_b)`` of its keys equal to
    the k-th, on top of its keys above it, and eq_before is stored for the write pass.
    """
    carry = tl.zeros([1], dtype=tl.int64)
    carry_eq = tl.zeros([1], dtype=tl.int64)
    if TIES:
        need = tl.load(state_ptr + 1).to(tl.int64)
    for start in range(0, nblocks, CHUNK):
        b = start + tl.arange(0, CHUNK)
        m = b < nblocks
        c = tl.load(counts_ptr + b, mask=m, other=0).to(tl.int64)
        if TIES:
            e = tl.load(eq_ptr + b, mask=m, other=0).to(tl.int64)
            before = carry_eq + tl.cumsum(e, axis=0) - e
            tl.store(eq_before_ptr + b, before, mask=m)
            carry_eq += tl.sum(e, axis=0)
            c += tl.minimum(tl.maximum(need - before, 0), e)
        tl.store(off_ptr + b, carry + tl.cumsum(c, axis=0) - c, mask=m)
        carry += tl.sum(c, axis=0)


@triton.jit
def _compact_kernel(
    x_ptr, x_stride, thr_ptr, off_ptr, idx_ptr, val_ptr, n, count, X_BF16: tl.constexpr, BLOCK: tl.constexpr
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = load_f32(x_ptr, offs * x_stride, m, X_BF16)
    sel = m & (tl.abs(x) >= tl.load(thr_ptr))
    s = sel.to(tl.int32)
    dst = tl.load(off_ptr + pid) + (tl.cumsum(s, axis=0) - s)
    # A count below the real selection (a caller's error the CPU backend raises on) must not
    # write out of bounds.
    ok = sel & (dst < count)
    tl.store(idx_ptr + dst, offs.to(tl.int32), mask=ok)
    tl.store(val_ptr + dst, x, mask=ok)


@triton.jit
def _hist_kernel(
    x_ptr, x_stride, state_ptr, hist_ptr, n,
    SHIFT: tl.constexpr, BITS: tl.constexpr, LOCAL: tl.constexpr, X_BF16: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    key = _abs_key(x_ptr, offs * x_stride, m, X_BF16)
    # Only keys whose higher digits equal the prefix chosen so far are still candidates
    # (before the first pass the prefix is 0 and key >> 31 is 0 for every key).
    m = m & ((key >> (SHIFT + BITS)) == tl.load(state_ptr))
    digit = (key >> SHIFT) & ((1 << BITS) - 1)
    if LOCAL:
        h = tl.histogram(digit, 1 << BITS, mask=m)
        bins = tl.arange(0, 1 << BITS)
        tl.atomic_add(hist_ptr + bins, h, mask=h > 0, sem="relaxed")
    else:
        tl.atomic_add(hist_ptr + digit, tl.full([BLOCK], 1, tl.int32), mask=m, sem="relaxed")


@triton.jit
def _pick_digit_kernel(hist_ptr, state_ptr, k, FIRST: tl.constexpr, BITS: tl.constexpr):
    d = tl.arange(0, 1 << BITS)
    h = tl.load(hist_ptr + d)
    prefix = tl.load(state_ptr)  # 0 before the first pass
    if FIRST:
        k_rem = k
    else:
        k_rem = tl.load(state_ptr + 1)
    # Candidates with a larger digit than d; the k-th largest key has the digit where this
    # count first falls below k_rem (exactly one d, since 1 <= k_rem <= sum(h)).
    above = tl.sum(h, axis=0) - tl.cumsum(h, axis=0)
    hit = (above < k_rem) & (k_rem <= above + h)
    digit = tl.max(tl.where(hit, d, -1), axis=0)
    above_digit = tl.sum(tl.where(d == digit, above, 0), axis=0)
    tl.store(state_ptr, (prefix << BITS) | digit)
    tl.store(state_ptr + 1, k_rem - above_digit)


@triton.jit
def _tie_count_kernel(
    x_ptr, x_stride, state_ptr, gt_ptr, eq_ptr, n, X_BF16: tl.constexpr, BLOCK: tl.constexpr
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    key = _abs_key(x_ptr, offs * x_stride, m, X_BF16)
    kth = tl.load(state_ptr)
    tl.store(gt_ptr + pid, tl.sum((m & (key > kth)).to(tl.int32), axis=0))
    tl.store(eq_ptr + pid, tl.sum((m & (key == kth)).to(tl.int32), axis=0))


@triton.jit
def _topk_write_kernel(
    x_ptr, x_stride, state_ptr, eq_before_ptr, off_ptr, out_ptr, n, k, X_BF16: tl.constexpr, BLOCK: tl.constexpr
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    key = _abs_key(x_ptr, offs * x_stride, m, X_BF16)
    kth = tl.load(state_ptr)
    need = tl.load(state_ptr + 1).to(tl.int64)
    eq = (m & (key == kth)).to(tl.int32)
    # Global rank of each tie in index order: the lowest-index ties win.
    tie_rank = tl.load(eq_before_ptr + pid) + (tl.cumsum(eq, axis=0) - eq)
    take = (m & (key > kth)) | ((eq != 0) & (tie_rank < need))
    t = take.to(tl.int32)
    dst = tl.load(off_ptr + pid) + (tl.cumsum(t, axis=0) - t)
    tl.store(out_ptr + dst, offs, mask=take & (dst < k))


@triton.jit
def _gather_abs_kernel(
    x_ptr, x_stride, idx_ptr, idx_stride, out_ptr, n, s, X_BF16: tl.constexpr, BLOCK: tl.constexpr
):
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = j < s
    i = tl.load(idx_ptr + j * idx_stride, mask=m, other=0).to(tl.int64)
    # Negative indices count from the end, as indexing does.
    i = tl.where(i < 0, i + n, i)
    ok = m & (i >= 0) & (i < n)
    tl.store(out_ptr + j, tl.abs(load_f32(x_ptr, i * x_stride, ok, X_BF16)), mask=m)


def _scalar_f32(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).to(torch.float32)


def _check_size(n: int) -> None:
    if n > _MAX_N:
        raise ValueError(f"top-k/compaction kernels take at most {_MAX_N} elements (int32 counts), got {n}")


def _block_counts(xk, bf16, thr, n) -> torch.Tensor:
    nblocks = triton.cdiv(n, _BLOCK)
    counts = torch.empty(nblocks, dtype=torch.int32, device=xk.device)
    _count_kernel[(nblocks,)](xk, xk.stride(0), thr, counts, n, X_BF16=bf16, BLOCK=_BLOCK, num_warps=NUM_WARPS)
    return counts


def count_above(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Number of elements with ``|x| >= threshold`` (DGC, Lin et al. 2018, Alg. 1: the
    size of the sparse message), with no host read.

    x: fp32/fp16/bf16 [n] (any stride). threshold: fp32 [1]. Returns int64 [1] on x's
    device (per-block int32 counts summed by torch, so the result is exact). Contract:
    :func:`hvdcomp.kernels.count_above`.
    """
    check_1d(x)
    n = x.numel()
    if n == 0:
        return torch.zeros(1, dtype=torch.int64, device=x.device)
    xk, bf16 = float_arg(x)
    return _block_counts(xk, bf16, _scalar_f32(threshold), n).sum(dtype=torch.int64).reshape(1)


def compact_above(x: torch.Tensor, threshold: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stream compaction of ``|x| >= threshold`` in index order (DGC's sparse message,
    Lin et al. 2018, Alg. 1), three launches and no host read.

    x: fp32/fp16/bf16 [n] (any stride, n < 2**31). threshold: fp32 [1]. count: host int,
    the number selected (from :func:`count_above`). Returns ``(indices int32 [count],
    values fp32 [count])``. The CPU backend raises when ``count`` is wrong; that check needs
    a host read, so here nothing is written past ``count`` and, for a count above the real
    selection, the tail is unspecified. Contract:
    :func:`hvdcomp.kernels.compact_above`.
    """
    check_1d(x)
    n = x.numel()
    _check_size(n)
    count = int(count)
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    idx = torch.empty(count, dtype=torch.int32, device=x.device)
    vals = torch.empty(count, dtype=torch.float32, device=x.device)
    if n == 0 or count == 0:
        return idx, vals
    xk, bf16 = float_arg(x)
    thr = _scalar_f32(threshold)
    counts = _block_counts(xk, bf16, thr, n)
    offsets = torch.empty(counts.numel(), dtype=torch.int64, device=x.device)
    # state/eq arguments are unused without TIES; counts stands in for them.
    _block_offsets_kernel[(1,)](counts, counts, counts, offsets, offsets, counts.numel(),
                                TIES=False, CHUNK=_SCAN_CHUNK, num_warps=4)
    _compact_kernel[(counts.numel(),)](
        xk, xk.stride(0), thr, offsets, idx, vals, n, count, X_BF16=bf16, BLOCK=_BLOCK, num_warps=NUM_WARPS,
    )
    return idx, vals


def _launch_hist(xk, bf16, state, hist, n, shift, bits) -> None:
    global _LOCAL_HISTOGRAM
    grid = (triton.cdiv(n, _BLOCK),)
    args = (xk, xk.stride(0), state, hist, n)
    if _LOCAL_HISTOGRAM:
        try:
            _hist_kernel[grid](*args, SHIFT=shift, BITS=bits, LOCAL=True, X_BF16=bf16, BLOCK=_BLOCK,
                               num_warps=NUM_WARPS)
            return
        except (triton.CompilationError, RuntimeError) as exc:  # fails before anything runs
            _LOCAL_HISTOGRAM = False
            warnings.warn(f"tl.histogram failed to compile ({exc!r}); top-k falls back to per-element atomics")
    _hist_kernel[grid](*args, SHIFT=shift, BITS=bits, LOCAL=False, X_BF16=bf16, BLOCK=_BLOCK, num_warps=NUM_WARPS)


def _kth_largest_key(xk, bf16, n: int, k: int) -> torch.Tensor:
    """Radix select: int32 [2] device tensor ``(key of the k-th largest |x|, how many keys
    equal to it the top k take)``, for 1 <= k <= n. 3 histogram passes over x, no host read."""
    state = torch.zeros(2, dtype=torch.int32, device=xk.device)
    hist = torch.zeros(sum(1 << bits for _, bits in _PASSES), dtype=torch.int32, device=xk.device)
    start = 0
    for p, (shift, bits) in enumerate(_PASSES):
        h = hist[start:start + (1 << bits)]
        start += 1 << bits
        _launch_hist(xk, bf16, state, h, n, shift, bits)
        _pick_digit_kernel[(1,)](h, state, k, FIRST=p == 0, BITS=bits, num_warps=4)
    return state


def topk_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """Exact top-k by magnitude: indices of the k largest ``|x|``, ties to the lower index,
    in increasing index order (ScaleCom's leader selection; DGC's exact variant).

    x: fp32/fp16/bf16 [n] (any stride, n < 2**31); k: host int, 0 <= k <= n. Returns int64
    [k]. Radix select over the bits of ``|x|`` (3 histogram passes), then one counting pass
    and one writing pass: 5 reads of x, 9 kernel launches (and 2 small zero-fills), no host
    synchronisation (k fixes the output size). A NaN ranks above inf, as in torch.topk and
    the CPU backend. Contract:
    :func:`hvdcomp.kernels.topk_indices`.
    """
    check_1d(x)
    n = x.numel()
    k = int(k)
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    _check_size(n)
    out = torch.empty(k, dtype=torch.int64, device=x.device)
    if k == 0:
        return out
    xk, bf16 = float_arg(x)
    state = _kth_largest_key(xk, bf16, n, k)
    nblocks = triton.cdiv(n, _BLOCK)
    gt = torch.empty(nblocks, dtype=torch.int32, device=x.device)
    eq = torch.empty(nblocks, dtype=torch.int32, device=x.device)
    _tie_count_kernel[(nblocks,)](xk, xk.stride(0), state, gt, eq, n, X_BF16=bf16, BLOCK=_BLOCK,
                                  num_warps=NUM_WARPS)
    offsets = torch.empty(nblocks, dtype=torch.int64, device=x.device)
    eq_before = torch.empty(nblocks, dtype=torch.int64, device=x.device)
    _block_offsets_kernel[(1,)](gt, eq, state, offsets, eq_before, nblocks, TIES=True, CHUNK=_SCAN_CHUNK,
                                num_warps=4)
    _topk_write_kernel[(nblocks,)](xk, xk.stride(0), state, eq_before, offsets, out, n, k, X_BF16=bf16,
                                   BLOCK=_BLOCK, num_warps=NUM_WARPS)
    return out


def sampled_threshold(x: torch.Tensor, ratio: float, sample_idx: torch.Tensor) -> torch.Tensor:
    """DGC's threshold from a sample (Lin et al. 2018, Sec. 3.1 / Alg. 1): the
    ``ceil(ratio * s)``-th largest ``|x|`` among ``x[sample_idx]``.

    x: fp32/fp16/bf16 [n] (any stride). ratio: fraction kept, in (0, 1]. sample_idx:
    int64/int32 [s], s >= 1, indices in [-n, n) (out-of-range ones read 0 instead of
    raising). Returns fp32 [1] on x's device, no host read: a gather kernel, then
    ``torch.topk`` on the small sample. Contract:
    :func:`hvdcomp.kernels.sampled_threshold`.
    """
    check_1d(x, sample_idx)
    s = sample_idx.numel()
    if s == 0:
        raise ValueError("sampled_threshold needs a non-empty sample")
    n = x.numel()
    sample = torch.empty(s, dtype=torch.float32, device=x.device)
    if n == 0:
        raise ValueError("sampled_threshold on an empty tensor")
    xk, bf16 = float_arg(x)
    _gather_abs_kernel[(triton.cdiv(s, _BLOCK),)](
        xk, xk.stride(0), sample_idx, sample_idx.stride(0), sample, n, s, X_BF16=bf16, BLOCK=_BLOCK,
        num_warps=NUM_WARPS,
    )
    # The CPU backend's rounding of ratio * s, to the same float expression.
    k = max(1, min(s, int(-(-ratio * s // 1))))
    return torch.topk(sample, k, sorted=False).values.min().reshape(1)
