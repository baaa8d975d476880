"""The in-process transport is bit-identical to real ranks: every compressor, 20 steps, on 2
and 3 Gloo ranks, through hvdcomp.DistributedOptimizer (Horovod, tensor fusion off) and the
DDP hook (torch.distributed, with DDP's bucket rebuild)."""
from __future__ import annotations

import pytest
import torch

import scenarios_ddp as sd
import scenarios_identity as si
from distributed import requires_horovod, run_ranks
from hvdcomp.registry import COMPRESSORS

STEPS = 20
NAMES = list(COMPRESSORS)


def test_every_registered_compressor_is_covered():
    assert set(NAMES) == set(si.CONFIGS)


@pytest.fixture(scope="module", params=[2, 3])
def horovod(request):
    n = request.param
    return n, run_ranks(si.horovod_ranks, n, NAMES, STEPS, env={"HOROVOD_FUSION_THRESHOLD": "0"})


@pytest.fixture(scope="module", params=[2, 3])
def ddp(request, tmp_path_factory):
    n = request.param
    # A small bucket cap: DDP starts with one bucket and rebuilds several after iteration 1.
    return n, sd.launch(si.ddp_ranks, n, NAMES, STEPS, 0.002, outdir=tmp_path_factory.mktemp(f"id{n}"),
                        timeout=300)


def _assert_identical(got: dict, want: dict, label: str) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), f"{label}: {k} differs by {(got[k] - want[k]).abs().max().item():.3g}"


@requires_horovod
@pytest.mark.parametrize("name", NAMES)
def test_inprocess_equals_horovod_ranks(horovod, name):
    n, real = horovod
    simulated = si.inprocess(name, n, STEPS)
    for r in range(n):
        _assert_identical(simulated[r], real[r][name], f"{name} rank {r} of {n}")
    assert not torch.equal(simulated[0]["fc1.weight"], si.fresh().fc1.weight.detach())  # it trained


@pytest.mark.parametrize("name", NAMES)
def test_inprocess_equals_ddp_ranks(ddp, name):
    n, real = ddp
    layouts = real[0][name]["layouts"]
    assert len(layouts[0]) == 1 and len(layouts[-1]) >= 2  # the rebuild happened and is replayed
    simulated = si.inprocess(name, n, STEPS, transport="ddp", layouts=layouts)
    for r in range(n):
        _assert_identical(simulated[r], real[r][name]["params"], f"{name} rank {r} of {n}")
