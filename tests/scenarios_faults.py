"""Training runs with faults, for tests/test_faults.py (in-process) and
tests/test_distributed_faults.py (real Horovod and DDP ranks): one rank's gradient overflows
at one step under ``torch.amp.GradScaler``, and the run must continue exactly as a run in
which that step never happened."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from scenarios_identity import CONFIGS, LR, MIN_NUMEL, batch, fresh, horovod_optimizer, make, params

#: The step at which rank 1's gradient overflows.
BAD_STEP = 3
STEPS = BAD_STEP + 6


def loss_of(model, rank: int, step: int, poisoned: bool = False):
    """The loss of ``rank`` at ``step``; ``poisoned``: times inf (every gradient of that rank
    becomes non-finite, as when fp16 activations overflow)."""
    x, y = batch(rank, step)
    loss = F.cross_entropy(model(x), y)
    return loss * float("inf") if poisoned else loss


def schedule(skip_bad: bool) -> list[int]:
    """The data steps a run trains on: all of them, or all but the bad one."""
    return [s for s in range(STEPS) if not (skip_bad and s == BAD_STEP)]


def halve_scales(scalers) -> None:
    """What GradScaler does after an overflow (backoff factor 0.5), for the reference run
    without the bad step: the loss scale schedule is GradScaler's, the same in both runs
    (error-feedback state holds gradients in the scaled units they arrive in)."""
    for scaler in scalers:
        scaler.update(new_scale=scaler.get_scale() * 0.5)


def inprocess_amp(name: str, nranks: int, skip_bad: bool, transport: str = "horovod", bad_rank: int = 1):
    """Horovod's AMP recipe on in-process ranks. Returns (every rank's parameters, rank 0's
    stats, every rank's scale after the run, the state of rank 0 before/after the bad step)."""
    from hvdcomp.inprocess import World

    torch.set_num_threads(1)
    world = World(nranks, transport=transport)
    comp = make(name)
    models = [fresh() for _ in range(nranks)]
    opts = [world.DistributedOptimizer(r, torch.optim.SGD(m.parameters(), lr=LR, momentum=CONFIGS[name][1]),
                                       named_parameters=m.named_parameters(), compression=comp,
                                       min_compress_numel=MIN_NUMEL)
            for r, m in enumerate(models)]
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10) for _ in range(nranks)]
    around = {}
    for step in schedule(skip_bad):
        if skip_bad and step == BAD_STEP + 1:
            halve_scales(scalers)
        bad = step == BAD_STEP and not skip_bad
        if bad:
            around["before"] = opts[0].state_dict()["hvdcomp"]
        for r, (m, opt, scaler) in enumerate(zip(models, opts, scalers)):
            opt.zero_grad()
            scaler.scale(loss_of(m, r, step, bad and r == bad_rank)).backward()
        world.synchronize()
        for opt, scaler in zip(opts, scalers):
            scaler.unscale_(opt)
            with opt.skip_synchronize():
                scaler.step(opt)
            scaler.update()
        if bad:
            around["after"] = opts[0].state_dict()["hvdcomp"]
            around["grads_finite"] = [all(torch.isfinite(p.grad).all() for p in m.parameters()) for m in models]
    return [params(m) for m in models], opts[0].compression_stats(), [s.get_scale() for s in scalers], around


# ---- real ranks ------------------------------------------------------------------------------------

def _amp_loop(model, opt, rank, scaler, sync_first: bool, bad_rank: int):
    for step in schedule(False):
        bad = step == BAD_STEP
        opt.zero_grad()
        scaler.scale(loss_of(model, rank, step, bad and rank == bad_rank)).backward()
        if sync_first:  # Horovod's recipe
            opt.synchronize()
            scaler.unscale_(opt)
            with opt.skip_synchronize():
                scaler.step(opt)
        else:  # DDP: the hook has averaged the gradients during backward()
            scaler.step(opt)
        scaler.update()


def _resume_behind(make_opt, model_of, rank: int) -> str | None:
    """Four steps with checkpoints after steps 3 and 4; every rank resumes, rank 1 from the
    older checkpoint: the next step must raise ValueError on every rank before any gradient
    travels. Returns the message (or None)."""
    model = fresh()
    opt = make_opt(model)
    run = model_of(model)
    saved = []
    for step in range(4):
        opt.zero_grad()
        loss_of(run, rank, step).backward()
        opt.step()
        saved.append(opt_state(opt))
    opt.load_state_dict(saved[-2] if rank == 1 else saved[-1])
    try:
        opt.zero_grad()
        loss_of(run, rank, 4).backward()
        opt.step()
    except ValueError as err:
        return str(err)
    return None


def opt_state(opt):
    import copy

    return copy.deepcopy(opt.state_dict())


def horovod_faults(names: list, bad_rank: int):
    """On every Horovod rank: each compressor's parameters after the AMP run with an overflow
    on ``bad_rank`` at BAD_STEP (Horovod's recipe), its stats, and the resume check."""
    import horovod.torch as hvd

    import hvdcomp

    hvd.init()
    torch.set_num_threads(1)
    out = {}
    for name in names:
        model = fresh()
        opt = horovod_optimizer(name, model)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        _amp_loop(model, opt, hvd.rank(), scaler, True, bad_rank)
        out[name] = {"params": params(model), "stats": opt.compression_stats(), "scale": scaler.get_scale()}

    def make_opt(model):
        return hvdcomp.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=LR),
                                            named_parameters=model.named_parameters(),
                                            compression=make("randomk"), min_compress_numel=MIN_NUMEL)

    out["resume"] = _resume_behind(make_opt, lambda m: m, hvd.rank())
    return out


class _DDPWithState:
    """The DDP model and its hook state as one optimizer-like object for _resume_behind."""

    def __init__(self, ddp, opt, state):
        self.ddp, self.opt, self.state = ddp, opt, state

    def zero_grad(self):
        self.opt.zero_grad()

    def step(self):
        self.opt.step()

    def state_dict(self):
        return self.state.state_dict()

    def load_state_dict(self, saved):
        self.state.load_state_dict(saved)


def ddp_faults(rank: int, nranks: int, names: list, bad_rank: int):
    """On every torch.distributed rank: as :func:`horovod_faults`, through the DDP hook and
    GradScaler."""
    from torch import nn

    from hvdcomp.ddp import CompressionState, compression_hook

    out = {}
    for name in names:
        model = fresh()
        ddp = nn.parallel.DistributedDataParallel(model)
        state = CompressionState(make(name), min_compress_numel=MIN_NUMEL, named_parameters=model.named_parameters())
        ddp.register_comm_hook(state, compression_hook)
        opt = torch.optim.SGD(ddp.parameters(), lr=LR, momentum=CONFIGS[name][1])
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        _amp_loop(ddp, opt, rank, scaler, False, bad_rank)
        out[name] = {"params": params(model), "stats": state.compression_stats(), "scale": scaler.get_scale()}

    holder = {}

    def make_opt(model):
        ddp = nn.parallel.DistributedDataParallel(model)
        state = CompressionState(make("randomk"), min_compress_numel=MIN_NUMEL,
                                 named_parameters=model.named_parameters())
        ddp.register_comm_hook(state, compression_hook)
        holder["ddp"] = ddp
        return _DDPWithState(ddp, torch.optim.SGD(ddp.parameters(), lr=LR), state)

    out["resume"] = _resume_behind(make_opt, lambda m: holder["ddp"], rank)
    return out
