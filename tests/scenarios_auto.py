"""Real-rank runs of ``Compression.auto()`` for tests/test_distributed_auto.py: the same
small model through Horovod's transport (``horovod.run``) and the DDP hook (spawned Gloo
ranks), a decision after two warm-up steps with the link measured through the transport."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from scenarios_identity import Net

CANDIDATES = ("none", "bf16", "topk")
MIN_NUMEL = 200
STEPS = 7


def auto():
    import hvdcomp

    return hvdcomp.Compression.auto(candidates=["none", "bf16", hvdcomp.Compression.topk(ratio=0.05)],
                                    warmup_steps=2, probe_bytes=1 << 16)


def _batch(rank: int):
    g = torch.Generator().manual_seed(1000 * rank)
    return torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)


def _summary(model, stats) -> dict:
    return {"params": torch.cat([p.detach().reshape(-1) for p in model.parameters()]), "auto": stats["auto"],
            "iterations": stats["iterations"]}


def horovod_run() -> dict:
    """hvdcomp.DistributedOptimizer with auto on this Horovod rank; then a redecision."""
    import horovod.torch as hvd

    import hvdcomp

    hvd.init()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Net()
    opt = hvdcomp.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                       named_parameters=model.named_parameters(), compression=auto(),
                                       min_compress_numel=MIN_NUMEL)
    x, y = _batch(hvd.rank())
    out = {}
    for step in range(STEPS):
        if step == 5:
            out["first"] = _summary(model, opt.compression_stats())
            opt.redecide_compression()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    out["last"] = _summary(model, opt.compression_stats())
    return out


def ddp_run(rank: int, nranks: int) -> dict:
    """The DDP hook with auto on this rank; then a redecision."""
    from hvdcomp.ddp import CompressionState, compression_hook

    torch.manual_seed(0)
    model = Net()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    state = CompressionState(auto(), min_compress_numel=MIN_NUMEL, named_parameters=model.named_parameters())
    ddp.register_comm_hook(state, compression_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    x, y = _batch(rank)
    out = {}
    for step in range(STEPS):
        if step == 5:
            out["first"] = _summary(model, state.compression_stats())
            state.redecide_compression()
        opt.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        opt.step()
    out["last"] = _summary(model, state.compression_stats())
    return out
