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


#: Settings that one rank sets differently from the others in :func:`mismatched_settings`:
#: name -> (rank 0's keyword arguments, the other ranks').
MISMATCHES = {
    "compression": ({"compression": "fp16"}, {"compression": "none"}),
    "backward_passes_per_step": ({"backward_passes_per_step": 1}, {"backward_passes_per_step": 2}),
    "gradient_predivide_factor": ({"gradient_predivide_factor": 1.0}, {"gradient_predivide_factor": 2.0}),
    "op": ({"op": "Average"}, {"op": "Sum"}),
    "sparse_as_dense": ({"sparse_as_dense": False}, {"sparse_as_dense": True}),
    "groups": ({"groups": None}, {"groups": 2}),
    "num_groups": ({"num_groups": 0}, {"num_groups": 2}),
}


def mismatched_settings(cases: list):
    """For each case of :data:`MISMATCHES`: rank 0 builds the optimizer with one value, the
    others with another; every rank must raise ValueError (its message is returned), none
    may hang, and no gradient may have been exchanged (p.grad stays None)."""
    import horovod.torch as hvd

    import hvdcomp

    hvd.init()
    out = {}
    for case in cases:
        model = _toy_model(0)
        kwargs = dict(MISMATCHES[case][0 if hvd.rank() == 0 else 1])
        kwargs["compression"] = hvdcomp.compression_from_name(kwargs.get("compression", "none"))
        if "op" in kwargs:
            kwargs["op"] = getattr(hvd, kwargs["op"])
        try:
            hvdcomp.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                         named_parameters=model.named_parameters(), **kwargs)
        except ValueError as err:
            out[case] = str(err)
        else:
            out[case] = None
        assert all(p.grad is None for p in model.parameters())
    return out
