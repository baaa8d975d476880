"""``hvdcomp.DistributedOptimizer``: Horovod's optimizer wrapper, for every compressor.

Same arguments and behaviour as ``hvd.DistributedOptimizer`` (it wraps any
``torch.optim.Optimizer``, starts communication from per-parameter backward hooks so that
early layers' exchange overlaps the backward of later ones, and completes it in
``synchronize()`` / ``step()``), but it patches nothing inside Horovod and routes each
gradient by what its compressor needs:

* ``transport == "allreduce"`` (none, fp16, random-k, ...): ``hvd.allreduce_async_`` of the
  dense payload per tensor, exactly like Horovod's optimizer.
* ``transport == "allgather"`` (AdaComp, DGC, top-k, 1-bit, TernGrad, bf16): parameters are
  grouped into buckets; when a bucket's gradients are ready its payloads are encoded, their
  sizes read to the host once for the whole bucket, packed into one uint8 buffer and sent
  with one ``hvd.allgather_async`` (plus a small allgather of the per-tensor sizes). Each rank
  decodes the N payloads of a tensor with one kernel launch and averages.

Error-feedback / momentum state is kept per parameter *name*, on the gradient's device, and
is part of ``state_dict()`` / ``load_state_dict()``. Tensors with fewer than
``min_compress_numel`` elements go through ``small_compression`` (default: uncompressed),
as the papers do for biases and norms.
"""
from __future__ import annotations

import contextlib
import dataclasses
import pickle
import warnings
from typing import Any, Iterable

import torch

from .collectives import CompressedAllreduce
from .exchange import decode_packed, encode_packed, split_packed
from ._horovod import hvd
from .compressor import Compressor, TensorInfo
from .registry import Compression
from .telemetry import TensorTraffic, TrafficLog, allgather_traffic, allreduce_traffic

Tensor = torch.Tensor

#: Default size below which a gradient is not compressed (elements). Biases and norm
#: weights of common models are below it; every conv/FC weight worth compressing is above.
DEFAULT_MIN_COMPRESS_NUMEL = 1024
#: Default bucket capacity for packed payloads, in dense fp32 megabytes (as DDP's).
DEFAULT_BUCKET_CAP_MB = 25.0
_HOROVOD_ALLREDUCE_DTYPES = (torch.float16, torch.float32, torch.float64, torch.int32, torch.int64)


@dataclasses.dataclass
class _Slot:
    """One parameter: its name, static description, compressor and state."""

    param: Tensor
    name: str
    info: TensorInfo
    compressor: Compressor
    state: dict
    delay: int
    bucket: int | None = None  # index into _buckets for allgather transport


@dataclasses.dataclass
class _Bucket:
    """Parameters whose packed payloads travel together in one allgather."""

    index: int
    slots: list
    collective: str = "allgather"  # or "compressed_allreduce"
    ready: int = 0
    handle: Any = None


