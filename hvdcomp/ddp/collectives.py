"""The ``torch.distributed`` side of the DDP hook: a chain's requests issued as async
collectives, each phase on its own process group in reservation order
(:mod:`hvdcomp.ddp.phase_groups`), later phases launched from the previous phase's future
callbacks, so the hook never waits.

A packed bucket reads its payload sizes to the host once (after the size ``all_gather``): the
padded payload length and the slicing offsets are host integers. With Gloo on CPU that read
runs in a callback, off the backward pass; with NCCL the futures complete as soon as the work
is enqueued, so the callbacks run at once on the hook's thread and the read synchronises the
device there, once per packed bucket (dense buckets never wait).
"""
from __future__ import annotations

import threading

import torch
import torch.distributed as dist

from ..compressor import Compressor
from ..core import requests as rq
from ..core.chains import ChainRun
from ..core.plan import Router
from ..core.traffic import TensorTraffic
from .backends import check_carries
from ..core.hierarchy import Topology
from .bucket import BucketRun
from .nodes import scoped_phase_groups
from .phase_groups import PhaseGroups


def _all_gather_flat(out: torch.Tensor, inp: torch.Tensor, group):
    """Async all-gather of equal-sized ``inp`` into ``out`` ([N * len]), rank order."""
    return dist.all_gather_into_tensor(out, inp, group=group, async_op=True)


class TorchCollectives:
    """Issues the hook's chains on ``process_group`` (see the module docstring).

    backend: the group's backend name, what the capability checks assume (settable, so that
    a test can ask what another backend would refuse)."""

    def __init__(self, process_group, rank: int, size: int):
        self.process_group, self.rank, self.size = process_group, rank, size
        self.backend = str(dist.get_backend(process_group))
        self.groups = PhaseGroups(process_group, rank, self.backend)
        #: The phase groups of each request scope (hierarchical exchange adds "local", "cross").
        self.scoped: dict[str, PhaseGroups] = {"world": self.groups}

    def all_gather_object(self, obj) -> list:
        """Every rank's ``obj`` in rank order (one blocking all_gather_object)."""
        everyone = [obj]
        if self.size > 1:
            everyone = [None] * self.size
            dist.all_gather_object(everyone, obj, group=self.process_group)
        return everyone

    def make_groups(self, router: Router, compressors, lock: threading.RLock, topology: Topology | None = None) -> None:
        """The phase groups the compressors' chains need (a collective call); with a
        ``topology``, every phase's local and cross groups too."""
        nphases = max(self.groups.phases(router, c) for c in compressors)
        self.groups.make(1 if topology is not None else nphases, lock)
        if topology is not None:
            self.scoped.update(scoped_phase_groups(topology, nphases, self.backend, lock))

    def reserve(self, scopes) -> list[tuple[str, list]]:
        """A ticket on the sequencer of each phase's scope and number (hook order)."""
        return [(scope, self.scoped[scope].sequencers[k].reserve()) for k, scope in enumerate(scopes)]

    def check(self, device: torch.device | None, **what) -> None:
        """ValueError if the group's backend cannot carry ``what`` (see :func:`check_carries`)."""
        check_carries(self.backend, device, **what)

    def check_supported(self, router: Router, compressors: list[Compressor]) -> None:
        """ValueError for what the backend is already known not to carry (before any gradient)."""
        for comp in compressors:
            kind, base = router.kind(comp), router.base_kind(comp)
            needs = set()
            if comp.transport == "allgather":
                needs.add("all_to_all" if base.name in ("compressed_allreduce", "sparse_allreduce") else "all_gather")
            if kind is not base:  # hierarchical: the local reduce-scatter and allgather
                needs |= {"all_to_all", "all_gather"}
            for need in sorted(needs):
                self.check(None, need=need, what=f"{comp.name} ({kind.name})")

    def check_requests(self, requests: list, device: torch.device) -> None:
        for req in requests:
            if isinstance(req, rq.Allreduce):
                self.check(device, reduce_dtype=req.tensor.dtype, what=f"{req.tensor.dtype} payloads")

    def launch(self, run: BucketRun, chain_run: ChainRun) -> None:
        """Issue the chain's current phase on that phase's group, in reservation order."""
        k = chain_run.phase
        tickets = chain_run.state
        if k >= len(tickets):
            raise RuntimeError(f"hvdcomp.ddp: chain {chain_run.key} yielded more phases than it reserved")
        scope, ticket = tickets[k]
        if any(req.scope != scope for req in chain_run.requests):
            raise RuntimeError(f"hvdcomp.ddp: chain {chain_run.key} phase {k} addresses another scope than {scope!r}")
        phase_groups = self.scoped[scope]
        group = phase_groups.groups[k]

        def issue():
            futures, finish = [], []
            for req in chain_run.requests:
                fut, done = self._issue(req, group, phase_groups, run.records, f"bucket {run.index}")
                futures.append(fut)
                finish.append(done)
            run.then(futures, lambda: self._advance(run, chain_run, [f() for f in finish]))

        phase_groups.sequencers[k].launch(ticket, run.guard(issue))

    def _advance(self, run: BucketRun, chain_run: ChainRun, results: list) -> None:
        if chain_run.advance(results):
            self.check_requests(chain_run.requests, run.device)
            self.launch(run, chain_run)
        else:
            run.chain_done(chain_run.result)

    def run_blocking(self, requests: list) -> list:
        """Issue one phase of requests on the user's group outside any bucket and wait for
        it (the link probes of ``Compression.auto()``, from the hook's thread)."""
        started = [self._issue(req, self.process_group, self.groups, [], "blocking") for req in requests]
        for future, _ in started:
            future.wait()
        return [done() for _, done in started]

    def _issue(self, req, group, phase_groups: PhaseGroups, records: list, label: str):
        """Start one request on ``group`` (one of ``phase_groups``); returns (future, function
        giving its result once complete); the bytes a padded all_gather moves beyond its
        payload go to ``records``."""
        n, rank = phase_groups.size, phase_groups.rank
        t = req.tensor
        if isinstance(req, rq.Allreduce):
            op = dist.ReduceOp.MAX if req.op == "max" else dist.ReduceOp.SUM
            return dist.all_reduce(t, op=op, group=group, async_op=True).get_future(), lambda: t
        if isinstance(req, rq.Broadcast):
            work = dist.broadcast(t, src=phase_groups.group_ranks[req.root], group=group, async_op=True)
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
            mine, others = req.lengths[rank], sum(req.lengths) - req.lengths[rank]
            records.append(TensorTraffic(name=f"[{label} allgather padding]", numel=0, dense_bytes=0,
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
