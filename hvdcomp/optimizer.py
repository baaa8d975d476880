"""``hvdcomp.DistributedOptimizer``: Horovod's optimizer wrapper, for every compressor.

Same arguments and behaviour as ``hvd.DistributedOptimizer``: it wraps any
``torch.optim.Optimizer``, starts communication from per-parameter backward hooks so that
early layers' exchange overlaps the backward of later ones, and completes it in
``synchronize()`` / ``step()``. It patches nothing inside Horovod.

This module is the Horovod *transport* of the step protocol in :mod:`hvdcomp.core`: the
chains (:mod:`hvdcomp.core.chains`) do the compression work and yield their collectives;
here each request becomes an ``hvd.*_async`` call on the process set, named after the chain
and phase so that every rank pairs the same messages:

* a slot of an allreduce compressor starts its chain from its hook (``dense``: one
  ``allreduce_async_``; ScaleCom's ``index``: a ``broadcast_async_`` of the leader's indices,
  then the values' allreduce as soon as the broadcast is done, checked at every later hook,
  so it overlaps the backward pass);
* packed compressors' slots are grouped into buckets of ``bucket_cap_mb``; a full bucket
  starts its chain (TernGrad's scale max-allreduce, the allgather of the payload sizes, one
  allgather of the packed payloads; or the compressed allreduce's alltoall + allgather).

Later phases are issued whenever a hook finds the previous one complete (never blocking the
backward pass); ``synchronize()`` then finishes every chain in an order identical on every
rank, which cannot deadlock: every rank issues every phase of a chain before it waits on it.

Drop-in parity with ``hvd.DistributedOptimizer`` (Horovod 0.28.1): the same arguments in the
same order, and the class is built as Horovod builds its own (:func:`wrapper_class`), with
Horovod's ``__module__``: ``hvd.broadcast_optimizer_state`` recognises it and initialises an
empty optimizer state with the wrapped optimizer's plain ``step()``, never an exchange. On a
rank outside ``process_set`` the optimizer is the plain local one (no hooks, no exchange),
as Horovod's is.
"""
from __future__ import annotations

import pickle
from typing import Any, Iterable

import torch

from ._horovod import hvd
from .compressor import Compressor
from .compressors.horovod_builtin import as_hvdcomp_compressor
from .core import requests as rq
from .core.chains import ChainRun
from .core.groups import resolve_groups
from .core.options import (DEFAULT_BUCKET_CAP_MB, DEFAULT_MIN_COMPRESS_NUMEL, ExchangeOptions, check_backward_passes,
                           check_exchange)
from .core.wrapped_optimizer import CompressingOptimizer, chain_label, wrapper_class
from .horovod_nodes import launcher_topology, scope_sets, sets_mode
from .recipes import reapply_after_load, recipe_for
from .registry import with_defaults

Tensor = torch.Tensor
#: The dtypes Horovod's allreduce sums (no bf16, no 8-bit integers): other dense payloads
#: travel as fp32 (also in the in-process transport's "horovod" chains).
HOROVOD_ALLREDUCE_DTYPES = frozenset({torch.float16, torch.float32, torch.float64, torch.int32, torch.int64})


