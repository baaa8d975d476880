"""Hierarchical exchange and the sparse allreduce on real ranks: 4 Gloo ranks split into 2
nodes of 2 (an explicit split, as ``hierarchical=2`` asks), through hvdcomp.DistributedOptimizer
(Horovod, dynamic process sets, tensor fusion off) and the DDP hook (with DDP's bucket
rebuild), every compressor hierarchical plus top-k and DGC by sparse allreduce, with rank
1's gradient non-finite at one step:

* the in-process transport (``World(4, nodes=2)``) gives bit-identical parameters on every
  rank, so everything proven in-process holds on real ranks;
* the poisoned step is dropped on every rank, and the run equals one in which it never came;
* the sparse allreduce's error feedback is exact on real ranks: the applied sum plus every
  rank's accumulator equals the sum of every rank's gradients, bit for bit.
"""
from __future__ import annotations

import pytest
import torch

import scenarios_ddp as sd
import scenarios_hierarchy as sh
from distributed import requires_horovod, run_ranks

STEPS = 6
CASES = list(sh.CASES)


@pytest.fixture(scope="module")
def horovod():
    return run_ranks(sh.horovod_ranks, sh.NRANKS, CASES, STEPS, env={"HOROVOD_FUSION_THRESHOLD": "0"})


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    return sd.launch(sh.ddp_ranks, sh.NRANKS, CASES, STEPS, 0.002, outdir=tmp_path_factory.mktemp("hier"),
                     timeout=600)


def _assert_identical(got: dict, want: dict, label: str) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), f"{label}: {k} differs by {(got[k] - want[k]).abs().max().item():.3g}"


def _check(real: list, case: str, transport: str) -> None:
    layouts = real[0][case].get("layouts")
    simulated, stats = sh.inprocess(case, STEPS, transport=transport, layouts=layouts)
    for r in range(sh.NRANKS):
        _assert_identical(real[r][case]["params"], simulated[r], f"{case} {transport} rank {r}")
        assert real[r][case]["stats"]["dropped_steps"] == 1
    assert stats["dropped_steps"] == 1
    kind = "hierarchical" if "hierarchical" in sh.CASES[case][1] else "sparse_allreduce"
    assert any(kind in t for t in real[0][case]["stats"]["transports"].values()), real[0][case]["stats"]


@requires_horovod
@pytest.mark.parametrize("case", CASES)
def test_inprocess_equals_horovod_ranks(horovod, case):
    _check(horovod, case, "horovod")


@pytest.mark.parametrize("case", CASES)
def test_inprocess_equals_ddp_ranks(ddp, case):
    layouts = ddp[0][case]["layouts"]
    assert len(layouts[0]) == 1 and len(layouts[-1]) >= 2  # DDP's rebuild happened and is replayed
    _check(ddp, case, "ddp")


@pytest.mark.parametrize("case", CASES)
def test_the_poisoned_step_is_dropped_as_if_it_never_came(case):
    poisoned, _ = sh.inprocess(case, STEPS)
    skipped, stats = sh.inprocess(case, STEPS, poison=False, skip_poison=True)
    assert stats["dropped_steps"] == 0
    for r in range(sh.NRANKS):
        _assert_identical(poisoned[r], skipped[r], f"{case} rank {r}")


def test_sparse_allreduce_error_feedback_is_exact_on_real_ranks(tmp_path):
    steps = 5
    ranks = sd.launch(sh.ddp_error_feedback, sh.NRANKS, sh.EF_CASES, steps, outdir=tmp_path, timeout=300)
    for case in sh.EF_CASES:
        applied = ranks[0][case]["applied"]
        assert all(torch.equal(r[case]["applied"], applied) for r in ranks)
        assert torch.count_nonzero(applied) > 0
        accumulators = torch.zeros(applied.numel())
        for rank, r in enumerate(ranks):
            acc = r[case]["accumulator"].reshape(-1)
            if "hierarchical" in sh.CASES[case][1]:  # this rank's shard of its node's sum
                start = (rank % sh.RANKS_PER_NODE) * acc.numel()
                padded = torch.zeros(acc.numel() * sh.RANKS_PER_NODE)
                padded[start:start + acc.numel()] = acc
                acc = padded[:applied.numel()]
            accumulators += acc
        gradients = sum(r[case]["grads"] for r in ranks)
        assert torch.equal(applied + accumulators.view(applied.shape), gradients), case
