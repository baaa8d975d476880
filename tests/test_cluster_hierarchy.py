"""Hierarchical exchange on the emulated 2 x 2 cluster (launch.cluster), with the launchers'
own node information: Horovod with ``hvd.init(process_sets=hvdcomp.node_process_sets())``
and ``hierarchical=True`` (ranks per node from ``hvd.local_size()``), torch.distributed with
``CompressionState(hierarchical=True)`` (from torchrun's ``LOCAL_WORLD_SIZE``). Both train a
few steps of top-k and must give exactly the parameters of ``World(4, nodes=2)``; every
node's link must carry the cross-node shards only. Skips where namespaces cannot be built
(fails with HVDCOMP_REQUIRE_NETNS=1)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

import scenarios_hierarchy as sh
from launch import cluster as emulated
from tests.distributed import rank_results, requires_horovod

UNAVAILABLE = emulated.unavailable_reason()
requires_netns = pytest.mark.skipif(
    UNAVAILABLE is not None and os.environ.get("HVDCOMP_REQUIRE_NETNS") != "1",
    reason=f"network namespaces with veth, bridge and tbf unavailable here: {UNAVAILABLE}")
REPO = Path(__file__).resolve().parents[1]
STEPS = 4
CASE = "hier_topk"

RANK_PROGRAM = """
import json, os, sys
sys.path.insert(0, {tests!r})
import torch
import scenarios_hierarchy as sh
from scenarios_identity import fresh, make, params, MIN_NUMEL
framework, case, steps, outdir = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
name = sh.CASES[case][0]
torch.set_num_threads(1)
model = fresh()
if framework == "horovod":
    import horovod.torch as hvd
    import hvdcomp
    hvd.init(process_sets=hvdcomp.node_process_sets())
    rank = hvd.rank()
    opt = hvdcomp.DistributedOptimizer(sh._optimizer(case, model), named_parameters=model.named_parameters(),
                                       compression=make(name), min_compress_numel=MIN_NUMEL, hierarchical=True)
    def step(s):
        opt.zero_grad()
        sh.loss_of(model, rank, s, False).backward()
        opt.step()
else:
    import torch.distributed as dist
    from torch import nn
    from hvdcomp.ddp import CompressionState, compression_hook
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=25)
    state = CompressionState(make(name), min_compress_numel=MIN_NUMEL, named_parameters=model.named_parameters(),
                             hierarchical=True)
    ddp.register_comm_hook(state, compression_hook)
    opt = sh._optimizer(case, ddp)
    def step(s):
        opt.zero_grad()
        sh.loss_of(ddp, rank, s, False).backward()
        opt.step()
for s in range(steps):
    step(s)
if framework == "horovod":
    # A node's last local allgather can still wait while the other node's ranks are done; a
    # rank that exits shuts Horovod down on every rank (docs/hierarchical.md).
    hvd.barrier()
# A file per rank: two ranks of a node share their launcher's stdout, where lines can interleave.
with open(os.path.join(outdir, f"result{{rank}}.json"), "w") as f:
    json.dump({{"rank": rank, "params": {{k: v.reshape(-1).tolist() for k, v in params(model).items()}}}}, f)
"""


@requires_netns
@pytest.mark.parametrize("framework", [pytest.param("horovod", marks=requires_horovod), "torch"])
def test_launchers_nodes_drive_hierarchical_exchange(tmp_path, framework):
    script = tmp_path / "rank.py"
    script.write_text(RANK_PROGRAM.format(tests=str(REPO / "tests")))
    with emulated.Cluster(2, 2, inter_rate="200mbit") as cluster:
        before = cluster.counters()
        run = cluster.run([sys.executable, str(script), framework, CASE, str(STEPS), str(tmp_path)], launcher=framework,
                          env={**os.environ, "PYTHONPATH": str(REPO), "HVDCOMP_KERNELS": "reference",
                               "OMP_NUM_THREADS": "1"}, timeout=300, echo=False)
        after = cluster.counters()
    assert run.returncode == 0, "\n".join(run.lines[-40:])
    got = {r["rank"]: r["params"] for r in rank_results(tmp_path)}
    # The same steps on in-process ranks, without the poisoned step (no poison on the cluster).
    want, _ = sh.inprocess(CASE, STEPS, poison=False, transport="ddp" if framework == "torch" else "horovod")
    for rank in range(4):
        for k, v in want[rank].items():
            assert torch.equal(torch.tensor(got[rank][k]).view(v.shape), v), (framework, rank, k)
    for a, b in zip(after, before):
        assert a["uplink_qdisc"]["bytes"] > b["uplink_qdisc"]["bytes"]  # the cross hop used the link
