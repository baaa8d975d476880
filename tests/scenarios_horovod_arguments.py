"""Real-rank runs for tests/test_distributed_horovod_arguments.py: Horovod's own optimizer and ours on
the same model and data, one launch for every case.

Each case trains a small model for a few steps through ``hvd.DistributedOptimizer``
(configuration "horovod") and through ``hvdcomp.DistributedOptimizer`` with
``Compression.none()`` ("none") and with a lossy compressor that touches every tensor
("topk": top-k 5 %, ``min_compress_numel=0``), and returns every rank's parameters.
With compression none on 2 ranks the two optimizers agree bit for bit: our averaging
divides by N before the sum and Horovod's after it, which for N = 2 is the same
arithmetic (halving is exact), and a sum of two values does not depend on its order.
"""
from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

from scenarios_identity import batch, fresh, params

CONFIGS = ("horovod", "none", "topk")
#: Horovod's resume recipe runs with every compressor too.
RECIPE_COMPRESSORS = ("fp16", "bf16", "adacomp", "terngrad", "dgc", "randomk", "onebit", "scalecom")
LR = 0.05
STEPS = 3


def _build(config: str, opt, model, **kwargs):
    import horovod.torch as hvd

    import hvdcomp

    named = kwargs.pop("named_parameters", model.named_parameters())
    if config == "horovod":
        return hvd.DistributedOptimizer(opt, named_parameters=named, **kwargs)
    if config == "none":
        extra = {"compression": hvdcomp.Compression.none()}
    elif config == "topk":
        extra = {"compression": hvdcomp.Compression.topk(ratio=0.05), "min_compress_numel": 0}
    else:  # any compressor by name, on every tensor
        params_ = {"ratio": 0.05} if config in ("randomk", "scalecom", "dgc") else {}
        extra = {"compression": hvdcomp.compression_from_name(config, **params_), "min_compress_numel": 0}
    extra.update(kwargs)
    return hvdcomp.DistributedOptimizer(opt, named_parameters=named, **extra)


def _train(model, opt, rank: int, steps: int, first: int = 0, passes: int = 1) -> None:
    for step in range(first, first + steps):
        opt.zero_grad()
        for p in range(passes):
            x, y = batch(rank, 10 * step + p)
            F.cross_entropy(model(x), y).backward()
        opt.step()


def _sgd(model, momentum: float = 0.9):
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=momentum)


# ---- the cases ------------------------------------------------------------------------------------

def plain(config: str, rank: int, **kwargs) -> dict:
    """STEPS steps of SGD with momentum; ``kwargs`` go to the optimizer wrapper."""
    model = fresh()
    opt = _build(config, _sgd(model), model, **kwargs)
    _train(model, opt, rank, STEPS)
    return params(model)


def positional(config: str, rank: int) -> dict:
    """Every Horovod argument given positionally, in Horovod's order."""
    import horovod.torch as hvd

    import hvdcomp

    model = fresh()
    comp = hvd.Compression.none if config == "horovod" else hvdcomp.Compression.none()
    cls = hvd.DistributedOptimizer if config == "horovod" else hvdcomp.DistributedOptimizer
    opt = cls(_sgd(model), model.named_parameters(), comp, 2, hvd.Average, 1.0, 0, None, False,
              hvd.global_process_set)
    _train(model, opt, rank, STEPS, passes=2)
    return params(model)


def accumulation_changed(config: str, rank: int) -> dict:
    """One step with one backward pass, then ``set_backward_passes_per_step(2)``."""
    model = fresh()
    opt = _build(config, _sgd(model), model)
    _train(model, opt, rank, 1)
    opt.set_backward_passes_per_step(2)
    _train(model, opt, rank, 2, first=1, passes=2)
    return params(model)


def horovod_fp16(config: str, rank: int) -> dict:
    """``compression=hvd.Compression.fp16``, Horovod's own compressor (configs horovod, none)."""
    import horovod.torch as hvd

    import hvdcomp

    model = fresh()
    cls = hvd.DistributedOptimizer if config == "horovod" else hvdcomp.DistributedOptimizer
    opt = cls(_sgd(model), named_parameters=model.named_parameters(), compression=hvd.Compression.fp16)
    _train(model, opt, rank, STEPS)
    return params(model)


def no_names(config: str) -> list:
    """``_parameter_names`` of an optimizer built without named_parameters (two groups)."""
    model = fresh()
    opt = torch.optim.SGD([{"params": model.conv.parameters()}, {"params": model.fc1.parameters()},
                           {"params": model.fc2.parameters()}], lr=LR)
    opt = _build(config, opt, model, named_parameters=None)
    return sorted(opt._parameter_names.values())


def checkpoint_recipe(config: str, rank: int) -> dict:
    """Horovod's resume recipe: STEPS steps, a checkpoint; then new models and optimizers on
    every rank (the others' initial weights differ), rank 0 alone loads the checkpoint,
    ``hvd.broadcast_parameters`` + ``hvd.broadcast_optimizer_state``, two more steps."""
    import horovod.torch as hvd

    model = fresh()
    opt = _build(config, _sgd(model), model)
    _train(model, opt, rank, STEPS)
    saved = {"model": copy.deepcopy(model.state_dict()), "opt": copy.deepcopy(opt.state_dict())}
    torch.manual_seed(100 + rank)
    model = type(model)()
    opt = _build(config, _sgd(model), model)
    start = time.perf_counter()
    if rank == 0:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    seconds = time.perf_counter() - start
    _train(model, opt, rank, 2, first=STEPS)
    out = {"params": params(model), "recipe_seconds": seconds}
    if config != "horovod":
        out["iterations"] = opt.compression_stats()["iterations"]
    return out


