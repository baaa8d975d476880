"""launch.cluster: 2 emulated nodes x 2 ranks, Horovod and torch.distributed across namespaces.

Each rank reads its node's byte counters (sysfs inside its namespace) around an allreduce
within its node and one over the world: the node's link to the bridge must carry the
world's bytes and not the node's own. Cleanup is checked with ``ip netns list``. No timing
is asserted. Skips where namespaces cannot be built, fails instead with
HVDCOMP_REQUIRE_NETNS=1.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch import cluster as emulated
from tests.distributed import HAS_HOROVOD, rank_results, requires_horovod

REPO = Path(__file__).resolve().parents[1]
UNAVAILABLE = emulated.unavailable_reason()
requires_netns = pytest.mark.skipif(
    UNAVAILABLE is not None and os.environ.get("HVDCOMP_REQUIRE_NETNS") != "1",
    reason=f"network namespaces with veth, bridge and tbf unavailable here: {UNAVAILABLE}")
NODES, RANKS_PER_NODE = 2, 2
#: Bytes per rank of each checked allreduce.
ALLREDUCE_BYTES = 2 << 20

RANK_PROGRAM = """
import json, os, sys
import torch
framework, numel, outdir = sys.argv[1], int(sys.argv[2]) // 4, sys.argv[3]
iface = os.environ["HVDCOMP_CLUSTER_IFACE"]
node = int(os.environ["HVDCOMP_CLUSTER_NODE"])

def sent(dev):
    with open(f"/sys/class/net/{dev}/statistics/tx_bytes") as f:
        return int(f.read())

if framework == "horovod":
    import horovod.torch as hvd
    node_sets = [hvd.ProcessSet([0, 1]), hvd.ProcessSet([2, 3])]
    hvd.init(process_sets=node_sets)
    rank, size = hvd.rank(), hvd.size()
    ids = dict(local_rank=hvd.local_rank(), local_size=hvd.local_size(), cross_rank=hvd.cross_rank(),
               cross_size=hvd.cross_size())
    barrier = hvd.barrier
    def allreduce(x, within_node):
        kwargs = {"process_set": node_sets[node]} if within_node else {}
        return hvd.allreduce(x, op=hvd.Sum, **kwargs)
