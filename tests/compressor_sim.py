"""In-process simulation of N ranks exchanging one tensor through a compressor, doing what
the front end (hvdcomp.DistributedOptimizer) does, without Horovod:

* packed compressors (transport "allgather"): optional scale sharing (``local_scale`` on
  every rank, max over ranks into ``state["shared_scale"]``), ``encode`` on every rank, one
  read of all sizes, ``pack`` into a separately allocated uint8 buffer of exactly that size
  (filled with garbage first, so a decoder reading unwritten bytes is caught), then every
  rank's ``decode_sum`` over all N payloads;
* dense compressors (transport "allreduce"): ``encode_dense`` on every rank, the payloads
  summed in their own dtype (as an allreduce does), ``decode_dense`` on every rank.

Each rank keeps its own state dict and TensorInfo (rank, size), as in a real run.
"""
from __future__ import annotations

import dataclasses

import torch

from hvdcomp import wire
from hvdcomp.compressor import Compressor, TensorInfo

GARBAGE = 0xA5


@dataclasses.dataclass
class Exchange:
    """What one simulated step produced."""

    totals: list  # per rank: the decoded fp32 sum, of the tensor's shape
    payloads: list  # per rank: uint8 payload (packed) or the dense payload
    sizes: list  # per rank: payload bytes
    contexts: list  # dense path: per rank ctx from encode_dense (else None)

    @property
    def total(self) -> torch.Tensor:
        return self.totals[0]


class Ranks:
    """N simulated ranks holding one tensor's compressor state each."""

    def __init__(self, comp: Compressor, shape, nranks: int = 1, dtype=torch.float32, name: str = "w",
                 index: int = 0, device="cpu"):
        self.comp = comp
        self.shape = torch.Size(shape)
        self.infos = [TensorInfo(name=name, shape=self.shape, dtype=dtype, device=torch.device(device),
                                 index=index, rank=r, size=nranks) for r in range(nranks)]
        self.states = [comp.init_state(i) for i in self.infos]
        self.step_count = 0

    @property
    def nranks(self) -> int:
        return len(self.infos)

    def step(self, grads: list, step: int | None = None, shared_scale=None) -> Exchange:
        """Exchange ``grads`` (one per rank) at ``step`` (default: the next step)."""
        if step is None:
            step = self.step_count
        self.step_count = step + 1
        assert len(grads) == self.nranks
        return exchange(self.comp, grads, self.states, self.infos, step, shared_scale=shared_scale)


def pack_payload(encoded, size: int, device="cpu") -> torch.Tensor:
    """Allocate exactly ``size`` bytes (its own allocation: 8-byte aligned), fill them with
    garbage, let ``encoded.pack`` write the payload."""
    out = torch.full((size,), GARBAGE, dtype=torch.uint8, device=device)
    assert out.data_ptr() % wire.ALIGN == 0
    encoded.pack(out)
    return out


def exchange(comp: Compressor, grads: list, states: list, infos: list, step: int, shared_scale=None) -> Exchange:
    """One step of ``comp`` over the ranks (see the module docstring). ``shared_scale``:
    override for the shared scale (e.g. larger than the max), else the max of local scales."""
    if comp.transport == "allreduce":
        encoded = [comp.encode_dense(g, s, i, step) for g, s, i in zip(grads, states, infos)]
        payloads = [p for p, _ in encoded]
        summed = torch.stack(payloads).sum(dim=0)
        totals = [comp.decode_dense(summed, ctx, s, i) for (_, ctx), s, i in zip(encoded, states, infos)]
        sizes = [p.numel() * p.element_size() for p in payloads]
        return Exchange(totals, payloads, sizes, [ctx for _, ctx in encoded])

    if getattr(comp, "needs_shared_scale", False):
        local = torch.cat([comp.local_scale(g, i).reshape(1) for g, i in zip(grads, infos)])
        shared = local.max().reshape(1) if shared_scale is None else torch.as_tensor(
            shared_scale, dtype=torch.float32).reshape(1)
        for s in states:
            s["shared_scale"] = shared.clone()
    encoded = [comp.encode(g, s, i, step) for g, s, i in zip(grads, states, infos)]
    for e, g in zip(encoded, grads):
        assert e.nbytes.dtype == torch.int64 and tuple(e.nbytes.shape) == (1,), e.nbytes
        assert e.nbytes.device == g.device
    # The front end's one device-to-host read of all sizes.
    sizes = torch.cat([e.nbytes for e in encoded]).tolist()
    payloads = [pack_payload(e, n, g.device) for e, n, g in zip(encoded, sizes, grads)]
    totals = [comp.decode_sum(payloads, s, i) for s, i in zip(states, infos)]
    return Exchange(totals, payloads, sizes, [None] * len(payloads))


def decode_one(comp: Compressor, payload: torch.Tensor, info: TensorInfo, state: dict | None = None) -> torch.Tensor:
    """What a single packed payload decodes to (fp32 of ``info.shape``)."""
    return comp.decode_sum([payload], state if state is not None else comp.init_state(info), info)
