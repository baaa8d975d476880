"""PyTorch DDP front end: a communication hook that sends every gradient through an hvdcomp
compressor, with torch's own ``ddp_comm_hooks`` conventions (a state object, a pure hook)::

    state = hvdcomp.ddp.CompressionState(hvdcomp.Compression.adacomp(),
                                         named_parameters=model.named_parameters())
    ddp_model.register_comm_hook(state, hvdcomp.ddp.compression_hook)

This module is the ``torch.distributed`` *transport* of the step protocol in
:mod:`hvdcomp.core`, which :class:`hvdcomp.DistributedOptimizer` (Horovod) and
:mod:`hvdcomp.inprocess` run too: the same chains do the compression work and yield their
collectives; only how those travel differs.

How a bucket travels
--------------------
DDP hands the hook a flat bucket (``bucket.buffer()``, dtype of the gradients) and views of
each parameter's gradient in it (``bucket.gradients()``). The hook compresses **per
parameter**, as the Horovod front end does, so AdaComp picks conv/FC bin sizes and ratios
apply per tensor; tensors with fewer than ``min_compress_numel`` elements use
``small_compression`` (default: uncompressed). Inside a bucket the parameters are grouped by
how their payload travels, each group a *chain* of collectives (members in name order,
so the layout of a concatenated payload does not depend on DDP's bucket order):

=========================  ==========================================================
dense (none, fp16,         encode_dense -> payloads of one dtype concatenated, divided by N
random-k)                  (as DDP and torch's hooks do) -> one ``all_reduce``
index broadcast (ScaleCom) propose -> ``broadcast`` of the indices (one per leader rank)
                           -> encode_dense -> ``all_reduce`` of the values
packed, allgather          [``all_reduce(MAX)`` of TernGrad scales] -> encode ->
(AdaComp, DGC, top-k,      ``all_gather`` of the int64 payload sizes -> pack -> ``all_gather``
1-bit, TernGrad, bf16)     of the uint8 buffers padded to the largest rank's -> ``decode_sum``
                           per tensor, / N
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

from .compressor import Compressor
from .core import requests as rq
from .core.chains import Averaging, ChainRun, StepContext
from .core.faults import check_same_step, restore, step_dropped
from .core.options import (DEFAULT_MIN_COMPRESS_NUMEL, check_collective, check_compressor, check_min_compress_numel,
                           check_named_parameters)
from .core.plan import Router, chain_function, phase_count
from .core.settings import describe_parameters, settings_problems, settings_record
from .core.slots import Slot, SlotTable
from .core.wrapper import compression_stats
from .recipes import recipe_compressors
from .registry import Compression
from .core.traffic import TensorTraffic, TrafficLog

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


def _all_gather_flat(out: Tensor, inp: Tensor, group) -> Any:
    """Async all-gather of equal-sized ``inp`` into ``out`` ([N * len]), rank order."""
    return dist.all_gather_into_tensor(out, inp, group=group, async_op=True)


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


def _queue_callback(fn: Callable[[], None]) -> None:
    """Run ``fn`` when the current backward pass ends (RuntimeError outside one)."""
    torch.autograd.Variable._execution_engine.queue_callback(fn)


class _LateErrors:
    """How an exchange that fails after its hook returned (a peer died, a collective raised)
    reaches the user: from ``loss.backward()``, with its own type and message.

    A hook's future completed with an exception reaches DDP's reducer, which reports it as
    ``RuntimeError: Unable to cast <message> to Tensor``. So at a step's first bucket a
    callback is queued on the autograd engine (it runs when the backward pass ends); a failed
    bucket's future completes with a NaN gradient, and the callback waits for the step's
    buckets and raises the first error as it is. It queues itself once more first: DDP
    queues its own end-of-backward callback after the last bucket, and raising before it
    ran would leave DDP's reducer unfinished (the next backward would fail inside DDP
    instead of in our hook). Outside a backward pass (no engine to queue on) the future
    carries the exception as before."""

    def __init__(self):
        self.error: BaseException | None = None
        self._futures: list = []
        self._queued = False
        self._reported = False

    def watch(self, future: torch.futures.Future) -> bool:
        """Whether ``future``'s failure will be raised by the step's callback."""
        if not self._queued:
            try:
                _queue_callback(self._queue_last)
            except RuntimeError:  # not called from a backward pass
                return False
            self._queued = True
        self._futures.append(future)
        return True

    def _queue_last(self) -> None:
        _queue_callback(self._raise)  # runs after the callbacks queued so far (DDP's)

    def _raise(self) -> None:
        futures, self._futures, self._queued = self._futures, [], False
        for future in futures:
            future.wait()
        if self.error is not None and not self._reported:
            self._reported = True
            raise self.error


class _BucketRun:
    """One hook call: the output buffer, the future DDP waits on, and the chains' bookkeeping."""

    def __init__(self, cs: "CompressionState", bucket: dist.GradBucket, grads: list, slots: list):
        self.cs = cs
        self.index = bucket.index()
        self.buffer = bucket.buffer()
        self.grads = grads
        self.device = self.buffer.device
        # Averaged gradients are written here, not into the buffer: chains that have not
        # encoded yet (e.g. after TernGrad's scale exchange) still read the gradients.
        self.out = torch.empty_like(self.buffer)
        self.future = torch.futures.Future(devices=[self.device]) if self.device.type == "cuda" else torch.futures.Future()
        self.position = {id(s): j for j, s in enumerate(slots)}
        self.offsets = self._offsets()
        self.pending = 0
        self.records: list = []
        self.results: list = []
        self.done = False
        self.lock = threading.Lock()
        self.raised_later = False  # see _LateErrors

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

    def chain_done(self, result) -> None:
        for slot, avg in result.outputs:
            j = self.position[id(slot)]
            n = self.grads[j].numel()
            part = self.out[self.offsets[j]:self.offsets[j] + n]
            part.copy_(avg.reshape(-1))
            # A rank was non-finite: the whole gradient NaN, decided on the device (DDP may copy
            # this bucket out before the step's other buckets are done).
            part.masked_fill_(result.nonfinite, float("nan"))
        with self.lock:
            self.results.append(result)
            self.records += result.traffic + result.overhead
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
        if self.raised_later:  # see _LateErrors
            self.future.set_result(self.out.fill_(float("nan")))
        else:
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


