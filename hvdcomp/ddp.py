"""PyTorch DDP front end: a communication hook that sends every gradient through an hvdcomp
compressor, with torch's own ``ddp_comm_hooks`` conventions (a state object, a pure hook)::

    state = hvdcomp.ddp.CompressionState(hvdcomp.Compression.adacomp(),
                                         named_parameters=model.named_parameters())
    ddp_model.register_comm_hook(state, hvdcomp.ddp.compression_hook)

The compression core is the one :class:`hvdcomp.DistributedOptimizer` uses (compressor
classes, kernels, wire format, :class:`~hvdcomp.collectives.CompressedAllreduce`'s chunk
steps, :class:`~hvdcomp.telemetry.TrafficLog`); only the collectives differ
(``torch.distributed`` instead of Horovod).

How a bucket travels
--------------------
DDP hands the hook a flat bucket (``bucket.buffer()``, dtype of the gradients) and views of
each parameter's gradient in it (``bucket.gradients()``). The hook compresses **per
parameter**, as the Horovod front end does, so AdaComp picks conv/FC bin sizes and ratios
apply per tensor; tensors with fewer than ``min_compress_numel`` elements use
``small_compression`` (default: uncompressed). Inside a bucket the parameters are grouped by
how their payload travels, each group a *chain* of collectives:

=========================  ==========================================================
dense (none, fp16,         encode_dense -> payloads of one dtype concatenated, divided by N
random-k)                  (as DDP and torch's hooks do) -> one ``all_reduce``
index broadcast (ScaleCom) propose -> ``broadcast`` of the indices (one per leader rank)
                           -> encode_dense -> ``all_reduce`` of the values
packed, allgather          [``all_reduce(MAX)`` of TernGrad scales] -> encode ->
(AdaComp, DGC, top-k,      ``all_gather`` of the int64 payload sizes -> pack, pad to the
1-bit, TernGrad, bf16)     largest rank's buffer -> ``all_gather`` of the uint8 buffers ->
                           ``decode_sum`` per tensor, / N
compressed allreduce       [scales] -> encode_chunked -> ``all_to_all_single`` of the
(bf16, TernGrad; see       chunks -> local sum + re-encode -> ``all_gather`` (padded) ->
``choose_collective``)     decode, / N
=========================  ==========================================================

Asynchrony and ordering
-----------------------
The hook never waits: it launches the first collective of each chain with
``async_op=True`` and returns a manually completed ``torch.futures.Future`` that is set
when the chains' last callbacks have written the averaged bucket, so DDP keeps overlapping
communication with the backward pass. Later collectives are launched from ``.then``
callbacks, which on Gloo run on the process group's worker threads in whatever order the
previous collectives finish: two ranks could then issue collectives in different orders
and pair the wrong messages. So collective number k of every chain goes to its own
process group (the user's group for k = 0, ``max phases - 1`` groups made once in
:class:`CompressionState` for the others), and on each group a sequencer issues them in
the order the hooks reserved them, which is the same on every rank (DDP calls the hook
bucket by bucket in index order). A chain's k-th collective only waits for its own
(k-1)-th and for earlier reservations on group k, so the scheme cannot deadlock.

**One blocking step per packed bucket**: after the size ``all_gather``, the N x T sizes
are read to the host once (``.tolist()``), because the padded payload length and the
slicing offsets are host integers. With Gloo on CPU it runs in the callback, off the
backward pass; with NCCL the futures complete as soon as the work is enqueued, so the
callbacks run at once on the hook's thread and this read synchronises the device there,
once per packed bucket (dense buckets never wait).

A collective that fails after others were launched leaves the chain's later collectives
unissued, as any failed collective leaves a process group unusable: the bucket's future
carries the error to DDP, and every later hook call raises it again instead of hanging.

State, rebuilds and checkpoints
-------------------------------
Each parameter's compressor state (error-feedback residual, DGC momentum) belongs to the
parameter: the state object maps DDP's ``(bucket index, position)`` to per-parameter slots
and, when DDP rebuilds its buckets after the first iteration, maps the new layout back to
the same slots by parameter identity (``bucket.parameters()``), so residuals never move to
another parameter. ``state_dict()`` keys the states by parameter name when
``named_parameters`` is given, else by the parameter's (bucket, position) in the first
layout DDP used (the same in a new process for the same model and DDP settings).

Supported backends: Gloo (CPU and CUDA tensors), NCCL (CUDA) and MPI, except fp16/bf16
all_reduce payloads on MPI (torch's MPI group maps no half types). bf16 travels as int16 bits via
``all_gather``/``all_to_all``, so it works on Gloo and MPI too (unlike torch's
``bf16_compress_hook``, which needs NCCL). Unsupported combinations raise before any
collective of the offending bucket, on every rank alike.
"""
import collections
import dataclasses
import threading
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist

from . import wire
from .collectives import CompressedAllreduce
from .exchange import decode_packed, split_packed
from .compressor import Compressor, TensorInfo
from .optimizer import DEFAULT_MIN_COMPRESS_NUMEL, choose_collective
from .registry import Compression
from .telemetry import TensorTraffic, TrafficLog, allgather_traffic, allreduce_traffic

Tensor = torch.Tensor

__all__ = ["CompressionState", "compression_hook"]


