"""Runs of the frozen-v Adam recipe (hvdcomp.FrozenAdamW) for tests/test_adam.py (in-process
ranks and hand-computed references) and tests/test_distributed_adam.py (real Horovod Gloo
ranks): the same model, batches and optimizer settings everywhere.

The model embeds 4 tokens drawn from the first ``USED_TOKENS`` of ``VOCAB``: the embedding
rows of the other tokens get an exactly zero gradient at every step (the coordinates the
recipe's live mask must keep still).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, USED_TOKENS, WIDTH = 32, 24, 16
MIN_NUMEL = 200  # the embedding (512) and both FC weights compressed, the biases exact
LR, BETAS, WD = 0.01, (0.9, 0.99), 0.01


class Net(nn.Module):
    """tokens [B, 4] -> embedding 32x16 -> FC 64x32 -> tanh -> FC 32x10."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, WIDTH)
        self.fc1 = nn.Linear(4 * WIDTH, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, tokens):
        return self.fc2(torch.tanh(self.fc1(self.emb(tokens).flatten(1))))


def fresh() -> Net:
    torch.manual_seed(0)
    return Net()


def batch(rank: int, step: int, n: int = 8):
    g = torch.Generator().manual_seed(7919 * step + 104729 * rank)
    return torch.randint(0, USED_TOKENS, (n, 4), generator=g), torch.randint(0, 10, (n,), generator=g)


def loss_of(model, rank: int, step: int, poisoned: bool = False):
    x, y = batch(rank, step)
    loss = F.cross_entropy(model(x), y)
    return loss * float("inf") if poisoned else loss


def params(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def adamw(model, warmup_steps="plain", **kw):
    """torch.optim.AdamW (``warmup_steps="plain"``) or hvdcomp.FrozenAdamW with that warm-up."""
    import hvdcomp

    settings = {"lr": LR, "betas": BETAS, "weight_decay": WD, **kw}
    if warmup_steps == "plain":
        return torch.optim.AdamW(model.parameters(), **settings)
    return hvdcomp.FrozenAdamW(model.parameters(), warmup_steps=warmup_steps, **settings)


def grad_scaler():
    """A CPU GradScaler whose scale stays 2^10 (a power of two: scaling is exact)."""
    return torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=10 ** 6)


def compressor(name: str):
    import hvdcomp

    settings = {"topk": {"ratio": 0.05}, "randomk": {"ratio": 0.05}, "dgc": {"ratio": 0.05, "warmup_steps": 0},
                "scalecom": {"ratio": 0.05}}.get(name, {})
    return hvdcomp.compression_from_name(name, **settings)


# ---- in-process ranks --------------------------------------------------------------------------

def inprocess_world(name: str, nranks: int, warmup_steps="plain", collective: str = "auto", transport="horovod",
                    nodes: int | None = None, **kw):
    """(models, optimizers, world) of ``nranks`` in-process ranks; ``nodes``: that many nodes
    and the hierarchical exchange."""
    import hvdcomp

    models = [fresh() for _ in range(nranks)]
    world = hvdcomp.inprocess.World(nranks, transport=transport, nodes=nodes)
    opts = [world.DistributedOptimizer(r, adamw(models[r], warmup_steps, **kw),
                                       named_parameters=models[r].named_parameters(), compression=compressor(name),
                                       min_compress_numel=MIN_NUMEL, collective=collective,
                                       hierarchical=nodes is not None)
            for r in range(nranks)]
    return models, opts, world


def train(models, opts, world, steps, poisoned=frozenset()):
    """``steps``: the data steps to train on; poisoned: (rank, step) pairs whose loss is inf."""
    for step in steps:
        for r, (model, opt) in enumerate(zip(models, opts)):
            opt.zero_grad()
            loss_of(model, r, step, (r, step) in poisoned).backward()
        world.step()


