"""Each chain kind declares how many phases (collective rounds) it has; the DDP transport
reserves that many sequencer tickets up front, so a wrong count would hang or break it.
Here every kind runs on in-process ranks and its phases are counted."""
from __future__ import annotations

import collections

import pytest
import torch

import hvdcomp
from hvdcomp.core.chains import CHAINS
from hvdcomp.inprocess import World

#: (compressor, collective, the kinds its chains must include)
CASES = [
    ("none", "auto", {"dense"}),
    ("scalecom", "auto", {"index", "dense"}),
    ("topk", "auto", {"allgather", "dense"}),
    ("terngrad", "allgather", {"allgather", "dense"}),
    ("terngrad", "compressed_allreduce", {"compressed_allreduce", "dense"}),
    ("bf16", "compressed_allreduce", {"compressed_allreduce", "dense"}),
    ("topk", "sparse_allreduce", {"sparse_allreduce", "dense"}),
    ("dgc", "sparse_allreduce", {"sparse_allreduce", "dense"}),
]


def _params():
    return {"w": (64, 40), "b": (40,)}


@pytest.mark.parametrize("name,collective,kinds", CASES)
@pytest.mark.parametrize("transport", ["horovod", "ddp"])
def test_declared_phases_are_the_chains_yields(name, collective, kinds, transport):
    nranks = 3
    world = World(nranks, transport=transport)
    opts, params = [], []
    for r in range(nranks):
        ps = {k: torch.nn.Parameter(torch.zeros(s)) for k, s in _params().items()}
        params.append(ps)
        ratio = {"ratio": 0.1} if name in ("scalecom", "topk", "dgc") else {}
        opts.append(world.DistributedOptimizer(r, torch.optim.SGD(ps.values(), lr=0.1), named_parameters=ps.items(),
                                               compression=hvdcomp.compression_from_name(name, **ratio),
                                               collective=collective, min_compress_numel=100))
    for r, ps in enumerate(params):
        g = torch.Generator().manual_seed(r)
        for p in ps.values():
            p.grad = torch.randn(p.shape, generator=g)
    phases = collections.Counter()
    world.synchronize(observe=lambda key, phase, requests: phases.update([key]))
    plan = {key: (kind, slots) for key, kind, slots in opts[0]._world_plan()}
    assert {kind.name for kind, _ in plan.values()} == kinds
    for key, (kind, slots) in plan.items():
        assert phases[key] == kind.phases([s.compressor for s in slots]), (key, phases[key])


def test_every_kind_is_named_by_its_key():
    assert all(name == kind.name for name, kind in CHAINS.items())
