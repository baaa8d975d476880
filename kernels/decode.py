"""Dense accumulation of sparse payloads (top-k, random-k, DGC, ScaleCom decode).

Same signature and semantics as :func:`hvdcomp.kernels.scatter_add_`. One launch
covers all N ranks' payloads concatenated; repeated indices (the same element sent by
several ranks) meet in fp32 atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import BLOCK, NUM_WARPS, check_1d, float_arg, load_f32


@triton.jit
def _scatter_add_kernel(
    out_ptr, out_stride, idx_ptr, idx_stride, val_ptr, val_stride, n, m,
    V_BF16: tl.constexpr, BLOCK: tl.constexpr,
):
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mj = j < m
    i = tl.load(idx_ptr + j * idx_stride, mask=mj, other=0).to(tl.int64)
    v = load_f32(val_ptr, j * val_stride, mj, V_BF16)
    # The CPU backend raises on an index outside [0, n); a kernel cannot, so it drops it
    # rather than write outside ``out``.
    ok = mj & (i >= 0) & (i < n)
    tl.atomic_add(out_ptr + i * out_stride, v, mask=ok, sem="relaxed")


def scatter_add_(out: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``out[indices[j]] += values[j]`` for all j, in place, one launch (the decode of
    sparse payloads: DGC, Lin et al. 2018, Alg. 1 line "sum the sparse gradients"; top-k,
    random-k and ScaleCom likewise).

    out: fp32 [n] (any stride). indices: int32/int64 [m] (any stride; repeats allowed: N
    ranks' payloads concatenated). values: fp32/fp16/bf16 [m] (any stride), upcast to fp32.
    Returns ``out``. Repeated indices are summed by fp32 atomics, so with three or more
    contributions to one element the rounding may differ from the CPU backend's order; an
    index outside ``[0, n)`` is dropped (the CPU backend raises). Contract:
    :func:`hvdcomp.kernels.scatter_add_`.
    """
    check_1d(out, indices, values)
    if out.dtype != torch.float32:
        raise TypeError(f"out must be float32, got {out.dtype}")
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"indices must be int32 or int64, got {indices.dtype}")
    m = indices.numel()
    if values.numel() != m:
        raise ValueError(f"{m} indices but {values.numel()} values")
    if m == 0 or out.numel() == 0:
        return out
    vk, v_bf16 = float_arg(values)
    _scatter_add_kernel[(triton.cdiv(m, BLOCK),)](
        out, out.stride(0), indices, indices.stride(0), vk, vk.stride(0), out.numel(), m,
        V_BF16=v_bf16, BLOCK=BLOCK, num_warps=NUM_WARPS,
    )
    return out
