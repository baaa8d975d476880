"""Runs for tests/test_distributed_hierarchy.py: hierarchical exchange (2 nodes x 2 ranks,
an explicit split of 4 local Gloo ranks) and the sparse allreduce, on real Horovod ranks,
real DDP ranks and in-process ranks, with one rank's gradient non-finite at one step.

Every case trains the small conv + FC model of tests/scenarios_identity.py. At POISON_STEP
rank 1's loss is multiplied by inf; every rank must then see NaN gradients (the step is
dropped everywhere) and skip the optimizer's step, as ``GradScaler`` does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from scenarios_identity import CONFIGS, LR, MIN_NUMEL, batch, fresh, make, params

NRANKS, RANKS_PER_NODE = 4, 2
POISON_STEP, POISON_RANK = 3, 1
#: case -> (compressor name, exchange settings)
CASES = {
    **{f"hier_{name}": (name, {"hierarchical": RANKS_PER_NODE}) for name in CONFIGS},
    "sar_topk": ("topk", {"collective": "sparse_allreduce"}),
    "sar_dgc": ("dgc", {"collective": "sparse_allreduce"}),
    "hier_sar_topk": ("topk", {"collective": "sparse_allreduce", "hierarchical": RANKS_PER_NODE}),
    # hvdcomp.FrozenAdamW: v freezes after ADAM_WARMUP steps, before the poisoned step.
    "hier_adam_onebit": ("onebit", {"hierarchical": RANKS_PER_NODE}),
}
ADAM_CASES, ADAM_WARMUP = {"hier_adam_onebit"}, 2


def schedule(steps: int, skip_poison: bool = False) -> list[int]:
    return [s for s in range(steps) if not (skip_poison and s == POISON_STEP)]


def loss_of(model, rank: int, step: int, poison: bool):
    x, y = batch(rank, step)
    loss = F.cross_entropy(model(x), y)
    return loss * float("inf") if poison and step == POISON_STEP and rank == POISON_RANK else loss


def finite(model) -> bool:
    return all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())


def _optimizer(case: str, model):
    """Momentum SGD, or for the Adam cases hvdcomp.FrozenAdamW (the recipe's optimizer)."""
    if case in ADAM_CASES:
        import hvdcomp

        return hvdcomp.FrozenAdamW(model.parameters(), lr=0.01, warmup_steps=ADAM_WARMUP)
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=CONFIGS[CASES[case][0]][1])


# ---- Horovod ranks --------------------------------------------------------------------------------

def horovod_ranks(cases: list, steps: int):
    """On every Horovod rank (dynamic process sets): each case's parameters after ``steps``
    steps with the poisoned step, and its stats."""
    import horovod.torch as hvd

    import hvdcomp

    hvd.init(process_sets="dynamic")
    torch.set_num_threads(1)
    out = {}
    for case in cases:
        name, exchange = CASES[case]
        model = fresh()
        opt = hvdcomp.DistributedOptimizer(_optimizer(case, model), named_parameters=model.named_parameters(),
                                           compression=make(name), min_compress_numel=MIN_NUMEL, **exchange)
        for step in schedule(steps):
            opt.zero_grad()
            loss_of(model, hvd.rank(), step, True).backward()
            opt.synchronize()
            if finite(model):
                with opt.skip_synchronize():
                    opt.step()
        out[case] = {"params": params(model), "stats": _summary(opt.compression_stats())}
    # A node's last local allgather can still wait while the other node's ranks are done, and
    # a rank that exits shuts Horovod down on every rank (docs/hierarchical.md).
    hvd.barrier()
    return out


def _summary(stats: dict) -> dict:
    """What the tests read of ``compression_stats()`` (results travel back through Horovod's
    HTTP store, which fails on large ones)."""
    return {"dropped_steps": stats["dropped_steps"], "collectives": stats["collectives"],
            "transports": {name: t["transport"] for name, t in stats["tensors"].items()}}


# ---- DDP ranks -------------------------------------------------------------------------------------

