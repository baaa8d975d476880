"""What the optimizer front ends share: ``hvdcomp.DistributedOptimizer`` (Horovod) and the
in-process ranks' optimizer (:mod:`hvdcomp.inprocess`) wrap a ``torch.optim.Optimizer`` the
same way and differ only in how their chains' collectives travel.

:class:`CompressingOptimizer` is a mixin placed before the wrapped optimizer's class (the
front end builds ``type(name, (FrontEnd, optimizer.__class__), {})``), so the result is
still an instance of the user's optimizer class (``isinstance(opt, torch.optim.SGD)``) and
LR schedulers work. The front end builds that class with :func:`wrapper_class`, as Horovod
builds its own: the mixin's methods are copied into a direct subclass of the user's class
(so ``super(type(opt), opt).step()`` is the wrapped optimizer's plain step, which
``hvd.broadcast_optimizer_state`` relies on), and the mixin's methods reach the wrapped
optimizer with ``super(self.__class__, self)``. It owns the slots (:class:`~hvdcomp.core.slots.SlotTable`), the packed
buckets, the averaging rule, the traffic log and the checkpoint; a step's chains are listed
by :meth:`CompressingOptimizer._chain_plan` in an order identical on every rank.
"""
from __future__ import annotations

import contextlib
import warnings

import torch

from .traffic import TrafficLog
from .chains import Averaging, ChainResult, StepContext
from .groups import form_groups
from ..recipes import reapply_after_load
from .faults import check_same_step, poison, restore, step_dropped
from .options import check_named_parameters
from .plan import Router, packed_buckets
from .settings import settings_record
from .slots import SlotTable

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


def compression_stats(traffic: TrafficLog, table: SlotTable, router: Router, iterations: int, dropped: int) -> dict:
    """``compression_stats()`` of every front end: the last step's and cumulative traffic
    (see :mod:`hvdcomp.core.traffic`), the settings, each packed compressor's collective,
    ``iterations`` (steps applied) and ``dropped_steps`` (steps dropped because some rank's
    gradient was non-finite, see :mod:`hvdcomp.core.faults`)."""
    stats = traffic.stats()
    stats.update(compression=table.compression.config(), small_compression=table.small_compression.config(),
                 nranks=table.size, iterations=iterations, dropped_steps=dropped,
                 collectives=dict(router.collectives))
    return stats


def chain_label(key: tuple) -> str:
    """The name of a chain in traffic records: the parameter's, or ``bucket i``."""
    return key[1] if key[0] == "slot" else f"bucket {key[1]}"