class _DistributedOptimizer(torch.optim.Optimizer):
    """Mixin body of the class built by :func:`DistributedOptimizer` (do not use directly)."""

    def __init__(self, params, named_parameters, compression, backward_passes_per_step, op,
                 gradient_predivide_factor, process_set, min_compress_numel, small_compression,
                 bucket_cap_mb, collective):
        super(self.__class__, self).__init__(params)
        h = hvd()
        self._h = h
        self._compression = compression
        self._small_compression = small_compression
        self._collective = collective
        self.backward_passes_per_step = backward_passes_per_step
        self.op = op
        self.gradient_predivide_factor = gradient_predivide_factor
        self.process_set = process_set
        self._rank = process_set.rank()
        self._size = process_set.size()
        self._step = 0
        self._traffic = TrafficLog()
        self._handles: dict[str, Any] = {}
        self._broadcasts: dict[str, Any] = {}  # ScaleCom index broadcasts still in flight
        self._synchronized = False
        self._should_synchronize = True

        names = _parameter_names(self.param_groups, named_parameters)
        order = sorted(names.values())
        index_of = {name: i for i, name in enumerate(order)}
        self._slots: dict[str, _Slot] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                name = names[p]
                info = TensorInfo(name=name, shape=p.shape, dtype=p.dtype, device=p.device,
                                  index=index_of[name], rank=self._rank, size=self._size)
                comp = compression if info.numel >= min_compress_numel else small_compression
                self._slots[name] = _Slot(p, name, info, comp, comp.init_state(info), backward_passes_per_step)
        self._check_same_on_all_ranks(min_compress_numel, bucket_cap_mb)
        self._buckets = self._make_buckets(bucket_cap_mb)
        for slot in self._slots.values():
            slot.param.register_post_accumulate_grad_hook(self._make_hook(slot))

    # ---- set-up ------------------------------------------------------------------------
    def _check_same_on_all_ranks(self, min_compress_numel, bucket_cap_mb) -> None:
        """Compare compressor settings and parameter lists across ranks before any exchange,
        so that a mismatch is a clear error on every rank rather than a hang or a wrong sum."""
        mine = {
            "compression": self._compression.config(),
            "small_compression": self._small_compression.config(),
            "min_compress_numel": min_compress_numel,
            "bucket_cap_mb": bucket_cap_mb,
            "collective": self._collective,
            "backward_passes_per_step": self.backward_passes_per_step,
            "op": str(self.op),
            "parameters": sorted((n, tuple(s.info.shape), str(s.info.dtype)) for n, s in self._slots.items()),
        }
        if self._size == 1:
            return
        everyone = _allgather_object(self._h, mine, "hvdcomp.config_check", self.process_set)
        diffs = [
            f"rank {r}: {key} = {theirs[key]!r} (rank {self._rank} has {mine[key]!r})"
            for r, theirs in enumerate(everyone)
            for key in mine
            if theirs[key] != mine[key] and key != "parameters"
        ]
        if any(theirs["parameters"] != mine["parameters"] for theirs in everyone):
            diffs.append("the ranks' named parameters (names, shapes or dtypes) differ")
        if diffs:
            raise ValueError("hvdcomp.DistributedOptimizer settings differ between ranks:\n  " + "\n  ".join(diffs))

    def _collective_for(self, comp: Compressor) -> str:
        """``allgather`` or ``compressed_allreduce`` for a packed compressor (see
        :func:`choose_collective`)."""
        return choose_collective(comp, self._collective, self._size)

    def _make_buckets(self, bucket_cap_mb: float) -> list[_Bucket]:
        # Name order (identical on every rank), reversed: roughly the order in which the
        # backward pass produces gradients, so buckets fill and leave early.
        cap = bucket_cap_mb * 2**20 / 4
        buckets: list[_Bucket] = []
        current: list[_Slot] = []
        filled = 0
        for name in sorted(self._slots, reverse=True):
            slot = self._slots[name]
            if slot.compressor.transport != "allgather":
                continue
            if current and filled + slot.info.numel > cap:
                buckets.append(_Bucket(len(buckets), current))
                current, filled = [], 0
            current.append(slot)
            filled += slot.info.numel
        if current:
            buckets.append(_Bucket(len(buckets), current))
        for b in buckets:
            b.collective = self._collective_for(b.slots[0].compressor)
            for slot in b.slots:
                slot.bucket = b.index
        return buckets

    # ---- backward hooks ------------------------------------------------------------------
    def _make_hook(self, slot: _Slot):
        def hook(param: Tensor) -> None:
            if slot.delay <= 0:
                raise AssertionError(
                    "Gradients were computed more than backward_passes_per_step times before "
                    "step(). Increase backward_passes_per_step to accumulate gradients locally."
                )
            slot.delay -= 1
            if slot.delay == 0:
                self._gradient_ready(slot)

        return hook

    def _gradient_ready(self, slot: _Slot) -> None:
        self._synchronized = False
        self._advance_broadcasts(wait=False)
        if slot.bucket is None:
            if getattr(slot.compressor, "needs_index_broadcast", False):
                self._broadcasts[slot.name] = self._index_broadcast_async(slot)
            else:
                self._handles[slot.name] = self._allreduce_async(slot)
            return
        bucket = self._buckets[slot.bucket]
        bucket.ready += 1
        if bucket.ready == len(bucket.slots):
            if _needs_shared_scale(bucket):
                # Phase 1 only: the max-allreduce of the scales is started here and the
                # payloads are encoded once it is done (in synchronize). Blocking on a
                # collective inside a backward hook could deadlock ranks whose buckets
                # become ready in different orders.
                bucket.handle = ("scales", self._shared_scale_async(bucket))
            else:
                self._launch_bucket(bucket)

    def _prescaled_grad(self, slot: _Slot) -> Tensor:
        p = slot.param
        if p.grad is None:
            # Another rank may have a gradient for it (dynamic graphs): send zeros.
            p.grad = torch.zeros_like(p)
        grad = p.grad
        if self.op == self._h.Average and self.gradient_predivide_factor != 1.0:
            grad = grad / self.gradient_predivide_factor
        return grad

    # ---- dense path ------------------------------------------------------------------------
    def _index_broadcast_async(self, slot: _Slot):
        """ScaleCom phase 1: start the broadcast of the leader's top-k indices. The values'
        allreduce starts as soon as it completes (checked at every later hook), so the
        broadcast overlaps the rest of the backward pass instead of blocking it."""
        comp = slot.compressor
        idx = comp.propose(self._prescaled_grad(slot), slot.state, slot.info, self._step)
        leader = comp.leader(slot.info, self._step)
        return self._h.broadcast_async_(idx, root_rank=leader, name=f"hvdcomp.indices.{slot.name}",
                                        process_set=self.process_set)

    def _advance_broadcasts(self, wait: bool) -> None:
        for name in list(self._broadcasts):
            handle = self._broadcasts[name]
            if wait or self._h.poll(handle):
                slot = self._slots[name]
                slot.state["indices"] = self._h.synchronize(handle)
                del self._broadcasts[name]
                self._handles[name] = self._allreduce_async(slot, extra_bytes=4 * slot.state["indices"].numel())

    def _allreduce_async(self, slot: _Slot, extra_bytes: int = 0):
        """Start the sum-allreduce of the slot's dense payload. ``extra_bytes``: bytes the
        slot already moved this step by another collective (ScaleCom's indices)."""
        grad = self._prescaled_grad(slot)
        payload, ctx = slot.compressor.encode_dense(grad, slot.state, slot.info, self._step)
        if payload.dtype not in _HOROVOD_ALLREDUCE_DTYPES:
            payload = payload.to(torch.float32)  # Horovod's allreduce has no bf16/int8
        handle = self._h.allreduce_async_(payload, name=f"hvdcomp.allreduce.{slot.name}", op=self._h.Sum,
                                          process_set=self.process_set)
        return handle, payload, ctx, extra_bytes

    def _finish_allreduce(self, slot: _Slot, pending) -> Tensor:
        handle, payload, ctx, extra_bytes = pending
        summed = self._h.synchronize(handle)
        total = slot.compressor.decode_dense(summed, ctx, slot.state, slot.info)
        nbytes = payload.numel() * payload.element_size()
        sent, received = allreduce_traffic(nbytes, self._size)
        if extra_bytes:  # a pipelined broadcast: every rank receives it once and forwards it once
            forwarded = extra_bytes if self._size > 1 else 0
            sent, received = sent + forwarded, received + forwarded
        self._record(slot, nbytes + extra_bytes, sent, received, "allreduce+broadcast" if extra_bytes else "allreduce")
        return total

    # ---- packed path -----------------------------------------------------------------------
    def _shared_scale_async(self, bucket: _Bucket):
        """Start the max-allreduce of the bucket's per-tensor scales (TernGrad's shared s)."""
        scales = torch.cat([
            slot.compressor.local_scale(self._prescaled_grad(slot), slot.info).reshape(1).to(torch.float32)
            for slot in bucket.slots
        ])
        return self._h.allreduce_async(scales, name=f"hvdcomp.bucket{bucket.index}.scales", op=self._h.Max,
                                       process_set=self.process_set)

    def _finish_shared_scale(self, bucket: _Bucket) -> None:
        shared = self._h.synchronize(bucket.handle[1])
        for j, slot in enumerate(bucket.slots):
            slot.state["shared_scale"] = shared[j:j + 1]
        self._launch_bucket(bucket)

    def _launch_bucket(self, bucket: _Bucket) -> None:
        if bucket.collective == "compressed_allreduce":
            exchange = CompressedAllreduce(
                self._h, [s.compressor for s in bucket.slots], [s.state for s in bucket.slots],
                [s.info for s in bucket.slots], f"hvdcomp.bucket{bucket.index}", self.process_set,
                self._rank, self._size)
            exchange.start([self._prescaled_grad(s) for s in bucket.slots], self._step)
            bucket.handle = ("compressed_allreduce", exchange)
        else:
            bucket.handle = ("payload", self._allgather_async(bucket))

    def _finish_bucket(self, bucket: _Bucket) -> dict[str, Tensor]:
        if bucket.handle[0] == "scales":
            self._finish_shared_scale(bucket)
        if bucket.handle[0] == "compressed_allreduce":
            sums, traffic = bucket.handle[1].finish()
            for slot, t in zip(bucket.slots, traffic):
                self._record(slot, t["payload_bytes"], t["sent_bytes"], t["received_bytes"], "compressed_allreduce")
            return {slot.name: total for slot, total in zip(bucket.slots, sums)}
        return self._finish_allgather(bucket)

    def _allgather_async(self, bucket: _Bucket):
        slots = bucket.slots
        buffer, sizes_list = encode_packed([s.compressor for s in slots], [self._prescaled_grad(s) for s in slots],
                                           [s.state for s in slots], [s.info for s in slots], self._step)
        sizes = torch.tensor(sizes_list, dtype=torch.int64)
        tag = f"hvdcomp.bucket{bucket.index}"
        size_handle = self._h.allgather_async(sizes, name=f"{tag}.sizes", process_set=self.process_set)
        data_handle = self._h.allgather_async(buffer, name=f"{tag}.payload", process_set=self.process_set)
        return size_handle, data_handle, sizes_list

    def _finish_allgather(self, bucket: _Bucket) -> dict[str, Tensor]:
        size_handle, data_handle, own_sizes = bucket.handle[1]
        slots = bucket.slots
        all_sizes = self._h.synchronize(size_handle).view(self._size, len(slots)).tolist()
        per_rank = split_packed(self._h.synchronize(data_handle), all_sizes)
        totals = decode_packed([s.compressor for s in slots], per_rank, [s.state for s in slots],
                               [s.info for s in slots])
        for j, slot in enumerate(slots):
            sent, received = allgather_traffic(own_sizes[j], [sizes[j] for sizes in all_sizes], self._rank)
            self._record(slot, own_sizes[j], sent, received, "allgather")
        return {slot.name: total for slot, total in zip(slots, totals)}

    # ---- completion --------------------------------------------------------------------------
    def _record(self, slot: _Slot, payload_bytes: int, sent: float, received: float, transport: str) -> None:
        info = slot.info
        self._traffic.record(TensorTraffic(
            name=slot.name, numel=info.numel, dense_bytes=info.numel * slot.param.element_size(),
            payload_bytes=payload_bytes, sent_bytes=sent, received_bytes=received,
            transport=transport, compressor=slot.compressor.name,
            selected=slot.compressor.selected_count(payload_bytes, info), shape=tuple(info.shape),
        ))

    def synchronize(self) -> None:
        """Finish every exchange of this step and write the averaged gradients to ``p.grad``."""
        # Parameters whose hook did not fire this step (no gradient, or fewer backward passes
        # than configured) still take part: other ranks may have sent theirs.
        for slot in self._slots.values():
            if slot.delay > 0:
                slot.delay = 0
                self._gradient_ready(slot)
        self._advance_broadcasts(wait=True)
        totals: dict[str, Tensor] = {}
        for name, pending in self._handles.items():
            totals[name] = self._finish_allreduce(self._slots[name], pending)
        for bucket in self._buckets:
            totals.update(self._finish_bucket(bucket))
            bucket.ready, bucket.handle = 0, None
        scale = self._postscale()
        for name, total in totals.items():
            slot = self._slots[name]
            if scale != 1.0:
                total = total * scale
            slot.param.grad.copy_(total.view(slot.info.shape))
            slot.delay = self.backward_passes_per_step
        self._handles.clear()
        self._traffic.end_step()
        self._step += 1
        self._synchronized = True

    def _postscale(self) -> float:
        if self.op == self._h.Average:
            return self.gradient_predivide_factor / self._size
        return 1.0

    @contextlib.contextmanager
    def skip_synchronize(self):
        """Let ``step()`` skip ``synchronize()`` (call it yourself first), as in Horovod."""
        self._should_synchronize = False
        try:
            yield
        finally:
            self._should_synchronize = True

    def step(self, closure=None):
        if self._should_synchronize:
            if self._synchronized:
                warnings.warn("optimizer.step() called without optimizer.skip_synchronize() after "
                              "optimizer.synchronize(): the gradients are exchanged again.")
            self.synchronize()
        self._synchronized = False
        return super(self.__class__, self).step(closure)

    def zero_grad(self, *args, **kwargs):
        if self._handles or self._broadcasts or any(b.handle is not None for b in self._buckets):
            raise AssertionError("optimizer.zero_grad() was called after loss.backward() but before "
                                 "optimizer.step() or optimizer.synchronize().")
        return super(self.__class__, self).zero_grad(*args, **kwargs)

    # ---- telemetry and checkpoints ------------------------------------------------------------
    def compression_stats(self) -> dict:
        """Traffic of the last step and since the start (see :mod:`hvdcomp.telemetry`)."""
        stats = self._traffic.stats()
        stats["compression"] = self._compression.config()
        stats["nranks"] = self._size
        return stats

    def state_dict(self) -> dict:
        sd = super(self.__class__, self).state_dict()
        sd["hvdcomp"] = {
            "step": self._step,
            "compression": self._compression.config(),
            "small_compression": self._small_compression.config(),
            "state": {name: {k: v.clone() for k, v in s.state.items()} for name, s in self._slots.items()},
        }
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        ours = state_dict.pop("hvdcomp", None)
        super(self.__class__, self).load_state_dict(state_dict)
        if ours is None:
            return
        if ours["compression"] != self._compression.config():
            raise ValueError(f"checkpoint was made with compression {ours['compression']}, "
                             f"this optimizer uses {self._compression.config()}")
        missing = set(self._slots) - set(ours["state"])
        if missing:
            raise ValueError(f"checkpoint has no compression state for {sorted(missing)[:5]}")
        for name, slot in self._slots.items():
            for key, value in ours["state"][name].items():
                if key not in slot.state:
                    raise ValueError(f"checkpoint state {name}.{key} is unknown to {slot.compressor.name}")
                slot.state[key].copy_(value)
        self._step = int(ours["step"])


