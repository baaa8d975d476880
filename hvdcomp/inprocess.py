"""In-process ranks: N simulated data-parallel ranks in one process, for tests, benchmarks
and long convergence studies, with no launcher and no sockets::

    world = hvdcomp.inprocess.World(nranks=4)
    opts = [world.DistributedOptimizer(r, torch.optim.SGD(models[r].parameters(), lr=0.1),
                                       named_parameters=models[r].named_parameters(),
                                       compression=hvdcomp.Compression.topk(ratio=0.01))
            for r in range(4)]
    for step in range(steps):
        for r in range(4):
            opts[r].zero_grad()
            loss_fn(models[r], batches[r]).backward()
        world.step()  # every rank's exchange, then every optimizer's step()

It is the third transport of the step protocol in :mod:`hvdcomp.core` (beside Horovod and
``torch.distributed``): every rank runs the same chains as on real ranks, in lockstep, and
the collectives are computed here. Broadcasts, gathers and alltoalls are copies; maxima and
integer sums are exact; floating sums follow **Gloo's ring allreduce order** (below), which
torch's ``ProcessGroupGloo`` and Horovod's Gloo operations both use. So the parameters are
bit-identical to a real run on N Gloo ranks of :class:`hvdcomp.DistributedOptimizer`
(with ``HOROVOD_FUSION_THRESHOLD=0``: tensor fusion changes which elements are summed
together) or, with ``transport="ddp"``, of the DDP hook whose buckets are given in
``buckets`` (default: one bucket holding every parameter, what DDP builds for a model of
less than 1 MiB of parameters). The tests prove it on 2 and 3 real ranks.

Gloo's ring order (measured on torch 2.13 and Horovod 0.28.1, fp32 and fp16): a tensor of
n elements is cut into 2N chunks of ``c = ceil(n / 2N)`` elements; rank k owns elements
``[2kc, 2(k+1)c)``, whose sum is accumulated around the ring starting at rank k-1:
``((x[k-1] + x[k-2]) + ...) + x[k]``.

Each rank's optimizer is the wrapped optimizer's class with the compression mixed in, as
with :func:`hvdcomp.DistributedOptimizer`; gradients are read from ``p.grad`` when the world
synchronizes, so accumulating several backward passes needs nothing more.
"""
from __future__ import annotations

import math
import time
from typing import Iterable, Sequence

import torch

from .compressor import Compressor
from .core import requests as rq
from .core.chains import ChainRun
from .core.hierarchy import Topology
from .core.options import DEFAULT_BUCKET_CAP_MB, DEFAULT_MIN_COMPRESS_NUMEL, ExchangeOptions, check_exchange
from .core.wrapped_optimizer import CompressingOptimizer, chain_label, wrapper_class
from .optimizer import HOROVOD_ALLREDUCE_DTYPES
from .recipes import reapply_after_load, recipe_for
from .registry import with_defaults

Tensor = torch.Tensor
#: The transports whose chains the in-process ranks run (``World(transport=...)``).
TRANSPORTS = ("horovod", "ddp")


def ring_allreduce_sum(tensors: Sequence[Tensor]) -> Tensor:
    """The sum of N equal-shaped tensors in Gloo's ring order (see the module docstring).

    tensors: one per rank, any shape and dtype (all the same). Returns a new tensor of that
    shape and dtype, bit-identical to what every rank of a Gloo allreduce receives.
    """
    n_ranks = len(tensors)
    flat = [t.reshape(-1) for t in tensors]
    if n_ranks == 1:
        return tensors[0].clone()
    n = flat[0].numel()
    chunk = math.ceil(n / (2 * n_ranks))
    out = torch.empty_like(flat[0])
    for k in range(n_ranks):
        lo, hi = min(n, 2 * k * chunk), min(n, 2 * (k + 1) * chunk)
        if lo >= hi:
            continue
        acc = flat[(k - 1) % n_ranks][lo:hi].clone()
        for i in range(2, n_ranks + 1):
            acc = acc + flat[(k - i) % n_ranks][lo:hi]
        out[lo:hi] = acc
    return out.view(tensors[0].shape)


