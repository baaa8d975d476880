"""Real-rank runs for tests/test_inprocess_identity.py, and the same runs on in-process ranks.

Every compressor trains the same small conv + FC model for ``steps`` steps on each rank's
own batches, through (a) ``hvdcomp.DistributedOptimizer`` on Horovod Gloo ranks with tensor
fusion off, (b) the DDP hook on torch.distributed Gloo ranks, and (c) the in-process
transport in this process. The test asserts that (c) gives bit-identical parameters to (a)
and (b) on every rank.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: name -> (compressor parameters, SGD momentum); ratios large enough to move every step.
CONFIGS = {
    "none": ({}, 0.9), "fp16": ({}, 0.9), "bf16": ({}, 0.9), "adacomp": ({}, 0.9), "terngrad": ({}, 0.9),
    "dgc": ({"ratio": 0.05}, 0.0), "topk": ({"ratio": 0.05}, 0.9), "randomk": ({"ratio": 0.05}, 0.9),
    "onebit": ({}, 0.9), "scalecom": ({"ratio": 0.05}, 0.9),
}
MIN_NUMEL = 200  # conv weight (216) and both FC weights compressed, biases dense
LR = 0.05


class Net(nn.Module):
    """[B, 3, 8, 8] -> conv 3x3 (8 maps) -> pool -> FC 128x32 -> FC 32x10."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Linear(128, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv(x)), 2).flatten(1)
        return self.fc2(F.relu(self.fc1(x)))


def batch(rank: int, step: int, n: int = 8):
    g = torch.Generator().manual_seed(7919 * step + 104729 * rank)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def fresh():
    torch.manual_seed(0)
    return Net()


def make(name: str):
    import hvdcomp

    return hvdcomp.compression_from_name(name, **CONFIGS[name][0])


def params(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _loss(model, rank, step):
    x, y = batch(rank, step)
    return F.cross_entropy(model(x), y)


# ---- (a) Horovod ranks -----------------------------------------------------------------------------

def horovod_optimizer(name: str, model):
    """hvdcomp.DistributedOptimizer over SGD for compressor ``name`` (its CONFIGS momentum)."""
    import hvdcomp

    return hvdcomp.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=LR, momentum=CONFIGS[name][1]),
                                        named_parameters=model.named_parameters(), compression=make(name),
                                        min_compress_numel=MIN_NUMEL)


def horovod_ranks(names: list, steps: int):
    """On every Horovod rank: each compressor's parameters after ``steps`` steps."""
    import horovod.torch as hvd

    hvd.init()
    torch.set_num_threads(1)
    out = {}
    for name in names:
        model = fresh()
        opt = horovod_optimizer(name, model)
        for step in range(steps):
            opt.zero_grad()
            _loss(model, hvd.rank(), step).backward()
            opt.step()
        out[name] = params(model)
    return out


# ---- (b) DDP ranks --------------------------------------------------------------------------------

def ddp_ranks(rank: int, nranks: int, names: list, steps: int, bucket_cap_mb: float):
    """On every torch.distributed rank: each compressor's parameters after ``steps`` steps
    and DDP's bucket layout (parameter names per bucket) before every step."""
    from hvdcomp.ddp import CompressionState, compression_hook

    out = {}
    for name in names:
        model = fresh()
        ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=bucket_cap_mb)
        state = CompressionState(make(name), min_compress_numel=MIN_NUMEL, named_parameters=model.named_parameters())
        ddp.register_comm_hook(state, compression_hook)
        opt = torch.optim.SGD(ddp.parameters(), lr=LR, momentum=CONFIGS[name][1])
        layouts = []
        for step in range(steps):
            opt.zero_grad()
            _loss(ddp, rank, step).backward()
            layouts.append([names_ for _, names_ in sorted(state.bucket_layout().items())])
            opt.step()
        out[name] = {"params": params(model), "layouts": layouts}
    return out


# ---- (c) in-process ranks ---------------------------------------------------------------------------

def inprocess(name: str, nranks: int, steps: int, transport: str = "horovod", layouts=None) -> list[dict]:
    """Every simulated rank's parameters after ``steps`` steps (``layouts``: DDP's buckets
    per step, for the "ddp" transport)."""
    from hvdcomp.inprocess import World

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: the same reduction order in the backward pass
    try:
        world = World(nranks, transport=transport)
        comp = make(name)  # one instance serves every rank
        models = [fresh() for _ in range(nranks)]
        opts = [world.DistributedOptimizer(r, torch.optim.SGD(m.parameters(), lr=LR, momentum=CONFIGS[name][1]),
                                           named_parameters=m.named_parameters(), compression=comp,
                                           min_compress_numel=MIN_NUMEL)
                for r, m in enumerate(models)]
        for step in range(steps):
            if layouts is not None:
                world.buckets = layouts[step]
            for r, (m, opt) in enumerate(zip(models, opts)):
                opt.zero_grad()
                _loss(m, r, step).backward()
            world.step()
        return [params(m) for m in models]
    finally:
        torch.set_num_threads(threads)
