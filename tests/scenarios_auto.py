"""Real-rank runs of ``Compression.auto()`` for tests/test_distributed_auto.py: the same
small model through Horovod's transport (``horovod.run``) and the DDP hook (spawned Gloo
ranks), a decision after two warm-up steps with the link measured through the transport."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from scenarios_identity import Net

MIN_NUMEL = 200
STEPS = 7


#: Steps of the trial runs: a decision at step 2, baseline 3, the switch at 4, trial 5, the
#: current choice back at 6, the second baseline 7, the verdict at 8, one step after it.
TRIAL_STEPS = 10


def auto(trial: bool):
    """The selector of these runs. A trial run tries every proposal for one step and fixes
    three candidates' costs (:func:`_propose_topk_that_steps_slower`); the others try for
    three, and have fp16 as a fourth candidate, so the link is probed with an fp16
    allreduce as well."""
    import hvdcomp

    candidates = ["none", "bf16", hvdcomp.Compression.topk(ratio=0.05)] + ([] if trial else ["fp16"])
    return hvdcomp.Compression.auto(candidates=candidates, warmup_steps=2, probe_bytes=1 << 16,
                                    trial_steps=1 if trial else 3)


def fixed_codecs(seconds: dict):
    """``choice.measure_codecs`` stand-in: candidate i of every compressed tensor costs
    ``seconds[i] = (local seconds, bytes moved by allgather)``, so a slow link makes moving
    bytes matter and a test knows what the model will choose."""
    from hvdcomp.core import choice

    def measure(table, candidates, router, step, seed=0):
        return {name: [choice.CodecTiming(seconds[i][0], (("allgather", seconds[i][1]),)) for i in range(len(candidates))]
                for name, slot in sorted(table.slots.items()) if slot.info.numel >= table.min_compress_numel}
    return measure


def _propose_topk_that_steps_slower(rank: int) -> None:
    """On this rank: the model proposes top-k for every tensor (its chain costs nothing,
    none's 0.2 s), and the steps say top-k is slower on rank 1 alone (1.5 s against 1 s;
    rank 0 times it at 0.5 s), so a verdict from anything but the slowest rank differs."""
    from hvdcomp.core import choice
    from hvdcomp.core.step import StepDriver

    def observed(self, since=0):
        topk = self.table.compression.candidates[2]
        if any(s.compressor is topk for s in self.table.slots.values()):
            return 1.5 if rank == 1 else 0.5
        return 1.0

    choice.measure_codecs = fixed_codecs({0: (0.2, 1e6), 1: (0.2, 5e5), 2: (0.0, 1e3)})
    StepDriver.observed_step_seconds = observed


def _batch(rank: int):
    g = torch.Generator().manual_seed(1000 * rank)
    return torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)


def _summary(model, stats) -> dict:
    return {"params": torch.cat([p.detach().reshape(-1) for p in model.parameters()]), "auto": stats["auto"],
            "iterations": stats["iterations"]}


def horovod_run(trial: bool = False) -> dict:
    """hvdcomp.DistributedOptimizer with auto on this Horovod rank; then a redecision (or,
    with ``trial``, a slower proposal tried and reverted)."""
    import horovod.torch as hvd

    import hvdcomp

    hvd.init()
    if trial:
        _propose_topk_that_steps_slower(hvd.rank())
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Net()
    opt = hvdcomp.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                       named_parameters=model.named_parameters(),
                                       compression=auto(trial), min_compress_numel=MIN_NUMEL)
    x, y = _batch(hvd.rank())
    out = {}
    for step in range(TRIAL_STEPS if trial else STEPS):
        if step == 5 and not trial:
            out["first"] = _summary(model, opt.compression_stats())
            opt.redecide_compression()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    out["last"] = _summary(model, opt.compression_stats())
    return out


def ddp_run(rank: int, nranks: int, trial: bool = False) -> dict:
    """The DDP hook with auto on this rank; then a redecision (or, with ``trial``, a slower
    proposal tried and reverted)."""
    from hvdcomp.ddp import CompressionState, compression_hook

    if trial:
        _propose_topk_that_steps_slower(rank)
    torch.manual_seed(0)
    model = Net()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    state = CompressionState(auto(trial), min_compress_numel=MIN_NUMEL,
                             named_parameters=model.named_parameters())
    ddp.register_comm_hook(state, compression_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    x, y = _batch(rank)
    out = {}
    for step in range(TRIAL_STEPS if trial else STEPS):
        if step == 5 and not trial:
            out["first"] = _summary(model, state.compression_stats())
            state.redecide_compression()
        opt.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        opt.step()
    out["last"] = _summary(model, state.compression_stats())
    return out