class _Collectives:
    """The torch.distributed side of the hook: what the group's backend carries, the phase
    groups and their sequencers, and the issuing of a chain's requests.

    Collective number k of every chain goes to its own process group (the user's group for
    k = 0, extra groups with the same ranks for the others), issued in the order the hooks
    reserved them (see the module docstring).
    """

    def __init__(self, process_group, rank: int, size: int):
        self.process_group, self.rank, self.size = process_group, rank, size
        self.backend = str(dist.get_backend(process_group))
        self.group_ranks = list(dist.get_process_group_ranks(process_group))
        self.groups: list = [process_group]
        self.sequencers: list[_Sequencer] = []

    def all_gather_object(self, obj) -> list:
        """Every rank's ``obj`` in rank order (one blocking all_gather_object)."""
        everyone = [obj]
        if self.size > 1:
            everyone = [None] * self.size
            dist.all_gather_object(everyone, obj, group=self.process_group)
        return everyone

    def phases(self, router: Router, comp: Compressor) -> int:
        """Collectives a chain of ``comp`` issues one after the other (groups it needs)."""
        if comp.transport == "allgather" and comp.name not in router.collectives:
            return 1  # a failed set-up: the error is raised after the settings exchange
        return phase_count(router.kind(comp), [comp])

    def check_supported(self, router: Router, compressors) -> None:
        """ValueError for what the backend is already known not to carry (before any gradient)."""
        for comp in compressors:
            if comp.transport == "allgather":
                kind = router.kind(comp)
                need = "all_to_all" if kind == "compressed_allreduce" else "all_gather"
                self.check(None, need=need, what=f"{comp.name} ({kind})")

    def make_groups(self, nphases: int, lock: threading.RLock) -> None:
        """Create the ``nphases - 1`` extra groups (collective on the user's group) and one
        sequencer per group."""
        self.groups = [self.process_group] + [self._new_group() for _ in range(nphases - 1)]
        self.sequencers = [_Sequencer(lock) for _ in self.groups]

    def _new_group(self):
        kwargs = {"ranks": self.group_ranks, "backend": self.backend}
        if self.process_group is not dist.group.WORLD:
            kwargs["use_local_synchronization"] = True  # only the members build it
        group = dist.new_group(**kwargs)
        if dist.get_rank(group) != self.rank:
            raise RuntimeError("hvdcomp.ddp: the helper process group orders ranks differently from "
                               "process_group; build process_group with sorted ranks")
        return group

    def check(self, device: torch.device | None, reduce_dtype: torch.dtype | None = None,
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

    def check_requests(self, requests: list, device: torch.device) -> None:
        for req in requests:
            if isinstance(req, rq.Allreduce):
                self.check(device, reduce_dtype=req.tensor.dtype, what=f"{req.tensor.dtype} payloads")

    def launch(self, run: _BucketRun, chain_run: ChainRun) -> None:
        """Issue the chain's current phase on that phase's group, in reservation order."""
        k = chain_run.phase
        tickets = chain_run.state
        if k >= len(tickets):
            raise RuntimeError(f"hvdcomp.ddp: chain {chain_run.key} yielded more phases than it reserved")
        group = self.groups[k]

        def issue():
            futures, finish = [], []
            for req in chain_run.requests:
                fut, done = self._issue(req, group, run)
                futures.append(fut)
                finish.append(done)
            run.then(futures, lambda: self._advance(run, chain_run, [f() for f in finish]))

        self.sequencers[k].launch(tickets[k], run.guard(issue))

    def _advance(self, run: _BucketRun, chain_run: ChainRun, results: list) -> None:
        if chain_run.advance(results):
            self.check_requests(chain_run.requests, run.device)
            self.launch(run, chain_run)
        else:
            run.chain_done(chain_run.result)

    def _issue(self, req, group, run: _BucketRun):
        """Start one request; returns (future, function giving its result once complete)."""
        n = self.size
        t = req.tensor
        if isinstance(req, rq.Allreduce):
            op = dist.ReduceOp.MAX if req.op == "max" else dist.ReduceOp.SUM
            return dist.all_reduce(t, op=op, group=group, async_op=True).get_future(), lambda: t
        if isinstance(req, rq.Broadcast):
            work = dist.broadcast(t, src=self.group_ranks[req.root], group=group, async_op=True)
            return work.get_future(), lambda: t
        if isinstance(req, rq.Allgather):
            out = torch.empty(n * t.numel(), dtype=t.dtype, device=t.device)
            return _all_gather_flat(out, t, group).get_future(), lambda: out
        if isinstance(req, rq.AllgatherV):
            # torch's all_gather needs equal sizes: pad every rank's buffer to the largest.
            width = max(max(req.lengths), 1)
            padded = torch.zeros(width, dtype=t.dtype, device=t.device)
            padded[:t.numel()] = t
            out = torch.empty(n * width, dtype=t.dtype, device=t.device)
            mine, others = req.lengths[self.rank], sum(req.lengths) - req.lengths[self.rank]
            run.records.append(TensorTraffic(name=f"[bucket {run.index} allgather padding]", numel=0, dense_bytes=0,
                                             payload_bytes=0, sent_bytes=(n - 1) * (width - mine),
                                             received_bytes=(n - 1) * width - others,
                                             transport="allgather padding", compressor="-"))
            return (_all_gather_flat(out, padded, group).get_future(),
                    lambda: [out[r * width:r * width + length] for r, length in enumerate(req.lengths)])
        if isinstance(req, rq.Alltoall):
            out = torch.empty(sum(req.recv_splits), dtype=t.dtype, device=t.device)
            work = dist.all_to_all_single(out, t, output_split_sizes=req.recv_splits,
                                          input_split_sizes=req.send_splits, group=group, async_op=True)
            return work.get_future(), lambda: out
        raise TypeError(f"hvdcomp.ddp: unknown collective request {type(req).__name__}")


class _Layouts:
    """DDP's bucket layouts mapped to per-parameter slots.

    Each parameter's compressor state belongs to the parameter: ``(bucket index, position)``
    is mapped to its slot, and when DDP rebuilds its buckets after the first iteration the
    new layout is mapped back to the same slots by parameter identity
    (``bucket.parameters()``), so residuals never move to another parameter. Slots are keyed
    by name (``names`` given) or by the parameter's position in the first layout DDP used.
    """

    def __init__(self, table: SlotTable, names: dict | None, name_index: dict):
        self._table, self._names, self._name_index = table, names, name_index
        self._slot_of: dict[int, Slot] = {}  # id(parameter) -> slot
        self._param_of: dict[int, Tensor] = {}  # id(slot) -> parameter
        self._layouts: dict[int, list[Slot]] = {}  # bucket index -> slots by position
        #: How many times a bucket index was found holding other parameters than before.
        self.rebuilds = 0

    def slots(self, index: int, params: list, grads: list) -> list[Slot]:
        """Slots of bucket ``index`` by position; maps a rebuilt layout back to the same
        per-parameter slots by parameter identity."""
        known = self._layouts.get(index)
        if known is not None and len(known) == len(params) and \
                all(self._param_of[id(s)] is p for s, p in zip(known, params)):
            return known
        slots = []
        for pos, (p, g) in enumerate(zip(params, grads)):
            slot = self._slot_of.get(id(p))
            if slot is None or self._param_of[id(slot)] is not p:
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

    def _new_slot(self, p: Tensor, grad: Tensor, index: int, pos: int) -> Slot:
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
        slot = self._table.add(name, p.shape, grad.dtype, grad.device, order)
        self._slot_of[id(p)] = slot
        self._param_of[id(slot)] = p
        return slot

    def names(self) -> dict[int, list[str]]:
        """DDP's current buckets as seen by the hook: bucket index -> parameter keys by position."""
        return {i: [s.name for s in slots] for i, slots in sorted(self._layouts.items())}


# ---- the state object ---------------------------------------------------------------------------

def _naming(named_parameters) -> tuple[dict | None, dict[str, int], list | None]:
    """``({parameter: name}, {name: name-sorted index}, described)`` of ``named_parameters``
    (``(None, {}, None)`` without names: the state is then keyed by layout position)."""
    if named_parameters is None:
        return None, {}, None
    named = check_named_parameters(named_parameters)
    return ({p: n for n, p in named}, {n: i for i, n in enumerate(sorted(n for n, _ in named))},
            describe_parameters(named))


class CompressionState:
    """State of :func:`compression_hook`: compressors, per-parameter state, step, telemetry.

    compression: any ``hvdcomp.Compression.*`` compressor, used for gradients with at least
        ``min_compress_numel`` elements; ``small_compression`` (default ``none()``) for the
        others (biases, norms).
    process_group: the DDP model's process group (None: the default group).
    collective: "auto", "allgather" or "compressed_allreduce": how packed payloads of
        summable formats (bf16, TernGrad) travel (:func:`hvdcomp.core.options.choose_collective`).
    named_parameters: optional ``model.named_parameters()``: keys the state (and the
        checkpoint) by name, lets AdaComp's per-name bin sizes apply, and gives every tensor
        its name-sorted index (RNG streams, ScaleCom leaders), as the Horovod front end does.
    optimizer: optional, the model's optimizer: the compressor's rules about it apply
        (:mod:`hvdcomp.recipes`; e.g. DGC takes over SGD's momentum).

    Construct it on every rank of the group, after ``init_process_group``: it compares its
    settings across ranks with one blocking ``all_gather_object`` (a mismatch or an
    unsupported combination raises ``ValueError`` on every rank instead of a hang), and
    creates ``phases - 1`` extra process groups with the same ranks for the chained
    collectives (none for fp16/none; one for sparse methods; two for TernGrad).
    """

    def __init__(self, compression: Compressor, process_group=None,
                 min_compress_numel: int = DEFAULT_MIN_COMPRESS_NUMEL,
                 small_compression: Compressor | None = None, collective: str = "auto",
                 named_parameters: Iterable | None = None, optimizer: torch.optim.Optimizer | None = None):
        compression = check_compressor("compression", compression)
        small_compression = check_compressor("small_compression",
                                             Compression.none() if small_compression is None else small_compression)
        min_compress_numel = check_min_compress_numel(min_compress_numel)
        collective = check_collective(collective, compression, small_compression)
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("hvdcomp.ddp.CompressionState needs torch.distributed to be initialized "
                               "(dist.init_process_group) before it is built")
        compression, small_compression = recipe_compressors(optimizer, compression, small_compression)
        self.compression = compression
        self.small_compression = small_compression
        self.min_compress_numel = min_compress_numel
        self.collective = collective
        self.process_group = process_group if process_group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.process_group)
        self.size = dist.get_world_size(self.process_group)
        self._collectives = _Collectives(self.process_group, self.rank, self.size)
        #: Iterations completed (incremented when DDP hands over its last bucket).
        self.step = 0
        self._names, self._name_index, described = _naming(named_parameters)
        self._keys = "names" if self._names is not None else "positions"  # what the checkpoint keys by
        self._table = SlotTable(compression, small_compression, min_compress_numel, self.rank, self.size,
                                expected_names=None if self._names is None else self._name_index)
        self._averaging = Averaging(self.size)
        self._layouts = _Layouts(self._table, self._names, self._name_index)
        self._traffic = TrafficLog()
        self._lock = threading.RLock()
        self._inflight = 0
        self._closing = False
        self._late_errors = _LateErrors()  # holds the first failed exchange's error
        self._step_results: list = []  # this iteration's chain results (flags, snapshots)
        self._check_step = False
        #: Iterations dropped because some rank's gradient was non-finite (see hvdcomp.core.faults).
        self.dropped_steps = 0
        # Errors found here are reported after the settings exchange, so that every rank
        # raises (one rank raising alone would leave the others waiting in it).
        error = None
        try:
            self._router = Router([compression, small_compression], collective, self.size)
            self._collectives.check_supported(self._router, (compression, small_compression))
        except ValueError as err:
            error, self._router = str(err), Router([], collective, self.size)
        self._check_same_on_all_ranks(settings_record(self._table, described, error, collective=collective))
        self._collectives.make_groups(max(self._collectives.phases(self._router, c)
                                          for c in (compression, small_compression)), self._lock)

    # ---- set-up --------------------------------------------------------------------------------
    def _check_same_on_all_ranks(self, mine: dict) -> None:
        problems = settings_problems(self._collectives.all_gather_object(mine), self.rank)
        if problems:
            raise ValueError("hvdcomp.ddp.CompressionState cannot run:\n  " + "\n  ".join(problems))

    # ---- the hook body --------------------------------------------------------------------------
    def _hook(self, bucket: dist.GradBucket) -> torch.futures.Future:
        if self._late_errors.error is not None:
            raise RuntimeError("hvdcomp.ddp: an earlier bucket's exchange failed; this process group's "
                               "collectives are out of step, restart the job") from self._late_errors.error
        if self._check_step:
            self._check_same_step()
        params, grads = bucket.parameters(), bucket.gradients()
        slots = self._layouts.slots(bucket.index(), params, grads)
        with self._lock:
            step = self.step
            self._inflight += 1
            if bucket.is_last():
                # Set before launching: the last bucket's chains may finish inline.
                self._closing = True
                self.step += 1
        run = _BucketRun(self, bucket, grads, slots)
        try:
            self._collectives.check(run.device, what="gradients")
            ctx = StepContext(self.rank, self.size, step, self._averaging)
            chains = []
            for kind, members in self._router.chains(slots):
                members = sorted(members, key=lambda j: slots[j].info.index)
                chain = chain_function(kind)(ctx, [slots[j] for j in members], [grads[j] for j in members],
                                             f"bucket {run.index}")
                chain_run = ChainRun(chain, kind)
                chain_run.advance()  # local work up to the first collective: raises before any
                self._collectives.check_requests(chain_run.requests, run.device)
                chains.append((chain_run, phase_count(kind, [slots[j].compressor for j in members])))
        except BaseException:
            with self._lock:
                self._inflight -= 1
                if bucket.is_last():
                    self._closing, self.step = False, step
            raise
        run.raised_later = self._late_errors.watch(run.future)
        run.pending = len(chains)
        for chain_run, nphases in chains:
            chain_run.state = [self._collectives.sequencers[k].reserve() for k in range(nphases)]
        for chain_run, _ in chains:
            self._collectives.launch(run, chain_run)
        if not chains:
            self._bucket_finished(run)
            run.future.set_result(run.out)
        return run.future

    def _check_same_step(self) -> None:
        """After a checkpoint was loaded, before the step's first collective: every rank at the
        same step (one blocking object all-gather, the first collective of every rank)."""
        self._check_step = False
        # Every rank loads its own checkpoint with DDP: no rank counts as fresh.
        check_same_step(self._collectives.all_gather_object((self.step, self.size, False)), self.rank)

    def _bucket_finished(self, run: _BucketRun) -> None:
        with self._lock:
            for r in run.records:
                self._traffic.record(r)
            self._step_results += run.results
            self._inflight -= 1
            if self._closing and self._inflight == 0:
                self._closing = False
                if step_dropped(self._step_results):  # the step's one host read of the flags
                    restore(self._step_results)
                    self.step -= 1
                    self.dropped_steps += 1
                self._step_results = []
                self._table.end_step()
                self._traffic.end_step()

    def _bucket_failed(self, run: _BucketRun, exc: BaseException) -> None:
        with self._lock:
            self._inflight -= 1
            if self._late_errors.error is None:
                self._late_errors.error = exc

    # ---- telemetry and checkpoints -----------------------------------------------------------------
    def compression_stats(self) -> dict:
        """The optimizer's ``compression_stats()`` keys plus ``rebuilds``; entries named
        ``[bucket i ...]`` hold bytes that belong to no tensor (padding, size exchange, scale
        max-allreduce), so ``sent_bytes``/``received_bytes`` are what the collectives moved."""
        with self._lock:
            stats = compression_stats(self._traffic, self._table, self._router, self.step, self.dropped_steps)
        stats["rebuilds"] = self._layouts.rebuilds
        return stats

    def state_dict(self) -> dict:
        """Step counter, settings and every parameter's compressor state (tensors cloned),
        keyed by parameter name (``named_parameters`` given) or first-layout position."""
        with self._lock:
            return self._table.state_dict(self.step, self._keys)

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore :meth:`state_dict` (before training, or between iterations); every check
        (settings, number of ranks, names, keys, shapes) runs before anything changes."""
        with self._lock:
            self.step = self._table.load_state_dict(state_dict, self._keys)
            self._check_step = True

    @property
    def backend(self) -> str:
        """The process group's backend name (what the capability checks assume)."""
        return self._collectives.backend

    @backend.setter
    def backend(self, name: str) -> None:
        self._collectives.backend = name

    @property
    def rebuilds(self) -> int:
        """How many times a bucket index was found holding other parameters than before."""
        return self._layouts.rebuilds

    def bucket_layout(self) -> dict[int, list[str]]:
        """DDP's current buckets as seen by the hook: bucket index -> parameter keys by position."""
        return self._layouts.names()



def compression_hook(state: CompressionState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: average ``bucket`` across ranks through ``state``'s compressors.

    bucket: DDP's ``GradBucket``; ``bucket.buffer()`` is a flat tensor (the gradients'
    dtype, e.g. fp32 [sum of numels]) and ``bucket.gradients()`` its per-parameter views.
    Returns a future resolving to a tensor of the buffer's size and dtype holding the
    average over the ranks of ``state.process_group`` (DDP semantics: ``op`` is always
    average). Register with ``ddp_model.register_comm_hook(state, compression_hook)``.
    """
    return state._hook(bucket)
