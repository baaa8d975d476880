"""Bytes each rank receives per step at N = 8 ... 256, flat and hierarchical, by collective,
from in-process ranks (``hvdcomp.inprocess.World``: the chains' real payloads, no network)::

    python -m bench.hierarchy_bytes --out bench/results/cluster/bytes_per_rank.json

One fp32 parameter of ``--numel`` elements, N(0, 1) gradients, one step (then a second,
recorded: the sparse allreduce's regions have moved once). Every collective a rank takes
part in is counted as it arrives at that rank:

=============  ==================================================================
collective     bytes a rank receives
=============  ==================================================================
allreduce      ``2 (n-1)/n S`` (ring)
allgather      what the other n-1 members contribute (allgatherv: their own lengths)
alltoall       what the other n-1 members send it
=============  ==================================================================

with n the members of the request's group: every rank ("world"), the node ("local") or one
rank per node ("cross", the only bytes that leave a node in hierarchical exchange). The
table gives the mean and the largest over the ranks, the sparse allreduce's in elements
(4 bytes) without its headers (``20 (N-1)`` bytes: the counts and the owners' candidate
numbers) against its bounds ``2k (N-1)/N`` and ``6k (N-1)/N``, and the crossovers: the
smallest N at which an allgather receives more than a dense allreduce, measured on a grid
around each formula's N* (top-k: ``N* = n/k`` against fp32, ``n/(2k)`` against a 16-bit
allreduce; TernGrad's 2-bit allgather: ``N* = 32 n/(2n + 32 + 8)`` ~ 16 x 2, ...).

A second table puts the same requests on nodes of ``--ranks-per-node`` consecutive ranks
(also for flat exchange) with :func:`bench.cluster_costs.collective_bytes`' ring model:
the bytes every node sends to other nodes, divided by the ranks, and for each compressor the
flat over the hierarchical figure. Against a ring allgather, hierarchical exchange sends
(N-1)/(M-1) >= G times fewer bytes across nodes (M nodes of G ranks); an uncompressed ring
allreduce already crosses each node boundary once per hop, so there it gains little.
"""
from __future__ import annotations

import argparse
import collections
import os
import platform
import shlex
import statistics
import sys
import time

import torch

from bench._record import emit
from bench.cluster_costs import collective_bytes, uplink_bytes_per_rank
from hvdcomp.core import requests as rq
from hvdcomp.core.hierarchy import Topology

SCHEMA = "hvdcomp.hierarchy_bytes/1"
SIZES = [8, 16, 32, 64, 128, 256]
#: label -> (compressor, parameters, collective, hierarchical)
CONFIGS = {
    "fp32 allreduce": ("none", {}, "auto", False),
    "fp16 allreduce": ("fp16", {}, "auto", False),
    "topk 1% allgather": ("topk", {"ratio": 0.01}, "allgather", False),
    "topk 1% sparse allreduce": ("topk", {"ratio": 0.01}, "sparse_allreduce", False),
    "terngrad allgather": ("terngrad", {}, "allgather", False),  # up to N = 64: see LARGEST
    "topk 1% allgather, hierarchical": ("topk", {"ratio": 0.01}, "allgather", True),
    "topk 1% sparse allreduce, hierarchical": ("topk", {"ratio": 0.01}, "sparse_allreduce", True),
    "fp32 allreduce, hierarchical": ("none", {}, "auto", True),
}
#: Bytes of headers a rank receives in one tensor's sparse allreduce: the counts' alltoall
#: (an int64 count and the flag from each other rank) and each other owner's candidate count.
SPARSE_HEADER_BYTES = lambda n: (2 * 8 + 4) * (n - 1)  # noqa: E731
#: The largest N a configuration runs at: every in-process rank decodes every other rank's
#: dense 2-bit payload, N^2 n work, hours at N = 256 on two cores (the bytes grow as N - 1).
LARGEST = {"terngrad allgather": 64}
#: (allgather label, dense label, formula N*(numel, k)) and the probes around it
CROSSOVERS = [
    ("topk 1% allgather", "fp32 allreduce", lambda n, k: n / k),
    ("topk 1% allgather", "fp16 allreduce", lambda n, k: n / (2 * k)),
    ("terngrad allgather", "fp32 allreduce", lambda n, k: 8 * n / (n / 4 + 8)),
    ("terngrad allgather", "fp16 allreduce", lambda n, k: 4 * n / (n / 4 + 8)),
]


