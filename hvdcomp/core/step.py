"""A step's life outside the chains, the same for every transport.

:class:`StepDriver` is one rank's bookkeeping around the chains (:mod:`hvdcomp.core.chains`):

* before the first exchange, the **settings agreement**: this rank's record
  (:mod:`hvdcomp.core.settings`) against every other rank's, one object allgather that the
  transport performs; a difference raises the same ``ValueError`` on every rank;
* at the first step and after a checkpoint was loaded, the **step agreement**: every rank at
  the same step of a run on as many ranks (:func:`hvdcomp.core.faults.check_same_step`);
* the **context** of each chain (rank, size, step counter, averaging rule, the dtypes the
  transport's allreduce sums);
* the **end of a step** (:meth:`StepDriver.finish`): a step in which some rank was
  non-finite is dropped (state restored, gradients NaN, counter not advanced), traffic
  recorded, one-step values dropped, counters advanced;
* **telemetry** (:meth:`StepDriver.stats`) and the **checkpoint** of the slots and the counter;
* under a selector (``Compression.auto()``), the **decision** of each tensor's compressor at
  the start of a step, when it is due (:meth:`StepDriver.decision_due`,
  :meth:`StepDriver.decide_with`; the measurements and the model: :mod:`hvdcomp.core.choice`).

A transport owns a driver and only issues the requests its chains yield; how it gathers
the records (Horovod's object allgather, ``torch.distributed``'s, or the in-process ranks'
lists) is its only part in the agreements.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

from ..compressor import Selector
from . import choice
from .chains import Averaging, ChainResult, StepContext
from .faults import check_same_step, poison, restore, step_dropped
from .plan import Router
from .settings import settings_problems, settings_record
from .slots import SlotTable
from .traffic import TrafficLog

#: ``allgather_object(obj) -> [every rank's obj]`` in rank order, as the transport provides it.
AllgatherObject = Callable[[object], list]


class StepDriver:
    """One rank's step bookkeeping (see the module docstring).

    table: the rank's slots. router: which chain carries each compressor. averaging: how
    sums become averages. settings: transport settings that must match on every rank, added
    to the record (bucket size, op, ...). allreduce_dtypes: dtypes the transport's
    allreduce sums (None: all). who: the name errors start with. overhead_in_stats: whether
    the bytes that belong to no tensor (payload sizes, scale max-allreduce) are counted in
    the telemetry (the DDP hook counts them; the optimizers report per-tensor traffic only).
    """

    def __init__(self, table: SlotTable, router: Router, averaging: Averaging, settings: dict,
                 allreduce_dtypes: frozenset | None = None, who: str = "hvdcomp", overhead_in_stats: bool = False):
        self.table, self.router, self.averaging = table, router, averaging
        self.settings = dict(settings)
        self.allreduce_dtypes = allreduce_dtypes
        self.who = who
        self.overhead_in_stats = overhead_in_stats
        self.traffic = TrafficLog()
        #: Steps applied (a dropped step is not counted).
        self.step = 0
        #: Steps dropped because some rank's gradient was non-finite.
        self.dropped = 0
        self.loaded = False
        #: Whether the next step starts with the step agreement (first step, after a load).
        self.check_step = True
        #: Each tensor's compressor chosen by a selector (``Compression.auto()``), if any.
        self.chooser = choice.Chooser(table, router) if isinstance(table.compression, Selector) else None
        self._finished_at: list[float] = []  # wall clock at the end of recent steps
        # Enough ends for the observed step's median and for a whole trial window.
        self._ends_kept = max(32, 1 + (self.chooser.selector.trial_steps if self.chooser is not None else 0))

    # ---- agreements ----------------------------------------------------------------------
    def settings_record(self, parameters, error: str | None = None) -> dict:
        """This rank's settings record (parameters: sorted ``(name, shape, dtype)`` or None)."""
        return settings_record(self.table, parameters, error, **self.settings)

    def agree_on_settings(self, allgather_object: AllgatherObject, parameters, error: str | None = None) -> None:
        """Compare this rank's record with every rank's (one object allgather); ValueError on
        every rank alike when they differ, or when some rank reported an ``error``."""
        mine = self.settings_record(parameters, error)
        everyone = allgather_object(mine) if self.table.size > 1 else [mine]
        self.check_records(everyone)

    def check_records(self, everyone: Sequence[dict]) -> None:
        """ValueError when the ranks' records (rank order) differ."""
        problems = settings_problems(list(everyone), self.table.rank)
        if problems:
            raise ValueError(f"{self.who} settings differ between ranks:\n  " + "\n  ".join(problems))

    def step_record(self, fresh_allowed: bool = True) -> tuple:
        """``(step, nranks, fresh, assignment)``: fresh when this rank neither loaded nor
        stepped (and the transport lets such a rank adopt the others' step); assignment: the
        selector's choice per tensor when one was made or loaded (else None)."""
        decided = self.chooser.decision.assignment if self.chooser and self.chooser.decision else None
        return self.step, self.table.size, fresh_allowed and self.step == 0 and not self.loaded, decided

    def agree_on_step(self, everyone: Sequence[tuple]) -> None:
        """Adopt the step every rank continues from (ValueError on every rank if they differ);
        a fresh rank also adopts the others' choice of compressors (Horovod's resume recipe:
        rank 0 loads the checkpoint, the others start empty)."""
        self.check_step = False
        self.step = check_same_step([record[:3] for record in everyone], self.table.rank)
        if self.chooser is not None:
            self.chooser.adopt([record[3] for record in everyone if not record[2]], self.step, self.who)

    def gather_and_agree_on_step(self, allgather_object: AllgatherObject, fresh_allowed: bool = True) -> None:
        """:meth:`agree_on_step` over the records ``allgather_object`` gathers."""
        mine = self.step_record(fresh_allowed)
        self.agree_on_step(allgather_object(mine) if self.table.size > 1 else [mine])

    # ---- the step --------------------------------------------------------------------------
    def context(self) -> StepContext:
        """What a chain of the current step knows of it."""
        return StepContext(self.table.rank, self.table.size, self.step, self.averaging, self.allreduce_dtypes)

    def finish(self, results: Sequence[ChainResult], extra_records: Sequence = (), poison_outputs: bool = True) -> bool:
        """Close a step whose chains produced ``results``; returns whether it was dropped.

        A step in which some rank was non-finite is dropped: every slot's state restored,
        the averaged gradients NaN (``poison_outputs``; a transport that already delivered
        them NaN says False) and the step counter not advanced (see
        :mod:`hvdcomp.core.faults`). Traffic of the results and ``extra_records`` (bytes
        the transport moved that belong to no chain) is recorded either way."""
        dropped = step_dropped(results)
        if dropped:
            restore(results)
            if poison_outputs:
                poison(results)
        for result in results:
            for record in list(result.traffic) + (list(result.overhead) if self.overhead_in_stats else []):
                self.traffic.record(record)
        for record in extra_records:
            self.traffic.record(record)
        self.table.end_step()
        self.traffic.end_step()
        self.step += 0 if dropped else 1
        self.dropped += int(dropped)
        self._finished_at = (self._finished_at + [time.perf_counter()])[-self._ends_kept:]
        return dropped

    def observed_step_seconds(self, since: int = 0) -> float | None:
        """Median wall time between the ends of the recent steps (the last ``since`` at most
        when ``since`` > 0), None before two steps ended."""
        ends = self._finished_at[-(since + 1):] if since else self._finished_at
        gaps = [b - a for a, b in zip(ends, ends[1:])]
        return statistics.median(gaps) if gaps else None

    # ---- choosing compressors (Compression.auto()) -------------------------------------------
    def decision_due(self) -> bool:
        """Whether this step must start with a selector's decision (see :class:`choice.Chooser`)."""
        return self.chooser is not None and self.chooser.due(self.step)

    def measure_for_decision(self, run_blocking: Callable[[list], list] | None) -> dict:
        """This rank's measurements for a decision (:meth:`choice.Chooser.measure`)."""
        return self.chooser.measure(run_blocking, self.step, self.observed_step_seconds)

    def decide(self, everyone: Sequence[dict], started: float) -> choice.Decision:
        """Choose from every rank's measurements (rank order) and assign."""
        return self.chooser.decide(everyone, started, self.step)

    def decide_with(self, allgather_object: AllgatherObject, run_blocking: Callable[[list], list]) -> choice.Decision:
        """A decision on real ranks: measure here, gather every rank's measurements, choose."""
        started = time.perf_counter()
        mine = self.measure_for_decision(run_blocking)
        everyone = allgather_object(mine) if self.table.size > 1 else [mine]
        return self.decide(everyone, started)

    # ---- telemetry and checkpoints -----------------------------------------------------------
    def stats(self) -> dict:
        """``compression_stats()`` of every transport: the last step's and cumulative traffic
        (see :mod:`hvdcomp.core.traffic`), the settings, each packed compressor's collective,
        ``iterations`` (steps applied) and ``dropped_steps``."""
        stats = self.traffic.stats()
        stats.update(compression=self.table.compression.config(),
                     small_compression=self.table.small_compression.config(), nranks=self.table.size,
                     iterations=self.step, dropped_steps=self.dropped, collectives=dict(self.router.collectives))
        if self.chooser is not None:
            stats["auto"] = self.chooser.stats(self.step, self.observed_step_seconds)
        return stats

    def state_dict(self, keys: str = "names") -> dict:
        """Step counter, settings and every slot's persistent state (tensors cloned)."""
        return self.table.state_dict(self.step, keys)

    def load_state_dict(self, saved: dict, keys: str = "names", compressors: dict | None = None) -> None:
        """Restore :meth:`state_dict` (every check runs before anything changes); the next
        step starts with the step agreement. compressors: ``{slot name: compressor}`` that
        serves those slots from now on (:meth:`SlotTable.load_state_dict`)."""
        self.step = self.table.load_state_dict(saved, keys, compressors)
        self.loaded = self.check_step = True
        if self.chooser is not None and "assignment" in saved:
            # The saved choice stands until the user asks for another.
            self.chooser.decision = choice.Decision.from_checkpoint(saved["assignment"], self.step)