def choose_collective(comp: Compressor, requested: str, nranks: int) -> str:
    """The collective that carries ``comp``'s packed payloads.

    ``requested``: "allgather", "compressed_allreduce" (only for compressors implementing
    :class:`hvdcomp.collectives.ChunkCodec`) or "auto": compressed allreduce where its
    bytes received per rank, ``(N-1)/N (b + b_sum)``, are fewer than allgather's,
    ``(N-1) b`` (b, b_sum: bits per element of a payload and of a re-encoded sum).
    """
    supports = getattr(comp, "supports_compressed_allreduce", False)
    if requested == "allgather" or not supports:
        if requested == "compressed_allreduce":
            raise ValueError(f"{comp.name} cannot travel by compressed allreduce (no chunk codec); "
                             "use collective='allgather' or 'auto'")
        return "allgather"
    if requested == "compressed_allreduce":
        return requested
    bits, sum_bits = comp.bits_per_element(), comp.sum_bits(nranks)
    return "compressed_allreduce" if (nranks - 1) / nranks * (bits + sum_bits) < (nranks - 1) * bits else "allgather"


def _needs_shared_scale(bucket: _Bucket) -> bool:
    return any(getattr(slot.compressor, "needs_shared_scale", False) for slot in bucket.slots)


def _allgather_object(h, obj: Any, name: str, process_set) -> list:
    """Every rank's ``obj`` (picklable), in rank order, within ``process_set``.

    Horovod 0.28.1's ``allgather_object`` takes no process set, hence this one.
    """
    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
    lengths = h.allgather(torch.tensor([data.numel()]), name=f"{name}.len", process_set=process_set).tolist()
    blob = h.allgather(data, name=f"{name}.data", process_set=process_set)
    out, start = [], 0
    for n in lengths:
        out.append(pickle.loads(blob[start:start + n].numpy().tobytes()))
        start += n
    return out