#: (flat label, hierarchical label): the same compressor and collective, both ways.
HIERARCHICAL_PAIRS = [(label.removesuffix(", hierarchical"), label) for label in CONFIGS
                      if label.endswith(", hierarchical")]


def received_bytes(requests: list, nranks: int, topology) -> list[collections.Counter]:
    """Per rank, the bytes it receives for one phase, by scope."""
    out = [collections.Counter() for _ in range(nranks)]
    for j in range(len(requests[0])):
        scope = requests[0][j].scope
        groups = [list(range(nranks))] if scope == "world" else topology.groups(scope)
        for group in groups:
            reqs = [requests[r][j] for r in group]
            n, item = len(group), reqs[0].tensor.element_size()
            for pos, r in enumerate(group):
                q = reqs[pos]
                if isinstance(q, rq.Allreduce):
                    got = 2 * (n - 1) / n * q.tensor.numel() * item
                elif isinstance(q, rq.Allgather):
                    got = (n - 1) * q.tensor.numel() * item
                elif isinstance(q, rq.AllgatherV):
                    got = (sum(q.lengths) - q.lengths[pos]) * item
                elif isinstance(q, rq.Alltoall):
                    got = (sum(q.recv_splits) - q.recv_splits[pos]) * item
                elif isinstance(q, rq.Broadcast):
                    got = 0 if pos == q.root else q.tensor.numel() * item
                else:
                    raise TypeError(type(q).__name__)
                out[r][scope] += got
    return out


