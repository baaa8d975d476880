"""AdaComp (Chen et al. 2018) in three Triton passes: select+stats, pack+residual, decode+sum.

Same signatures and semantics as :mod:`hvdcomp.kernels` (its docstrings hold the
full contract). The variable-length payload is written without a host synchronisation
(no size read in the middle): pass 1 counts per bin, the caller turns
the counts into offsets with ``torch.cumsum``, pass 2 writes each bin at its offset.

Bins are not powers of two (L_T = 50, 500, ...). A program owns ``BINS`` whole bins laid out
as the rows of a ``[BINS, CHUNK]`` tile, ``CHUNK = next_pow2(bin_size)`` capped at
``_TILE``; a bin longer than the cap is walked in chunks. Owning whole bins means the bin
max, the in-bin ranks of the selected elements and the per-bin counts need no atomics and
come out in a fixed order.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .adacomp_format import adacomp_code_dtype, num_bins
from ._launch import BLOCK, NUM_WARPS, check_1d, float_arg, grid_1d, load_f32, next_pow2

#: Elements per program tile for the bin kernels (rows x columns).
_TILE = 4096


def _tile(bin_size: int) -> tuple[int, int]:
    """(BINS, CHUNK): bins per program and columns walked per step."""
    chunk = min(next_pow2(bin_size), _TILE)
    return _TILE // chunk, chunk


@triton.jit
def _bin_max(
    x_ptr, x_stride, bins, n, bin_size, X_BF16: tl.constexpr, BINS: tl.constexpr, CHUNK: tl.constexpr
):
    bmax = tl.zeros([BINS], dtype=tl.float32)
    for start in range(0, bin_size, CHUNK):
        col = start + tl.arange(0, CHUNK)[None, :]
        elem = bins[:, None] * bin_size + col
        # elem < n also masks bins past the last one (their first element is >= n).
        m = (col < bin_size) & (elem < n)
        ax = tl.abs(load_f32(x_ptr, elem * x_stride, m, X_BF16))
        bmax = tl.maximum(bmax, tl.max(ax, axis=1))
    return bmax


@triton.jit
def _select_stats_kernel(
    x_ptr, x_stride, g_ptr, g_stride, counts_ptr, abs_sum_ptr, n, nbins, bin_size,
    X_BF16: tl.constexpr, G_BF16: tl.constexpr, BINS: tl.constexpr, CHUNK: tl.constexpr,
):
    bins = tl.program_id(0).to(tl.int64) * BINS + tl.arange(0, BINS)
    bmax = _bin_max(x_ptr, x_stride, bins, n, bin_size, X_BF16, BINS, CHUNK)
    count = tl.zeros([BINS], dtype=tl.int32)
    acc = tl.zeros([BINS], dtype=tl.float32)
    for start in range(0, bin_size, CHUNK):
        col = start + tl.arange(0, CHUNK)[None, :]
        elem = bins[:, None] * bin_size + col
        m = (col < bin_size) & (elem < n)
        x = load_f32(x_ptr, elem * x_stride, m, X_BF16)
        g = load_f32(g_ptr, elem * g_stride, m, G_BF16)
        sel = m & (tl.abs(x + g) >= bmax[:, None]) & (x != 0.0)
        count += tl.sum(sel.to(tl.int32), axis=1)
        # Scaled by 2^-64 (exact: a power of two) so that the fp32 sums cannot overflow for
        # finite inputs; the launcher scales back in fp64. An fp64 accumulator instead costs
        # 255 registers and spills on sm_90 with Triton 3.6.
        acc += tl.sum(tl.where(sel, tl.abs(x) * 5.421010862427522e-20, 0.0), axis=1)
    tl.store(counts_ptr + bins, count, mask=bins < nbins)
    # One atomic per program: the only cross-program reduction of the pass.
    tl.atomic_add(abs_sum_ptr, tl.sum(acc, axis=0))


@triton.jit
def _pack_kernel(
    x_ptr, x_stride, g_ptr, g_stride, offsets_ptr, offsets_stride, scale_ptr, codes_ptr, codes_stride,
    n_codes, n, nbins, bin_size,
    G_BF16: tl.constexpr, BINS: tl.constexpr, CHUNK: tl.constexpr,
):
    bins = tl.program_id(0).to(tl.int64) * BINS + tl.arange(0, BINS)
    # The max is taken over the whole bin before any element of it is rewritten below.
    bmax = _bin_max(x_ptr, x_stride, bins, n, bin_size, False, BINS, CHUNK)
    s = tl.load(scale_ptr)
    base = tl.load(offsets_ptr + bins * offsets_stride, mask=bins < nbins, other=0).to(tl.int64)
    # In-bin counts and ranks stay below bin_size <= 16384: int32 keeps the [BINS, CHUNK] tile
    # small enough for registers (int64 ranks spilled at the 255-register cap for L_T <= 128).
    written = tl.zeros([BINS], dtype=tl.int32)
    for start in range(0, bin_size, CHUNK):
        col = start + tl.arange(0, CHUNK)[None, :]
        elem = bins[:, None] * bin_size + col
        m = (col < bin_size) & (elem < n)
        x = tl.load(x_ptr + elem * x_stride, mask=m, other=0.0)
        g = load_f32(g_ptr, elem * g_stride, m, G_BF16)
        # m & ...: x != 0 already rules out masked lanes, but the stores below must not
        # depend on that for memory safety.
        sel = m & (tl.abs(x + g) >= bmax[:, None]) & (x != 0.0)
        sel_i = sel.to(tl.int32)
        # Exclusive in-bin rank: codes of a bin land in increasing offset order.
        rank = written[:, None] + (tl.cumsum(sel_i, axis=1) - sel_i)
        written += tl.sum(sel_i, axis=1)
        dst = base[:, None] + rank
        pos = x > 0.0
        code = (col << 2) | tl.where(pos, 1, 2)
        # The CPU backend raises when codes is too short; a kernel cannot without a host
        # sync, so it never writes past the end (and leaves unsent elements unchanged).
        ok = sel & (dst < n_codes)
        tl.store(codes_ptr + dst * codes_stride, code.to(codes_ptr.dtype.element_ty), mask=ok)
        tl.store(x_ptr + elem * x_stride, tl.where(pos, x - s, x + s), mask=ok)


@triton.jit
def _decode_sum_kernel(
    codes_ptr, codes_stride, cum_ptr, scales_ptr, scales_stride, out_ptr,
    n_codes, n_pairs, n_iter, nbins, bin_size, numel,
    BLOCK: tl.constexpr,
):
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = j < n_codes
    c = tl.load(codes_ptr + j * codes_stride, mask=valid, other=0).to(tl.int32) & 0xFFFF
    # Which (rank, bin) pair code j belongs to: the first p with cum[p] > j, found by a
    # branch-free binary search over the inclusive prefix sum of the counts. The work is
    # O(codes * log(pairs)): it follows the payload, not the dense size times N.
    lo = tl.zeros([BLOCK], dtype=tl.int64)
    hi = tl.zeros([BLOCK], dtype=tl.int64) + n_pairs
    for _ in range(n_iter):
        active = lo < hi
        mid = (lo + hi) >> 1
        v = tl.load(cum_ptr + mid, mask=valid & active, other=0)
        lo = tl.where(active & (v <= j), mid + 1, lo)
        hi = tl.where(active & (v > j), mid, hi)
    rank = lo // nbins
    b = lo - rank * nbins
    idx = b * bin_size + (c >> 2)
    ok = valid & (lo < n_pairs) & (idx < numel)
    scale = tl.load(scales_ptr + rank * scales_stride, mask=ok, other=0.0)
    val = tl.where((c & 3) == 1, scale, -scale)
    tl.atomic_add(out_ptr + idx, val, mask=ok, sem="relaxed")


def adacomp_select_stats(
    x: torch.Tensor, g: torch.Tensor, bin_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """AdaComp pass 1 (Chen et al. 2018, Sec. 3): per-bin counts of the selected elements
    and ``sum |x|`` over them, in one read of ``x`` and ``g``.

    x: fp32 [n] (fp16/bf16 accepted, read as fp32), the residue ``r + g``. g: fp32/fp16/bf16
    [n]. bin_size: L_T in [2, 16384]. Selected: ``|x + g| >= max_bin |x|`` and ``x != 0``.
    Returns ``(bin_counts int32 [nbins], abs_sum fp64 [1])``; ``abs_sum`` is accumulated as
    ``sum |x| * 2^-64`` in fp32 with atomics (no overflow for finite inputs; magnitudes below
    about 2^-62 = 2e-19 lose precision, as subnormals) and scaled back in fp64, so its last
    bits depend on the order programs finish. Contract:
    :func:`hvdcomp.kernels.adacomp_select_stats`.
    """
    adacomp_code_dtype(bin_size)
    check_1d(x, g)
    n = x.numel()
    if g.numel() != n:
        raise ValueError(f"x has {n} elements, g has {g.numel()}")
    nb = num_bins(n, bin_size)
    counts = torch.zeros(nb, dtype=torch.int32, device=x.device)
    abs_sum = torch.zeros(1, dtype=torch.float32, device=x.device)  # sum |x| * 2^-64
    if n == 0:
        return counts, abs_sum.double()
    xk, x_bf16 = float_arg(x)
    gk, g_bf16 = float_arg(g)
    bins, chunk = _tile(bin_size)
    _select_stats_kernel[(triton.cdiv(nb, bins),)](
        xk, xk.stride(0), gk, gk.stride(0), counts, abs_sum, n, nb, bin_size,
        X_BF16=x_bf16, G_BF16=g_bf16, BINS=bins, CHUNK=chunk, num_warps=NUM_WARPS,
    )
    return counts, abs_sum.double() * 2.0**64


def adacomp_pack_(
    x: torch.Tensor, g: torch.Tensor, bin_size: int, bin_offsets: torch.Tensor, scale: torch.Tensor,
    codes: torch.Tensor,
) -> torch.Tensor:
    """AdaComp pass 2: write the codes ``(offset_in_bin << 2) | sign_code`` (1 = +, 2 = -)
    of bin b at ``bin_offsets[b]`` onward in increasing offset order, and turn ``x`` into
    the new residual ``x - sign(x)*scale`` on the selected elements, in place.

    x: fp32 [n] (any stride). g: [n], the same gradient as in pass 1 (the selection is
    recomputed bit-identically). bin_offsets: int64 [nbins], exclusive prefix sum of the
    counts. scale: fp32 [1], read on the device. codes: [total selected], uint8/int16 (see
    :func:`hvdcomp.kernels.adacomp_code_dtype`). Returns ``codes``.

    Unlike the CPU backend, a ``codes`` shorter than the selection is not detected (that
    needs a host sync); nothing is written past its end. Contract:
    :func:`hvdcomp.kernels.adacomp_pack_` (AdaComp, Chen et al. 2018, Sec. 3).
    """
    adacomp_code_dtype(bin_size)
    check_1d(x, g, bin_offsets, codes)
    if x.dtype != torch.float32:
        raise TypeError(f"x is the fp32 residual updated in place, got {x.dtype}")
    n = x.numel()
    if g.numel() != n:
        raise ValueError(f"x has {n} elements, g has {g.numel()}")
    nb = num_bins(n, bin_size)
    if bin_offsets.numel() != nb:
        raise ValueError(f"bin_offsets has {bin_offsets.numel()} entries, expected {nb} bins")
    if n == 0 or codes.numel() == 0:
        return codes
    gk, g_bf16 = float_arg(g)
    # A 1-element device scalar: converting it (when not fp32 already) costs nothing.
    sk = scale.reshape(-1).to(torch.float32)
    bins, chunk = _tile(bin_size)
    _pack_kernel[(triton.cdiv(nb, bins),)](
        x, x.stride(0), gk, gk.stride(0), bin_offsets, bin_offsets.stride(0), sk, codes, codes.stride(0),
        codes.numel(), n, nb, bin_size,
        G_BF16=g_bf16, BINS=bins, CHUNK=chunk, num_warps=NUM_WARPS,
    )
    return codes


def adacomp_decode_sum(
    codes: torch.Tensor, bin_counts: torch.Tensor, scales: torch.Tensor, bin_size: int, numel: int
) -> torch.Tensor:
    """Dense sum of N ranks' AdaComp payloads, ``sum_r scale_r * ternary_r``, in one launch.

    codes: uint8/int16 [sum of all counts] (int16 read as unsigned 16-bit), the ranks'
    codes concatenated in rank order. bin_counts: int32 [N, nbins]. scales: fp32 [N].
    Returns fp32 [numel]. Contributions are summed with fp32 atomics: with N >= 3 ranks
    hitting one element the rounding may differ from the CPU backend's sequential order.
    Contract: :func:`hvdcomp.kernels.adacomp_decode_sum`.
    """
    if bin_counts.dim() != 2:
        raise ValueError(f"bin_counts must be [N, nbins], got shape {tuple(bin_counts.shape)}")
    check_1d(codes)
    nranks, nb = bin_counts.shape
    out = torch.zeros(numel, dtype=torch.float32, device=codes.device)
    n_codes = codes.numel()
    n_pairs = nranks * nb
    if n_codes == 0 or numel == 0 or n_pairs == 0:
        return out
    cum = bin_counts.reshape(-1).to(torch.int64).cumsum(0)
    sk = scales.reshape(-1).to(torch.float32)
    _decode_sum_kernel[grid_1d(n_codes)](
        codes, codes.stride(0), cum, sk, sk.stride(0), out,
        n_codes, n_pairs, n_pairs.bit_length(), nb, bin_size, numel,
        BLOCK=BLOCK, num_warps=NUM_WARPS,
    )
    return out
