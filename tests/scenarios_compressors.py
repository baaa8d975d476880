"""Multi-rank scenarios for the packed compressors (run inside Horovod ranks)."""
from __future__ import annotations

import copy

import torch

#: conv weight (AdaComp bin 50), FC weight (bin 500), a vector, and a tensor smaller than one bin
SHAPES = {"conv": (8, 4, 3, 3), "fc": (30, 70), "vec": (777,), "tiny": (3, 5)}


def rank_gradient(name: str, rank: int, step: int, shape) -> torch.Tensor:
    """Rank 1 has all-zero gradients at step 0 (it selects nothing); ranks differ in scale
    and sparsity so their selected counts differ."""
    if rank == 1 and step == 0:
        return torch.zeros(shape)
    g = torch.Generator().manual_seed(17 * step + 1013 * rank + sum(map(ord, name)))
    dense = torch.randn(shape, generator=g) * (1 + rank)
    keep = torch.rand(shape, generator=g) < (0.3 + 0.2 * rank)
    return dense * keep


def own_contribution(opt, name: str, grad: torch.Tensor, h) -> torch.Tensor:
    """What this rank's compressor sends for ``name`` this step, decoded — computed on a
    copy of its state, exactly as the optimizer will (same step, rank, tensor index)."""
    from hvdcomp.compressor import SharedScale

    slot = opt._table.slots[name]
    comp, info = slot.compressor, slot.info
    state = copy.deepcopy(slot.state)
    if isinstance(comp, SharedScale):
        local = comp.local_scale(grad, info).reshape(1).to(torch.float32)
        state["shared_scale"] = h.allreduce(local, op=h.Max, name=f"test.scale.{name}")
    if comp.transport == "allreduce":
        payload, ctx = comp.encode_dense(grad, state, info, opt._driver.step)
        return comp.decode_dense(payload, ctx, state, info).reshape(-1)
    enc = comp.encode(grad, state, info, opt._driver.step)
    n = int(enc.nbytes.item())
    buf = torch.zeros(max(n, 8), dtype=torch.uint8)
    enc.pack(buf[:n])
    return comp.decode_sum([buf[:n]], state, info).reshape(-1)


def exchange(configs: list, steps: int, collective: str = "allgather"):
    """For each (name, params): per step, every parameter's averaged gradient and this rank's
    own decoded contribution; plus the last step's stats."""
    import horovod.torch as hvd

    import hvdcomp

    hvd.init()
    out = {}
    for name, params in configs:
        # Odd ranks list their parameters in reverse: tensors must be matched by name.
        order = list(SHAPES.items())[:: -1 if hvd.rank() % 2 else 1]
        ps = {n: torch.nn.Parameter(torch.zeros(s)) for n, s in order}
        opt = hvdcomp.DistributedOptimizer(torch.optim.SGD(ps.values(), lr=0.0), named_parameters=ps.items(),
                                           compression=hvdcomp.compression_from_name(name, **params),
                                           min_compress_numel=0, collective=collective)
        history = []
        for t in range(steps):
            opt.zero_grad()
            grads = {n: rank_gradient(n, hvd.rank(), t, s) for n, s in SHAPES.items()}
            own = {n: own_contribution(opt, n, grads[n], hvd) for n in SHAPES}
            for n, p in ps.items():
                p.grad = grads[n].clone()
            opt.step()
            history.append({"result": {n: p.grad.clone() for n, p in ps.items()}, "own": own})
        out[name] = {"history": history, "stats": opt.compression_stats()}
    return out


def horovod_optimizer_rejects(configs: list):
    """Each packed compressor in hvd.DistributedOptimizer: the first backward must raise
    (before any collective starts, so no rank waits for another). Returns name -> message."""
    import horovod.torch as hvd

    import hvdcomp

    hvd.init()
    out = {}
    for name, params in configs:
        model = torch.nn.Linear(20, 3)
        opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                       named_parameters=[(f"{name}.{k}", v) for k, v in model.named_parameters()],
                                       compression=hvdcomp.compression_from_name(name, **params))
        try:
            model(torch.randn(4, 20)).sum().backward()
            opt.step()
            out[name] = None
        except Exception as err:  # Horovod re-raises from its hook
            out[name] = f"{type(err).__name__}: {err}"
    return out