def run_collectives(per_rank: Sequence[Sequence], topology: Topology | None = None) -> list[list]:
    """The results every rank receives for one phase: ``per_rank[r]`` is rank r's list of
    requests (:mod:`hvdcomp.core.requests`); returns ``results[r][j]``. A request addressed to
    the ``"local"`` or ``"cross"`` scope runs within each group of ``topology`` (nodes of
    consecutive ranks; any rank's Topology describes them). Mismatched requests (another kind,
    op, shape, root or scope on some rank) raise ``RuntimeError``, where real ranks would hang
    or exchange garbage."""
    n = len(per_rank)
    count = len(per_rank[0])
    if any(len(reqs) != count for reqs in per_rank):
        raise RuntimeError(f"hvdcomp.inprocess: the ranks issue {[len(r) for r in per_rank]} collectives")
    out: list[list] = [[None] * count for _ in range(n)]
    for j in range(count):
        scope = per_rank[0][j].scope
        if any(per_rank[r][j].scope != scope for r in range(n)):
            raise RuntimeError(f"hvdcomp.inprocess: collective {j} addresses different scopes on the ranks")
        if scope != "world" and topology is None:
            raise RuntimeError(f"hvdcomp.inprocess: a {scope!r} collective needs World(nranks, nodes=...)")
        for group in [list(range(n))] if scope == "world" else topology.groups(scope):
            results = _one_collective(j, [per_rank[r][j] for r in group])
            for position, r in enumerate(group):
                out[r][j] = results[position]
    return out


def _one_collective(j: int, reqs: list) -> list:
    """Every member's result of one collective among ``reqs`` (one request per member, in
    position order)."""
    n = len(reqs)
    first = reqs[0]
    if any(type(q) is not type(first) for q in reqs):
        raise RuntimeError(f"hvdcomp.inprocess: collective {j} differs between ranks: "
                           f"{[type(q).__name__ for q in reqs]}")
    if isinstance(first, rq.Allreduce):
        if any(q.op != first.op or q.tensor.shape != first.tensor.shape or q.tensor.dtype != first.tensor.dtype
               for q in reqs):
            raise RuntimeError("hvdcomp.inprocess: allreduce of different ops, shapes or dtypes")
        tensors = [q.tensor for q in reqs]
        total = ring_allreduce_sum(tensors) if first.op == "sum" else torch.stack(tensors).amax(0)
        results = [total.clone() for _ in range(n)]
    elif isinstance(first, rq.Broadcast):
        if any(q.root != first.root or q.tensor.shape != first.tensor.shape for q in reqs):
            raise RuntimeError("hvdcomp.inprocess: broadcast with different roots or shapes")
        results = [reqs[first.root].tensor.clone() for _ in range(n)]
    elif isinstance(first, rq.Allgather):
        if any(q.tensor.numel() != first.tensor.numel() for q in reqs):
            raise RuntimeError("hvdcomp.inprocess: allgather of different lengths")
        gathered = torch.cat([q.tensor.reshape(-1) for q in reqs])
        results = [gathered.clone() for _ in range(n)]
    elif isinstance(first, rq.AllgatherV):
        if any(list(q.lengths) != [r.tensor.numel() for r in reqs] for q in reqs):
            raise RuntimeError("hvdcomp.inprocess: allgather lengths do not match the ranks' tensors")
        parts = [q.tensor.reshape(-1).clone() for q in reqs]
        results = [list(parts) for _ in range(n)]  # read-only views: decoders never write them
    elif isinstance(first, rq.Alltoall):
        starts = [[sum(q.send_splits[:r]) for r in range(n)] for q in reqs]
        results = []
        for r in range(n):
            pieces = [reqs[s].tensor[starts[s][r]:starts[s][r] + reqs[s].send_splits[r]] for s in range(n)]
            if [p.numel() for p in pieces] != list(reqs[r].recv_splits):
                raise RuntimeError("hvdcomp.inprocess: alltoall splits do not match")
            results.append(torch.cat(pieces))
    else:
        raise TypeError(f"hvdcomp.inprocess: unknown collective request {type(first).__name__}")
    return results


