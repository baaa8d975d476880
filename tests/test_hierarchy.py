"""Hierarchical exchange on in-process ranks (``World(nranks, nodes=M)``): the sum is exact
where the arithmetic is (uncompressed, integer gradients), state lives on each rank's shard
and is checkpointed as such, the inter-node bytes shrink, each chain kind yields the phases
and scopes it declares, and bad settings are refused with one clear error.
(That real Horovod and DDP ranks compute the same bits: tests/test_distributed_hierarchy.py.)"""
from __future__ import annotations

import collections

import pytest
import torch

import hvdcomp
from hvdcomp.core import requests as rq
from hvdcomp.core.hierarchy import Topology, shard_info, shard_length
from hvdcomp.core.options import check_exchange
from hvdcomp.compressor import TensorInfo
from hvdcomp.inprocess import World

SHAPES = {"conv": (6, 3, 3, 3), "fc": (37, 11), "bias": (5,)}  # 5 < G*granule: padded shards


def _world(nranks, nodes, name="topk", hierarchical=True, **kw):
    world = World(nranks, nodes=nodes)
    params = [{k: torch.nn.Parameter(torch.zeros(s)) for k, s in SHAPES.items()} for _ in range(nranks)]
    comp = hvdcomp.compression_from_name(name, **({"ratio": 0.2} if name in ("topk", "dgc", "randomk", "scalecom")
                                                 else {}))
    opts = [world.DistributedOptimizer(r, torch.optim.SGD(ps.values(), lr=1.0), named_parameters=ps.items(),
                                       compression=comp, min_compress_numel=0, hierarchical=hierarchical, **kw)
            for r, ps in enumerate(params)]
    return world, params, opts


def _integer_grads(params, step):
    for r, ps in enumerate(params):
        g = torch.Generator().manual_seed(31 * step + r)
        for p in ps.values():
            p.grad = torch.randint(-6, 7, p.shape, generator=g).to(torch.float32)


@pytest.mark.parametrize("nranks,nodes,op", [(4, 2, "average"), (4, 1, "average"), (8, 4, "average"), (6, 2, "sum"),
                                             (6, 3, "sum"), (3, 3, "sum"), (4, 2, "sum")])
def test_uncompressed_hierarchical_sum_is_the_exact_sum(nranks, nodes, op):
    # (Averages over a power of two ranks only: x / 6 rounds, however it is summed.)
    world, params, _ = _world(nranks, nodes, "none", op=op)
    for step in range(2):
        _integer_grads(params, step)
        want = {k: sum(ps[k].grad for ps in params) for k in SHAPES}
        world.synchronize()
        for ps in params:
            for k in SHAPES:
                expect = want[k] / nranks if op == "average" else want[k]
                assert torch.equal(ps[k].grad, expect), (k, nranks, nodes)


def test_topology_groups_partition_the_ranks():
    t = Topology.of(6, 2, 3)
    assert (t.local_rank, t.cross_rank, t.local_size, t.cross_size) == (1, 1, 2, 3)
    assert t.group("local") == [2, 3] and t.group("cross") == [1, 3, 5]
    for scope in ("local", "cross"):
        assert sorted(r for g in t.groups(scope) for r in g) == list(range(6))
    with pytest.raises(ValueError, match="dividing"):
        Topology.of(6, 4, 0)


