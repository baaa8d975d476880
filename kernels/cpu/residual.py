"""Error-feedback accumulation and DGC momentum correction, in place, with torch's own
elementwise ops (nothing to gain over them on a CPU)."""
from __future__ import annotations

import torch

Tensor = torch.Tensor


def ef_accumulate_(residual: Tensor, grad: Tensor, out: Tensor | None = None) -> Tensor:
    """``residual += grad`` (grad upcast to fp32), or ``out = residual + grad``."""
    g = grad.to(torch.float32)
    return residual.add_(g) if out is None else torch.add(residual, g, out=out)


def dgc_momentum_(u: Tensor, v: Tensor, grad: Tensor, momentum: float,
                  out: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """``u = m*u + g`` (two roundings, as the Triton kernel without FMA), then ``v += u``;
    into ``out = (u_out, v_out)`` when given (the same passes, another destination)."""
    u_out, v_out = (u, v) if out is None else out
    torch.mul(u, momentum, out=u_out).add_(grad.to(torch.float32))
    return torch.add(v, u_out, out=v_out)
