"""Hierarchical exchange: a dense reduce-scatter inside each node, the compressor on each
rank's shard across nodes, a dense allgather inside the node.

With M nodes of G ranks (N = M G), a flat exchange compresses every rank's gradient for
every other rank, so each node's link carries what G ranks send. Here the G ranks of a node
first sum their gradients densely over the node's fast interconnect, each rank owning one
shard (1/G) of every tensor; then each rank compresses *its shard of the node's sum* and
exchanges it only with the ranks that own the same shard on the other nodes (its "cross"
group of M ranks), through any chain kind (:mod:`hvdcomp.core.chains`); finally the node's
ranks allgather their decoded shards. Each rank's inter-node payload is that of a tensor G
times smaller exchanged among M instead of N ranks: for an allgather of payload S, the
node's link carries ``(M-1) S`` instead of ``(N-1) S``. Horovod's own hierarchical allreduce
splits the same way, uncompressed; DGC's authors (Lin et al., "Deep Gradient Compression",
ICLR 2018) recommend the same split for multi-GPU nodes.

=========  ===========  ===================================================================
phase      scope        what travels
=========  ===========  ===================================================================
1          ``local``    **alltoall**: shard c of every tensor (and this rank's non-finite
                        flag) to local rank c: a reduce-scatter whose sum is taken here, in
                        local-rank order, so every transport adds in the same order
2 .. p+1   ``cross``    the inner chain on the shards (p phases: its own collectives)
p+2        ``local``    **allgather** of the decoded, averaged shards (fp32)
=========  ===========  ===================================================================

Error feedback lives on the shard each rank owns: a slot's state is created for its shard
(:func:`shard_info`, via :meth:`HierarchicalRouter.state_info`), so residuals, momenta and
checkpoints are per shard (a checkpoint holds G times less per rank and records
``ranks_per_node``). Tensors are padded with zeros to a multiple of G elements so that all
shards have the same length. Sparse gradients (``nn.Embedding(sparse=True)``) keep
travelling flat. A non-finite gradient on any rank reaches its node's ranks with the
alltoall, is marked in the shard sums (element 0 NaN), so the inner chain drops the step
across nodes, and every rank of every node learns it.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import torch

from ..compressor import Compressor, TensorInfo
from .chains import Averaging, Chain, ChainKind, ChainResult, StepContext
from .faults import nonfinite_flag
from .plan import Router
from .requests import Allgather, Alltoall
from .slots import Slot

Tensor = torch.Tensor


@dataclasses.dataclass(frozen=True)
class Topology:
    """One rank's place among M = ``cross_size`` nodes of G = ``local_size`` ranks each,
    ranks numbered node by node: world rank r is local rank ``r % G`` of node ``r // G``."""

    local_size: int
    cross_size: int
    rank: int

    def __post_init__(self):
        for field, value in (("local_size", self.local_size), ("cross_size", self.cross_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field} must be an integer >= 1, got {value!r}")
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} outside 0..{self.size - 1}")

    @classmethod
    def of(cls, size: int, ranks_per_node: int, rank: int) -> "Topology":
        """Nodes of ``ranks_per_node`` consecutive ranks (ValueError unless it divides size)."""
        if isinstance(ranks_per_node, bool) or not isinstance(ranks_per_node, int) or ranks_per_node < 1 \
                or size % ranks_per_node:
            raise ValueError(f"ranks per node must be an integer >= 1 dividing the {size} ranks, "
                             f"got {ranks_per_node!r}")
        return cls(ranks_per_node, size // ranks_per_node, rank)

    @property
    def size(self) -> int:
        return self.local_size * self.cross_size

    @property
    def local_rank(self) -> int:
        return self.rank % self.local_size

    @property
    def cross_rank(self) -> int:
        return self.rank // self.local_size

    def group(self, scope: str, rank: int | None = None) -> list[int]:
        """World ranks of the ``scope`` group holding ``rank`` (default: this rank), in
        position order."""
        rank = self.rank if rank is None else rank
        g = self.local_size
        if scope == "local":
            return list(range(rank // g * g, rank // g * g + g))
        if scope == "cross":
            return list(range(rank % g, self.size, g))
        if scope == "world":
            return list(range(self.size))
        raise ValueError(f"unknown scope {scope!r}")

    def groups(self, scope: str) -> list[list[int]]:
        """Every group of ``scope``, each in position order (the partition of the ranks)."""
        firsts = {"world": [0], "local": range(0, self.size, self.local_size), "cross": range(self.local_size)}
        return [self.group(scope, r) for r in firsts[scope]]

    def describe(self) -> dict:
        """What must match on every rank and in a checkpoint."""
        return {"ranks_per_node": self.local_size, "nodes": self.cross_size}


def shard_length(numel: int, local_size: int) -> int:
    """Elements of each of the G equal shards of a tensor of ``numel`` (zero-padded)."""
    return max(1, math.ceil(numel / local_size))


def shard_info(info: TensorInfo, topology: Topology) -> TensorInfo:
    """The TensorInfo the compressor sees for this rank's shard of ``info``'s tensor.

    Shape: the shard's length followed by ones, keeping the tensor's number of dimensions
    (shape-based choices such as AdaComp's conv/FC bin sizes follow the parameter). index:
    ``info.index * G + local rank`` (distinct per shard: RNG streams, ScaleCom's leaders).
    rank/size: the position in the cross group and the number of nodes."""
    length = shard_length(info.numel, topology.local_size)
    shape = (length,) + (1,) * max(0, len(info.shape) - 1)
    return TensorInfo(name=info.name, shape=torch.Size(shape), dtype=info.dtype, device=info.device,
                      index=info.index * topology.local_size + topology.local_rank, rank=topology.cross_rank,
                      size=topology.cross_size)


def in_scope(chain: Chain, scope: str) -> Chain:
    """``chain`` with every request it yields addressed to ``scope``; returns its result."""
    try:
        requests = next(chain)
        while True:
            results = yield [dataclasses.replace(r, scope=scope) for r in requests]
            requests = chain.send(results)
    except StopIteration as stop:
        return stop.value


def _wire_dtype(ctx: StepContext, slots: Sequence[Slot]) -> torch.dtype:
    # The local hop carries the gradients' dtype when they share one the transport moves,
    # else fp32 (the sum itself is always taken in fp32).
    dtypes = {s.info.dtype for s in slots}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    if not dtype.is_floating_point or (ctx.allreduce_dtypes is not None and dtype not in ctx.allreduce_dtypes):
        return torch.float32
    return dtype


def hierarchical_chain(inner: ChainKind, topology: Topology, ctx: StepContext, slots: Sequence[Slot],
                       grads: Sequence[Tensor], label: str) -> Chain:
    """alltoall (local reduce-scatter) -> ``inner`` across nodes on the shards -> local allgather."""
    if ctx.size != topology.size or ctx.rank != topology.rank:
        raise RuntimeError(f"hvdcomp: hierarchical chain of rank {topology.rank} of {topology.size} run as rank "
                           f"{ctx.rank} of {ctx.size}")
    g = topology.local_size
    lengths = [shard_length(s.info.numel, g) for s in slots]
    per = sum(lengths)
    wire = _wire_dtype(ctx, slots)
    flag = nonfinite_flag(grads)
    rows = []  # [G, length] per slot: row c is shard c
    for s, grad, length in zip(slots, grads, lengths):
        flat = grad.reshape(-1).to(wire)
        rows.append(torch.nn.functional.pad(flat, (0, length * g - flat.numel())).view(g, length))
    rows.append(flag.to(wire).reshape(1, 1).expand(g, 1))
    send = torch.cat(rows, dim=1).reshape(-1)
    (received,) = yield [Alltoall(send, [per + 1] * g, [per + 1] * g, scope="local")]
    blocks = received.view(g, per + 1)
    total = blocks[0, :per].to(torch.float32)
    for c in range(1, g):  # the node's sum, in local-rank order on every transport
        total = total + blocks[c, :per].to(torch.float32)
    node_flag = (blocks[:, per] != 0).any()
    shards, shard_slots, pos = [], [], 0
    for s, length in zip(slots, lengths):
        info = shard_info(s.info, topology)
        part = total[pos:pos + length].clone()
        part[:1] = torch.where(node_flag, torch.full_like(part[:1], float("nan")), part[:1])
        shards.append(part.to(s.info.dtype).view(info.shape))
        shard_slots.append(Slot(s.name, info, s.compressor, s.state, s.persistent))
        pos += length
    # The inner chain divides by N (all ranks' gradients are in its sums), once.
    inner_ctx = StepContext(topology.cross_rank, topology.cross_size, ctx.step,
                            Averaging(topology.size, ctx.averaging.average), ctx.allreduce_dtypes)
    result: ChainResult = yield from in_scope(inner.run(inner_ctx, shard_slots, shards, label), "cross")
    by_slot = {id(shard): out for shard, out in result.outputs}
    mine = torch.cat([by_slot[id(shard)].reshape(-1).to(torch.float32) for shard in shard_slots])
    (gathered,) = yield [Allgather(mine, scope="local")]
    gathered = gathered.view(g, per)
    outputs, pos = [], 0
    for s, length in zip(slots, lengths):
        outputs.append((s, gathered[:, pos:pos + length].reshape(-1)[:s.info.numel].reshape(s.info.shape)))
        pos += length
    return ChainResult(outputs, _traffic(slots, lengths, wire, g, result.traffic), result.overhead,
                       result.nonfinite, result.snapshots)


def _traffic(slots, lengths, wire: torch.dtype, g: int, inner: list) -> list:
    """Per-slot records: the inner chain's (cross-node) plus the local alltoall and allgather."""
    out = []
    for s, length, record in zip(slots, lengths, inner):
        local = (g - 1) * length * (wire.itemsize + 4)  # alltoall out (wire dtype) + allgather (fp32)
        out.append(dataclasses.replace(record, numel=s.info.numel, dense_bytes=s.info.numel * s.info.dtype.itemsize,
                                       sent_bytes=record.sent_bytes + local, received_bytes=record.received_bytes + local,
                                       transport=f"hierarchical {record.transport}", shape=tuple(s.info.shape)))
    return out


def hierarchical_kind(inner: ChainKind, topology: Topology) -> ChainKind:
    """``inner`` run across nodes on shards, between a local reduce-scatter and allgather."""
    return ChainKind(f"hierarchical_{inner.name}", functools.partial(hierarchical_chain, inner, topology),
                     lambda compressors: inner.phases(compressors) + 2,
                     lambda compressors: ("local",) + ("cross",) * inner.phases(compressors) + ("local",))


class HierarchicalRouter(Router):
    """A :class:`~hvdcomp.core.plan.Router` whose chains are hierarchical: the inner kind of a
    compressor is the flat router's choice for M = ``topology.cross_size`` ranks (the
    collective that carries it across nodes), and slot state is created per shard."""

    def __init__(self, compressors: Sequence[Compressor], requested: str, topology: Topology):
        super().__init__(compressors, requested, topology.cross_size)
        self.topology = topology
        self._kinds: dict[str, ChainKind] = {}

    def _wrap(self, kind: ChainKind) -> ChainKind:
        if kind.name not in self._kinds:
            self._kinds[kind.name] = hierarchical_kind(kind, self.topology)
        return self._kinds[kind.name]

    def kind(self, comp: Compressor) -> ChainKind:
        return self._wrap(self.base_kind(comp))

    def chains(self, slots: Sequence[Slot]) -> list[tuple[ChainKind, list[int]]]:
        return [(self._wrap(kind), members) for kind, members in super().chains(slots)]

    def state_info(self, info: TensorInfo) -> TensorInfo:
        return shard_info(info, self.topology)

    def describe(self) -> dict:
        return self.topology.describe()
