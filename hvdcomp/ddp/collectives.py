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
from .bucket import BucketRun
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

    def all_gather_object(self, obj) -> list:
        """Every rank's ``obj`` in rank order (one blocking all_gather_object)."""
        everyone = [obj]
        if self.size > 1:
            everyone = [None] * self.size
            dist.all_gather_object(everyone, obj, group=self.process_group)
        return everyone

    def make_groups(self, router: Router, compressors, lock: threading.RLock) -> None:
        """The phase groups the compressors' chains need (a collective call)."""
        self.groups.make(max(self.groups.phases(router, c) for c in compressors), lock)

    def check(self, device: torch.device | None, **what) -> None:
        """ValueError if the group's backend cannot carry ``what`` (see :func:`check_carries`)."""
        check_carries(self.backend, device, **what)

    def check_supported(self, router: Router, compressors: list[Compressor]) -> None:
        """ValueError for what the backend is already known not to carry (before any gradient)."""
        for comp in compressors:
            if comp.transport == "allgather":
                kind = router.kind(comp)
                need = "all_to_all" if kind.name == "compressed_allreduce" else "all_gather"
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
        group = self.groups.groups[k]

        def issue():
            futures, finish = [], []
            for req in chain_run.requests:
                fut, done = self._issue(req, group, run.records, f"bucket {run.index}")
                futures.append(fut)
                finish.append(done)
            run.then(futures, lambda: self._advance(run, chain_run, [f() for f in finish]))

        self.groups.sequencers[k].launch(tickets[k], run.guard(issue))

    def _advance(self, run: BucketRun, chain_run: ChainRun, results: list) -> None:
        if chain_run.advance(results):
            self.check_requests(chain_run.requests, run.device)
            self.launch(run, chain_run)
        else:
            run.chain_done(chain_run.result)

    def run_blocking(self, requests: list) -> list:
        """Issue one phase of requests on the user's group outside any bucket and wait for
        it (the link probes of ``Compression.auto()``, from the hook's thread)."""
        started = [self._issue(req, self.process_group, [], "blocking") for req in requests]
        for future, _ in started:
            future.wait()
        return [done() for _, done in started]

    def _issue(self, req, group, records: list, label: str):
        """Start one request; returns (future, function giving its result once complete);
        the bytes a padded all_gather moves beyond its payload go to ``records``."""
        n = self.size
        t = req.tensor
        if isinstance(req, rq.Allreduce):
            op = dist.ReduceOp.MAX if req.op == "max" else dist.ReduceOp.SUM
            return dist.all_reduce(t, op=op, group=group, async_op=True).get_future(), lambda: t
        if isinstance(req, rq.Broadcast):
            work = dist.broadcast(t, src=self.groups.group_ranks[req.root], group=group, async_op=True)
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
