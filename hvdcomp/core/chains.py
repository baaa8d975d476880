"""The step protocol: one generator per chain of slots that travel the same way.

Each chain does the local work of a step for its slots and yields the collectives it needs
(:mod:`hvdcomp.core.requests`); its return value (``StopIteration.value``) is a
:class:`ChainResult`: every slot's averaged gradient and the traffic it caused.

==================  ======================================================================
chain               phases (one ``yield`` each)
==================  ======================================================================
``dense``           encode_dense -> payloads concatenated per dtype, linear float payloads
                    divided by N first -> **allreduce** -> decode_dense
``index``           propose -> **broadcast** of the leaders' indices (one per leader) ->
                    encode_dense -> **allreduce** -> decode_dense (ScaleCom)
``allgather``       [**max-allreduce** of shared scales] -> encode -> **allgather** of the
                    int64 payload sizes (read to the host once per chain) -> pack ->
                    **allgather** of the payloads -> decode_sum per tensor -> / N
``compressed_       [**max-allreduce** of shared scales] -> encode_chunked -> **alltoall**
allreduce``         of the chunks -> local sum + re-encode -> **allgather** -> decode -> / N
``sparse_           select (top-k / DGC, :mod:`hvdcomp.core.sparse_allreduce`) ->
allreduce``         **alltoall** of the counts per region owner -> **alltoall** of the
                    entries -> owners' sums, k kept in all -> **allgather** -> / N
``sparse``          **allgather** of the nnz counts -> **allgather** of the COO indices and
                    values -> one sparse tensor of them all -> / N (Horovod's sparse
                    allreduce, uncompressed: a sparse gradient is already sparse)
==================  ======================================================================

Every chain also carries the step's non-finite flag in one of those collectives and
snapshots its slots' state first (:mod:`hvdcomp.core.faults`): a NaN or inf on any rank
drops the step everywhere instead of crashing or poisoning the state.

Nothing here communicates or depends on a transport, so every transport runs exactly the
same arithmetic in the same order; the in-process transport is bit-identical to real ranks
because of it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Generator, Sequence

import torch

from .. import kernels, wire
from .compressed_allreduce import CompressedAllreduce
from .sparse_allreduce import SparseAllreduce, quota
from ..compressor import SharedScale
from .traffic import TensorTraffic, allgather_traffic, allreduce_traffic
from .faults import found_in_sum, mark_in_payload, nonfinite_flag, snapshot
from .requests import Allgather, AllgatherV, Allreduce, Alltoall, Broadcast
from .slots import Slot, take_carry

Tensor = torch.Tensor
Chain = Generator[list, list, "ChainResult"]


@dataclasses.dataclass(frozen=True)
class Averaging:
    """How the sum over ``nranks`` ranks becomes the applied gradient.

    average: divide by N (``op=Average``, DDP) or not (``op=Sum``). predivide: Horovod's
    ``gradient_predivide_factor`` f: linear floating payloads are divided by f before the
    sum and multiplied by f / N after it; f = 1 divides by N before the sum (as DDP and
    torch's hooks do, which keeps fp16 sums of many ranks in range). Payloads that are not
    linear in the gradient (packed, integer) are summed as they are and divided by N after
    decoding.
    """

    nranks: int
    average: bool = True
    predivide: float = 1.0

    def prescales(self, linear: bool, dtype: torch.dtype) -> bool:
        """Whether a payload of this kind is divided before the sum."""
        return self.average and self.nranks > 1 and linear and dtype.is_floating_point

    def before_sum(self, part: Tensor) -> None:
        part.div_(self.nranks if self.predivide == 1.0 else self.predivide)

    def after_sum(self, total: Tensor, prescaled: bool) -> Tensor:
        if not self.average:
            return total
        if prescaled:
            return total if self.predivide == 1.0 else total * (self.predivide / self.nranks)
        return total / self.nranks

    def after_decode(self, total: Tensor) -> Tensor:
        """``after_sum(total, False)`` in place, for a decoded sum that nothing else holds
        (a fresh tensor per step: a second one, of the gradient's size, would cost every
        page's first touch again)."""
        return total.div_(self.nranks) if self.average else total


@dataclasses.dataclass(frozen=True)
class StepContext:
    """What a chain knows of the step: this rank, the number of ranks, the step counter,
    the averaging rule, and the dtypes the transport's allreduce can sum (None: all; other
    dense payloads travel as fp32)."""

    rank: int
    size: int
    step: int
    averaging: Averaging
    allreduce_dtypes: frozenset | None = None


@dataclasses.dataclass
class ChainResult:
    """outputs: ``(slot, averaged gradient)`` pairs (fp32 of the slot's shape); traffic: one
    record per slot; overhead: bytes that belong to no tensor (scale max-allreduce, payload
    size exchange); nonfinite: bool [] (on the device), whether some rank's gradient of the
    chain was non-finite; snapshots: the slots' state before the step (see
    :mod:`hvdcomp.core.faults`)."""

    outputs: list
    traffic: list
    overhead: list
    nonfinite: Tensor
    snapshots: list


def record(slot: Slot, payload: int, sent: float, received: float, transport: str) -> TensorTraffic:
    info = slot.info
    return TensorTraffic(name=slot.name, numel=info.numel, dense_bytes=info.numel * info.dtype.itemsize,
                         payload_bytes=payload, sent_bytes=sent, received_bytes=received, transport=transport,
                         compressor=slot.compressor.name,
                         selected=slot.compressor.selected_count(payload, info) if payload else 0,
                         shape=tuple(info.shape))


def overhead(label: str, what: str, sent: float, received: float) -> TensorTraffic:
    return TensorTraffic(name=f"[{label} {what}]", numel=0, dense_bytes=0, payload_bytes=0, sent_bytes=sent,
                         received_bytes=received, transport=what, compressor="-")


# ---- dense payloads ------------------------------------------------------------------------------

def _flats_by_dtype(ctx: StepContext, slots: Sequence[Slot], payloads: Sequence[Tensor]) -> list:
    """Payloads concatenated per wire dtype: ``[(flat, [(j, offset, payload, prescaled)])]``,
    prescaled entries already divided (see :class:`Averaging`)."""
    groups: dict[torch.dtype, list] = {}
    for j, payload in enumerate(payloads):
        if ctx.allreduce_dtypes is not None and payload.dtype not in ctx.allreduce_dtypes:
            payload = payload.to(torch.float32)
        groups.setdefault(payload.dtype, []).append((j, payload))
    out = []
    for dtype, items in groups.items():
        # One payload travels as itself (a view, divided in place: it is not read again).
        flat = items[0][1].reshape(-1) if len(items) == 1 else torch.cat([p.reshape(-1) for _, p in items])
        entries, pos = [], 0
        for j, p in items:
            prescaled = ctx.averaging.prescales(slots[j].compressor.linear, dtype)
            if prescaled:
                ctx.averaging.before_sum(flat[pos:pos + p.numel()])
            entries.append((j, pos, p, prescaled))
            pos += p.numel()
        out.append((flat, entries))
    return out


def _mark_dense(flats: list, flag: Tensor) -> list:
    """Carry the non-finite flag in the first floating payload (or in a 1-element one)."""
    floating = [flat for flat, _ in flats if flat.dtype.is_floating_point]
    if floating:
        mark_in_payload(floating[0], flag)
        return []
    return [Allreduce(flag.to(torch.float32).reshape(1))]


def _found_dense(flats: list, sums: list) -> Tensor:
    for (flat, _), summed in zip(flats, sums):
        if flat.dtype.is_floating_point:
            return found_in_sum(summed)
    return sums[-1].reshape(()) > 0


def _decode_dense(ctx: StepContext, slots, contexts, flats, sums, extra: dict, saved: list) -> ChainResult:
    outputs, traffic = [None] * len(slots), [None] * len(slots)
    for (_, entries), summed in zip(flats, sums):
        for j, off, p, prescaled in entries:
            slot = slots[j]
            total = slot.compressor.decode_dense(summed[off:off + p.numel()].view(p.shape), contexts[j], slot.state,
                                                 slot.info)
            outputs[j] = (slot, ctx.averaging.after_sum(total, prescaled).reshape(slot.info.shape))
            nbytes = p.numel() * p.element_size()
            sent, received = allreduce_traffic(nbytes, ctx.size)
            more = extra.get(j, 0)
            if more and ctx.size > 1:  # broadcast indices: every rank receives them once and forwards once
                sent, received = sent + more, received + more
            traffic[j] = record(slot, nbytes + more, sent, received, "allreduce+broadcast" if more else "allreduce")
    return ChainResult(outputs, traffic, [], _found_dense(flats, sums), saved)


def dense_chain(ctx: StepContext, slots: Sequence[Slot], grads: Sequence[Tensor], label: str) -> Chain:
    """encode_dense -> one sum-allreduce per payload dtype -> decode_dense."""
    flag, saved = nonfinite_flag(grads), snapshot(slots)
    grads = take_carry(slots, grads)
    encoded = [s.compressor.encode_dense(g, s.state, s.info, ctx.step) for s, g in zip(slots, grads)]
    flats = _flats_by_dtype(ctx, slots, [p for p, _ in encoded])
    sums = yield [Allreduce(flat) for flat, _ in flats] + _mark_dense(flats, flag)
    return _decode_dense(ctx, slots, [c for _, c in encoded], flats, sums, {}, saved)


def index_chain(ctx: StepContext, slots: Sequence[Slot], grads: Sequence[Tensor], label: str) -> Chain:
    """propose -> broadcast of each leader's indices -> encode_dense -> allreduce -> decode."""
    flag, saved = nonfinite_flag(grads), snapshot(slots)
    grads = take_carry(slots, grads)
    by_leader: dict[int, list] = {}
    for j, (s, g) in enumerate(zip(slots, grads)):
        idx = s.compressor.propose(g, s.state, s.info, ctx.step)
        by_leader.setdefault(int(s.compressor.leader(s.info, ctx.step)), []).append((j, idx))
    groups = sorted(by_leader.items())  # one broadcast per leader, in rank order on every rank
    received = yield [Broadcast(torch.cat([idx.reshape(-1) for _, idx in items]), leader) for leader, items in groups]
    extra = {}
    for (_, items), flat in zip(groups, received):
        pos = 0
        for j, idx in items:
            slots[j].state["indices"] = flat[pos:pos + idx.numel()]
            extra[j] = 4 * idx.numel()
            pos += idx.numel()
    encoded = [s.compressor.encode_dense(g, s.state, s.info, ctx.step) for s, g in zip(slots, grads)]
    flats = _flats_by_dtype(ctx, slots, [p for p, _ in encoded])
    sums = yield [Allreduce(flat) for flat, _ in flats] + _mark_dense(flats, flag)
    return _decode_dense(ctx, slots, [c for _, c in encoded], flats, sums, extra, saved)


# ---- packed payloads ----------------------------------------------------------------------------

def decode_packed(compressors: Sequence, per_rank: Sequence[Sequence[Tensor]], states: Sequence[dict],
                  infos: Sequence) -> list[Tensor]:
    """Dense fp32 sum over the ranks of each tensor's payloads (``per_rank[r][j]``: rank r's
    uint8 payload of tensor j): one ``decode_sum`` (one kernel launch) per tensor for all N."""
    return [c.decode_sum([payloads[j] for payloads in per_rank], s, i)
            for j, (c, s, i) in enumerate(zip(compressors, states, infos))]


def _share_scales(ctx: StepContext, slots: Sequence[Slot], grads: Sequence[Tensor], label: str, extra: list):
    """Max-allreduce of the local scales of the slots whose compressor is a SharedScale."""
    scaled = [j for j, s in enumerate(slots) if isinstance(s.compressor, SharedScale)]
    if not scaled:
        return
    local = torch.cat([slots[j].compressor.local_scale(grads[j], slots[j].info).reshape(1).to(torch.float32)
                       for j in scaled])
    (shared,) = yield [Allreduce(local, op="max")]
    for i, j in enumerate(scaled):
        slots[j].state["shared_scale"] = shared[i:i + 1]
    extra.append(overhead(label, "scale max-allreduce", *allreduce_traffic(4 * len(scaled), ctx.size)))


def allgather_chain(ctx: StepContext, slots: Sequence[Slot], grads: Sequence[Tensor], label: str) -> Chain:
    """[scales] -> encode -> sizes allgather -> pack -> payload allgather -> decode_sum / N."""
    extra: list = []
    flag, saved = nonfinite_flag(grads), snapshot(slots)
    grads = take_carry(slots, grads)
    yield from _share_scales(ctx, slots, grads, label, extra)
    encoded = [s.compressor.encode(g, s.state, s.info, ctx.step) for s, g in zip(slots, grads)]
    # The sizes travel with the rank's non-finite flag as one more int64.
    sizes = torch.cat([e.nbytes.reshape(1).to(torch.int64) for e in encoded] + [flag.to(torch.int64).reshape(1)])
    (gathered,) = yield [Allgather(sizes)]
    rows = gathered.view(ctx.size, len(slots) + 1).tolist()  # the chain's one device-to-host read
    dropped = any(row[-1] for row in rows)
    # A dropped step sends nothing (a selection over NaN has no meaningful size).
    all_sizes = [[0] * len(slots) if dropped else row[:-1] for row in rows]
    layouts = [wire.concat_offsets(row) for row in all_sizes]
    offsets, total = layouts[ctx.rank]
    buffer = torch.zeros(total, dtype=torch.uint8, device=sizes.device)
    if not dropped:
        for e, off, n in zip(encoded, offsets, all_sizes[ctx.rank]):
            e.pack(buffer[off:off + n])
    (parts,) = yield [AllgatherV(buffer, [t for _, t in layouts])]
    outputs, traffic = [], []
    if dropped:
        totals = [torch.full(s.info.shape, float("nan"), device=buffer.device) for s in slots]
    else:
        per_rank = [[part[o:o + n] for o, n in zip(offs, row)]
                    for part, (offs, _), row in zip(parts, layouts, all_sizes)]
        totals = decode_packed([s.compressor for s in slots], per_rank, [s.state for s in slots],
                               [s.info for s in slots])
    for j, (s, t) in enumerate(zip(slots, totals)):
        outputs.append((s, ctx.averaging.after_decode(t).reshape(s.info.shape)))
        column = [row[j] for row in all_sizes]
        traffic.append(record(s, column[ctx.rank], *allgather_traffic(column[ctx.rank], column, ctx.rank), "allgather"))
    size_bytes = 8 * (len(slots) + 1) * (ctx.size - 1)
    extra.append(overhead(label, "payload sizes", size_bytes, size_bytes))
    return ChainResult(outputs, traffic, extra, torch.tensor(dropped, device=buffer.device), saved)


def compressed_allreduce_chain(ctx: StepContext, slots: Sequence[Slot], grads: Sequence[Tensor],
                               label: str) -> Chain:
    """[scales] -> encode_chunked -> alltoall -> sum + re-encode -> allgather -> decode / N."""
    extra: list = []
    flag, saved = nonfinite_flag(grads), snapshot(slots)
    grads = take_carry(slots, grads)
    yield from _share_scales(ctx, slots, grads, label, extra)
    car = CompressedAllreduce([s.compressor for s in slots], [s.state for s in slots], [s.info for s in slots],
                              ctx.rank, ctx.size)
    send, splits = car.encode_and_split(grads, ctx.step)
    # One more byte to every rank: this rank's non-finite flag.
    byte = flag.to(torch.uint8).reshape(1)
    send = torch.cat([piece for part in torch.split(send, splits) for piece in (part, byte)])
    per = car.chunk_nbytes()
    (received,) = yield [Alltoall(send, [n + 1 for n in splits], [per + 1] * ctx.size)]
    blocks = received.view(ctx.size, per + 1)
    found = (blocks[:, per] != 0).any()  # bool []
    mine = car.reduce_chunks(blocks[:, :per].reshape(-1))
    (parts,) = yield [AllgatherV(mine, [car.sum_nbytes(c) for c in range(ctx.size)])]
    sums, moved = car.decode_gathered(torch.cat(parts))
    outputs = [(s, ctx.averaging.after_decode(t).reshape(s.info.shape)) for s, t in zip(slots, sums)]
    traffic = [record(s, m["payload_bytes"], m["sent_bytes"], m["received_bytes"], "compressed_allreduce")
               for s, m in zip(slots, moved)]
    extra.append(overhead(label, "non-finite flags", ctx.size - 1, ctx.size - 1))
    return ChainResult(outputs, traffic, extra, found, saved)


def sparse_allreduce_chain(ctx: StepContext, slots: Sequence[Slot], grads: Sequence[Tensor], label: str) -> Chain:
    """select -> alltoall of counts -> alltoall of entries -> owners' sums, k kept ->
    allgather -> commit / N (:mod:`hvdcomp.core.sparse_allreduce`)."""
    flag, saved = nonfinite_flag(grads), snapshot(slots)
    grads = take_carry(slots, grads)
    sar = SparseAllreduce([s.compressor for s in slots], [s.state for s in slots], [s.info for s in slots], grads,
                          ctx.rank, ctx.size, ctx.step)
    (counts,) = yield [Alltoall(sar.count_message(flag), [len(slots) + 1] * ctx.size, [len(slots) + 1] * ctx.size)]
    dropped = sar.read_counts(counts)
    words, send, recv = sar.entries_message(dropped)
    (received,) = yield [Alltoall(words, send, recv)]
    lengths = sar.lengths(dropped)
    mine = sar.owner_message(received) if not dropped else received[:0]
    (parts,) = yield [AllgatherV(mine, lengths)]
    if dropped:
        totals = [torch.full((s.info.numel,), float("nan"), device=flag.device) for s in slots]
    else:
        totals = sar.decode(parts)
        sar.commit()
    outputs, traffic = [], []
    for t, (s, total) in enumerate(zip(slots, totals)):
        outputs.append((s, ctx.averaging.after_sum(total, False).reshape(s.info.shape)))
        own = quota(sar.targets[t], ctx.size, ctx.rank)
        sent = 8 * sum(n for c, n in enumerate(sar.sent[t]) if c != ctx.rank) + (ctx.size - 1) * (8 * own + 4)
        received_bytes = 8 * sum(row[t] for r, row in enumerate(sar.received) if r != ctx.rank) + sum(
            8 * quota(sar.targets[t], ctx.size, j) + 4 for j in range(ctx.size) if j != ctx.rank)
        payload = 0 if dropped else 8 * sum(sar.sent[t])
        traffic.append(record(s, payload, sent, received_bytes, "sparse_allreduce"))
    count_bytes = 8 * (len(slots) + 1) * (ctx.size - 1)
    extra = [overhead(label, "sparse allreduce counts", count_bytes, count_bytes)]
    return ChainResult(outputs, traffic, extra, torch.tensor(dropped, device=flag.device), saved)


# ---- sparse gradients ----------------------------------------------------------------------------

def sparse_chain(ctx: StepContext, slots: Sequence[Slot], grads: Sequence[Tensor], label: str) -> Chain:
    """One sparse COO gradient (``nn.Embedding(sparse=True)``), sent as Horovod's
    ``sparse_allreduce_async`` sends it: every rank's indices (``[nnz, ndim]`` row-major)
    and values (``[nnz, *dense dims]``) gathered and concatenated in rank order, the result
    an uncoalesced sparse tensor of the parameter's shape whose values are divided by N when
    averaging. The nnz counts travel first (with the non-finite flag) so that every rank
    knows every length."""
    (slot,), (grad,) = slots, grads
    if not grad.is_sparse:  # no gradient on this rank this step (zeros were made for it)
        grad = grad.to_sparse()
    indices, values = grad._indices().t().contiguous(), grad._values()
    flag = ~torch.isfinite(values).all()
    mine = torch.stack([torch.tensor(indices.shape[0], device=values.device), flag.to(torch.int64)])
    (gathered,) = yield [Allgather(mine)]
    rows = gathered.view(ctx.size, 2).tolist()
    ndim, row = indices.shape[1], math.prod(values.shape[1:])
    idx_parts, val_parts = yield [AllgatherV(indices.reshape(-1), [n * ndim for n, _ in rows]),
                                  AllgatherV(values.reshape(-1), [n * row for n, _ in rows])]
    all_idx = torch.cat(idx_parts).view(-1, ndim).t()
    all_val = torch.cat(val_parts).view(-1, *values.shape[1:])
    if ctx.averaging.average:
        all_val = all_val / ctx.size
    total = torch.sparse_coo_tensor(all_idx, all_val, grad.shape, check_invariants=True)
    nnz = [n for n, _ in rows]
    own = nnz[ctx.rank] * (ndim * indices.element_size() + row * values.element_size())
    per_rank = [n * (ndim * indices.element_size() + row * values.element_size()) for n in nnz]
    sent, received = allgather_traffic(own, per_rank, ctx.rank)
    info = slot.info
    traffic = TensorTraffic(name=slot.name, numel=info.numel, dense_bytes=info.numel * info.dtype.itemsize,
                            payload_bytes=own, sent_bytes=sent, received_bytes=received, transport="sparse allgather",
                            compressor="sparse", selected=nnz[ctx.rank], shape=tuple(info.shape))
    extra = [overhead(label, "sparse nnz", 16 * (ctx.size - 1), 16 * (ctx.size - 1))]
    found = torch.tensor(any(f for _, f in rows), device=values.device)
    return ChainResult([(slot, total)], [traffic], extra, found, [])


@dataclasses.dataclass(frozen=True)
class ChainKind:
    """A kind of chain: its name (part of every collective's key), its generator, and how
    many phases (yields) it has for members served by ``compressors``, which the DDP
    transport reserves up front (:mod:`hvdcomp.ddp.phase_groups`). The counts are checked
    against the generators by the tests. scopes: the scope of each phase's requests
    (:data:`~hvdcomp.core.requests.SCOPES`), when not every phase is ``"world"``
    (hierarchical chains, :mod:`hvdcomp.core.hierarchy`)."""

    name: str
    run: Callable[..., Chain]
    phases: Callable[[Sequence], int]
    scopes: Callable[[Sequence], tuple] | None = None

    def phase_scopes(self, compressors: Sequence) -> tuple:
        """The scope of every phase, in order (``len == phases(compressors)``)."""
        if self.scopes is None:
            return ("world",) * self.phases(compressors)
        return tuple(self.scopes(compressors))

    def __repr__(self) -> str:
        return f"ChainKind({self.name})"


def _scale_phase(compressors: Sequence) -> int:
    return int(any(isinstance(c, SharedScale) for c in compressors))


DENSE = ChainKind("dense", dense_chain, lambda compressors: 1)
INDEX = ChainKind("index", index_chain, lambda compressors: 2)
ALLGATHER = ChainKind("allgather", allgather_chain, lambda compressors: 2 + _scale_phase(compressors))
COMPRESSED_ALLREDUCE = ChainKind("compressed_allreduce", compressed_allreduce_chain,
                                 lambda compressors: 2 + _scale_phase(compressors))
SPARSE_ALLREDUCE = ChainKind("sparse_allreduce", sparse_allreduce_chain, lambda compressors: 3)
SPARSE = ChainKind("sparse", sparse_chain, lambda compressors: 2)
#: Every kind by name, in the order a group of slots starts its chains on every rank.
CHAINS = {kind.name: kind for kind in (DENSE, INDEX, ALLGATHER, COMPRESSED_ALLREDUCE, SPARSE_ALLREDUCE, SPARSE)}
#: The kinds that carry packed payloads (grouped into buckets).
PACKED = (ALLGATHER, COMPRESSED_ALLREDUCE, SPARSE_ALLREDUCE)


class ChainRun:
    """A chain being driven by a transport: the requests of its current phase, then its
    result. ``advance()`` starts it (local work up to the first collective), ``advance(results)``
    hands in the current phase's results; both return True while requests are pending."""

    def __init__(self, chain: Chain, key):
        self.chain, self.key = chain, key
        self.requests: list | None = None
        self.result: ChainResult | None = None
        self.phase = -1
        self.state: object = None  # the transport's bookkeeping for the pending phase

    @property
    def done(self) -> bool:
        return self.result is not None

    def advance(self, results: list | None = None) -> bool:
        try:
            with kernels.one_mode():  # one read of HVDCOMP_KERNELS for the phase's tensors
                self.requests = next(self.chain) if self.phase < 0 else self.chain.send(results)
        except StopIteration as stop:
            self.requests, self.result = None, stop.value
        self.phase += 1
        return self.requests is not None
