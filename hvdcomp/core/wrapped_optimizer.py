"""What the optimizer transports share: ``hvdcomp.DistributedOptimizer`` (Horovod) and the
in-process ranks' optimizer (:mod:`hvdcomp.inprocess`) wrap a ``torch.optim.Optimizer`` the
same way and differ only in how their chains' collectives travel.

:class:`CompressingOptimizer` is a mixin whose methods the transport copies into a direct
subclass of the user's optimizer class with :func:`wrapper_class`, as Horovod builds its
own: the result is still an instance of the user's class (``isinstance(opt,
torch.optim.SGD)``, LR schedulers work), ``super(type(opt), opt).step()`` is the wrapped
optimizer's plain step (which ``hvd.broadcast_optimizer_state`` relies on), and the mixin's
methods reach the wrapped optimizer with ``super(self.__class__, self)``. It owns the slots
(:class:`~hvdcomp.core.slots.SlotTable`), the packed buckets and a
:class:`~hvdcomp.core.step.StepDriver` (agreements, end of step, telemetry, checkpoint); a
step's chains are listed by :meth:`CompressingOptimizer._chain_plan` in an order identical
on every rank.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable

import torch

from .chains import SPARSE, Averaging, ChainResult, StepContext
from .frozen_adam import FrozenAdamW, phase_compressors
from .groups import form_groups
from .hierarchy import HierarchicalRouter, Topology
from .options import ExchangeOptions, check_named_parameters
from .plan import Router, packed_buckets
from .slots import SlotTable
from .step import StepDriver

Tensor = torch.Tensor


def wrapper_class(optimizer_cls: type, front_end: type, module: str) -> type:
    """A direct subclass of ``optimizer_cls`` named like it, holding the methods of
    ``front_end`` and of its bases (those of subclasses win), with ``__module__`` =
    ``module``. Horovod's ``DistributedOptimizer`` is built this way
    (``type(name, (cls,), dict(_DistributedOptimizer.__dict__))``), and Horovod's helpers
    tell such an optimizer apart by its ``__module__``."""
    namespace: dict = {}
    for klass in reversed(front_end.__mro__[:-1]):  # object excluded
        namespace.update({k: v for k, v in vars(klass).items() if k not in ("__dict__", "__weakref__")})
    namespace["__module__"] = module
    namespace["__doc__"] = optimizer_cls.__doc__
    return type(optimizer_cls.__name__, (optimizer_cls,), namespace)


def parameter_names(param_groups, named_parameters) -> dict[Tensor, str]:
    """Map each optimizer parameter to its name (Horovod's rules, stricter errors): when
    ``named_parameters`` is None, Horovod's ``allreduce.noname.{group}.{position}``."""
    params = [p for g in param_groups for p in g["params"]]
    if named_parameters is None:
        return {p: f"allreduce.noname.{i}.{j}" for i, g in enumerate(param_groups) for j, p in enumerate(g["params"])}
    by_param = {p: n for n, p in check_named_parameters(named_parameters)}
    unnamed = [i for i, p in enumerate(params) if p not in by_param]
    if unnamed:
        raise ValueError(f"named_parameters does not cover every optimizer parameter "
                         f"(positions {unnamed[:5]} have no name)")
    return {p: by_param[p] for p in params}


def chain_label(key: tuple) -> str:
    """The name of a chain in traffic records: the parameter's, or ``bucket i``."""
    return key[1] if key[0] == "slot" else f"bucket {key[1]}"


class CompressingOptimizer:
    """Mixin of the optimizer transports (see the module docstring)."""

    def _setup_compression(self, named_parameters, options: ExchangeOptions, rank: int, size: int, *,
                           settings: dict, allreduce_dtypes: frozenset | None, who: str,
                           after_load: Callable[[object, object], None], topology: Topology | None = None) -> None:
        """Slots, buckets and step driver. settings: the transport's own settings that must
        match on every rank (added to the record); after_load(optimizer, compression): the
        recipe to apply again after ``load_state_dict`` (:func:`hvdcomp.recipes.reapply_after_load`);
        topology: this rank's nodes when the exchange is hierarchical (:mod:`hvdcomp.core.hierarchy`)."""
        names = parameter_names(self.param_groups, named_parameters)
        self._parameter_names = names  # Horovod's attribute: {parameter: name}
        trainable = {names[p]: p for g in self.param_groups for p in g["params"] if p.requires_grad}
        table = SlotTable(options.compression, options.small_compression, options.min_compress_numel, rank, size,
                          expected_names=trainable)
        self._router = (Router(table.compressors(), options.collective, size) if topology is None
                        else HierarchicalRouter(table.compressors(), options.collective, topology))
        table.layout = self._router  # before the slots: their state follows the way they travel
        index_of = {n: i for i, n in enumerate(sorted(names.values()))}
        for name, p in trainable.items():
            table.add(name, p.shape, p.dtype, p.device, index_of[name])
        self._table = table
        self._params = trainable
        self._bucket_cap_mb = options.bucket_cap_mb
        if options.groups is None:
            self._plan_buckets()
        else:  # Horovod's explicit groups replace the buckets, for every kind of chain
            formed = form_groups(list(trainable.values()), options.groups)
            self._buckets = [[table.slots[names[p]] for p in group] for group in formed if group]
            self._bucket_of = {slot.name: i for i, bucket in enumerate(self._buckets) for slot in bucket}
        self._explicit_groups = options.groups is not None
        self._sparse_as_dense = options.sparse_as_dense
        self._sparse: set[str] = set()  # slots whose gradients were sparse: Horovod's sparse allreduce
        self._after_load = after_load
        self._synchronized = False
        self._should_synchronize = True
        shared = {"bucket_cap_mb": options.bucket_cap_mb, "collective": options.collective,
                  "sparse_as_dense": options.sparse_as_dense,
                  "groups": None if options.groups is None else [[s.name for s in b] for b in self._buckets],
                  "backward_passes_per_step": options.backward_passes_per_step,
                  "gradient_predivide_factor": options.predivide,
                  "hierarchical": None if topology is None else topology.describe()}
        if isinstance(self, FrozenAdamW):
            shared["warmup_steps"] = self.warmups()
        self._driver = StepDriver(table, self._router, Averaging(size, options.average, options.predivide),
                                  {**shared, **settings}, allreduce_dtypes, who)
        self._switch_phases()

    # ---- the step's chains ------------------------------------------------------------------
    def _plan_buckets(self) -> None:
        """Packed slots into buckets of ``bucket_cap_mb`` (again after a selector's decision
        changed which slots are packed)."""
        self._buckets = packed_buckets(list(self._table.slots.values()), self._router, self._bucket_cap_mb)
        self._bucket_of = {slot.name: i for i, bucket in enumerate(self._buckets) for slot in bucket}

    def _decided(self) -> None:
        """After a decision (``Compression.auto()``) changed slots' compressors."""
        if not self._explicit_groups:
            self._plan_buckets()

    def _switch_phases(self, frozen: dict | None = None) -> None:
        """Under :class:`FrozenAdamW`: serve each compressed slot with the exact codec during
        its parameter's warm-up and with the compressor once frozen (:func:`phase_compressors`;
        at construction and at the start of every step, before any of its collectives)."""
        if not isinstance(self, FrozenAdamW):
            return
        wanted = phase_compressors(self, self._table, self._params, frozen)
        changed = [name for name, comp in wanted.items() if self._table.slots[name].compressor is not comp]
        for name in changed:
            self._table.slots[name].assign(wanted[name])
        if changed:
            self._decided()

    def redecide_compression(self) -> None:
        """``Compression.auto()``: measure and choose each tensor's compressor again at the
        start of the next step (call it on every rank; between steps)."""
        if self._driver.chooser is None:
            raise ValueError("redecide_compression() needs compression=hvdcomp.Compression.auto(...)")
        self._driver.chooser.redecide_requested = True

    def _described_parameters(self) -> list[tuple]:
        """Sorted ``(name, shape, dtype)`` of the slots: part of the settings record."""
        return sorted((s.name, tuple(s.info.shape), str(s.info.dtype)) for s in self._table.slots.values())

    def _note_sparse(self, name: str) -> None:
        """A sparse gradient travels as Horovod sends it (uncompressed), unless
        ``sparse_as_dense``; once seen sparse, a slot stays in the sparse chain."""
        grad = self._params[name].grad
        if grad is not None and grad.is_sparse and not self._sparse_as_dense:
            self._sparse.add(name)

    def _slot_chain(self, name: str) -> tuple:
        """``(key, kind, slots)`` of the chain a slot outside the buckets travels in."""
        slot = self._table.slots[name]
        return ("slot", name), SPARSE if name in self._sparse else self._router.kind(slot.compressor), [slot]

    def _bucket_chains(self, index: int) -> list[tuple]:
        bucket = [s for s in self._buckets[index] if s.name not in self._sparse]
        chains = [(("bucket", index, kind.name), kind, [bucket[j] for j in members])
                  for kind, members in self._router.chains(bucket)]
        return chains + [self._slot_chain(s.name) for s in self._buckets[index] if s.name in self._sparse]

    def _chain_plan(self) -> list[tuple]:
        """Every chain of a step, ``(key, kind, slots)``, in an order identical on every rank."""
        plan = [self._slot_chain(n) for n in sorted(self._table.slots) if n not in self._bucket_of]
        for index in range(len(self._buckets)):
            plan.extend(self._bucket_chains(index))
        return plan

    def _context(self) -> StepContext:
        return self._driver.context()

    def _reset_exchange(self) -> None:
        """Forget this step's pending exchange (``load_state_dict``, as Horovod's does)."""

    def _gradient(self, name: str) -> Tensor:
        p = self._params[name]
        if p.grad is None:
            # Another rank may have a gradient for it (dynamic graphs): send zeros.
            p.grad = torch.zeros_like(p)
        grad = p.grad.to_dense() if p.grad.is_sparse and name not in self._sparse else p.grad
        if isinstance(self, FrozenAdamW):  # the local momentum once frozen
            return self.exchange_message(p, grad)
        return grad  # sparse_as_dense: a sparse gradient is compressed like any dense one

    def _write_gradient(self, name: str, avg: Tensor) -> None:
        """The averaged gradient into ``p.grad``; a sparse gradient stays sparse (as in Horovod)."""
        p = self._params[name]
        if p.grad.is_sparse or avg.is_sparse:
            p.grad = (avg if avg.is_sparse else avg.to_sparse()).to(p.grad.dtype)
        else:
            p.grad.copy_(avg)

    def _apply(self, results: list[ChainResult]) -> None:
        """Close the step (:meth:`StepDriver.finish`: a dropped step's gradients are NaN),
        then write the averaged gradients."""
        dropped = self._driver.finish(results)
        if isinstance(self, FrozenAdamW):
            self.exchanged(dropped)
        for result in results:
            for slot, avg in result.outputs:
                self._write_gradient(slot.name, avg)
        self._synchronized = True

    # ---- the Optimizer surface ------------------------------------------------------------------
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
        return self._local_step(closure)

    def _local_step(self, closure=None):
        """The wrapped optimizer's step on the exchanged gradients (a :class:`FrozenAdamW`
        skips a dropped step)."""
        self._synchronized = False
        return super(self.__class__, self).step(closure)

    def compression_stats(self) -> dict:
        """Traffic of the last step and since the start (see :mod:`hvdcomp.core.traffic`)."""
        return self._driver.stats()

    def state_dict(self) -> dict:
        sd = super(self.__class__, self).state_dict()
        sd["hvdcomp"] = self._driver.state_dict()
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        self._reset_exchange()
        self._synchronized, self._should_synchronize = False, True
        state_dict = dict(state_dict)
        ours = state_dict.pop("hvdcomp", None)
        frozen = self.frozen_in(state_dict) if isinstance(self, FrozenAdamW) else None
        if ours is not None:
            # Under FrozenAdamW the checkpoint's phase decides which compressor's state each slot holds.
            compressors = None if frozen is None else phase_compressors(self, self._table, self._params, frozen)
            self._driver.load_state_dict(ours, compressors=compressors)
        super(self.__class__, self).load_state_dict(state_dict)
        if frozen is not None:
            self._switch_phases()
            self._decided()
            self._reset_exchange()  # the buckets may have changed
        self._after_load(self, self._table.compression)