def _parameter_names(param_groups, named_parameters) -> dict[Tensor, str]:
    """Map each optimizer parameter to its name (Horovod's rules, stricter errors)."""
    params = [p for g in param_groups for p in g["params"]]
    if named_parameters is None:
        # Positional names, as Horovod does; identical across ranks for the same model.
        return {p: f"param.{i}" for i, p in enumerate(params)}
    named = list(named_parameters)
    if any(not isinstance(item, tuple) or len(item) != 2 for item in named):
        raise ValueError("named_parameters must be an iterable of (name, parameter) tuples, "
                         "e.g. model.named_parameters()")
    names = [n for n, _ in named]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"named_parameters has duplicate names: {dupes[:5]}")
    by_param = {p: n for n, p in named}
    unnamed = [i for i, p in enumerate(params) if p not in by_param]
    if unnamed:
        raise ValueError(f"named_parameters does not cover every optimizer parameter "
                         f"(positions {unnamed[:5]} have no name)")
    return {p: by_param[p] for p in params}


def DistributedOptimizer(optimizer: torch.optim.Optimizer, named_parameters: Iterable | None = None,
                         compression: Compressor | None = None, backward_passes_per_step: int = 1,
                         op=None, gradient_predivide_factor: float = 1.0, process_set=None, *,
                         min_compress_numel: int = DEFAULT_MIN_COMPRESS_NUMEL,
                         small_compression: Compressor | None = None,
                         bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB, collective: str = "auto"):
    """Wrap ``optimizer`` so that ``step()`` applies the average of all ranks' gradients,
    exchanged through ``compression`` (any ``hvdcomp.Compression.*`` compressor).

    Arguments as ``hvd.DistributedOptimizer``; ``op`` is ``hvd.Average`` (default) or
    ``hvd.Sum`` (Adasum is not supported). Extra keyword-only arguments:
    ``min_compress_numel`` (tensors with fewer elements use ``small_compression``, default
    uncompressed), ``bucket_cap_mb`` (dense fp32 size of one packed-payload bucket) and
    ``collective`` ("auto", "allgather" or "compressed_allreduce": how packed payloads of
    summable formats travel, see :func:`choose_collective`).
    """
    h = hvd()
    compression = Compression.none() if compression is None else compression
    small_compression = Compression.none() if small_compression is None else small_compression
    for label, comp in (("compression", compression), ("small_compression", small_compression)):
        if not isinstance(comp, Compressor):
            raise TypeError(f"{label} must be an hvdcomp compressor (e.g. hvdcomp.Compression.fp16()), "
                            f"got {type(comp).__name__}; Horovod's own compressors are not supported here")
    op = h.Average if op is None else op
    if op not in (h.Average, h.Sum):
        raise ValueError("hvdcomp.DistributedOptimizer supports op=hvd.Average or hvd.Sum")
    if not isinstance(backward_passes_per_step, int) or backward_passes_per_step < 1:
        raise ValueError(f"backward_passes_per_step must be an integer >= 1, got {backward_passes_per_step!r}")
    if gradient_predivide_factor <= 0:
        raise ValueError(f"gradient_predivide_factor must be > 0, got {gradient_predivide_factor}")
    if gradient_predivide_factor != 1.0 and op != h.Average:
        raise ValueError("gradient_predivide_factor not supported with op != Average")
    if min_compress_numel < 0:
        raise ValueError(f"min_compress_numel must be >= 0, got {min_compress_numel}")
    if collective not in ("auto", "allgather", "compressed_allreduce"):
        raise ValueError(f"collective must be 'auto', 'allgather' or 'compressed_allreduce', got {collective!r}")
    if collective == "compressed_allreduce" and compression.transport == "allgather":
        choose_collective(compression, collective, 2)  # raises if unsupported
    if bucket_cap_mb <= 0:
        raise ValueError(f"bucket_cap_mb must be > 0, got {bucket_cap_mb}")
    process_set = h.global_process_set if process_set is None else process_set
    cls = type(optimizer.__class__.__name__, (optimizer.__class__,), dict(_DistributedOptimizer.__dict__))
    return cls(optimizer.param_groups, named_parameters, compression, backward_passes_per_step, op,
               gradient_predivide_factor, process_set, min_compress_numel, small_compression, bucket_cap_mb,
               collective)

