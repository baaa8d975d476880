"""What the optimizer front ends share: ``hvdcomp.DistributedOptimizer`` (Horovod) and the
in-process ranks' optimizer (:mod:`hvdcomp.inprocess`) wrap a ``torch.optim.Optimizer`` the
same way and differ only in how their chains' collectives travel.

:class:`CompressingOptimizer` is a mixin placed before the wrapped optimizer's class (the
front end builds ``type(name, (FrontEnd, optimizer.__class__), {})``), so the result is
still an instance of the user's optimizer class (``isinstance(opt, torch.optim.SGD)``) and
LR schedulers work. It owns the slots (:class:`~hvdcomp.core.slots.SlotTable`), the packed
buckets, the averaging rule, the traffic log and the checkpoint; a step's chains are listed
by :meth:`CompressingOptimizer._chain_plan` in an order identical on every rank.
"""
from __future__ import annotations

import contextlib
import warnings

import torch

from ..telemetry import TrafficLog
from .chains import Averaging, ChainResult, StepContext
from .faults import poison, restore, step_dropped
from .options import check_named_parameters
from .plan import Router, packed_buckets
from .settings import settings_record
from .slots import SlotTable

Tensor = torch.Tensor


def parameter_names(param_groups, named_parameters) -> dict[Tensor, str]:
    """Map each optimizer parameter to its name (Horovod's rules, stricter errors):
    positional names ``param.i`` when ``named_parameters`` is None."""
    params = [p for g in param_groups for p in g["params"]]
    if named_parameters is None:
        return {p: f"param.{i}" for i, p in enumerate(params)}
    by_param = {p: n for n, p in check_named_parameters(named_parameters)}
    unnamed = [i for i, p in enumerate(params) if p not in by_param]
    if unnamed:
        raise ValueError(f"named_parameters does not cover every optimizer parameter "
                         f"(positions {unnamed[:5]} have no name)")
    return {p: by_param[p] for p in params}


def compression_stats(traffic: TrafficLog, table: SlotTable, router: Router, iterations: int, dropped: int) -> dict:
    """``compression_stats()`` of every front end: the last step's and cumulative traffic
    (see :mod:`hvdcomp.telemetry`), the settings, each packed compressor's collective,
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
                           rank: int, size: int) -> None:
        names = parameter_names(self.param_groups, named_parameters)
        trainable = {names[p]: p for g in self.param_groups for p in g["params"] if p.requires_grad}
        self._table = SlotTable(compression, small_compression, min_compress_numel, rank, size,
                                expected_names=trainable)
        index_of = {n: i for i, n in enumerate(sorted(names.values()))}
        for name, p in trainable.items():
            self._table.add(name, p.shape, p.dtype, p.device, index_of[name])
        self._params = trainable
        self._router = Router([compression, small_compression], collective, size)
        self._buckets = packed_buckets(list(self._table.slots.values()), self._router, bucket_cap_mb)
        self._bucket_of = {slot.name: i for i, bucket in enumerate(self._buckets) for slot in bucket}
        self._averaging = Averaging(size, average, predivide)
        self._traffic = TrafficLog()
        self._step = 0
        self._dropped = 0
        self._check_step = False  # set by load_state_dict: compare steps across ranks first
        self._synchronized = False
        self._should_synchronize = True
        self._settings = {"bucket_cap_mb": bucket_cap_mb, "collective": collective}

    # ---- the step's chains ------------------------------------------------------------------
    def _settings_record(self, error: str | None = None, **extra) -> dict:
        described = sorted((s.name, tuple(s.info.shape), str(s.info.dtype)) for s in self._table.slots.values())
        return settings_record(self._table, described, error, **self._settings, **extra)

    def _slot_chain(self, name: str) -> tuple:
        """``(key, kind, slots)`` of the chain a slot outside the buckets travels in."""
        slot = self._table.slots[name]
        return ("slot", name), self._router.kind(slot.compressor), [slot]

    def _bucket_chains(self, index: int) -> list[tuple]:
        bucket = self._buckets[index]
        return [(("bucket", index, kind), kind, [bucket[j] for j in members])
                for kind, members in self._router.chains(bucket)]

    def _chain_plan(self) -> list[tuple]:
        """Every chain of a step, ``(key, kind, slots)``, in an order identical on every rank."""
        plan = [self._slot_chain(n) for n in sorted(self._table.slots) if n not in self._bucket_of]
        for index in range(len(self._buckets)):
            plan.extend(self._bucket_chains(index))
        return plan

    def _context(self) -> StepContext:
        return StepContext(self._table.rank, self._table.size, self._step, self._averaging, self._allreduce_dtypes())

    def _allreduce_dtypes(self):
        """Dtypes this transport's allreduce sums (None: all)."""
        return None

    def _gradient(self, name: str) -> Tensor:
        p = self._params[name]
        if p.grad is None:
            # Another rank may have a gradient for it (dynamic graphs): send zeros.
            p.grad = torch.zeros_like(p)
        return p.grad

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
                self._params[slot.name].grad.copy_(avg)
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
        return super().step(closure)

    def compression_stats(self) -> dict:
        """Traffic of the last step and since the start (see :mod:`hvdcomp.telemetry`)."""
        return compression_stats(self._traffic, self._table, self._router, self._step, self._dropped)

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["hvdcomp"] = self._table.state_dict(self._step)
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        ours = state_dict.pop("hvdcomp", None)
        if ours is not None:
            self._step = self._table.load_state_dict(ours)
            self._check_step = True
        super().load_state_dict(state_dict)
