"""A cost model of one exchange on ``launch.cluster``'s two tiers: per-direction token
buckets between nodes (one per node and direction, rate R, burst B) and unshaped loopbacks
inside nodes.

The bytes come from the requests themselves: :func:`phase_bytes` replays a step on
in-process ranks (``hvdcomp.inprocess.World(N, nodes=M, transport="ddp")``, bit-identical to
the real DDP ranks for the same gradients, so every payload size is the real one) and puts
each collective's bytes on the buckets they cross, following the algorithms Gloo runs for
``torch.distributed`` with ranks numbered node by node:

=============================  ==================================================================
collective                     bytes on the link from node a to node b
=============================  ==================================================================
allreduce (ring)               each hop i -> i+1 between nodes carries ``2 (n-1)/n S``
allgather, allgatherv (ring)   each hop carries ``n-1`` chunks; torch pads an allgatherv to the
                               largest chunk, so every chunk is ``max_r S_r``
alltoall (pairwise)            ``S_ij`` from every rank i of a to every rank j of b
broadcast                      ``S`` from the root to every member of b (direct sends)
=============================  ==================================================================

(a group of the ``local`` scope never leaves its node). A phase lasts as long as its most
loaded bucket needs, ``T / R``, and the phases of a chain follow each other; a bucket that
was idle long enough starts full and lets B bytes through at once. So the link adds

    t_link = max(0, sum over phases of max over buckets T_phase - B) * h / R

to the step's time on unshaped links (measured: every CPU cost and latency), with h the
framing overhead of TCP/IPv4 on 1,500-byte Ethernet frames (1,514 bytes on the wire per
1,448 bytes of payload). The inter-node bytes per rank are the uplinks' sum over the ranks.
"""
from __future__ import annotations

import collections
from typing import Callable

import torch

from hvdcomp.core import requests as rq
from hvdcomp.core.hierarchy import Topology

#: Bytes on the wire per payload byte: TCP/IPv4 with timestamps in 1,500-byte frames.
FRAMING = 1514 / 1448


def _members(req, topology: Topology, nranks: int) -> list[list[int]]:
    return [list(range(nranks))] if req.scope == "world" else topology.groups(req.scope)


def _node(rank: int, topology: Topology) -> int:
    return rank // topology.local_size


def collective_bytes(per_rank: list, topology: Topology, padded_gathers: bool = True) -> collections.Counter:
    """Bytes each inter-node bucket carries for one collective: ``per_rank[r]`` is rank r's
    request; keys ``("up", node)`` and ``("down", node)``."""
    nranks = len(per_rank)
    out: collections.Counter = collections.Counter()

    def cross(src: int, dst: int, nbytes: float) -> None:
        a, b = _node(src, topology), _node(dst, topology)
        if a != b and nbytes:
            out[("up", a)] += nbytes
            out[("down", b)] += nbytes

    for group in _members(per_rank[0], topology, nranks):
        reqs = [per_rank[r] for r in group]
        n = len(group)
        item = reqs[0].tensor.element_size()
        first = reqs[0]
        if isinstance(first, rq.Allreduce):
            for i in range(n):
                cross(group[i], group[(i + 1) % n], 2 * (n - 1) / n * first.tensor.numel() * item)
        elif isinstance(first, (rq.Allgather, rq.AllgatherV)):
            sizes = [q.tensor.numel() * item for q in reqs]
            if padded_gathers:
                sizes = [max(sizes)] * n
            for i in range(n):  # hop i -> i+1 carries every chunk but the receiver's own
                cross(group[i], group[(i + 1) % n], sum(sizes) - sizes[(i + 1) % n])
        elif isinstance(first, rq.Broadcast):  # modelled as the root sending to every other member
            for j in range(n):
                if j != first.root:
                    cross(group[first.root], group[j], first.tensor.numel() * item)
        elif isinstance(first, rq.Alltoall):
            for i, q in enumerate(reqs):
                for j, count in enumerate(q.send_splits):
                    cross(group[i], group[j], count * item)
        else:
            raise NotImplementedError(f"no link model for {type(first).__name__}")
    return out


def phase_bytes(world, set_gradients: Callable[[int], None], steps: int) -> list[list[collections.Counter]]:
    """Per step, per phase (chains in plan order, phases in order), the bytes on each bucket,
    from ``steps`` synchronizations of the in-process ``world`` (``set_gradients(step)`` puts
    every rank's gradients in place first)."""
    topology = world.topology(0)
    out = []
    for step in range(steps):
        set_gradients(step)
        phases: list[collections.Counter] = []

        def observe(key, phase, requests):
            total: collections.Counter = collections.Counter()
            for j in range(len(requests[0])):
                total.update(collective_bytes([reqs[j] for reqs in requests], topology))
            phases.append(total)

        world.synchronize(observe=observe)
        out.append(phases)
    return out


def link_seconds(phases: list[collections.Counter], rate_bytes_per_s: float, burst_bytes: float,
                 framing: float = FRAMING) -> float:
    """Seconds the buckets add to one step whose phases put ``phases`` bytes on them."""
    busiest = sum(max(p.values(), default=0.0) for p in phases)
    return max(0.0, busiest * framing - burst_bytes) / rate_bytes_per_s


def uplink_bytes_per_rank(phases: list[collections.Counter], topology: Topology) -> float:
    """Payload bytes one rank sends to other nodes in one step, averaged over the ranks."""
    return sum(v for p in phases for (direction, _), v in p.items() if direction == "up") / topology.size


def dense_gradient(numel: int, rank: int, step: int) -> torch.Tensor:
    """The synthetic gradient of ``rank`` at ``step`` (fp32 [numel], N(0, 1)), the same in
    the ranks and in the replay."""
    return torch.randn(numel, generator=torch.Generator().manual_seed(7919 * step + 104729 * rank))