class _InProcessRank(CompressingOptimizer):
    """Methods of the class built by :meth:`World.DistributedOptimizer` (do not use directly)."""

    def __init__(self, params, world: "World", rank: int, named_parameters, options: ExchangeOptions):
        super(self.__class__, self).__init__(params)
        self._world = world
        self._setup_compression(named_parameters, options, rank, world.nranks,
                                settings={"op": "average" if options.average else "sum", "transport": world.transport},
                                allreduce_dtypes=HOROVOD_ALLREDUCE_DTYPES if world.transport == "horovod" else None,
                                who="hvdcomp.inprocess", after_load=reapply_after_load,
                                topology=world.topology(rank) if options.hierarchical else None)

    def _world_plan(self) -> list[tuple]:
        """The chains of a step: Horovod's (per slot and packed bucket), or one set per DDP bucket."""
        if self._world.transport == "horovod":
            return self._chain_plan()
        plan = []
        for i, names in enumerate(self._world.buckets or [sorted(self._table.slots)]):
            slots = sorted((self._table.slots[n] for n in names if n in self._table.slots), key=lambda s: s.info.index)
            plan += [(("ddp", i, kind.name), kind, [slots[j] for j in members])
                     for kind, members in self._router.chains(slots)]
        return plan

    def synchronize(self) -> None:
        """Exchange every rank's gradients (all ranks of the world at once)."""
        if not self._synchronized:
            self._world.synchronize()

    def step(self, closure=None):
        if not self._synchronized:
            self._world.synchronize()
        return self._local_step(closure)