else:
    import torch.distributed as dist
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    local_size = int(os.environ["LOCAL_WORLD_SIZE"])
    groups = [dist.new_group(list(range(k * local_size, (k + 1) * local_size))) for k in range(size // local_size)]
    ids = dict(local_rank=int(os.environ["LOCAL_RANK"]), local_size=local_size,
               cross_rank=int(os.environ["GROUP_RANK"]), cross_size=int(os.environ["GROUP_WORLD_SIZE"]))
    barrier = dist.barrier
    def allreduce(x, within_node):
        dist.all_reduce(x, group=groups[node] if within_node else None)
        return x

out = dict(rank=rank, size=size, node=node, **ids)
for phase, within_node in (("node", True), ("world", False)):
    barrier()
    before = sent(iface), sent("lo")
    total = allreduce(torch.full((numel,), rank + 1.0), within_node)
    barrier()
    out[phase + "_uplink_bytes"] = sent(iface) - before[0]
    out[phase + "_loopback_bytes"] = sent("lo") - before[1]
    out[phase + "_sum"] = float(total[0]) if torch.all(total == total[0]) else None
# The result by a file per rank (two ranks of a node share their launcher's stdout, where
# two lines can interleave); the line shows the launcher's labels.
with open(os.path.join(outdir, f"result{rank}.json"), "w") as f:
    json.dump(out, f)
print(f"RESULT rank {rank}", flush=True)
if framework == "torch":
    barrier()
    dist.destroy_process_group()  # exiting with a live Gloo group can abort the process
"""


def _check_ranks(results: list[dict], lines: list[str]) -> None:
    assert [r["rank"] for r in results] == list(range(NODES * RANKS_PER_NODE)), "\n".join(lines)
    for r in results:
        node, local = divmod(r["rank"], RANKS_PER_NODE)
        assert (r["node"], r["local_rank"], r["cross_rank"]) == (node, local, node)
        assert (r["size"], r["local_size"], r["cross_size"]) == (4, RANKS_PER_NODE, NODES)
        assert r["world_sum"] == 1 + 2 + 3 + 4
        assert r["node_sum"] == sum(range(node * RANKS_PER_NODE + 1, (node + 1) * RANKS_PER_NODE + 1))
        # Within the node: the bytes stay on its loopback (2 ranks' ring: S each), at most a
        # barrier's and the controller's few KB leave through its link.
        assert r["node_loopback_bytes"] >= 2 * ALLREDUCE_BYTES
        assert r["node_uplink_bytes"] < ALLREDUCE_BYTES / 10
        # Over the world: the other node needs this node's partial sums, S at least, whatever
        # the algorithm (a ring sends 2 (N-1)/N S = 1.5 S over each node's hop).
        assert r["world_uplink_bytes"] >= ALLREDUCE_BYTES


def _assert_no_namespace_of(names: list[str]) -> None:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [n for n in names if n in listed], listed


@requires_netns
@requires_horovod
def test_horovod_ranks_see_emulated_nodes_and_only_cross_node_bytes_use_the_link(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_PROGRAM)
    with emulated.Cluster(NODES, RANKS_PER_NODE, inter_rate="200mbit") as cluster:
        names = [cluster.bridge_ns, *cluster.node_ns]
        run = cluster.run([sys.executable, str(script), "horovod", str(ALLREDUCE_BYTES), str(tmp_path)], launcher="horovod",
                          timeout=180, echo=False)
        assert run.returncode == 0, "\n".join(run.lines)
        assert any(line.startswith("[node 1 rank 3] RESULT") for line in run.lines)
        _check_ranks(rank_results(tmp_path), run.lines)
        for node in cluster.counters():
            # Both directions of each node's link are shaped, and the tbf saw the world's bytes.
            assert node["uplink_qdisc"]["kind"] == node["downlink_qdisc"]["kind"] == "tbf"
            assert node["uplink_qdisc"]["bytes"] >= ALLREDUCE_BYTES
            assert node["downlink_qdisc"]["bytes"] >= ALLREDUCE_BYTES
            assert node["loopback_qdisc"] is None  # intra-node unshaped
    _assert_no_namespace_of(names)


@requires_netns
def test_torch_ranks_through_the_cli_with_shaped_loopbacks_and_a_report(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_PROGRAM)
    report = tmp_path / "counters.json"
    before = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    done = subprocess.run([sys.executable, "-m", "launch.cluster", "--nodes", str(NODES), "--ranks-per-node",
                           str(RANKS_PER_NODE), "--inter-rate", "200mbit", "--intra-rate", "2gbit", "--launcher",
                           "torch", "--timeout", "180", "--report-counters", str(report), "--",
                           sys.executable, str(script), "torch", str(ALLREDUCE_BYTES), str(tmp_path)],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=240)
    lines = done.stdout.splitlines()
    assert done.returncode == 0, done.stdout + done.stderr
    _check_ranks(rank_results(tmp_path), lines)
    record = json.loads(report.read_text())
    assert record["cluster"]["inter"]["rate_bytes_per_s"] == 25e6
    for node in record["counters"]:
        assert node["loopback_qdisc"]["kind"] == "tbf"
        assert node["loopback_qdisc"]["bytes"] >= 2 * ALLREDUCE_BYTES
        assert node["uplink_qdisc"]["bytes"] >= ALLREDUCE_BYTES
    assert subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout == before


@requires_netns
def test_a_failing_rank_stops_the_others_and_every_namespace_goes():
    with emulated.Cluster(NODES, RANKS_PER_NODE) as cluster:
        names = [cluster.bridge_ns, *cluster.node_ns]
        # Node 1's ranks fail at once; node 0's would sleep a minute unless stopped.
        run = cluster.run(["sh", "-c", 'test "$HVDCOMP_CLUSTER_NODE" = 0 && exec sleep 60; exit 3'],
                          launcher="torch", echo=False)
        assert run.returncode == 3 and not run.timed_out
        # The first rank of node 1 to exit stops every other rank, its node-mate included when
        # that one has not exited yet (None: stopped by the launcher).
        assert 3 in run.rank_returncodes[2:] and set(run.rank_returncodes[2:]) <= {3, None}
        assert run.rank_returncodes[:2] == [None, None]
        late = cluster.run(["sleep", "60"], launcher="torch", timeout=1, echo=False)
        assert late.timed_out and late.returncode == emulated.TIMED_OUT
    _assert_no_namespace_of(names)


@requires_netns
def test_each_rank_gets_its_launchers_variables():
    horovod = 'echo "$HOROVOD_RANK $HOROVOD_LOCAL_RANK $HOROVOD_CROSS_RANK $HOROVOD_HOSTNAME $HOROVOD_GLOO_RENDEZVOUS_ADDR"'
    torch = 'echo "$RANK $LOCAL_RANK $GROUP_RANK $MASTER_ADDR $WORLD_SIZE $GLOO_SOCKET_IFNAME"'
    with emulated.Cluster(NODES, RANKS_PER_NODE) as cluster:
        torch_run = cluster.run(["sh", "-c", torch], launcher="torch", echo=False)
        hvd_run = cluster.run(["sh", "-c", horovod], launcher="horovod", echo=False) if HAS_HOROVOD else None
    assert "[node 1 rank 3] 3 1 1 10.213.0.1 4 eth0" in torch_run.lines
    if hvd_run is not None:
        assert "[node 1 rank 2] 2 0 1 node1 10.213.0.1" in hvd_run.lines


def test_bad_settings_are_refused_before_any_namespace():
    with pytest.raises(ValueError, match="too small"):
        emulated.Cluster(2, 2, inter_rate="50mbit", burst="1kb")
    with pytest.raises(ValueError, match="1..250 nodes"):
        emulated.Cluster(0, 2)
    with pytest.raises(ValueError, match="cannot read rate"):
        emulated.Cluster(2, 2, intra_rate="quick")
    done = subprocess.run([sys.executable, "-m", "launch.cluster", "--inter-rate", "slow", "--", "true"],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    assert done.returncode == emulated.OWN_FAILURE and "cannot read rate 'slow'" in done.stderr
    assert "Traceback" not in done.stderr
