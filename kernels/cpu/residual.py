"""Error-feedback accumulation and DGC momentum correction, in place, with torch's own
elementwise ops (nothing to gain over them on a CPU)."""
from __future__ import annotations

import torch

Tensor = torch.Tensor


def ef_accumulate_(residual: Tensor, grad: Tensor) -> Tensor:
    """``residual += grad`` (grad upcast to fp32)."""
    return residual.add_(grad.to(torch.float32))


def dgc_momentum_(u: Tensor, v: Tensor, grad: Tensor, momentum: float) -> Tensor:
    """``u = m*u + g`` (two roundings, as the Triton kernel without FMA), then ``v += u``."""
    u.mul_(momentum).add_(grad.to(torch.float32))
    return v.add_(u)