def process_set(config: str, rank: int) -> dict:
    """The optimizer restricted to a process set holding rank 0 only: rank 1 is outside it
    and trains on its own gradients."""
    import horovod.torch as hvd

    only_first = hvd.add_process_set([0])
    try:
        model = fresh()
        opt = _build(config, _sgd(model), model, process_set=only_first)
        _train(model, opt, rank, STEPS)
        hvd.broadcast_parameters([], root_rank=0)  # both ranks still reach global collectives
        return params(model)
    finally:
        hvd.remove_process_set(only_first)


class Embedder(nn.Module):
    """[B, 4] token ids -> sparse embedding (20 x 6) -> mean -> FC 6x3."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(20, 6, sparse=True)
        self.fc = nn.Linear(6, 3)

    def forward(self, ids):
        return self.fc(self.embedding(ids).mean(1))


def _tokens(rank: int, step: int):
    g = torch.Generator().manual_seed(31 * step + rank)
    return torch.randint(0, 10 + 10 * rank, (5, 4), generator=g)  # rank 1 also looks up tokens 10-19


def _embedder():
    torch.manual_seed(0)
    return Embedder()


def sparse(config: str, rank: int, sparse_as_dense: bool) -> dict:
    """SGD on a model with a sparse embedding; rank 1 looks up other tokens than rank 0."""
    model = _embedder()
    opt = _build(config, torch.optim.SGD(model.parameters(), lr=0.5), model, sparse_as_dense=sparse_as_dense)
    for step in range(STEPS):
        opt.zero_grad()
        model(_tokens(rank, step)).pow(2).sum().backward()
        opt.step()
    return params(model)


def _groups(kind: str, model) -> dict:
    if kind == "num_groups":
        return {"num_groups": 2}
    if kind == "count":
        return {"groups": 2}
    return {"groups": [[model.fc1.weight, model.fc2.weight], [model.conv.bias, model.fc1.bias]]}


def grouped(config: str, rank: int, kind: str) -> dict:
    """Explicit groups: ``num_groups=2`` (deprecated alias), ``groups=2``, or a list."""
    import warnings

    model = fresh()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        opt = _build(config, _sgd(model), model, **_groups(kind, model))
    _train(model, opt, rank, STEPS)
    return params(model)


# ---- the same runs on in-process ranks (config "topk") ----------------------------------------------

def _inprocess(models, make_opt, loss_of) -> list[dict]:
    import hvdcomp
    from hvdcomp.inprocess import World

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks
    try:
        world = World(2)
        comp = hvdcomp.Compression.topk(ratio=0.05)
        opts = [world.DistributedOptimizer(r, make_opt(m), named_parameters=m.named_parameters(), compression=comp,
                                           min_compress_numel=0, **extra)
                for r, (m, extra) in enumerate(models)]
        for step in range(STEPS):
            for r, ((m, _), opt) in enumerate(zip(models, opts)):
                opt.zero_grad()
                loss_of(m, r, step).backward()
            world.step()
        return [params(m) for m, _ in models]
    finally:
        torch.set_num_threads(threads)


def inprocess_sparse(sparse_as_dense: bool) -> list[dict]:
    """:func:`sparse` with config "topk" on 2 in-process ranks."""
    models = [(_embedder(), {"sparse_as_dense": sparse_as_dense}) for _ in range(2)]
    return _inprocess(models, lambda m: torch.optim.SGD(m.parameters(), lr=0.5),
                      lambda m, r, step: m(_tokens(r, step)).pow(2).sum())


def inprocess_grouped(kind: str) -> list[dict]:
    """:func:`grouped` with config "topk" on 2 in-process ranks (``num_groups`` is Horovod's
    alias of ``groups``: the in-process optimizer takes ``groups``)."""
    models = []
    for _ in range(2):
        m = fresh()
        extra = _groups(kind, m)
        models.append((m, {"groups": extra.get("groups", extra.get("num_groups"))}))

    def loss_of(m, r, step):
        x, y = batch(r, 10 * step)
        return F.cross_entropy(m(x), y)

    return _inprocess(models, _sgd, loss_of)


def parity_ranks() -> dict:
    """On every Horovod rank: {(case, config): result} for every case and configuration."""
    import horovod.torch as hvd

    hvd.init(process_sets="dynamic")
    torch.set_num_threads(1)
    rank = hvd.rank()
    out: dict = {}
    for config in CONFIGS:
        out[("plain", config)] = plain(config, rank)
        out[("sum", config)] = plain(config, rank, op=hvd.Sum)
        out[("predivide", config)] = plain(config, rank, gradient_predivide_factor=2.0)
        out[("positional", config)] = positional(config, rank) if config != "topk" else None
        out[("accumulation", config)] = accumulation_changed(config, rank)
        out[("fp16", config)] = horovod_fp16(config, rank) if config != "topk" else None
        out[("no_names", config)] = no_names(config)
        out[("checkpoint", config)] = checkpoint_recipe(config, rank)
        out[("process_set", config)] = process_set(config, rank)
        for dense in (False, True):
            out[(f"sparse_as_dense={dense}", config)] = sparse(config, rank, dense)
        for kind in ("num_groups", "count", "lists"):
            out[(f"groups:{kind}", config)] = grouped(config, rank, kind)
    for name in RECIPE_COMPRESSORS:
        out[("checkpoint", name)] = checkpoint_recipe(name, rank)
    return out