def measure(label: str, nranks: int, numel: int, per_node: int) -> dict:
    """Mean and largest bytes per rank by scope, in the second of two steps."""
    import hvdcomp
    from hvdcomp.inprocess import World

    name, params, collective, hierarchical = CONFIGS[label]
    world = World(nranks, nodes=nranks // per_node if hierarchical else None)
    weights = [torch.nn.Parameter(torch.zeros(numel)) for _ in range(nranks)]
    comp = hvdcomp.compression_from_name(name, **params)
    for r, w in enumerate(weights):
        world.DistributedOptimizer(r, torch.optim.SGD([w], lr=0.0), named_parameters=[("w", w)], compression=comp,
                                   min_compress_numel=0, collective=collective, hierarchical=hierarchical)
    topology = world.topology(0) if hierarchical else None
    # Nodes of per_node ranks also for flat exchange: where the ring model puts its bytes.
    nodes = Topology.of(nranks, per_node, 0) if nranks % per_node == 0 and nranks > per_node else None
    for step in range(2):
        for r, w in enumerate(weights):
            w.grad = torch.randn(numel, generator=torch.Generator().manual_seed(7919 * step + 104729 * r))
        totals = [collections.Counter() for _ in range(nranks)]
        uplinks: collections.Counter = collections.Counter()

        def observe(key, phase, requests):
            for total, got in zip(totals, received_bytes(requests, nranks, topology)):
                total.update(got)
            if nodes is not None:
                for j in range(len(requests[0])):
                    uplinks.update(collective_bytes([reqs[j] for reqs in requests], nodes, padded_gathers=False))

        world.synchronize(observe=observe)
    scopes = sorted({s for t in totals for s in t})
    out = {scope: {"mean": statistics.mean(t[scope] for t in totals), "max": max(t[scope] for t in totals)}
           for scope in scopes}
    if nodes is not None:
        out["internode"] = {"mean": uplink_bytes_per_rank([uplinks], nodes),
                            "max": max(v for (d, _), v in uplinks.items() if d == "up") / per_node}
    return out


def crossover(results: dict, ag: str, dense: str) -> int | None:
    """Smallest measured N at which ``ag`` receives more than ``dense`` (world scope)."""
    common = sorted(set(results[ag]) & set(results[dense]))
    return next((n for n in common if results[ag][n]["world"]["mean"] > results[dense][n]["world"]["mean"]), None)


def format_table(record: dict) -> str:
    res, k, sizes = record["results"], record["k"], record["sizes"]
    rows = ["| configuration | " + " | ".join(f"N={n}" for n in sizes) + " |", "|---" * (len(sizes) + 1) + "|"]
    for label in CONFIGS:
        cells = []
        for n in sizes:
            got = res.get(label, {}).get(n)
            if got is None:
                cells.append("-")
                continue
            scope = "cross" if "cross" in got else "world"
            cells.append(f"{got[scope]['mean']:,.0f}" + (f" (max {got[scope]['max']:,.0f})"
                                                          if got[scope]["max"] > 1.01 * got[scope]["mean"] else ""))
        where = "inter-node (cross) " if CONFIGS[label][3] else ""
        rows.append(f"| {label}: {where}bytes received per rank | " + " | ".join(cells) + " |")
    sar = res["topk 1% sparse allreduce"]
    rows.append("| sparse allreduce, largest rank: elements without headers / (k (N-1)/N) (bounds 2 and 6) | "
                + " | ".join(f"{(sar[n]['world']['max'] - SPARSE_HEADER_BYTES(n)) / 4 / (k * (n - 1) / n):.2f}"
                             for n in sizes) + " |")
    rows += ["", f"Inter-node bytes sent per rank and step (ring model, nodes of {record['ranks_per_node']} ranks):",
             "", "| configuration | " + " | ".join(f"N={n}" for n in sizes) + " |", "|---" * (len(sizes) + 1) + "|"]
    for label in CONFIGS:
        rows.append(f"| {label} | " + " | ".join(
            f"{res[label][n]['internode']['mean']:,.0f}" if "internode" in res.get(label, {}).get(n, {}) else "-"
            for n in sizes) + " |")
    for flat, hier in HIERARCHICAL_PAIRS:
        rows.append(f"| {flat}: flat / hierarchical | " + " | ".join(
            f"{res[flat][n]['internode']['mean'] / res[hier][n]['internode']['mean']:.2f}"
            if "internode" in res.get(hier, {}).get(n, {}) and "internode" in res[flat].get(n, {}) else "-"
            for n in sizes) + " |")
    rows.append("")
    rows.append("| allgather | against | N* formula | measured crossover (first N on the grid) | grid |")
    rows.append("|---|---|---|---|---|")
    for c in record["crossovers"]:
        rows.append(f"| {c['allgather']} | {c['dense']} | {c['formula']:.1f} | {c['measured']} | {c['grid']} |")
    return "\n".join(rows)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench/results/cluster/bytes_per_rank.json")
    p.add_argument("--numel", type=int, default=2**18)
    p.add_argument("--ranks-per-node", type=int, default=8)
    p.add_argument("--sizes", type=int, nargs="*", default=SIZES)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    start, load = time.time(), round(os.getloadavg()[0], 2)
    k = max(1, -(-args.numel // 100))
    results: dict = collections.defaultdict(dict)
    for label, (_, _, _, hierarchical) in CONFIGS.items():
        for n in args.sizes:
            if (hierarchical and n // args.ranks_per_node < 2) or n > LARGEST.get(label, n):
                continue
            results[label][n] = measure(label, n, args.numel, args.ranks_per_node)
            print(f"[hierarchy_bytes] {label} N={n}: {results[label][n]}", flush=True)
    crossovers = []
    for ag, dense, formula in CROSSOVERS:
        star = formula(args.numel, k)
        grid = sorted({max(2, round(star) + d) for d in range(-4, 5)})
        for n in grid:
            for label in (ag, dense):
                if n not in results[label]:
                    results[label][n] = measure(label, n, args.numel, args.ranks_per_node)
        crossovers.append({"allgather": ag, "dense": dense, "formula": star, "grid": grid,
                           "measured": crossover({a: {n: results[a][n] for n in grid} for a in (ag, dense)},
                                                 ag, dense)})
    record = {"schema": SCHEMA, "command": "python -m bench.hierarchy_bytes " + shlex.join(argv or sys.argv[1:]),
              "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(time.time() - start, 1),
              "load_average_1min": {"start": load, "end": round(os.getloadavg()[0], 2)},
              "machine": f"cpu ({platform.machine()}, {os.cpu_count()} cores); bytes do not depend on it",
              "versions": {"torch": torch.__version__, "python": platform.python_version()},
              "numel": args.numel, "k": k, "ranks_per_node": args.ranks_per_node, "sizes": args.sizes,
              "configs": {c: list(v) for c, v in CONFIGS.items()},
              "results": {label: {str(n): v for n, v in sorted(r.items())} for label, r in results.items()},
              "crossovers": crossovers}
    table_record = dict(record, results={label: dict(r) for label, r in results.items()})
    emit(record, format_table(table_record), args.out)
    return record


if __name__ == "__main__":
    main()
