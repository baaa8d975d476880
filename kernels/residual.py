"""Error-feedback accumulation and DGC momentum correction (fused elementwise passes).

Same signatures and semantics as :mod:`hvdcomp.kernels` (its docstrings hold the
full contract). Inputs may be strided 1-D views: the kernels take element strides, so an
in-place update writes through the caller's view and no copy is made.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import BLOCK, NUM_WARPS, check_1d, float_arg, grid_1d, load_f32


@triton.jit
def _ef_accumulate_kernel(r_ptr, r_stride, g_ptr, g_stride, o_ptr, o_stride, n, G_BF16: tl.constexpr,
                          BLOCK: tl.constexpr):
    # Reads r, writes r + g to o (the same tensor when in place).
    # int64 offsets: a strided view of a large bucket can address past 2**31 elements.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    r = tl.load(r_ptr + offs * r_stride, mask=mask)
    g = load_f32(g_ptr, offs * g_stride, mask, G_BF16)
    tl.store(o_ptr + offs * o_stride, r + g, mask=mask)


@triton.jit
def _dgc_momentum_kernel(
    u_ptr, u_stride, v_ptr, v_stride, g_ptr, g_stride, uo_ptr, uo_stride, vo_ptr, vo_stride, n, momentum,
    G_BF16: tl.constexpr, BLOCK: tl.constexpr
):
    # Reads u and v, writes their new values to uo and vo (the same tensors when in place).
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    u = tl.load(u_ptr + offs * u_stride, mask=mask)
    v = tl.load(v_ptr + offs * v_stride, mask=mask)
    g = load_f32(g_ptr, offs * g_stride, mask, G_BF16)
    u = u * momentum + g
    tl.store(uo_ptr + offs * uo_stride, u, mask=mask)
    tl.store(vo_ptr + offs * vo_stride, v + u, mask=mask)


def _check_accumulator(name: str, t: torch.Tensor, n: int) -> None:
    if t.dtype != torch.float32:
        raise TypeError(f"{name} must be float32 (accumulators are fp32), got {t.dtype}")
    if t.numel() != n:
        raise ValueError(f"{name} has {t.numel()} elements, grad has {n}")


def ef_accumulate_(residual: torch.Tensor, grad: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Error-feedback accumulation, ``r <- r + g`` (one read of each, one write), in place
    or into ``out``.

    residual: fp32 [n] (any stride), updated in place, or only read when ``out`` (fp32 [n],
    any stride) receives ``r + g``. grad: fp32/fp16/bf16 [n] (any stride), upcast to fp32
    on load. Returns the tensor written. See :func:`hvdcomp.kernels.ef_accumulate_` (error
    feedback as in Seide et al., "1-Bit Stochastic Gradient Descent and its Application to
    Data-Parallel Distributed Training of Speech DNNs", Interspeech 2014).
    """
    target = residual if out is None else out
    check_1d(residual, grad, target)
    n = grad.numel()
    _check_accumulator("residual", residual, n)
    _check_accumulator("out", target, n)
    if n == 0:
        return target
    g, g_bf16 = float_arg(grad)
    _ef_accumulate_kernel[grid_1d(n)](
        residual, residual.stride(0), g, g.stride(0), target, target.stride(0), n, G_BF16=g_bf16, BLOCK=BLOCK,
        num_warps=NUM_WARPS
    )
    return target


def dgc_momentum_(u: torch.Tensor, v: torch.Tensor, grad: torch.Tensor, momentum: float,
                  out: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """DGC momentum correction in one pass: ``u <- m*u + g``; ``v <- v + u``.

    u, v: fp32 [n] (any stride), updated in place, or only read when ``out = (u_out,
    v_out)`` (fp32 [n] each, any stride) receives the new values. grad: fp32/fp16/bf16 [n].
    momentum: Python float (used as fp32, as torch does for an fp32 tensor). Returns the new
    ``v``. Lin et al. 2018 (DGC), Sec. 3.2, eq. (5)-(6); see
    :func:`hvdcomp.kernels.dgc_momentum_`.
    """
    u_out, v_out = (u, v) if out is None else out
    check_1d(u, v, grad, u_out, v_out)
    n = grad.numel()
    for name, t in (("u", u), ("v", v), ("u_out", u_out), ("v_out", v_out)):
        _check_accumulator(name, t, n)
    if n == 0:
        return v_out
    g, g_bf16 = float_arg(grad)
    # enable_fp_fusion=False: an FMA for m*u + g would round once where torch rounds twice,
    # and the GPU result would drift from the CPU backend by an ulp.
    _dgc_momentum_kernel[grid_1d(n)](
        u, u.stride(0), v, v.stride(0), g, g.stride(0), u_out, u_out.stride(0), v_out, v_out.stride(0), n,
        float(momentum), G_BF16=g_bf16, BLOCK=BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=False,
    )
    return v_out