class World:
    """N in-process ranks (see the module docstring).

    nranks: the number of simulated ranks (>= 1). transport: whose chains the ranks run,
    "horovod" (those of :class:`hvdcomp.DistributedOptimizer`: one per dense tensor and packed
    bucket; dense payloads Horovod cannot sum travel as fp32) or "ddp" (those of the DDP
    hook, one set per DDP bucket). buckets: with "ddp", DDP's buckets as lists of parameter
    names (default: one bucket of every parameter). nodes: the number of nodes the ranks
    are spread over, ``nranks / nodes`` consecutive ranks each (None: no nodes); needed by
    ``hierarchical=True`` (:mod:`hvdcomp.core.hierarchy`), whose ``"local"`` and
    ``"cross"`` collectives then run within each node and across nodes.
    """

    def __init__(self, nranks: int, transport: str = "horovod", buckets: Sequence[Sequence[str]] | None = None,
                 nodes: int | None = None):
        if isinstance(nranks, bool) or not isinstance(nranks, int) or nranks < 1:
            raise ValueError(f"nranks must be an integer >= 1, got {nranks!r}")
        if nodes is not None and (isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1
                                  or nranks % nodes):
            raise ValueError(f"nodes must be an integer >= 1 dividing nranks = {nranks}, got {nodes!r}")
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
        if buckets is not None and transport != "ddp":
            raise ValueError("buckets describe DDP's buckets: pass transport='ddp' with them")
        self.nranks = nranks
        self.transport = transport
        self.buckets = None if buckets is None else [list(b) for b in buckets]
        self.nodes = nodes
        self.ranks: list = [None] * nranks

    def topology(self, rank: int) -> Topology:
        """Rank ``rank``'s place among the nodes (ValueError when the world has none)."""
        if self.nodes is None:
            raise ValueError("hierarchical exchange needs nodes: World(nranks, nodes=M)")
        return Topology.of(self.nranks, self.nranks // self.nodes, rank)

    def DistributedOptimizer(self, rank: int, optimizer: torch.optim.Optimizer,
                             named_parameters: Iterable | None = None, compression: Compressor | None = None,
                             backward_passes_per_step: int = 1, op: str = "average",
                             gradient_predivide_factor: float = 1.0, *,
                             min_compress_numel: int = DEFAULT_MIN_COMPRESS_NUMEL,
                             small_compression: Compressor | None = None,
                             bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB, collective: str = "auto",
                             groups=None, sparse_as_dense: bool = False, hierarchical: bool | int = False):
        """Rank ``rank``'s optimizer: arguments as :func:`hvdcomp.DistributedOptimizer`, with
        ``op`` "average" or "sum" (Horovod's constants need Horovod). One compressor instance
        may serve every rank. ``backward_passes_per_step`` is accepted for the same
        signature: gradients are read when the world synchronizes, however many backward
        passes made them. ``hierarchical``: True (or the world's ranks per node) exchanges
        through the world's nodes (``World(nranks, nodes=M)``)."""
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.nranks:
            raise ValueError(f"rank must be an integer in [0, {self.nranks}), got {rank!r}")
        if self.ranks[rank] is not None:
            raise ValueError(f"rank {rank} has an optimizer already")
        if op not in ("average", "sum"):
            raise ValueError(f"op must be 'average' or 'sum', got {op!r}")
        options = check_exchange(*with_defaults(compression, small_compression),
                                 min_compress_numel=min_compress_numel, collective=collective,
                                 bucket_cap_mb=bucket_cap_mb, average=op == "average",
                                 predivide=gradient_predivide_factor,
                                 backward_passes_per_step=backward_passes_per_step, groups=groups,
                                 sparse_as_dense=sparse_as_dense, hierarchical=hierarchical)
        if options.hierarchical is not False:
            per_node = self.topology(rank).local_size
            if options.hierarchical not in (True, per_node):
                raise ValueError(f"hierarchical={options.hierarchical!r} ranks per node, but the world's nodes hold "
                                 f"{per_node}")
        options, base = recipe_for(optimizer, options)
        cls = wrapper_class(base, _InProcessRank, __name__)
        opt = cls(optimizer.param_groups, self, rank, named_parameters, options)
        self.ranks[rank] = opt
        if all(r is not None for r in self.ranks):
            self._check_settings()
        return opt

    def _check_settings(self) -> None:
        records = [opt._driver.settings_record(opt._described_parameters()) for opt in self.ranks]
        self.ranks[0]._driver.check_records(records)

    def synchronize(self, observe=None) -> None:
        """Run one step's exchange for every rank and write the averaged gradients.

        observe: optional ``observe(key, phase, requests)`` called before every phase's
        collectives with the chain's key and every rank's requests (benchmarks record the
        other ranks' payloads with it)."""
        missing = [r for r, opt in enumerate(self.ranks) if opt is None]
        if missing:
            raise RuntimeError(f"hvdcomp.inprocess: ranks {missing} have no optimizer yet")
        if any(opt._driver.check_step for opt in self.ranks):
            everyone = [opt._driver.step_record() for opt in self.ranks]
            for opt in self.ranks:
                opt._driver.agree_on_step(everyone)
        if any(opt._driver.decision_due() for opt in self.ranks):
            self._decide()
        for opt in self.ranks:
            opt._switch_phases()
        for opt in self.ranks:
            for name in opt._params:
                opt._note_sparse(name)
        plans = [opt._world_plan() for opt in self.ranks]
        results: list[list] = [[] for _ in self.ranks]
        for i, (key, _, _) in enumerate(plans[0]):
            runs = []
            for opt, plan in zip(self.ranks, plans):
                _, kind, slots = plan[i]
                grads = [opt._gradient(s.name) for s in slots]
                runs.append(ChainRun(kind.run(opt._context(), slots, grads, chain_label(key)), key))
            active = [run.advance() for run in runs]
            while any(active):
                if not all(active):
                    raise RuntimeError(f"hvdcomp.inprocess: chain {key} ended on some ranks only")
                if observe is not None:
                    observe(key, runs[0].phase, [run.requests for run in runs])
                outcomes = run_collectives([run.requests for run in runs],
                                           None if self.nodes is None else self.topology(0))
                active = [run.advance(o) for run, o in zip(runs, outcomes)]
            for r, run in enumerate(runs):
                results[r].append(run.result)
        for opt, res in zip(self.ranks, results):
            opt._apply(res)

    def _decide(self) -> None:
        """``Compression.auto()``'s decision on every rank: each rank measures its candidates;
        the link is the selector's ``link`` (in-process ranks have none of their own: without
        one, transfers are free)."""
        started = time.perf_counter()
        everyone = [opt._driver.measure_for_decision(None) for opt in self.ranks]
        for opt in self.ranks:
            opt._driver.decide(everyone, started)
            opt._decided()

    def step(self, closure=None) -> None:
        """:meth:`synchronize`, then every rank's ``optimizer.step(closure)``."""
        self.synchronize()
        for opt in self.ranks:
            opt.step(closure)