class _HorovodTransport(CompressingOptimizer):
    """Methods of the class built by :func:`DistributedOptimizer` (do not use directly)."""

    def __init__(self, params, named_parameters, options: ExchangeOptions, op, process_set):
        super(self.__class__, self).__init__(params)
        h = hvd()
        self._h = h
        # Horovod's attributes.
        self.backward_passes_per_step = options.backward_passes_per_step
        self.op = op
        self.gradient_predivide_factor = options.predivide
        self.sparse_as_dense = options.sparse_as_dense
        self.process_set = process_set
        # A rank outside the process set keeps a local optimizer (Horovod's behaviour): its
        # compression runs as on one rank that never exchanges and is never used.
        self._included = process_set.included()
        rank, size = (process_set.rank(), process_set.size()) if self._included else (0, 1)
        ranks = sorted(process_set.ranks) if self._included and process_set.ranks else None
        topology, problem, mode = self._nodes(options.hierarchical, rank, size)
        self._setup_compression(named_parameters, options, rank, size,
                                settings={"op": str(op), "process_set": ranks, "node_sets": mode},
                                allreduce_dtypes=HOROVOD_ALLREDUCE_DTYPES, who="hvdcomp.DistributedOptimizer",
                                after_load=reapply_after_load, topology=topology)
        self._runs: dict[tuple, ChainRun] = {}
        self._blocking_calls = 0
        self._reset_exchange()
        #: The process set of each request scope (hierarchical exchange adds "local" and "cross").
        self._sets = {"world": process_set}
        if self._included:
            self._driver.agree_on_settings(self._allgather_object("hvdcomp.config_check"),
                                           self._described_parameters(), problem)
            if topology is not None:
                self._sets.update(scope_sets(topology))
            for name, p in self._params.items():
                p.register_post_accumulate_grad_hook(self._make_hook(name))

    def _nodes(self, hierarchical, rank: int, size: int):
        """``(topology, problem, node-set mode)`` of ``hierarchical`` (see :mod:`hvdcomp.horovod_nodes`);
        a problem is raised on every rank by the settings agreement."""
        if hierarchical is False or not self._included:
            return None, None, None
        if self.process_set is not self._h.global_process_set:
            return None, "hierarchical exchange runs on the global process set (process_set=None)", None
        topology, problem = launcher_topology(hierarchical, size, rank)
        if topology is None:
            return None, problem, None
        mode, problem = sets_mode(topology)
        return (None if problem else topology), problem, mode

    def set_backward_passes_per_step(self, passes: int) -> None:
        """Change how many backward passes make one step (as Horovod's; restarts the count)."""
        self.backward_passes_per_step = check_backward_passes(passes)
        self._delay = {name: passes for name in self._table.slots}

    def _reset_exchange(self) -> None:
        if self._runs:
            raise AssertionError("load_state_dict() was called while gradients were being exchanged: "
                                 "call it before loss.backward() or after optimizer.step()")
        self._delay = {name: self.backward_passes_per_step for name in self._table.slots}
        self._ready = [0] * len(self._buckets)

    def _allgather_object(self, name: str):
        """``obj -> [every rank's obj]`` within the process set, one blocking exchange."""
        return lambda obj: allgather_object(self._h, obj, name, self.process_set)

    # ---- backward hooks --------------------------------------------------------------------
    def _make_hook(self, name: str):
        def hook(param: Tensor) -> None:
            if self._delay[name] <= 0:
                raise AssertionError(
                    "Gradients were computed more than backward_passes_per_step times before "
                    "step(). Increase backward_passes_per_step to accumulate gradients locally."
                )
            self._delay[name] -= 1
            if self._delay[name] == 0:
                self._gradient_ready(name)

        return hook

    def _gradient_ready(self, name: str) -> None:
        self._synchronized = False
        if self._driver.check_step:
            # At the first step and after a load, before the step's first collective.
            self._driver.gather_and_agree_on_step(self._allgather_object("hvdcomp.step_check"))
        if self._driver.decision_due() and not self._runs and not any(self._ready):
            # Compression.auto(): at the step's first gradient, before any of its collectives.
            self._driver.decide_with(self._allgather_object("hvdcomp.auto"), self._run_blocking)
            self._decided()
            self._ready = [0] * len(self._buckets)
        if not self._runs and not any(self._ready):
            # FrozenAdamW's freeze switches compressors, also at the step's first gradient.
            self._switch_phases()
            self._ready = [0] * len(self._buckets)
        self._note_sparse(name)
        self._poll()
        bucket = self._bucket_of.get(name)
        if bucket is None:
            self._start(*self._slot_chain(name))
            return
        self._ready[bucket] += 1
        if self._ready[bucket] == len(self._buckets[bucket]):
            for key, kind, slots in self._bucket_chains(bucket):
                self._start(key, kind, slots)

    # ---- driving the chains ------------------------------------------------------------------
    def _start(self, key: tuple, kind: str, slots: list) -> None:
        grads = [self._gradient(s.name) for s in slots]
        run = ChainRun(kind.run(self._context(), slots, grads, chain_label(key)), key)
        self._runs[key] = run
        if run.advance():
            self._issue(run)

    def _name(self, run: ChainRun, j: int) -> str:
        return "hvdcomp." + ".".join(map(str, run.key)) + f".{run.phase}.{j}"

    def _issue(self, run: ChainRun) -> None:
        run.state = self._issue_requests(run.requests, [self._name(run, j) for j in range(len(run.requests))])

    def _run_blocking(self, requests: list) -> list:
        """Issue one phase of requests outside any chain and wait for it (the link probes of
        ``Compression.auto()``); every rank calls it the same number of times."""
        self._blocking_calls += 1
        handles = self._issue_requests(requests, [f"hvdcomp.blocking.{self._blocking_calls}.{j}"
                                                  for j in range(len(requests))])
        return self._wait(requests, handles)

    def _issue_requests(self, requests: list, names: list[str]) -> list:
        h = self._h
        handles = []
        for req, name in zip(requests, names):
            ps = self._sets[req.scope]
            if isinstance(req, rq.Allreduce):
                # In place, as torch.distributed's: a dense payload is often the gradient
                # itself, and a new output of its size each step costs a first touch of
                # every page and a copy back into p.grad.
                op = h.Max if req.op == "max" else h.Sum
                handles.append(h.allreduce_async_(req.tensor, name=name, op=op, process_set=ps))
            elif isinstance(req, rq.Broadcast):
                # Horovod names the root by its global rank, also within a process set.
                root = sorted(ps.ranks)[req.root] if ps.ranks else req.root
                handles.append(h.broadcast_async_(req.tensor, root_rank=root, name=name, process_set=ps))
            elif isinstance(req, (rq.Allgather, rq.AllgatherV)):
                handles.append(h.allgather_async(req.tensor, name=name, process_set=ps))
            elif isinstance(req, rq.Alltoall):
                splits = torch.tensor(req.send_splits, dtype=torch.int32)
                handles.append(h.alltoall_async(req.tensor, splits=splits, name=name, process_set=ps))
            else:
                raise TypeError(f"hvdcomp: unknown collective request {type(req).__name__}")
        return handles

    def _collect(self, run: ChainRun) -> list:
        return self._wait(run.requests, run.state)

    def _wait(self, requests: list, handles: list) -> list:
        results = []
        for req, handle in zip(requests, handles):
            out = self._h.synchronize(handle)
            if isinstance(out, tuple):  # alltoall: (tensor, received splits)
                out = out[0]
            if isinstance(req, rq.AllgatherV):
                out = list(torch.split(out, req.lengths))
            results.append(out)
        return results

    def _poll(self) -> None:
        """Advance every chain whose pending phase is complete (never waits)."""
        for run in self._runs.values():
            while not run.done and all(self._h.poll(handle) for handle in run.state):
                if run.advance(self._collect(run)):
                    self._issue(run)

    def synchronize(self) -> None:
        """Finish every exchange of this step and write the averaged gradients to ``p.grad``."""
        if not self._included:
            self._synchronized = True
            return
        # Parameters whose hook did not fire this step (no gradient, or fewer backward passes
        # than configured) still take part: other ranks may have sent theirs.
        for name in self._table.slots:
            if self._delay[name] > 0:
                self._delay[name] = 0
                self._gradient_ready(name)
        results = []
        for key, _, _ in self._chain_plan():
            run = self._runs[key]
            while not run.done:
                if run.advance(self._collect(run)):
                    self._issue(run)
            results.append(run.result)
        self._runs.clear()
        self._reset_exchange()
        self._apply(results)

    def zero_grad(self, *args, **kwargs):
        if self._runs:
            raise AssertionError("optimizer.zero_grad() was called after loss.backward() but before "
                                 "optimizer.step() or optimizer.synchronize().")
        return super(self.__class__, self).zero_grad(*args, **kwargs)