def one_thread(fn):
    """``fn`` run with one intra-op thread, as the real ranks run (the same reduction order in
    the backward pass, so the same local gradients bit for bit)."""
    def run(*args, **kwargs):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return run


@one_thread
def inprocess(name: str, nranks: int, steps: int, warmup_steps="plain", collective: str = "auto",
              transport: str = "horovod", poisoned=frozenset(), nodes: int | None = None) -> list[dict]:
    """Every rank's parameters after ``steps`` steps on in-process ranks."""
    models, opts, world = inprocess_world(name, nranks, warmup_steps, collective, transport, nodes)
    train(models, opts, world, range(steps), poisoned)
    return [params(m) for m in models]


# ---- references computed by hand ----------------------------------------------------------------

def rank_gradients(model, nranks: int, step: int) -> list[dict]:
    """Each rank's gradients at ``step``, from ``model``'s current parameters."""
    out = []
    for r in range(nranks):
        model.zero_grad()
        loss_of(model, r, step).backward()
        out.append({n: p.grad.clone() for n, p in model.named_parameters()})
    return out


@one_thread
def reference_adamw(nranks: int, steps: int, frozen_from: int | None = None) -> dict:
    """torch.optim.AdamW on the plain average of the ranks' gradients for the first
    ``frozen_from`` steps (all when None), then v frozen by hand: m <- b1 m + (1 - b1) mean(g),
    masked where v = 0, theta <- theta (1 - lr wd) - lr / (1 - b1^s) m / (sqrt(v / (1 - b2^k)) + eps)."""
    model = fresh()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WD)
    b1, b2 = BETAS
    for step in range(steps):
        grads = rank_gradients(model, nranks, step)
        if frozen_from is None or step < frozen_from:
            for n, p in model.named_parameters():
                p.grad = sum(g[n] for g in grads) / nranks
            opt.step()
            continue
        with torch.no_grad():
            for n, p in model.named_parameters():
                state = opt.state[p]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                mean = sum(g[n] for g in grads) / nranks
                m.mul_(b1).add_((1 - b1) * mean).mul_((v > 0).to(m.dtype))
                s = step + 1
                p.mul_(1 - LR * WD)
                p.sub_(LR / (1 - b1 ** s) * m / ((v / (1 - b2 ** frozen_from)).sqrt() + 1e-8))
    return params(model)


# ---- real Horovod ranks -------------------------------------------------------------------------

def horovod_ranks(runs: list, steps: int) -> dict:
    """On every Horovod rank: {(name, warmup, collective): parameters after ``steps`` steps},
    and "bad_warmup": the ValueError's text for FrozenAdamW groups with warmup_steps = -1."""
    import horovod.torch as hvd

    import hvdcomp

    hvd.init()
    torch.set_num_threads(1)
    rank = hvd.rank()
    out = {}
    for name, warmup, collective in runs:
        model = fresh()
        opt = hvdcomp.DistributedOptimizer(adamw(model, warmup), named_parameters=model.named_parameters(),
                                           compression=compressor(name), min_compress_numel=MIN_NUMEL,
                                           collective=collective)
        for step in range(steps):
            opt.zero_grad()
            loss_of(model, rank, step).backward()
            opt.step()
        out[(name, warmup, collective)] = params(model)
    # Horovod's start-of-training recipe with the wrapped FrozenAdamW (its warmup_steps is a
    # group option that hvd.broadcast_optimizer_state carries too).
    model = fresh()
    opt = hvdcomp.DistributedOptimizer(adamw(model, 2), named_parameters=model.named_parameters(),
                                       compression=compressor("onebit"), min_compress_numel=MIN_NUMEL)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    for step in range(5):
        opt.zero_grad()
        loss_of(model, rank, step).backward()
        opt.step()
    out["broadcast"] = {"params": params(model), "warmup_steps": opt.param_groups[0]["warmup_steps"]}
    # Horovod's AMP recipe with a loss scale that stays put (a power of two: exact).
    model = fresh()
    opt = hvdcomp.DistributedOptimizer(adamw(model, 4), named_parameters=model.named_parameters(),
                                       compression=compressor("onebit"), min_compress_numel=MIN_NUMEL)
    scaler = grad_scaler()
    opt.use_grad_scaler(scaler)
    for step in range(steps):
        opt.zero_grad()
        scaler.scale(loss_of(model, rank, step)).backward()
        opt.synchronize()
        scaler.unscale_(opt)
        with opt.skip_synchronize():
            scaler.step(opt)
        scaler.update()
    out["grad_scaler"] = params(model)
    model = fresh()
    plain = adamw(model)
    plain.param_groups[0]["warmup_steps"] = -1
    try:
        hvdcomp.DistributedOptimizer(plain, named_parameters=model.named_parameters(),
                                     compression=compressor("onebit"))
        out["bad_warmup"] = None
    except ValueError as err:
        out["bad_warmup"] = str(err)
    # Every rank is still in step: one more collective completes on both.
    out["after"] = float(hvd.allreduce(torch.ones(1), name="adam.after", op=hvd.Sum))
    return out


