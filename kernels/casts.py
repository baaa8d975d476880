"""Wire casts fp32 <-> bf16 / fp16, bit-exact with torch on every backend.

Same signatures and semantics as :mod:`hvdcomp.kernels`. The rounding is done on
integer bit patterns rather than with ``.to(tl.bfloat16)``: Triton's interpreter truncates
that cast while GPUs round it to nearest even, and one result must hold everywhere.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import BLOCK, NUM_WARPS, check_1d, float_arg, grid_1d, load_f32


@triton.jit
def _cast_bf16_kernel(x_ptr, x_stride, out_ptr, n, X_BF16: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    u = load_f32(x_ptr, offs * x_stride, mask, X_BF16).to(tl.uint32, bitcast=True)
    # Round to nearest even on the dropped 16 bits (Kalamkar et al. 2019, Sec. 3): adding
    # 0x7FFF plus the kept LSB carries exactly when the tail is above half, or at half with
    # an odd LSB. A carry out of the mantissa bumps the exponent, so overflow gives Inf.
    hi = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    # NaN: the carry could turn it into Inf (or wrap -NaN to +0); keep it a quiet NaN.
    is_nan = (u & 0x7FFFFFFF) > 0x7F800000
    hi = tl.where(is_nan, (u >> 16) | 0x40, hi)
    tl.store(out_ptr + offs, hi.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)


@triton.jit
def _cast_fp16_kernel(x_ptr, x_stride, out_ptr, n, X_BF16: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = load_f32(x_ptr, offs * x_stride, mask, X_BF16)
    # |x| >= 65520 rounds to Inf in RNE (65520 is the tie between 65504 and 2**16). Setting
    # it to Inf first gives the same result but spares the interpreter's numpy cast its
    # overflow warning; the cast itself rounds to nearest even on GPU and interpreter.
    u = x.to(tl.uint32, bitcast=True)
    inf = ((u & 0x80000000) | 0x7F800000).to(tl.float32, bitcast=True)
    x = tl.where(tl.abs(x) >= 65520.0, inf, x)
    tl.store(out_ptr + offs, x.to(tl.float16), mask=mask)


@triton.jit
def _cast_fp32_kernel(x_ptr, x_stride, out_ptr, n, X_BF16: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, load_f32(x_ptr, offs * x_stride, mask, X_BF16), mask=mask)


def _launch(kernel, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    check_1d(x)
    n = x.numel()
    if n == 0:
        return out
    xk, x_bf16 = float_arg(x)
    kernel[grid_1d(n)](xk, xk.stride(0), out, n, X_BF16=x_bf16, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out


def cast_bf16(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16, round to nearest even (Kalamkar et al. 2019, Sec. 3).

    x: fp32 [n] (fp16/bf16 accepted, via fp32; any stride). Returns bf16 [n], contiguous,
    bit-identical to ``x.to(torch.bfloat16)`` for every non-NaN input (±0, subnormals,
    ±Inf, overflow to Inf); a NaN stays a quiet NaN (sign and top payload bits kept; torch's
    own NaN bits differ between its CPU and CUDA paths). Contract:
    :func:`hvdcomp.kernels.cast_bf16`.
    """
    out = torch.empty(x.numel(), dtype=torch.bfloat16, device=x.device)
    _launch(_cast_bf16_kernel, x, out.view(torch.int16))
    return out


def cast_fp16(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> fp16, round to nearest even (IEEE 754 binary16; overflow to ±Inf).

    x: fp32 [n] (fp16/bf16 accepted; any stride). Returns fp16 [n], contiguous,
    bit-identical to ``x.to(torch.float16)`` for every non-NaN input. Contract:
    :func:`hvdcomp.kernels.cast_fp16`.
    """
    out = torch.empty(x.numel(), dtype=torch.float16, device=x.device)
    return _launch(_cast_fp16_kernel, x, out)


def cast_fp32(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32 (exact; bf16 widened by a 16-bit shift of its bits).

    x: fp16/bf16/fp32 [n] (any stride). Returns fp32 [n], contiguous. Contract:
    :func:`hvdcomp.kernels.cast_fp32`.
    """
    out = torch.empty(x.numel(), dtype=torch.float32, device=x.device)
    return _launch(_cast_fp32_kernel, x, out)