def test_state_is_per_shard_and_keeps_the_tensor_rank():
    _, _, opts = _world(4, 2, "topk")
    for r, opt in enumerate(opts):
        for name, shape in SHAPES.items():
            slot = opt._table.slots[name]
            n = slot.info.numel
            assert slot.state["residual"].numel() == shard_length(n, 2) == -(-n // 2)
    info = TensorInfo("conv", torch.Size(SHAPES["conv"]), torch.float32, torch.device("cpu"), index=3, rank=3, size=4)
    shard = shard_info(info, Topology.of(4, 2, 3))
    assert len(shard.shape) == 4 and shard.numel == 81 and (shard.index, shard.rank, shard.size) == (7, 1, 2)


def _train(world, params, steps, start=0):
    for step in range(start, start + steps):
        _integer_grads(params, step)
        world.step()


@pytest.mark.parametrize("name,collective", [("topk", "auto"), ("dgc", "allgather"), ("terngrad", "auto"),
                                             ("topk", "sparse_allreduce")])
def test_a_checkpoint_of_shards_resumes_bit_for_bit_and_refuses_a_flat_run(name, collective):
    world, params, opts = _world(4, 2, name, collective=collective)
    _train(world, params, 5)
    want = [{k: p.detach().clone() for k, p in ps.items()} for ps in params]

    world, params, opts = _world(4, 2, name, collective=collective)
    _train(world, params, 3)
    saved = [opt.state_dict() for opt in opts]
    at = [{k: p.detach().clone() for k, p in ps.items()} for ps in params]
    assert saved[0]["hvdcomp"]["ranks_per_node"] == 2
    world, params, opts = _world(4, 2, name, collective=collective)  # a new process, resuming
    for opt, state, ps, values in zip(opts, saved, params, at):
        opt.load_state_dict(state)
        for k, p in ps.items():
            p.data.copy_(values[k])
    _train(world, params, 2, start=3)
    for ps, w in zip(params, want):
        for k in w:
            assert torch.equal(ps[k].detach(), w[k]), (name, k)

    _, _, flat = _world(4, 2, name, hierarchical=False, collective=collective)
    with pytest.raises(ValueError, match="ranks_per_node"):
        flat[0].load_state_dict(saved[0])


def _received_bytes(world) -> collections.Counter:
    """Bytes rank 0 receives per scope in one step: a ring allreduce 2(n-1)/n S, a gather or
    alltoall what the group's other members send it."""
    got = collections.Counter()

    def observe(key, phase, requests):
        for req in requests[0]:
            n = world.nranks if req.scope == "world" else len(world.topology(0).group(req.scope))
            item = req.tensor.element_size()
            if isinstance(req, rq.Allreduce):
                got[req.scope] += 2 * (n - 1) / n * req.tensor.numel() * item
            elif isinstance(req, rq.AllgatherV):
                got[req.scope] += sum(req.lengths[1:]) * item
            elif isinstance(req, rq.Allgather):
                got[req.scope] += (n - 1) * req.tensor.numel() * item
            elif isinstance(req, rq.Alltoall):
                got[req.scope] += sum(req.recv_splits[1:]) * item

    world.synchronize(observe=observe)
    return got


@pytest.mark.parametrize("name", ["topk", "onebit", "none"])
def test_each_rank_sends_fewer_bytes_across_nodes(name):
    nranks, nodes = 8, 2
    flat_world, flat_params, _ = _world(nranks, nodes, name, hierarchical=False)
    hier_world, hier_params, _ = _world(nranks, nodes, name)
    _integer_grads(flat_params, 0)
    _integer_grads(hier_params, 0)
    flat, hier = _received_bytes(flat_world), _received_bytes(hier_world)
    assert set(flat) == {"world"} and set(hier) == {"local", "cross"}
    # Flat, every byte a rank receives may cross nodes; hierarchical, only the cross hop does:
    # a shard G times smaller among M = N/G ranks (an allgather: (M-1)/(N-1)/G of it).
    assert hier["cross"] < flat["world"] / (nranks // nodes) * 1.1, (flat, hier)


def test_declared_phases_and_scopes_are_the_chains_yields():
    for name, collective in [("none", "auto"), ("scalecom", "auto"), ("topk", "allgather"), ("terngrad", "allgather"),
                             ("bf16", "compressed_allreduce"), ("topk", "sparse_allreduce")]:
        world, params, opts = _world(4, 2, name, collective=collective)
        _integer_grads(params, 0)
        seen = collections.defaultdict(list)
        world.synchronize(observe=lambda key, phase, reqs: seen[key].append({q.scope for q in reqs[0]}))
        for key, kind, slots in opts[0]._world_plan():
            scopes = kind.phase_scopes([s.compressor for s in slots])
            assert kind.name.startswith("hierarchical_")
            assert [s for (s,) in seen[key]] == list(scopes), (name, key)


def test_bad_settings_are_refused_before_any_collective():
    with pytest.raises(ValueError, match="hierarchical must be"):
        check_exchange(hvdcomp.Compression.none(), hvdcomp.Compression.none(), hierarchical=-2)
    with pytest.raises(ValueError, match="gradient_predivide_factor"):
        check_exchange(hvdcomp.Compression.none(), hvdcomp.Compression.none(), hierarchical=True, predivide=2.0)
    with pytest.raises(ValueError, match="nodes=M"):
        _world(4, None, "topk")
    with pytest.raises(ValueError, match="dividing"):
        World(4, nodes=3)
    with pytest.raises(ValueError, match="ranks per node"):
        _world(4, 2, "topk", hierarchical=4)
    # Ranks that disagree (one flat, the others hierarchical) fail together.
    world = World(2, nodes=1)
    ps = [{"w": torch.nn.Parameter(torch.zeros(8))} for _ in range(2)]
    world.DistributedOptimizer(0, torch.optim.SGD(ps[0].values(), lr=1.0), named_parameters=ps[0].items(),
                               hierarchical=True)
    with pytest.raises(ValueError, match="hierarchical"):
        world.DistributedOptimizer(1, torch.optim.SGD(ps[1].values(), lr=1.0), named_parameters=ps[1].items())
