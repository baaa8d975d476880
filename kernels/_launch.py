"""Launch helpers shared by the Triton kernel modules (not part of the public API).

Kept free of any op logic: block sizes, grid arithmetic, the bf16-as-int16 load that the
interpreter needs, and a load that upcasts any float dtype to fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Elements per program for elementwise kernels. Large so that the interpreter (which runs
#: Python once per program) runs few programs; on a GPU 4096 elements over 8 warps keeps
#: enough bytes in flight per SM for a bandwidth-bound pass.
BLOCK = 4096
NUM_WARPS = 8

#: Floating dtypes a gradient may arrive in.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def grid_1d(n: int, block: int = BLOCK) -> tuple[int]:
    return (triton.cdiv(n, block),)


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def float_arg(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``(tensor to pass, is_bf16)``: bf16 travels as its int16 bit pattern.

    bf16 arithmetic is unreliable in the interpreter; widening the bits by a shift is exact
    on every backend, so kernels never touch a bf16 value directly.
    """
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"expected a float32/float16/bfloat16 tensor, got {t.dtype}")
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16), True
    return t, False


def check_1d(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.dim() != 1:
            raise ValueError(f"kernels take flat 1-D tensors (pass t.reshape(-1)), got {tuple(t.shape)}")


@triton.jit
def load_f32(ptr, offs, mask, IS_BF16: tl.constexpr):
    """Load ``ptr[offs]`` as fp32; a bf16 tensor is passed as int16 bits (see float_arg)."""
    if IS_BF16:
        bits = tl.load(ptr + offs, mask=mask, other=0).to(tl.uint16, bitcast=True)
        return (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(ptr + offs, mask=mask, other=0).to(tl.float32)
