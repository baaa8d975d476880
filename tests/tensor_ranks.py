"""One tensor on N in-process ranks, through the real step protocol (:mod:`hvdcomp.core`).

For the single-process compressor tests: every rank keeps its own state and
:class:`~hvdcomp.compressor.TensorInfo` (rank, size), and :meth:`Ranks.step` runs the chain
the transports would run for that tensor (``hvdcomp.core.chains``) with the collectives of
:func:`hvdcomp.inprocess.run_collectives`, summing instead of averaging (``op=Sum``). It
only *observes* the step — which payload each rank sent, its announced size — so there is
no second copy of the protocol here.
"""
from __future__ import annotations

import dataclasses

import torch

from hvdcomp.compressor import Compressor, TensorInfo
from hvdcomp.core import requests as rq
from hvdcomp.core.chains import Averaging, ChainRun, StepContext
from hvdcomp.core.plan import Router
from hvdcomp.core.slots import SlotTable
from hvdcomp.inprocess import run_collectives


@dataclasses.dataclass
class Exchange:
    """What one step produced."""

    totals: list  # per rank: the decoded fp32 sum over ranks, of the tensor's shape
    payloads: list  # per rank: the uint8 payload (packed) or the dense payload it sent
    sizes: list  # per rank: payload bytes

    @property
    def total(self) -> torch.Tensor:
        return self.totals[0]


class Ranks:
    """N in-process ranks holding one tensor's compressor state each."""

    def __init__(self, comp: Compressor, shape, nranks: int = 1, dtype=torch.float32, name: str = "w",
                 index: int = 0, device="cpu", collective: str = "allgather"):
        self.comp = comp
        self.shape = torch.Size(shape)
        self.router = Router([comp], collective, nranks)
        self.slots = []
        for r in range(nranks):
            table = SlotTable(comp, comp, 0, r, nranks)
            self.slots.append(table.add(name, self.shape, dtype, device, index))
        self.step_count = 0

    @property
    def nranks(self) -> int:
        return len(self.slots)

    @property
    def infos(self) -> list[TensorInfo]:
        return [s.info for s in self.slots]

    @property
    def states(self) -> list[dict]:
        return [s.state for s in self.slots]

    def step(self, grads: list, step: int | None = None, shared_scale=None) -> Exchange:
        """Exchange ``grads`` (one per rank) at ``step`` (default: the next step).
        shared_scale: replaces the max-allreduced scale (e.g. larger than the max)."""
        if step is None:
            step = self.step_count
        self.step_count = step + 1
        assert len(grads) == self.nranks
        n = self.nranks
        kind = self.router.kind(self.comp)
        runs = [ChainRun(kind.run(StepContext(r, n, step, Averaging(n, average=False)), [slot],
                                  [g], slot.name), kind.name)
                for r, (slot, g) in enumerate(zip(self.slots, grads))]
        payloads, sizes = [None] * n, [None] * n
        active = [run.advance() for run in runs]
        while all(active):
            requests = [run.requests for run in runs]
            results = run_collectives(requests)
            for r, reqs in enumerate(requests):
                for j, req in enumerate(reqs):
                    if isinstance(req, rq.Allreduce) and req.op == "max" and shared_scale is not None:
                        results[r][j] = torch.full_like(results[r][j], float(shared_scale))
                    elif isinstance(req, rq.Allreduce) and req.op == "sum":
                        payloads[r], sizes[r] = req.tensor, req.tensor.numel() * req.tensor.element_size()
                    elif isinstance(req, rq.Alltoall):
                        payloads[r] = req.tensor
                    elif isinstance(req, rq.AllgatherV) and payloads[r] is None:
                        payloads[r] = req.tensor[:sizes[r]]  # the buffer is padded to 8 bytes
                    elif isinstance(req, rq.Allgather):
                        sizes[r] = int(req.tensor.sum())
            active = [run.advance(res) for run, res in zip(runs, results)]
        assert not any(active)
        for slot in self.slots:
            slot.end_step()
        return Exchange([run.result.outputs[0][1] for run in runs], payloads, sizes)


def decode_one(comp: Compressor, payload: torch.Tensor, info: TensorInfo, state: dict | None = None) -> torch.Tensor:
    """What a single packed payload decodes to (fp32 of ``info.shape``)."""
    return comp.decode_sum([payload], state if state is not None else comp.init_state(info), info)