# ---- real torch.distributed ranks: the DDP hook with FrozenAdamW --------------------------------------

def _ddp_run(rank: int, name: str, warmup, collective: str):
    """(model, DDP model, FrozenAdamW, CompressionState), the hook registered."""
    from hvdcomp.ddp import CompressionState, compression_hook

    model = fresh()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = adamw(model, warmup)
    state = CompressionState(compressor(name), min_compress_numel=MIN_NUMEL, collective=collective,
                             named_parameters=model.named_parameters(), optimizer=opt)
    ddp.register_comm_hook(state, compression_hook)
    return model, ddp, opt, state


def _ddp_train(rank, ddp, opt, steps, poisoned=frozenset(), scaler=None):
    for step in steps:
        opt.zero_grad()
        loss = loss_of(ddp, rank, step, (rank, step) in poisoned)
        if scaler is None:
            loss.backward()
            opt.step()
            continue
        scaler.scale(loss).backward()  # DDP's AMP recipe: scaler.step unscales (here: the step does)
        scaler.step(opt)
        scaler.update()


def ddp_ranks(rank: int, nranks: int, runs: list, steps: int, poisoned: frozenset, resume: tuple):
    """On every DDP rank: {run: parameters after ``steps`` steps} for each (name, warmup,
    collective) of ``runs``; "poisoned": onebit with the ``poisoned`` (rank, step) losses inf;
    "resumed": ``resume`` = (name, warmup, stop) trained to ``stop``, checkpointed (model,
    optimizer, hook state), rebuilt, loaded and trained on to ``steps``."""
    torch.set_num_threads(1)
    out = {}
    for run in runs:
        model, ddp, opt, _ = _ddp_run(rank, *run)
        _ddp_train(rank, ddp, opt, range(steps))
        out[run] = params(model)
    model, ddp, opt, state = _ddp_run(rank, "onebit", 4, "auto")
    _ddp_train(rank, ddp, opt, range(steps), poisoned)
    out["poisoned"] = {"params": params(model), "dropped": state.dropped_steps}
    model, ddp, opt, state = _ddp_run(rank, "onebit", 4, "auto")
    scaler = grad_scaler()
    opt.use_grad_scaler(scaler)
    _ddp_train(rank, ddp, opt, range(steps), scaler=scaler)
    out["grad_scaler"] = params(model)
    name, warmup, stop = resume
    model, ddp, opt, state = _ddp_run(rank, name, warmup, "auto")
    _ddp_train(rank, ddp, opt, range(stop))
    saved = params(model), opt.state_dict(), state.state_dict()
    model, ddp, opt, state = _ddp_run(rank, name, warmup, "auto")
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(saved[0][n])
    opt.load_state_dict(saved[1])
    state.load_state_dict(saved[2])
    _ddp_train(rank, ddp, opt, range(stop, steps))
    out["resumed"] = params(model)
    return out
