"""The results a rank would receive if every other rank sent exactly what it sends.

Used to time one rank's local work of a chain without any other rank
(:mod:`hvdcomp.core.choice`): the chain runs for real, its collectives are answered by
:func:`mirror_results` as N identical ranks would answer them. Sums are N times the tensor
(computed as a product, so the arithmetic cost of a received sum is not modelled), gathers
repeat it N times, a broadcast returns it, an alltoall returns this rank's chunk N times.
"""
from __future__ import annotations

import torch

from . import requests as rq


def mirror_results(requests: list, nranks: int, rank: int = 0) -> list:
    """One result per request (see the module docstring), as a transport returns them."""
    out = []
    for req in requests:
        t = req.tensor
        if isinstance(req, rq.Allreduce):
            out.append(t.clone() if req.op == "max" or nranks == 1 else t * nranks)
        elif isinstance(req, rq.Broadcast):
            out.append(t.clone())
        elif isinstance(req, rq.Allgather):
            out.append(t.reshape(-1).repeat(nranks))
        elif isinstance(req, rq.AllgatherV):
            out.append([t.reshape(-1).clone() for _ in range(nranks)])
        elif isinstance(req, rq.Alltoall):
            start = sum(req.send_splits[:rank])
            mine = t[start:start + req.send_splits[rank]]
            out.append(torch.cat([mine] * nranks))
        else:
            raise TypeError(f"hvdcomp: unknown collective request {type(req).__name__}")
    return out
