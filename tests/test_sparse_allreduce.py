"""The sparse allreduce (collective="sparse_allreduce") on in-process ranks: exact sums of
what was selected, exact error feedback, O(k) bytes per rank at any N, regions that follow
the selections, and the choice of collective. (Real ranks: tests/test_distributed_hierarchy.py.)"""
from __future__ import annotations

import pytest
import torch

import hvdcomp
from hvdcomp.core.options import choose_collective
from hvdcomp.core.sparse_allreduce import REGIONS, balanced_regions, initial_regions, quota
from hvdcomp.inprocess import World

N_ELEMENTS = 4000


def _world(nranks, name="topk", numel=N_ELEMENTS, **params):
    world = World(nranks)
    ps = [{"w": torch.nn.Parameter(torch.zeros(numel))} for _ in range(nranks)]
    comp = hvdcomp.compression_from_name(name, **params)
    opts = [world.DistributedOptimizer(r, torch.optim.SGD(p.values(), lr=1.0), named_parameters=p.items(),
                                       compression=comp, min_compress_numel=0, collective="sparse_allreduce")
            for r, p in enumerate(ps)]
    return world, ps, opts


def _accumulator(opt, name):
    state = opt._table.slots["w"].state
    return state["v" if name == "dgc" else "residual"]


def _integer_grads(ps, step, skew=False):
    for r, p in enumerate(ps):
        g = torch.Generator().manual_seed(97 * step + r)
        grad = torch.randint(-9, 10, p["w"].shape, generator=g).to(torch.float32)
        if skew:  # large entries crowd the first tenth of the tensor
            grad[: grad.numel() // 10] *= 8
        p["w"].grad = grad


@pytest.mark.parametrize("nranks", [2, 3, 5, 8])
@pytest.mark.parametrize("name,params", [("topk", {"ratio": 0.02}),
                                         ("dgc", {"ratio": 0.02, "momentum": 0.0, "warmup_steps": 0})])
def test_applied_sum_is_exactly_what_was_selected_and_error_feedback_is_exact(nranks, name, params):
    world, ps, opts = _world(nranks, name, **params)
    k = opts[0]._table.slots["w"].compressor.target_count(opts[0]._table.slots["w"].info, 0)
    applied_total, grads_total = torch.zeros(N_ELEMENTS), torch.zeros(N_ELEMENTS)
    for step in range(6):
        _integer_grads(ps, step)
        grads = [p["w"].grad.clone() for p in ps]
        before = [_accumulator(o, name).clone() for o in opts]
        grads_total += sum(grads)
        world.synchronize()
        applied = ps[0]["w"].grad * nranks
        assert all(torch.equal(p["w"].grad * nranks, applied) for p in ps)
        # What each rank gave up is part of its own selection, and their sum is what was applied.
        given = [x + g - _accumulator(o, name) for x, g, o in zip(before, grads, opts)]
        assert all(int(torch.count_nonzero(c)) <= k for c in given)
        assert torch.equal(sum(given), applied)
        assert int(torch.count_nonzero(applied)) <= k
        applied_total += applied
    accumulators = sum(_accumulator(o, name) for o in opts)
    assert torch.equal(applied_total + accumulators, grads_total)


def _received_elements(opt) -> float:
    tensor = opt.compression_stats()["tensors"]["w"]
    return tensor["received_bytes"] / 4


@pytest.mark.parametrize("nranks", [8, 16, 32])
def test_bytes_per_rank_stay_within_the_bound_while_allgathers_grow(nranks):
    numel, ratio = 20000, 0.01
    world, ps, opts = _world(nranks, numel=numel, ratio=ratio)
    k = quota(int(ratio * numel), 1, 0)
    for step in range(3):
        for r, p in enumerate(ps):
            p["w"].grad = torch.randn(numel, generator=torch.Generator().manual_seed(step * 1000 + r))
        world.synchronize()
    headers = nranks - 1  # each owner's candidate count, one int32
    for opt in opts:
        assert _received_elements(opt) - headers <= 6 * k * (nranks - 1) / nranks
    # the allgather of the same selections: 2k from each other rank
    assert 2 * k * (nranks - 1) > 6 * k * (nranks - 1) / nranks


def test_regions_follow_the_selections():
    nranks = 4
    world, ps, opts = _world(nranks, ratio=0.05)
    first = None
    for step in range(8):
        _integer_grads(ps, step, skew=True)
        world.synchronize()
        regions = opts[0]._table.slots["w"].state[REGIONS]
        assert all(torch.equal(o._table.slots["w"].state[REGIONS], regions) for o in opts)  # one truth
        if first is None:
            first = regions.clone()
    # the first tenth holds most selections: its owner's region shrank to a fraction of it
    assert first.tolist() != initial_regions(N_ELEMENTS, nranks, "cpu").tolist()
    assert int(regions[1]) < N_ELEMENTS // 10


def test_balanced_regions():
    old = initial_regions(1000, 4, "cpu")
    assert old.tolist() == [0, 250, 500, 750, 1000]
    new = balanced_regions(old, torch.tensor([300, 100, 100, 100]), 1000)
    assert new[0] == 0 and new[-1] == 1000 and bool((new[1:] >= new[:-1]).all())
    assert int(new[1]) < 250  # the crowded region splits
    assert balanced_regions(old, torch.tensor([100, 100, 100, 100]), 1000).tolist() == old.tolist()
    assert balanced_regions(old, torch.zeros(4, dtype=torch.int64), 1000).tolist() == old.tolist()


def test_choice_of_collective():
    topk, terngrad = hvdcomp.Compression.topk(ratio=0.01), hvdcomp.Compression.terngrad()
    assert [choose_collective(topk, "auto", n) for n in (2, 64, 1024)] == ["allgather"] * 3  # asked by name only
    assert choose_collective(topk, "sparse_allreduce", 2) == "sparse_allreduce"
    assert choose_collective(topk, "allgather", 64) == "allgather"
    with pytest.raises(ValueError, match="cannot travel by sparse allreduce"):
        choose_collective(terngrad, "sparse_allreduce", 4)
    dgc16 = hvdcomp.Compression.dgc(value_dtype=torch.float16)
    with pytest.raises(ValueError, match="value_dtype"):
        choose_collective(dgc16, "sparse_allreduce", 4)
    assert choose_collective(dgc16, "auto", 64) == "allgather"
    with pytest.raises(ValueError, match="terngrad cannot travel by sparse allreduce"):
        World(2).DistributedOptimizer(0, torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=1.0),
                                      compression=terngrad, collective="sparse_allreduce")


def test_auto_is_refused_with_hierarchical_and_sparse_allreduce():
    from hvdcomp.core.options import check_exchange

    auto = hvdcomp.Compression.auto(candidates=[hvdcomp.Compression.topk(ratio=0.01)])
    none = hvdcomp.Compression.none()
    with pytest.raises(ValueError, match="sparse_allreduce"):
        check_exchange(auto, none, collective="sparse_allreduce")
    with pytest.raises(ValueError, match="hierarchical"):
        check_exchange(auto, none, hierarchical=True)