class CompressingOptimizer:
    """Mixin of the optimizer front ends (see the module docstring)."""

    def _setup_compression(self, named_parameters, compression, small_compression, min_compress_numel: int,
                           bucket_cap_mb: float, collective: str, average: bool, predivide: float,
                           rank: int, size: int, groups=None, sparse_as_dense: bool = False) -> None:
        names = parameter_names(self.param_groups, named_parameters)
        self._parameter_names = names  # Horovod's attribute: {parameter: name}
        trainable = {names[p]: p for g in self.param_groups for p in g["params"] if p.requires_grad}
        self._table = SlotTable(compression, small_compression, min_compress_numel, rank, size,
                                expected_names=trainable)
        index_of = {n: i for i, n in enumerate(sorted(names.values()))}
        for name, p in trainable.items():
            self._table.add(name, p.shape, p.dtype, p.device, index_of[name])
        self._params = trainable
        self._router = Router([compression, small_compression], collective, size)
        slots = self._table.slots
        if groups is None:
            self._buckets = packed_buckets(list(slots.values()), self._router, bucket_cap_mb)
        else:  # Horovod's explicit groups replace the buckets, for every kind of chain
            formed = form_groups(list(trainable.values()), groups)
            self._buckets = [[slots[names[p]] for p in group] for group in formed if group]
        self._bucket_of = {slot.name: i for i, bucket in enumerate(self._buckets) for slot in bucket}
        self._sparse_as_dense = sparse_as_dense
        self._sparse: set[str] = set()  # slots whose gradients were sparse: Horovod's sparse allreduce
        self._averaging = Averaging(size, average, predivide)
        self._traffic = TrafficLog()
        self._step = 0
        self._dropped = 0
        self._loaded = False
        # The first step, and the first after a load_state_dict, compares the ranks' steps.
        self._check_step = True
        self._synchronized = False
        self._should_synchronize = True
        self._settings = {"bucket_cap_mb": bucket_cap_mb, "collective": collective, "sparse_as_dense": sparse_as_dense,
                          "groups": None if groups is None else [[s.name for s in b] for b in self._buckets]}

    # ---- the step's chains ------------------------------------------------------------------
    def _settings_record(self, error: str | None = None, **extra) -> dict:
        described = sorted((s.name, tuple(s.info.shape), str(s.info.dtype)) for s in self._table.slots.values())
        return settings_record(self._table, described, error, **self._settings, **extra)

    def _note_sparse(self, name: str) -> None:
        """A sparse gradient travels as Horovod sends it (uncompressed), unless
        ``sparse_as_dense``; once seen sparse, a slot stays in the sparse chain."""
        grad = self._params[name].grad
        if grad is not None and grad.is_sparse and not self._sparse_as_dense:
            self._sparse.add(name)

    def _slot_chain(self, name: str) -> tuple:
        """``(key, kind, slots)`` of the chain a slot outside the buckets travels in."""
        slot = self._table.slots[name]
        return ("slot", name), "sparse" if name in self._sparse else self._router.kind(slot.compressor), [slot]

    def _bucket_chains(self, index: int) -> list[tuple]:
        bucket = [s for s in self._buckets[index] if s.name not in self._sparse]
        chains = [(("bucket", index, kind), kind, [bucket[j] for j in members])
                  for kind, members in self._router.chains(bucket)]
        return chains + [self._slot_chain(s.name) for s in self._buckets[index] if s.name in self._sparse]

    def _chain_plan(self) -> list[tuple]:
        """Every chain of a step, ``(key, kind, slots)``, in an order identical on every rank."""
        plan = [self._slot_chain(n) for n in sorted(self._table.slots) if n not in self._bucket_of]
        for index in range(len(self._buckets)):
            plan.extend(self._bucket_chains(index))
        return plan

    def _context(self) -> StepContext:
        return StepContext(self._table.rank, self._table.size, self._step, self._averaging, self._allreduce_dtypes())

    def _reset_exchange(self) -> None:
        """Forget this step's pending exchange (``load_state_dict``, as Horovod's does)."""

    def _allreduce_dtypes(self):
        """Dtypes this transport's allreduce sums (None: all)."""
        return None

    def _gradient(self, name: str) -> Tensor:
        p = self._params[name]
        if p.grad is None:
            # Another rank may have a gradient for it (dynamic graphs): send zeros.
            p.grad = torch.zeros_like(p)
        if p.grad.is_sparse and name not in self._sparse:
            return p.grad.to_dense()  # sparse_as_dense: compressed like any dense gradient
        return p.grad

    def _write_gradient(self, name: str, avg: Tensor) -> None:
        """The averaged gradient into ``p.grad``; a sparse gradient stays sparse (as in Horovod)."""
        p = self._params[name]
        if p.grad.is_sparse or avg.is_sparse:
            p.grad = (avg if avg.is_sparse else avg.to_sparse()).to(p.grad.dtype)
        else:
            p.grad.copy_(avg)

    def _agree_on_step(self, everyone: list[tuple[int, int, bool]]) -> None:
        """Every rank's ``(step, nranks, fresh)`` compared (:func:`check_same_step`)."""
        self._check_step = False
        self._step = check_same_step(everyone, self._table.rank)

    def _step_record(self) -> tuple[int, int, bool]:
        return self._step, self._table.size, self._step == 0 and not self._loaded

    def _apply(self, results: list[ChainResult]) -> None:
        """Write the averaged gradients, record the traffic, close the step. A step in which
        some rank was non-finite is dropped: NaN gradients, state as before, the step counter
        not advanced (see :mod:`hvdcomp.core.faults`)."""
        dropped = step_dropped(results)
        if dropped:
            restore(results)
            poison(results)
        for result in results:
            for slot, avg in result.outputs:
                self._write_gradient(slot.name, avg)
            for t in result.traffic:
                self._traffic.record(t)
        self._table.end_step()
        self._traffic.end_step()
        self._step += 0 if dropped else 1
        self._dropped += int(dropped)
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
        self._synchronized = False
        return super(self.__class__, self).step(closure)

    def compression_stats(self) -> dict:
        """Traffic of the last step and since the start (see :mod:`hvdcomp.core.traffic`)."""
        return compression_stats(self._traffic, self._table, self._router, self._step, self._dropped)

    def state_dict(self) -> dict:
        sd = super(self.__class__, self).state_dict()
        sd["hvdcomp"] = self._table.state_dict(self._step)
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        self._reset_exchange()
        self._synchronized, self._should_synchronize = False, True
        state_dict = dict(state_dict)
        ours = state_dict.pop("hvdcomp", None)
        if ours is not None:
            self._step = self._table.load_state_dict(ours)
            self._loaded = self._check_step = True
        super(self.__class__, self).load_state_dict(state_dict)
        reapply_after_load(self, self._table.compression)
