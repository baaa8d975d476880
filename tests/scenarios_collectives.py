"""Multi-rank scenarios comparing allgather with compressed allreduce (run inside ranks)."""
from __future__ import annotations

import torch

SHAPES = {"w": (61, 33), "v": (1001,), "conv": (6, 4, 3, 3)}


def rank_gradient(name: str, rank: int, step: int, shape) -> torch.Tensor:
    seed = 31 * step + 1009 * rank + sum(map(ord, name))
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * (1 + rank)


def exchange(names: list, steps: int):
    """For each compressor name and collective: the averaged gradients per step and the stats."""
    import horovod.torch as hvd

    import hvdcomp

    hvd.init()
    out = {}
    for name in names:
        for collective in ("allgather", "compressed_allreduce"):
            params = {n: torch.nn.Parameter(torch.zeros(s)) for n, s in SHAPES.items()}
            opt = hvdcomp.DistributedOptimizer(torch.optim.SGD(params.values(), lr=0.0),
                                               named_parameters=params.items(),
                                               compression=hvdcomp.compression_from_name(name),
                                               min_compress_numel=0, collective=collective)
            history = []
            for t in range(steps):
                opt.zero_grad()
                for n, p in params.items():
                    p.grad = rank_gradient(n, hvd.rank(), t, p.shape)
                opt.step()
                history.append({n: p.grad.clone() for n, p in params.items()})
            out[(name, collective)] = {"history": history, "stats": opt.compression_stats()}
    return out
