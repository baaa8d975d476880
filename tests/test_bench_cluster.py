"""The pure parts of the cluster benches: where the link model puts each collective's bytes,
the link time from them, the bytes a rank receives, and a small in-process bytes table."""
from __future__ import annotations

import collections
import json

import pytest
import torch

from bench import cluster_costs, hierarchy_bytes
from hvdcomp.core import requests as rq
from hvdcomp.core.hierarchy import Topology

#: 2 nodes x 2 ranks: ranks 0, 1 on node 0, ranks 2, 3 on node 1
TWO_BY_TWO = Topology.of(4, 2, 0)


def test_ring_allreduce_crosses_each_node_boundary_once_per_direction():
    reqs = [rq.Allreduce(torch.zeros(100)) for _ in range(4)]  # 400 bytes each
    out = cluster_costs.collective_bytes(reqs, TWO_BY_TWO)
    hop = 2 * 3 / 4 * 400  # the ring's hops 1 -> 2 and 3 -> 0 cross
    assert out == {("up", 0): hop, ("down", 1): hop, ("up", 1): hop, ("down", 0): hop}


def test_allgatherv_pads_to_the_largest_chunk_only_when_asked():
    lengths = [10, 20, 30, 40]
    reqs = [rq.AllgatherV(torch.zeros(n), lengths) for n in lengths]
    exact = cluster_costs.collective_bytes(reqs, TWO_BY_TWO, padded_gathers=False)
    padded = cluster_costs.collective_bytes(reqs, TWO_BY_TWO)
    # hop 1 -> 2 carries every chunk but rank 2's; hop 3 -> 0 every chunk but rank 0's
    assert exact[("up", 0)] == 4 * (100 - 30) and exact[("up", 1)] == 4 * (100 - 10)
    assert padded[("up", 0)] == padded[("up", 1)] == 4 * 3 * 40


def test_alltoall_counts_only_what_goes_to_the_other_node():
    # rank i sends (i + 1) elements to every rank
    reqs = [rq.Alltoall(torch.zeros(4 * (i + 1)), [i + 1] * 4, [1, 2, 3, 4]) for i in range(4)]
    out = cluster_costs.collective_bytes(reqs, TWO_BY_TWO)
    assert out[("up", 0)] == 4 * 2 * (1 + 2)  # ranks 0 and 1, each to ranks 2 and 3
    assert out[("up", 1)] == out[("down", 0)] == 4 * 2 * (3 + 4)


def test_local_scope_never_leaves_the_node_and_cross_always_does():
    local = cluster_costs.collective_bytes([rq.Allreduce(torch.zeros(8), scope="local") for _ in range(4)],
                                           TWO_BY_TWO)
    cross = cluster_costs.collective_bytes([rq.Allgather(torch.zeros(8), scope="cross") for _ in range(4)],
                                           TWO_BY_TWO)
    assert not local
    assert cross[("up", 0)] == cross[("up", 1)] == 2 * 32  # two cross groups, one chunk each way


def test_link_seconds_sums_each_phases_busiest_bucket_less_the_burst():
    phases = [collections.Counter({("up", 0): 1000, ("up", 1): 3000}), collections.Counter({("down", 0): 2000})]
    assert cluster_costs.link_seconds(phases, 1000.0, 0.0, framing=1.0) == pytest.approx(5.0)
    assert cluster_costs.link_seconds(phases, 1000.0, 1500.0, framing=1.0) == pytest.approx(3.5)
    assert cluster_costs.link_seconds(phases, 1000.0, 10**6, framing=1.0) == 0.0
    assert cluster_costs.uplink_bytes_per_rank(phases, TWO_BY_TWO) == 1000.0


def test_received_bytes_by_collective():
    reqs = [[rq.Allreduce(torch.zeros(10)), rq.AllgatherV(torch.zeros(n), [1, 2, 3, 4]),
             rq.Broadcast(torch.zeros(5), root=0)] for n in (1, 2, 3, 4)]
    got = hierarchy_bytes.received_bytes(reqs, 4, None)
    assert [g["world"] for g in got] == [2 * 3 / 4 * 40 + 4 * (10 - n) + (0 if n == 1 else 20) for n in (1, 2, 3, 4)]


def test_bytes_table_small(tmp_path, monkeypatch):
    """The in-process table at N = 8 and 16 (2 nodes of 8 at 16): the sparse allreduce within
    its 6k (N-1)/N bound, the allgather growing with N, hierarchical cutting the inter-node
    bytes of top-k's allgather by at least the ranks per node."""
    monkeypatch.setattr(hierarchy_bytes, "CROSSOVERS", [])
    monkeypatch.setattr(hierarchy_bytes, "CONFIGS", {k: v for k, v in hierarchy_bytes.CONFIGS.items()
                                                     if k.startswith("topk") or k.startswith("fp32")})
    monkeypatch.setattr(hierarchy_bytes, "HIERARCHICAL_PAIRS",
                        [p for p in hierarchy_bytes.HIERARCHICAL_PAIRS if p[1] in hierarchy_bytes.CONFIGS])
    out = tmp_path / "bytes.json"
    record = hierarchy_bytes.main(["--numel", "4096", "--sizes", "8", "16", "--out", str(out)])
    res = json.loads(out.read_text())["results"]
    k = record["k"]
    for n in (8, 16):
        sparse = res["topk 1% sparse allreduce"][str(n)]["world"]["max"] - hierarchy_bytes.SPARSE_HEADER_BYTES(n)
        assert 2 * k * (n - 1) / n * 4 <= sparse <= 6 * k * (n - 1) / n * 4
    assert res["topk 1% allgather"]["16"]["world"]["mean"] > 2 * res["topk 1% allgather"]["8"]["world"]["mean"]
    flat = res["topk 1% allgather"]["16"]["internode"]["mean"]
    hier = res["topk 1% allgather, hierarchical"]["16"]["internode"]["mean"]
    assert flat >= 8 * hier
    assert "flat / hierarchical" in record["table"]