def ddp_ranks(rank: int, nranks: int, cases: list, steps: int, bucket_cap_mb: float):
    """On every torch.distributed rank: as :func:`horovod_ranks` through the DDP hook, with
    DDP's bucket layout before every step."""
    from torch import nn

    from hvdcomp.ddp import CompressionState, compression_hook

    out = {}
    for case in cases:
        name, exchange = CASES[case]
        model = fresh()
        ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=bucket_cap_mb)
        opt = _optimizer(case, ddp)
        adam = {"optimizer": opt} if case in ADAM_CASES else {}  # the hook's companion optimizer
        state = CompressionState(make(name), min_compress_numel=MIN_NUMEL, named_parameters=model.named_parameters(),
                                 **exchange, **adam)
        ddp.register_comm_hook(state, compression_hook)
        layouts = []
        for step in schedule(steps):
            opt.zero_grad()
            loss_of(ddp, rank, step, True).backward()
            layouts.append([names for _, names in sorted(state.bucket_layout().items())])
            if finite(model):
                opt.step()
        out[case] = {"params": params(model), "stats": _summary(state.compression_stats()), "layouts": layouts}
    return out


# ---- in-process ranks -------------------------------------------------------------------------------

def inprocess(case: str, steps: int, poison: bool = True, skip_poison: bool = False, transport: str = "horovod",
              layouts=None):
    """Every in-process rank's parameters and rank 0's stats (``World(4, nodes=2)``);
    ``skip_poison``: the run in which the poisoned step's data never came."""
    from hvdcomp.inprocess import World

    name, exchange = CASES[case]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        world = World(NRANKS, transport=transport, nodes=NRANKS // RANKS_PER_NODE)
        comp = make(name)
        models = [fresh() for _ in range(NRANKS)]
        opts = [world.DistributedOptimizer(r, _optimizer(case, m), named_parameters=m.named_parameters(), compression=comp,
                                           min_compress_numel=MIN_NUMEL, **exchange)
                for r, m in enumerate(models)]
        for i, step in enumerate(schedule(steps, skip_poison)):
            if layouts is not None:
                world.buckets = layouts[i]
            for r, (m, opt) in enumerate(zip(models, opts)):
                opt.zero_grad()
                loss_of(m, r, step, poison).backward()
            world.synchronize()
            for m, opt in zip(models, opts):
                if finite(m):
                    opt.step()
        return [params(m) for m in models], opts[0].compression_stats()
    finally:
        torch.set_num_threads(threads)


# ---- error feedback of the sparse allreduce on real ranks -------------------------------------------

EF_SHAPE = (40, 30)
EF_CASES = ["sar_topk", "sar_dgc", "hier_sar_topk"]


class Weighted(torch.nn.Module):
    """loss = sum(weight * g): the gradient of ``weight`` is exactly ``g``."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(EF_SHAPE))

    def forward(self, g):
        return (self.weight * g).sum()


def integer_gradient(rank: int, step: int) -> torch.Tensor:
    """Small integers: every sum of them is exact in fp32, so the invariant holds bit for bit."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(-8, 9, EF_SHAPE, generator=g).to(torch.float32)


def ddp_error_feedback(rank: int, nranks: int, cases: list, steps: int):
    """On every torch.distributed rank: the sum over steps of the applied gradient times N,
    of this rank's gradients, and this rank's accumulator (residual, or DGC's v) at the end."""
    from torch import nn

    from hvdcomp.ddp import CompressionState, compression_hook

    out = {}
    for case in cases:
        name, exchange = CASES[case]
        model = Weighted()
        ddp = nn.parallel.DistributedDataParallel(model)
        state = CompressionState(make(name), min_compress_numel=0, named_parameters=model.named_parameters(),
                                 **exchange)
        ddp.register_comm_hook(state, compression_hook)
        applied, grads = torch.zeros(EF_SHAPE), torch.zeros(EF_SHAPE)
        for step in range(steps):
            g = integer_gradient(rank, step)
            model.weight.grad = None
            ddp(g).backward()
            applied += model.weight.grad * nranks
            grads += g
        saved = state.state_dict()["state"]["weight"]
        out[case] = {"applied": applied, "grads": grads, "accumulator": saved["v" if name == "dgc" else "residual"]}
    return out
