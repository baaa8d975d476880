"""Multi-rank ScaleCom scenarios (run inside Horovod ranks)."""
from __future__ import annotations

import torch

SHAPES = {"a": (300,), "b": (40, 25), "c": (7, 3, 3, 3)}


def rank_gradient(name: str, rank: int, step: int, shape) -> torch.Tensor:
    """Gradient of parameter ``name`` on ``rank`` at ``step`` (the test recomputes it)."""
    seed = 7919 * step + 104729 * rank + sum(map(ord, name))
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def exchange(steps: int, ratio: float, beta: float):
    """Run ScaleCom through both transports; per step, every parameter's averaged gradient,
    and at the end our optimizer's residuals."""
    import horovod.torch as hvd

    import hvdcomp

    hvd.init()
    out = {}
    for front in ("hvdcomp", "horovod"):
        params = {n: torch.nn.Parameter(torch.zeros(s)) for n, s in SHAPES.items()}
        base = torch.optim.SGD(params.values(), lr=0.0)
        comp = hvdcomp.Compression.scalecom(ratio=ratio, beta=beta)
        if front == "hvdcomp":
            opt = hvdcomp.DistributedOptimizer(base, named_parameters=params.items(), compression=comp,
                                               min_compress_numel=0)
        else:
            opt = hvd.DistributedOptimizer(base, named_parameters=params.items(), compression=comp)
        history = []
        for t in range(steps):
            opt.zero_grad()
            # loss = sum_j <P_j, C_j>: the gradient of P_j is exactly C_j, through a real
            # backward so Horovod's hooks fire in their natural (deterministic) order.
            loss = sum((p * rank_gradient(n, hvd.rank(), t, p.shape)).sum() for n, p in params.items())
            loss.backward()
            opt.step()
            history.append({n: p.grad.detach().clone() for n, p in params.items()})
        out[front] = history
        if front == "hvdcomp":
            out["residuals"] = {n: s["residual"].clone() for n, s in opt.state_dict()["hvdcomp"]["state"].items()}
            out["stats"] = opt.compression_stats()
    return out
