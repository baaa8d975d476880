"""The DDP hook's state object and the hook function (see :mod:`hvdcomp.ddp`).

No ``from __future__ import annotations`` here: DDP checks that the hook's ``bucket``
annotation *is* ``dist.GradBucket``, which a string annotation is not.
"""

import threading
from typing import Iterable

import torch
import torch.distributed as dist

from ..compressor import Compressor
from ..core.chains import Averaging, ChainRun
from ..core.options import DEFAULT_MIN_COMPRESS_NUMEL, check_exchange, check_named_parameters
from ..core.hierarchy import HierarchicalRouter
from ..core.plan import Router
from ..core.settings import describe_parameters
from ..core.slots import SlotTable
from ..core.step import StepDriver
from ..recipes import recipe_options
from ..registry import with_defaults
from .bucket import BucketOutputs, BucketRun
from .collectives import TorchCollectives
from .frozen_adam import FrozenAdamLink
from .late_errors import LateErrors
from .layouts import Layouts
from .nodes import torch_topology


def _route(compressors: list, collective: str, size: int, topology, error: str | None,
           collectives: TorchCollectives) -> tuple[Router, str | None, object]:
    """The router (hierarchical where ``topology`` is given), the error to report after the
    settings exchange, and the topology; after an error, a router of nothing and no topology."""
    try:
        router = (Router(compressors, collective, size) if topology is None
                  else HierarchicalRouter(compressors, collective, topology))
        collectives.check_supported(router, compressors)
    except ValueError as err:
        error, router = str(err), Router([], collective, size)
    return router, error, None if error is not None else topology


def _naming(named_parameters) -> tuple[dict | None, dict[str, int], list | None]:
    """``({parameter: name}, {name: name-sorted index}, described)`` of ``named_parameters``
    (``(None, {}, None)`` without names: the state is then keyed by layout position)."""
    if named_parameters is None:
        return None, {}, None
    named = check_named_parameters(named_parameters)
    return ({p: n for n, p in named}, {n: i for i, n in enumerate(sorted(n for n, _ in named))},
            describe_parameters(named))


def _start_chains(driver: StepDriver, collectives: TorchCollectives, run: BucketRun, slots: list,
                  grads: list) -> list[tuple[ChainRun, tuple]]:
    """A bucket's chains, each run up to its first collective (errors raise here, before any
    collective of the bucket), with the scope of each phase it reserves."""
    collectives.check(run.device, what="gradients")
    ctx = driver.context()
    chains = []
    for kind, members in driver.router.chains(slots):
        members = sorted(members, key=lambda j: slots[j].info.index)
        chain = kind.run(ctx, [slots[j] for j in members], [grads[j] for j in members], f"bucket {run.index}")
        chain_run = ChainRun(chain, kind.name)
        chain_run.advance()
        collectives.check_requests(chain_run.requests, run.device)
        chains.append((chain_run, kind.phase_scopes([slots[j].compressor for j in members])))
    return chains


