"""Multi-rank scenarios for the dense compressors (run inside Horovod ranks).

Every function here runs on each rank and returns plain data for the test to check.
"""
from __future__ import annotations

import torch


def rank_gradient(seed: int, rank: int, shape) -> torch.Tensor:
    """The gradient rank ``rank`` uses in a scenario; the test recomputes it to check sums."""
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    return torch.randn(shape, generator=g) * 3.0


def _toy_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(40, 64), torch.nn.ReLU(), torch.nn.Linear(64, 5))


def averaged_gradients(names: list, shapes: dict, seed: int):
    """For each compressor name: set known gradients, synchronize, return the averaged ones
    through hvdcomp.DistributedOptimizer (and through hvd.DistributedOptimizer for the dense
    ones), plus the step's telemetry."""
    import horovod.torch as hvd

    import hvdcomp

    hvd.init()
    out = {}
    for name in names:
        for front in ("hvdcomp", "horovod"):
            if front == "horovod" and name not in ("none", "fp16", "bf16"):
                continue
            params = {k: torch.nn.Parameter(torch.zeros(s)) for k, s in shapes.items()}
            base = torch.optim.SGD(params.values(), lr=0.1)
            comp = hvdcomp.compression_from_name(name)
            if front == "hvdcomp":
                opt = hvdcomp.DistributedOptimizer(base, named_parameters=params.items(), compression=comp,
                                                   min_compress_numel=0)
            else:
                opt = hvd.DistributedOptimizer(base, named_parameters=params.items(), compression=comp)
            for i, (k, p) in enumerate(sorted(params.items())):
                p.grad = rank_gradient(seed + i, hvd.rank(), p.shape)
            opt.synchronize()
            out[(name, front)] = {k: p.grad.clone() for k, p in params.items()}
            if front == "hvdcomp":
                out[(name, "stats")] = opt.compression_stats()
    return out


def train_identical(names: list, steps: int, seed: int):
    """Train the toy model a few steps per compressor; return the final parameters per rank."""
    import horovod.torch as hvd

    import hvdcomp

    hvd.init()
    out = {}
    for name in names:
        model = _toy_model(seed)
        # Different data per rank: the ranks only agree if the exchange is right.
        g = torch.Generator().manual_seed(seed + 17 * hvd.rank())
        x = torch.randn(steps, 16, 40, generator=g)
        y = torch.randint(0, 5, (steps, 16), generator=g)
        opt = hvdcomp.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                           named_parameters=model.named_parameters(),
                                           compression=hvdcomp.compression_from_name(name),
                                           min_compress_numel=0)
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        for s in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[s]), y[s]).backward()
            opt.step()
        out[name] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return out


def mismatched_settings():
    """Rank 0 asks for fp16, the others for none: every rank must raise, none may hang."""
    import horovod.torch as hvd

    import hvdcomp

    hvd.init()
    model = _toy_model(0)
    comp = hvdcomp.Compression.fp16() if hvd.rank() == 0 else hvdcomp.Compression.none()
    try:
        hvdcomp.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                     named_parameters=model.named_parameters(), compression=comp)
    except ValueError as err:
        return str(err)
    return None
