"""Wire casts: torch's own, which round to nearest even."""
from __future__ import annotations

import torch

Tensor = torch.Tensor


def cast_bf16(x: Tensor) -> Tensor:
    """``x.to(torch.bfloat16)`` via fp32."""
    return x.to(torch.float32).to(torch.bfloat16)


def cast_fp16(x: Tensor) -> Tensor:
    """``x.to(torch.float16)`` via fp32."""
    return x.to(torch.float32).to(torch.float16)


def cast_fp32(x: Tensor) -> Tensor:
    """``x.to(torch.float32)``."""
    return x.to(torch.float32)