# ---- what each backend carries -------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Backend:
    """Capabilities of a torch.distributed backend as this hook uses it."""

    reduce_dtypes: frozenset  # dtypes of a sum / max all_reduce
    devices: frozenset  # tensor device types
    all_gather: bool = True
    all_to_all: bool = True


_NUMERIC = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64,
                      torch.uint8, torch.int8, torch.int32, torch.int64})
_BACKENDS = {
    "gloo": _Backend(_NUMERIC, frozenset({"cpu", "cuda"})),
    "nccl": _Backend(_NUMERIC, frozenset({"cuda"})),
    # torch's ProcessGroupMPI maps uint8/int8/int16/int32/int64/fp32/fp64 only.
    "mpi": _Backend(frozenset({torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                               torch.float32, torch.float64}), frozenset({"cpu", "cuda"})),
}


def _backend_for(backend: str, device_type: str) -> tuple[str, _Backend | None]:
    """The backend serving ``device_type`` (handles "cpu:gloo,cuda:nccl" strings); None when
    unknown to this table (then it is trusted and torch reports what it lacks)."""
    name = str(backend).lower()
    if ":" in name:
        parts = dict(p.split(":", 1) for p in name.split(",") if ":" in p)
        name = parts.get(device_type, next(iter(parts.values()), name))
    return name, _BACKENDS.get(name)


def _phases(comp: Compressor) -> int:
    """How many dependent collectives a chain of ``comp`` needs (see the module docstring)."""
    if comp.transport == "allreduce":
        return 2 if getattr(comp, "needs_index_broadcast", False) else 1
    return 2 + bool(getattr(comp, "needs_shared_scale", False))