def allgather_object(h, obj: Any, name: str, process_set) -> list:
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


def horovod_optimizer_module() -> str:
    """The ``__module__`` that ``hvd.broadcast_optimizer_state`` compares an optimizer's
    against to recognise Horovod's own wrapper: that of the class it imports from
    ``horovod.torch.optimizer`` at call time. Not ``hvd.DistributedOptimizer.__module__``:
    a script switched over by reassigning ``hvd.DistributedOptimizer`` to a factory (or a
    ``functools.partial``) would give the factory's module (or none), Horovod would not
    recognise the optimizer and would run its exchanging ``step()`` on one rank alone."""
    import horovod.torch.optimizer as horovod_optimizer

    return getattr(horovod_optimizer.DistributedOptimizer, "__module__", None) or horovod_optimizer.__name__


def DistributedOptimizer(optimizer: torch.optim.Optimizer, named_parameters: Iterable | None = None,
                         compression=None, backward_passes_per_step: int = 1, op=None,
                         gradient_predivide_factor: float = 1.0, num_groups: int = 0, groups=None,
                         sparse_as_dense: bool = False, process_set=None, *,
                         min_compress_numel: int = DEFAULT_MIN_COMPRESS_NUMEL,
                         small_compression: Compressor | None = None,
                         bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB, collective: str = "auto",
                         hierarchical: bool | int = False):
    """Wrap ``optimizer`` so that ``step()`` applies the average of all ranks' gradients,
    exchanged through ``compression``.

    Horovod 0.28.1's arguments, in its order and with its defaults (None stands for
    ``hvd.Compression.none``, ``hvd.Average`` and ``hvd.global_process_set``, which need
    Horovod to name):

    * ``compression``: any ``hvdcomp.Compression.*`` compressor, or Horovod's own
      (``hvd.Compression.none`` / ``fp16``, or any object with its ``compress`` /
      ``decompress`` pair), used as Horovod uses it: compress, allreduce, decompress.
    * ``op``: ``hvd.Average`` or ``hvd.Sum``. ``hvd.Adasum`` is refused (ValueError, on
      every rank, before any collective): Adasum combines full-precision gradients pairwise
      by their dot products, which no compressed payload supports; use Horovod's optimizer.
    * ``gradient_predivide_factor`` f: linear floating payloads (none, fp16, random-k,
      ScaleCom) are divided by f before the sum and multiplied by f / N after it; f = 1
      divides by N before the sum, so fp16 sums stay in range. Packed payloads are decoded,
      summed and divided by N.
    * ``num_groups`` (deprecated alias) / ``groups``: Horovod's explicit groups (an integer,
      or lists of parameters). A group's gradients start their exchange together once all
      are ready: dense payloads as one allreduce, packed ones as one bucket. Groups replace
      hvdcomp's own buckets (``bucket_cap_mb`` is then unused).
    * ``sparse_as_dense``: sparse gradients (``nn.Embedding(sparse=True)``) travel as
      Horovod sends them, an allgather of indices and values, uncompressed; with True they
      are densified and compressed like any other, and come back sparse.
    * ``process_set``: gradients are averaged within it; on a rank outside it the optimizer
      is the plain local one, as Horovod's.

    Extra keyword-only arguments: ``min_compress_numel`` (tensors with fewer elements use
    ``small_compression``, default uncompressed), ``bucket_cap_mb`` (dense fp32 size of one
    packed-payload bucket), ``collective`` ("auto", "allgather", "compressed_allreduce" or
    "sparse_allreduce": how packed payloads travel, see
    :func:`hvdcomp.core.options.choose_collective`) and ``hierarchical`` (True: a dense
    reduce-scatter inside each node, the compressor on each rank's shard across nodes, a dense
    allgather inside the node, with Horovod's ``local_size`` ranks per node; an int: that
    many consecutive ranks per node; it needs the nodes' process sets, see
    :mod:`hvdcomp.horovod_nodes` and :mod:`hvdcomp.core.hierarchy`). The compressor's paper rules about the
    optimizer are applied first (:func:`hvdcomp.recipes.apply_recipe`: e.g. DGC takes over
    SGD's momentum).
    """
    h = hvd()
    op = h.Average if op is None else op
    if op == h.Adasum:
        raise ValueError("hvdcomp.DistributedOptimizer does not support op=hvd.Adasum: Adasum combines "
                         "full-precision gradients pairwise by their dot products, which compressed payloads "
                         "cannot carry; use hvd.DistributedOptimizer(op=hvd.Adasum) without compression")
    if op not in (h.Average, h.Sum):
        raise ValueError(f"op must be hvd.Average or hvd.Sum, got {op!r}")
    compression, small_compression = with_defaults(compression, small_compression)
    options = check_exchange(as_hvdcomp_compressor(compression), small_compression,
                             min_compress_numel=min_compress_numel, collective=collective, bucket_cap_mb=bucket_cap_mb,
                             average=op == h.Average, predivide=gradient_predivide_factor,
                             backward_passes_per_step=backward_passes_per_step,
                             groups=resolve_groups(groups, num_groups), sparse_as_dense=sparse_as_dense,
                             hierarchical=hierarchical)
    options, base = recipe_for(optimizer, options)
    process_set = h.global_process_set if process_set is None else process_set
    # Horovod's module: hvd.broadcast_optimizer_state then steps the wrapped optimizer only.
    cls = wrapper_class(base, _HorovodTransport, horovod_optimizer_module())
    return cls(optimizer.param_groups, named_parameters, options, op, process_set)