class CompressionState:
    """State of :func:`compression_hook`: compressors, per-parameter state, step, telemetry.

    compression: any ``hvdcomp.Compression.*`` compressor, used for gradients with at least
        ``min_compress_numel`` elements; ``small_compression`` (default ``none()``) for the
        others (biases, norms).
    process_group: the DDP model's process group (None: the default group).
    collective: "auto", "allgather", "compressed_allreduce" or "sparse_allreduce": how packed
        payloads travel (:func:`hvdcomp.core.options.choose_collective`).
    named_parameters: optional ``model.named_parameters()``: keys the state (and the
        checkpoint) by name, lets AdaComp's per-name bin sizes apply, and gives every tensor
        its name-sorted index (RNG streams, ScaleCom leaders), as the Horovod transport does.
    optimizer: optional, the model's optimizer: the compressor's rules about it apply
        (:mod:`hvdcomp.recipes`; e.g. DGC takes over SGD's momentum); a :class:`hvdcomp.FrozenAdamW`
        gets the Adam recipe (:mod:`hvdcomp.ddp.frozen_adam`; load its state before this one's).
    hierarchical: False (flat), True (nodes of ``LOCAL_WORLD_SIZE`` ranks, as torchrun
        sets it) or the ranks per node: a dense reduce-scatter inside each node, the
        compressor on each rank's shard across nodes, a dense allgather inside the node
        (:mod:`hvdcomp.core.hierarchy`, :mod:`hvdcomp.ddp.nodes`; default process group only).

    Construct it on every rank of the group, after ``init_process_group``: it compares its
    settings across ranks with one blocking ``all_gather_object`` (a mismatch or an
    unsupported combination raises ``ValueError`` on every rank instead of a hang), and
    creates ``phases - 1`` extra process groups with the same ranks for the chained
    collectives (none for fp16/none; one for sparse methods; two for TernGrad).
    """

    def __init__(self, compression: Compressor, process_group=None,
                 min_compress_numel: int = DEFAULT_MIN_COMPRESS_NUMEL,
                 small_compression: Compressor | None = None, collective: str = "auto",
                 named_parameters: Iterable | None = None, optimizer: torch.optim.Optimizer | None = None,
                 hierarchical: bool | int = False):
        options = check_exchange(compression, with_defaults(compression, small_compression)[1],
                                 min_compress_numel=min_compress_numel, collective=collective,
                                 hierarchical=hierarchical)
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("hvdcomp.ddp.CompressionState needs torch.distributed to be initialized "
                               "(dist.init_process_group) before it is built")
        options = recipe_options(optimizer, options)
        self.compression, self.small_compression = options.compression, options.small_compression
        self.min_compress_numel, self.collective = options.min_compress_numel, options.collective
        self.process_group = process_group if process_group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.process_group)
        self.size = dist.get_world_size(self.process_group)
        self._collectives = TorchCollectives(self.process_group, self.rank, self.size)
        self._names, name_index, described = _naming(named_parameters)
        self._keys = "names" if self._names is not None else "positions"  # what the checkpoint keys by
        table = SlotTable(self.compression, self.small_compression, self.min_compress_numel, self.rank, self.size,
                          expected_names=None if self._names is None else name_index)
        self._layouts = Layouts(table, self._names, name_index)
        self._adam = FrozenAdamLink.of(optimizer, table, self._names)  # None unless a FrozenAdamW
        self._lock = threading.RLock()
        self._outputs = BucketOutputs()
        self._inflight = 0
        self._closing = False
        self._late_errors = LateErrors()  # holds the first failed exchange's error
        self._step_results: list = []  # this iteration's chain results (flags, snapshots)
        self._step_records: list = []  # and the transport's own traffic records (padding)
        # Errors found here are reported after the settings exchange, so that every rank
        # raises (one rank raising alone would leave the others waiting in it).
        topology, error = torch_topology(options.hierarchical, self.process_group, self.rank, self.size)
        compressors = table.compressors()
        router, error, topology = _route(compressors, self.collective, self.size, topology, error,
                                         self._collectives)
        table.layout = router  # slots are created later, by the hook (shard state, regions)
        settings = {"collective": self.collective, "hierarchical": None if topology is None else topology.describe(),
                    "warmup_steps": self._adam and self._adam.optimizer.warmups()}
        self._driver = StepDriver(table, router, Averaging(self.size), settings,
                                  who="hvdcomp.ddp.CompressionState", overhead_in_stats=True)
        # Every rank loads its own checkpoint with DDP: the step agreement runs after a load only.
        self._driver.check_step = False
        self._driver.agree_on_settings(self._collectives.all_gather_object, described, error)
        self._collectives.make_groups(router, compressors, self._lock, topology)

    # ---- the hook body --------------------------------------------------------------------------
    def _hook(self, bucket: dist.GradBucket) -> torch.futures.Future:
        if self._late_errors.error is not None:
            raise RuntimeError("hvdcomp.ddp: an earlier bucket's exchange failed; this process group's "
                               "collectives are out of step, restart the job") from self._late_errors.error
        if self._driver.check_step:
            # After a checkpoint was loaded, before the step's first collective.
            self._driver.gather_and_agree_on_step(self._collectives.all_gather_object, fresh_allowed=False)
        if self._driver.decision_due() and self._driver.step >= 1 and self._iteration_not_started():
            # Compression.auto(), once DDP has shown every bucket (the slots exist from the
            # first iteration on), at an iteration's first bucket, before its collectives.
            self._driver.decide_with(self._collectives.all_gather_object, self._collectives.run_blocking)
        params, grads = bucket.parameters(), bucket.gradients()
        slots = self._layouts.slots(bucket.index(), params, grads)
        messages = grads if self._adam is None else self._adam.messages(slots, params, grads)
        with self._lock:
            self._inflight += 1
            # Set before launching: the last bucket's chains may finish inline.
            self._closing = self._closing or bucket.is_last()
        run = BucketRun(bucket, grads, slots, self._bucket_finished, self._bucket_failed,
                        self._outputs.for_bucket(bucket.index(), bucket.buffer()))
        try:
            chains = _start_chains(self._driver, self._collectives, run, slots, messages)
        except BaseException:
            with self._lock:
                self._inflight -= 1
                self._closing = self._closing and not bucket.is_last()
            raise
        run.raised_later = self._late_errors.watch(run.future)
        run.pending = len(chains)
        for chain_run, scopes in chains:
            chain_run.state = self._collectives.reserve(scopes)
        for chain_run, _ in chains:
            self._collectives.launch(run, chain_run)
        if not chains:
            self._bucket_finished(run)
            run.future.set_result(run.out)
        return run.future

    def _iteration_not_started(self) -> bool:
        with self._lock:
            return self._inflight == 0 and not self._closing and not self._step_results

    def redecide_compression(self) -> None:
        """``Compression.auto()``: measure and choose each tensor's compressor again at the
        start of the next iteration (call it on every rank, between iterations)."""
        if self._driver.chooser is None:
            raise ValueError("redecide_compression() needs compression=hvdcomp.Compression.auto(...)")
        self._driver.chooser.redecide_requested = True

    def _bucket_finished(self, run: BucketRun) -> None:
        with self._lock:
            self._step_results += run.results
            self._step_records += run.records
            self._inflight -= 1
            if self._closing and self._inflight == 0:
                self._closing = False
                # The gradients were delivered NaN by their buckets already (BucketRun.chain_done).
                dropped = self._driver.finish(self._step_results, self._step_records, poison_outputs=False)
                if self._adam is not None:
                    self._adam.optimizer.exchanged(dropped)
                self._step_results, self._step_records = [], []

    def _bucket_failed(self, run: BucketRun, exc: BaseException) -> None:
        with self._lock:
            self._inflight -= 1
            if self._late_errors.error is None:
                self._late_errors.error = exc

    # ---- telemetry and checkpoints -----------------------------------------------------------------
    @property
    def step(self) -> int:
        """Iterations completed (a dropped iteration is not counted)."""
        return self._driver.step

    @property
    def dropped_steps(self) -> int:
        """Iterations dropped because some rank's gradient was non-finite (see hvdcomp.core.faults)."""
        return self._driver.dropped

    def compression_stats(self) -> dict:
        """The optimizer's ``compression_stats()`` keys plus ``rebuilds``; entries named
        ``[bucket i ...]`` hold bytes that belong to no tensor (padding, size exchange, scale
        max-allreduce), so ``sent_bytes``/``received_bytes`` are what the collectives moved."""
        with self._lock:
            stats = self._driver.stats()
        stats["rebuilds"] = self._layouts.rebuilds
        return stats

    def state_dict(self) -> dict:
        """Step counter, settings and every parameter's compressor state (tensors cloned),
        keyed by parameter name (``named_parameters`` given) or first-layout position."""
        with self._lock:
            return self._driver.state_dict(self._keys)

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore :meth:`state_dict` (before training, or between iterations); every check
        (settings, number of ranks, names, keys, shapes) runs before anything changes."""
        with self._lock:
            self._driver.load_state_dict(state_dict, self._keys, self._adam and self._adam.checkpoint_compressors())

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