def _all_gather_flat(out: Tensor, inp: Tensor, group) -> Any:
    """Async all-gather of equal-sized ``inp`` into ``out`` ([N * len]), rank order."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(out, inp, group=group, async_op=True)


# ---- per-parameter slots ----------------------------------------------------------------------

@dataclasses.dataclass(eq=False)  # compared by identity
class _Slot:
    """One parameter: its stable key/name, TensorInfo, compressor and state."""

    param: Tensor
    name: str
    info: TensorInfo
    compressor: Compressor
    state: dict


class _Sequencer:
    """Issues the collectives of one process group in reservation order.

    ``reserve()`` is called from the hook (same order on every rank); ``launch(ticket, fn)``
    may come from any thread; ``fn`` (which issues the collectives) runs once every earlier
    ticket has run. The lock is shared by all sequencers and re-entrant, because a
    collective whose future is already complete runs its callback inline, which may launch
    the next ticket.
    """

    def __init__(self, lock: threading.RLock):
        self._lock = lock
        self._queue: collections.deque = collections.deque()

    def reserve(self) -> list:
        with self._lock:
            ticket = [None]
            self._queue.append(ticket)
            return ticket

    def launch(self, ticket: list, fn: Callable[[], None]) -> None:
        with self._lock:
            ticket[0] = fn
            while self._queue and self._queue[0][0] is not None:
                self._queue.popleft()[0]()


class _BucketRun:
    """One hook call: the output buffer, the future DDP waits on, and the chains' bookkeeping."""

    def __init__(self, cs: "CompressionState", bucket: dist.GradBucket, grads: list, slots: list, step: int):
        self.cs = cs
        self.index = bucket.index()
        self.buffer = bucket.buffer()
        self.grads = grads
        self.slots = slots
        self.step = step
        self.device = self.buffer.device
        # Averaged gradients are written here, not into the buffer: chains that have not
        # encoded yet (e.g. after TernGrad's scale exchange) still read the gradients.
        self.out = torch.empty_like(self.buffer)
        self.future = torch.futures.Future(devices=[self.device]) if self.device.type == "cuda" else torch.futures.Future()
        self.offsets = self._offsets()
        self.pending = 0
        self.records: list = []
        self.done = False
        self.lock = threading.Lock()

    def _offsets(self) -> list[int]:
        base = self.buffer.storage_offset()
        offsets, expect = [], 0
        for g in self.grads:
            same = g.untyped_storage().data_ptr() == self.buffer.untyped_storage().data_ptr()
            offsets.append(g.storage_offset() - base if same else expect)
            expect += g.numel()
        if expect != self.buffer.numel():
            raise RuntimeError(f"hvdcomp.ddp: bucket {self.index} holds {self.buffer.numel()} elements, "
                               f"its gradients {expect}")
        return offsets

    def write(self, j: int, total_sum: Tensor) -> None:
        """Store the average of slot j (``total_sum``: fp32 sum over ranks, any shape)."""
        n = self.grads[j].numel()
        avg = total_sum.reshape(-1) / self.cs.size
        self.out[self.offsets[j]:self.offsets[j] + n].copy_(avg)

    def write_average(self, j: int, avg: Tensor) -> None:
        n = self.grads[j].numel()
        self.out[self.offsets[j]:self.offsets[j] + n].copy_(avg.reshape(-1))

    def record(self, slot: _Slot, payload: int, sent: float, received: float, transport: str) -> None:
        info = slot.info
        self.records.append(TensorTraffic(
            name=slot.name, numel=info.numel, dense_bytes=info.numel * self.buffer.element_size(),
            payload_bytes=payload, sent_bytes=sent, received_bytes=received, transport=transport,
            compressor=slot.compressor.name, selected=slot.compressor.selected_count(payload, info),
            shape=tuple(info.shape)))

    def overhead(self, what: str, sent: float, received: float) -> None:
        """Bytes on the wire that belong to no tensor (padding to equal sizes, size exchange)."""
        if sent or received:
            self.records.append(TensorTraffic(name=f"[bucket {self.index} {what}]", numel=0, dense_bytes=0,
                                              payload_bytes=0, sent_bytes=sent, received_bytes=received,
                                              transport=what, compressor="-"))

    def chain_started(self) -> None:
        with self.lock:
            self.pending += 1

    def chain_done(self) -> None:
        with self.lock:
            self.pending -= 1
            finished = self.pending == 0 and not self.done
            if finished:
                self.done = True
        if finished:
            self.cs._bucket_finished(self)
            self.future.set_result(self.out)

    def fail(self, exc: BaseException) -> None:
        with self.lock:
            if self.done:
                return
            self.done = True
        self.cs._bucket_failed(self, exc)
        self.future.set_exception(exc)

    def guard(self, fn: Callable) -> Callable:
        """``fn`` with its exceptions routed to the bucket's future."""

        def run(*args):
            try:
                fn(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to DDP through the future
                self.fail(exc)

        return run

    def then(self, futures: list, fn: Callable[[], None]) -> None:
        """Run ``fn()`` once every future in ``futures`` is complete (errors -> fail)."""
        fut = futures[0] if len(futures) == 1 else torch.futures.collect_all(futures)

        def callback(f):
            for x in (f.value() if len(futures) > 1 else [f]):
                x.value()  # raises the collective's error, if any
            fn()

        fut.then(self.guard(callback))


# ---- chains ------------------------------------------------------------------------------------

class _Chain:
    """A group of a bucket's slots whose payloads travel the same way (one collective per phase)."""

    nphases = 1

    def __init__(self, run: _BucketRun, members: list[int]):
        self.run, self.members = run, members
        self.cs = run.cs
        self.tickets: list = []

    def reserve(self) -> None:
        self.tickets = [self.cs._sequencers[k].reserve() for k in range(self.nphases)]

    def launch(self, phase: int, fn: Callable[[Any], list]) -> None:
        """Issue ``fn(group)`` (returns its futures) on phase ``phase``'s group in turn."""
        self.cs._sequencers[phase].launch(self.tickets[phase], self.run.guard(lambda: fn(self.cs._groups[phase])))

    def slot(self, j: int) -> _Slot:
        return self.run.slots[j]

    def grad(self, j: int) -> Tensor:
        return self.run.grads[j]

    def check_reduce(self, dtype: torch.dtype, what: str) -> None:
        self.cs._check_backend(self.run.device, reduce_dtype=dtype, what=what)

    def prepare(self) -> None:
        """Local work before the first collective (checks included); no communication."""

    def start(self) -> None:
        raise NotImplementedError

    # -- shared-scale phase (TernGrad) ------------------------------------------------------
    def scaled(self) -> list[int]:
        return [j for j in self.members if getattr(self.slot(j).compressor, "needs_shared_scale", False)]

    def start_with_scale(self, then: Callable[[int], None]) -> None:
        """Phase 0 max-allreduce of the members' local scales (if any need one), then ``then(k)``
        with k the next phase."""
        scaled = self.scaled()
        if not scaled:
            then(0)
            return
        run = self.run
        scales = torch.cat([self.slot(j).compressor.local_scale(self.grad(j), self.slot(j).info)
                            .reshape(1).to(torch.float32) for j in scaled])

        def issue(group):
            work = dist.all_reduce(scales, op=dist.ReduceOp.MAX, group=group, async_op=True)
            run.then([work.get_future()], finish)

        def finish():
            for i, j in enumerate(scaled):
                self.slot(j).state["shared_scale"] = scales[i:i + 1]
            moved = allreduce_traffic(4 * len(scaled), self.cs.size)
            run.overhead("scale max-allreduce", *moved)
            then(1)

        self.launch(0, issue)


class _DenseChain(_Chain):
    """allreduce transport without index broadcast: one all_reduce per payload dtype."""

    nphases = 1

    def prepare(self) -> None:
        run = self.run
        self.encoded = []
        for j in self.members:
            slot = self.slot(j)
            payload, ctx = slot.compressor.encode_dense(self.grad(j), slot.state, slot.info, run.step)
            self.encoded.append((j, payload, ctx))
        self.flats = _concat_by_dtype(self.encoded, self.cs.size, self)

    def start(self) -> None:
        run = self.run
        flats = self.flats

        def issue(group):
            futs = [dist.all_reduce(flat, group=group, async_op=True).get_future() for flat, _, _ in flats]
            run.then(futs, finish)

        def finish():
            _decode_dense(self, flats, extra={})
            run.chain_done()

        self.launch(0, issue)


class _IndexChain(_Chain):
    """ScaleCom: broadcast of the leaders' indices, then an all_reduce of the values."""

    nphases = 2

    def prepare(self) -> None:
        run = self.run
        by_leader: dict[int, list] = {}
        for j in self.members:
            slot = self.slot(j)
            idx = slot.compressor.propose(self.grad(j), slot.state, slot.info, run.step)
            leader = int(slot.compressor.leader(slot.info, run.step))
            by_leader.setdefault(leader, []).append((j, idx))
        self.check_reduce(torch.int32, "index broadcast")
        # One broadcast per leader rank, in rank order (identical on every rank).
        self.groups = [(leader, items, torch.cat([idx.reshape(-1) for _, idx in items]))
                       for leader, items in sorted(by_leader.items())]

    def start(self) -> None:
        run, cs = self.run, self.cs

        def issue_indices(group):
            futs = [dist.broadcast(flat, src=cs._global_rank(leader), group=group, async_op=True).get_future()
                    for leader, _, flat in self.groups]
            run.then(futs, indices_arrived)

        def indices_arrived():
            encoded, extra = [], {}
            for _, items, flat in self.groups:
                pos = 0
                for j, idx in items:
                    slot = self.slot(j)
                    slot.state["indices"] = flat[pos:pos + idx.numel()]
                    extra[j] = 4 * idx.numel()
                    pos += idx.numel()
            for j in self.members:
                slot = self.slot(j)
                payload, ctx = slot.compressor.encode_dense(self.grad(j), slot.state, slot.info, run.step)
                encoded.append((j, payload, ctx))
            flats = _concat_by_dtype(encoded, cs.size, self)

            def issue_values(group):
                futs = [dist.all_reduce(flat, group=group, async_op=True).get_future() for flat, _, _ in flats]
                run.then(futs, lambda: finish(flats, extra))

            self.launch(1, issue_values)

        def finish(flats, extra):
            _decode_dense(self, flats, extra)
            run.chain_done()

        self.launch(0, issue_indices)


class _AllgatherChain(_Chain):
    """Packed payloads: [scales] -> sizes all_gather -> padded payload all_gather -> decode_sum."""

    def __init__(self, run, members):
        super().__init__(run, members)
        self.nphases = 2 + bool(self.scaled())

    def prepare(self) -> None:
        self.cs._check_backend(self.run.device, need="all_gather", what="packed payloads (allgather)")

    def start(self) -> None:
        self.start_with_scale(self._sizes)

    def _sizes(self, phase: int) -> None:
        run, cs = self.run, self.cs
        encoded = []
        for j in self.members:
            slot = self.slot(j)
            encoded.append(slot.compressor.encode(self.grad(j), slot.state, slot.info, run.step))
        sizes = torch.cat([e.nbytes.reshape(1).to(torch.int64) for e in encoded])
        gathered = torch.empty(cs.size * sizes.numel(), dtype=torch.int64, device=sizes.device)

        def issue(group):
            run.then([_all_gather_flat(gathered, sizes, group).get_future()], lambda: self._payload(phase + 1, encoded, gathered))

        self.launch(phase, issue)

    def _payload(self, phase: int, encoded: list, gathered_sizes: Tensor) -> None:
        run, cs = self.run, self.cs
        nranks, t = cs.size, len(self.members)
        # The bucket's one device-to-host read: every rank's payload sizes.
        all_sizes = gathered_sizes.view(nranks, t).tolist()
        layouts = [wire.concat_offsets(row) for row in all_sizes]
        width = max(total for _, total in layouts)
        own_offsets, _ = layouts[cs.rank]
        buffer = torch.zeros(width, dtype=torch.uint8, device=run.device)
        for e, off, n in zip(encoded, own_offsets, all_sizes[cs.rank]):
            e.pack(buffer[off:off + n])
        received = torch.empty(nranks * width, dtype=torch.uint8, device=run.device)

        def issue(group):
            run.then([_all_gather_flat(received, buffer, group).get_future()],
                     lambda: self._decode(received, all_sizes, layouts, width))

        self.launch(phase, issue)

    def _decode(self, received: Tensor, all_sizes: list, layouts: list, width: int) -> None:
        run, cs = self.run, self.cs
        nranks = cs.size
        slots = [self.slot(j) for j in self.members]
        per_rank = split_packed(received, all_sizes, rank_lengths=[width] * nranks)
        totals = decode_packed([s.compressor for s in slots], per_rank, [s.state for s in slots],
                               [s.info for s in slots])
        for col, (j, slot, total) in enumerate(zip(self.members, slots, totals)):
            run.write(j, total)
            column = [all_sizes[r][col] for r in range(nranks)]
            sent, recv = allgather_traffic(all_sizes[cs.rank][col], column, cs.rank)
            run.record(slot, all_sizes[cs.rank][col], sent, recv, "allgather")
        # What the model above leaves out: equal-size padding and the size exchange.
        own = sum(all_sizes[cs.rank])
        others = sum(sum(row) for r, row in enumerate(all_sizes) if r != cs.rank)
        size_bytes = 8 * len(self.members) * (nranks - 1)
        run.overhead("allgather padding+sizes", (nranks - 1) * (width - own) + size_bytes,
                     (nranks - 1) * width - others + size_bytes)
        run.chain_done()


class _CompressedAllreduceChain(_Chain):
    """Summable packed formats: [scales] -> all_to_all of chunks -> re-encoded sums all_gather."""

    def __init__(self, run, members):
        super().__init__(run, members)
        self.nphases = 2 + bool(self.scaled())

    def prepare(self) -> None:
        self.cs._check_backend(self.run.device, need="all_to_all", what="compressed allreduce")

    def start(self) -> None:
        self.start_with_scale(self._scatter)

    def _scatter(self, phase: int) -> None:
        run, cs = self.run, self.cs
        slots = [self.slot(j) for j in self.members]
        car = CompressedAllreduce(None, [s.compressor for s in slots], [s.state for s in slots],
                                  [s.info for s in slots], f"hvdcomp.ddp.bucket{run.index}", None, cs.rank, cs.size)
        send, splits = car.encode_and_split([self.grad(j) for j in self.members], run.step)
        per_source = car.chunk_nbytes()
        received = torch.empty(per_source * cs.size, dtype=torch.uint8, device=run.device)

        def issue(group):
            work = dist.all_to_all_single(received, send, output_split_sizes=[per_source] * cs.size,
                                          input_split_sizes=splits, group=group, async_op=True)
            run.then([work.get_future()], lambda: self._gather(phase + 1, car, received))

        self.launch(phase, issue)

    def _gather(self, phase: int, car: CompressedAllreduce, received: Tensor) -> None:
        run, cs = self.run, self.cs
        mine = car.reduce_chunks(received)
        lengths = [car.sum_nbytes(c) for c in range(cs.size)]
        width = max(max(lengths), 1)
        padded = torch.zeros(width, dtype=torch.uint8, device=run.device)
        padded[:mine.numel()] = mine
        gathered = torch.empty(cs.size * width, dtype=torch.uint8, device=run.device)

        def issue(group):
            run.then([_all_gather_flat(gathered, padded, group).get_future()],
                     lambda: self._decode(car, gathered, lengths, width))

        self.launch(phase, issue)

    def _decode(self, car: CompressedAllreduce, gathered: Tensor, lengths: list, width: int) -> None:
        run, cs = self.run, self.cs
        rows = gathered.view(cs.size, width)
        sums, traffic = car.decode_gathered(torch.cat([rows[c, :lengths[c]] for c in range(cs.size)]))
        for j, total, t in zip(self.members, sums, traffic):
            run.write(j, total)
            run.record(self.slot(j), t["payload_bytes"], t["sent_bytes"], t["received_bytes"], "compressed_allreduce")
        others = sum(n for c, n in enumerate(lengths) if c != cs.rank)
        run.overhead("allgather padding", (cs.size - 1) * (width - lengths[cs.rank]), (cs.size - 1) * width - others)
        run.chain_done()


def _concat_by_dtype(encoded: list, nranks: int, chain: _Chain) -> list:
    """Dense payloads -> [(flat, dtype, [(j, offset, payload, ctx, prescaled)])] per dtype.

    Linear floating payloads are divided by N before the sum (as DDP and torch's hooks do,
    which keeps fp16 sums of many ranks in range); the others are averaged after decoding.
    """
    groups: dict[torch.dtype, list] = {}
    for j, payload, ctx in encoded:
        groups.setdefault(payload.dtype, []).append((j, payload, ctx))
    out = []
    for dtype, items in groups.items():
        chain.check_reduce(dtype, f"{chain.slot(items[0][0]).compressor.name} payloads ({dtype})")
        flat = torch.cat([p.reshape(-1) for _, p, _ in items]) if items else None
        entries, pos = [], 0
        for j, p, ctx in items:
            prescaled = bool(chain.slot(j).compressor.linear) and dtype.is_floating_point
            entries.append((j, pos, p, ctx, prescaled))
            pos += p.numel()
        if nranks > 1:
            # Only prescale the entries that allow it (a flat may mix compressors).
            for j, off, p, ctx, prescaled in entries:
                if prescaled:
                    flat[off:off + p.numel()].div_(nranks)
        out.append((flat, dtype, entries))
    return out


def _decode_dense(chain: _Chain, flats: list, extra: dict) -> None:
    run, cs = chain.run, chain.cs
    for flat, dtype, entries in flats:
        for j, off, p, ctx, prescaled in entries:
            slot = chain.slot(j)
            summed = flat[off:off + p.numel()].view(p.shape)
            total = slot.compressor.decode_dense(summed, ctx, slot.state, slot.info)
            if prescaled:
                run.write_average(j, total)
            else:
                run.write(j, total)
            nbytes = p.numel() * p.element_size()
            sent, received = allreduce_traffic(nbytes, cs.size)
            more = extra.get(j, 0)
            if more and cs.size > 1:  # broadcast indices: every rank receives them once and forwards once
                sent, received = sent + more, received + more
            run.record(slot, nbytes + more, sent, received, "allreduce+broadcast" if more else "allreduce")


# ---- the state object ---------------------------------------------------------------------------

class CompressionState:
    """State of :func:`compression_hook`: compressors, per-parameter state, step, telemetry.

    compression: any ``hvdcomp.Compression.*`` compressor, used for gradients with at least
        ``min_compress_numel`` elements; ``small_compression`` (default ``none()``) for the
        others (biases, norms).
    process_group: the DDP model's process group (None: the default group).
    collective: "auto", "allgather" or "compressed_allreduce": how packed payloads of
        summable formats (bf16, TernGrad) travel (:func:`hvdcomp.optimizer.choose_collective`).
    named_parameters: optional ``model.named_parameters()``: keys the state (and the
        checkpoint) by name, lets AdaComp's per-name bin sizes apply, and gives every tensor
        its name-sorted index (RNG streams, ScaleCom leaders), as the Horovod front end does.

    Construct it on every rank of the group, after ``init_process_group``: it compares its
    settings across ranks with one blocking ``all_gather_object`` (a mismatch or an
    unsupported combination raises ``ValueError`` on every rank instead of a hang), and
    creates ``phases - 1`` extra process groups with the same ranks for the chained
    collectives (none for fp16/none; one for sparse methods; two for TernGrad).
    """

    def __init__(self, compression: Compressor, process_group=None,
                 min_compress_numel: int = DEFAULT_MIN_COMPRESS_NUMEL,
                 small_compression: Compressor | None = None, collective: str = "auto",
                 named_parameters: Iterable | None = None):
        small_compression = Compression.none() if small_compression is None else small_compression
        for label, comp in (("compression", compression), ("small_compression", small_compression)):
            if not isinstance(comp, Compressor):
                raise TypeError(f"{label} must be an hvdcomp compressor (e.g. hvdcomp.Compression.fp16()), "
                                f"got {type(comp).__name__}")
        if isinstance(min_compress_numel, bool) or not isinstance(min_compress_numel, int) or min_compress_numel < 0:
            raise ValueError(f"min_compress_numel must be an integer >= 0, got {min_compress_numel!r}")
        if collective not in ("auto", "allgather", "compressed_allreduce"):
            raise ValueError(f"collective must be 'auto', 'allgather' or 'compressed_allreduce', got {collective!r}")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("hvdcomp.ddp.CompressionState needs torch.distributed to be initialized "
                               "(dist.init_process_group) before it is built")
        self.compression = compression
        self.small_compression = small_compression
        self.min_compress_numel = min_compress_numel
        self.collective = collective
        self.process_group = process_group if process_group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.process_group)
        self.size = dist.get_world_size(self.process_group)
        self.backend = str(dist.get_backend(self.process_group))
        self._group_ranks = list(dist.get_process_group_ranks(self.process_group))
        #: Iterations completed (incremented when DDP hands over its last bucket).
        self.step = 0
        #: How many times a bucket index was found holding other parameters than before.
        self.rebuilds = 0
        self._names: dict[Tensor, str] | None = None
        self._name_index: dict[str, int] = {}
        if named_parameters is not None:
            named = list(named_parameters)
            if any(not isinstance(item, tuple) or len(item) != 2 for item in named):
                raise ValueError("named_parameters must be an iterable of (name, parameter) tuples, "
                                 "e.g. model.named_parameters()")
            names = [n for n, _ in named]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"named_parameters has duplicate names: {dupes[:5]}")
            self._names = {p: n for n, p in named}
            self._name_index = {n: i for i, n in enumerate(sorted(names))}
            described = sorted((n, tuple(p.shape), str(p.dtype)) for n, p in named)
        else:
            described = None
        self._slot_of: dict[int, _Slot] = {}  # id(parameter) -> slot
        self._layouts: dict[int, list[_Slot]] = {}  # bucket index -> slots by position
        self._pending: dict[str, dict] = {}  # loaded state for slots not created yet
        self._traffic = TrafficLog()
        self._lock = threading.RLock()
        self._inflight = 0
        self._closing = False
        self._failed: BaseException | None = None
        # Errors found here are reported after the settings exchange, so that every rank
        # raises (one rank raising alone would leave the others waiting in it).
        error = None
        try:
            self._collectives = {c.name: choose_collective(c, self.collective, self.size)
                                 for c in (compression, small_compression) if c.transport == "allgather"}
            self._static_checks()
        except ValueError as err:
            error, self._collectives = str(err), {}
        self._check_same_on_all_ranks(described, error)
        nphases = max(_phases(c) for c in (compression, small_compression))
        self._groups = [self.process_group] + [self._new_group() for _ in range(nphases - 1)]
        self._sequencers = [_Sequencer(self._lock) for _ in self._groups]

    # ---- set-up --------------------------------------------------------------------------------
    def _static_checks(self) -> None:
        """Raise ValueError for what is already known to be unsupported (before any gradient)."""
        for comp in (self.compression, self.small_compression):
            if comp.transport == "allgather":
                need = "all_to_all" if self._collectives[comp.name] == "compressed_allreduce" else "all_gather"
                self._check_backend(None, need=need, what=f"{comp.name} ({self._collectives[comp.name]})")

    def _check_same_on_all_ranks(self, described, error: str | None) -> None:
        mine = {
            "compression": self.compression.config(),
            "small_compression": self.small_compression.config(),
            "min_compress_numel": self.min_compress_numel,
            "collective": self.collective,
            "named_parameters": described,
            "error": error,
        }
        everyone = [mine]
        if self.size > 1:
            everyone = [None] * self.size
            dist.all_gather_object(everyone, mine, group=self.process_group)
        problems = sorted({f"rank {r}: {theirs['error']}" for r, theirs in enumerate(everyone) if theirs["error"]})
        problems += [f"rank {r}: {key} = {theirs[key]!r} (rank {self.rank} has {mine[key]!r})"
                     for r, theirs in enumerate(everyone) for key in mine
                     if key not in ("error", "named_parameters") and theirs[key] != mine[key]]
        if any(theirs["named_parameters"] != described for theirs in everyone):
            problems.append("the ranks' named_parameters (names, shapes or dtypes) differ")
        if problems:
            raise ValueError("hvdcomp.ddp.CompressionState cannot run:\n  " + "\n  ".join(problems))

    def _new_group(self):
        kwargs = {"ranks": self._group_ranks, "backend": self.backend}
        if self.process_group is not dist.group.WORLD:
            kwargs["use_local_synchronization"] = True  # only the members build it
        group = dist.new_group(**kwargs)
        if dist.get_rank(group) != self.rank:
            raise RuntimeError("hvdcomp.ddp: the helper process group orders ranks differently from "
                               "process_group; build process_group with sorted ranks")
        return group

    def _global_rank(self, group_rank: int) -> int:
        return self._group_ranks[group_rank]

    def _check_backend(self, device: torch.device | None, reduce_dtype: torch.dtype | None = None,
                       need: str | None = None, what: str = "") -> None:
        """Raise ValueError if this group's backend cannot carry ``what`` (before any collective)."""
        device_type = device.type if device is not None else None
        name, caps = _backend_for(self.backend, device_type or "cpu")
        if caps is None:
            return
        if device_type is not None and device_type not in caps.devices:
            raise ValueError(f"hvdcomp.ddp: the {name} backend does not carry {device_type} tensors "
                             f"(gradients of this DDP model); use {'nccl' if device_type == 'cuda' else 'gloo'}")
        if reduce_dtype is not None and reduce_dtype not in caps.reduce_dtypes:
            hint = (" (Compression.bf16() sends 2 bytes per element as uint8, which it carries)"
                    if reduce_dtype in (torch.float16, torch.bfloat16) else "")
            raise ValueError(f"hvdcomp.ddp: {what} need a {reduce_dtype} all_reduce, which the {name} "
                             f"backend does not have{hint}; use another compressor or backend")
        if need is not None and not getattr(caps, need):
            raise ValueError(f"hvdcomp.ddp: {what} need {need}, which the {name} backend does not have")

    # ---- slots, layouts and rebuilds ------------------------------------------------------------
    def _layout(self, index: int, params: list, grads: list) -> list[_Slot]:
        """Slots of bucket ``index`` by position; maps a rebuilt layout back to the same
        per-parameter slots by parameter identity."""
        known = self._layouts.get(index)
        if known is not None and len(known) == len(params) and all(s.param is p for s, p in zip(known, params)):
            return known
        slots = []
        for pos, (p, g) in enumerate(zip(params, grads)):
            slot = self._slot_of.get(id(p))
            if slot is None or slot.param is not p:
                slot = self._new_slot(p, g, index, pos)
            elif tuple(slot.info.shape) != tuple(p.shape) or slot.info.dtype != g.dtype:
                raise RuntimeError(f"hvdcomp.ddp: parameter {slot.name} changed shape or dtype "
                                   f"({tuple(slot.info.shape)} {slot.info.dtype} -> {tuple(p.shape)} {g.dtype})")
            slots.append(slot)
        if known is not None or any(any(s in slots for s in other) for other in self._layouts.values()):
            self.rebuilds += 1
        members = {id(s) for s in slots}
        for other in [i for i, layout in self._layouts.items() if any(id(s) in members for s in layout)]:
            del self._layouts[other]  # those positions now live under ``index``
        self._layouts[index] = slots
        return slots

    def _new_slot(self, p: Tensor, grad: Tensor, index: int, pos: int) -> _Slot:
        if self._names is not None:
            if p not in self._names:
                raise ValueError(f"a parameter of shape {tuple(p.shape)} in DDP bucket {index} is not in "
                                 "named_parameters; pass model.named_parameters() of the DDP-wrapped model")
            name = self._names[p]
            order = self._name_index[name]
        else:
            # First layout DDP uses: identical on every rank and in a new process.
            name = f"bucket{index}.{pos}"
            order = len(self._slot_of)
        info = TensorInfo(name=name, shape=p.shape, dtype=grad.dtype, device=grad.device, index=order,
                          rank=self.rank, size=self.size)
        comp = self.compression if info.numel >= self.min_compress_numel else self.small_compression
        slot = _Slot(p, name, info, comp, comp.init_state(info))
        if name in self._pending:
            _load_into(slot, self._pending.pop(name))
        self._slot_of[id(p)] = slot
        return slot

    def bucket_layout(self) -> dict[int, list[str]]:
        """DDP's current buckets as seen by the hook: bucket index -> parameter keys by position."""
        return {i: [s.name for s in slots] for i, slots in sorted(self._layouts.items())}

    # ---- the hook body --------------------------------------------------------------------------
    def _hook(self, bucket: dist.GradBucket) -> torch.futures.Future:
        if self._failed is not None:
            raise RuntimeError("hvdcomp.ddp: an earlier bucket's exchange failed; this process group's "
                               "collectives are out of step, restart the job") from self._failed
        params, grads = bucket.parameters(), bucket.gradients()
        slots = self._layout(bucket.index(), params, grads)
        with self._lock:
            step = self.step
            self._inflight += 1
            if bucket.is_last():
                # Set before launching: the last bucket's chains may finish inline.
                self._closing = True
                self.step += 1
        run = _BucketRun(self, bucket, grads, slots, step)
        try:
            self._check_backend(run.device, what="gradients")
            chains = self._chains(run)
            for chain in chains:
                chain.prepare()  # local work and checks: raises before any collective
        except BaseException:
            with self._lock:
                self._inflight -= 1
                if bucket.is_last():
                    self._closing, self.step = False, step
            raise
        for chain in chains:
            chain.reserve()
            run.chain_started()
        for chain in chains:
            chain.start()
        if not chains:
            run.chain_started()
            run.chain_done()
        return run.future

    def _chains(self, run: _BucketRun) -> list[_Chain]:
        groups: dict[str, list[int]] = {}
        for j, slot in enumerate(run.slots):
            comp = slot.compressor
            if comp.transport == "allreduce":
                kind = "index" if getattr(comp, "needs_index_broadcast", False) else "dense"
            else:
                kind = self._collectives[comp.name]
            groups.setdefault(kind, []).append(j)
        kinds = {"dense": _DenseChain, "index": _IndexChain, "allgather": _AllgatherChain,
                 "compressed_allreduce": _CompressedAllreduceChain}
        # A fixed order of chains: every rank reserves the same collectives in the same order.
        return [kinds[k](run, groups[k]) for k in ("dense", "index", "allgather", "compressed_allreduce") if k in groups]

    def _bucket_finished(self, run: _BucketRun) -> None:
        with self._lock:
            for r in run.records:
                self._traffic.record(r)
            self._inflight -= 1
            if self._closing and self._inflight == 0:
                self._closing = False
                self._traffic.end_step()

    def _bucket_failed(self, run: _BucketRun, exc: BaseException) -> None:
        with self._lock:
            self._inflight -= 1
            self._failed = exc

    # ---- telemetry and checkpoints -----------------------------------------------------------------
    def compression_stats(self) -> dict:
        """Traffic of the last iteration and since the start (see :mod:`hvdcomp.telemetry`).

        Per-tensor entries are keyed by parameter key; entries named ``[bucket i ...]`` hold
        bytes that belong to no tensor (padding to equal all_gather sizes, size exchange,
        TernGrad's scale max-allreduce), so ``sent_bytes``/``received_bytes`` are what the
        collectives really moved."""
        with self._lock:
            stats = self._traffic.stats()
        stats["compression"] = self.compression.config()
        stats["small_compression"] = self.small_compression.config()
        stats["nranks"] = self.size
        stats["iterations"] = self.step
        stats["rebuilds"] = self.rebuilds
        stats["collectives"] = dict(self._collectives)
        return stats

    def state_dict(self) -> dict:
        """Step counter and every parameter's compressor state (tensors cloned), keyed by
        parameter name (``named_parameters`` given) or first-layout position."""
        with self._lock:
            states = {name: {k: v.detach().clone() for k, v in st.items()} for name, st in self._pending.items()}
            for slot in self._slot_of.values():
                states[slot.name] = {k: v.detach().clone() for k, v in slot.state.items() if isinstance(v, Tensor)}
            return {"step": self.step, "keys": "names" if self._names is not None else "positions",
                    "compression": self.compression.config(), "small_compression": self.small_compression.config(),
                    "min_compress_numel": self.min_compress_numel, "state": states}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore :meth:`state_dict` (before training, or between iterations)."""
        keys = "names" if self._names is not None else "positions"
        for field, mine in (("keys", keys), ("compression", self.compression.config()),
                            ("small_compression", self.small_compression.config()),
                            ("min_compress_numel", self.min_compress_numel)):
            if state_dict.get(field) != mine:
                raise ValueError(f"checkpoint has {field} = {state_dict.get(field)!r}, this state {mine!r}")
        with self._lock:
            by_name = {s.name: s for s in self._slot_of.values()}
            self._pending = {}
            for name, st in state_dict["state"].items():
                if name in by_name:
                    _load_into(by_name[name], st)
                else:
                    self._pending[name] = {k: v.clone() for k, v in st.items()}
            self.step = int(state_dict["step"])


def _load_into(slot: _Slot, saved: dict) -> None:
    unknown = set(saved) - set(slot.state)
    missing = {k for k, v in slot.state.items() if isinstance(v, Tensor)} - set(saved)
    if unknown or missing:
        raise ValueError(f"checkpoint state of {slot.name} has keys {sorted(saved)}, "
                         f"{slot.compressor.name} keeps {sorted(slot.state)}")
    for k, v in saved.items():
        if slot.state[k].shape != v.shape:
            raise ValueError(f"checkpoint state {slot.name}.{k} has shape {tuple(v.shape)}, "
                             f"expected {tuple(slot.state[k].shape)}")
        slot.state[k].copy_(v)


def compression_hook(state: CompressionState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: average ``bucket`` across ranks through ``state``'s compressors.

    bucket: DDP's ``GradBucket``; ``bucket.buffer()`` is a flat tensor (the gradients'
    dtype, e.g. fp32 [sum of numels]) and ``bucket.gradients()`` its per-parameter views.
    Returns a future resolving to a tensor of the buffer's size and dtype holding the
    average over the ranks of ``state.process_group`` (DDP semantics: ``op`` is always
    average). Register with ``ddp_model.register_comm_hook(state, compression_hook)``.
    """
    return state._hook(bucket)
