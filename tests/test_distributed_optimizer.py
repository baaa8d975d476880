"""hvdcomp.DistributedOptimizer with every compressor on 2 Gloo ranks: identical parameters
on all ranks in plain training, with backward_passes_per_step=2, with a parameter that
gets no gradient on some ranks, with fp16/bf16 parameters, and bit-identical resumption
from a checkpoint."""
from __future__ import annotations

import pytest
import torch

from distributed import requires_horovod, run_ranks
from hvdcomp.registry import COMPRESSORS
import scenarios_optimizer as sc

pytestmark = requires_horovod
NP, STEPS, SEED = 2, 6, 3

#: name -> (params, optimizer momentum); DGC applies momentum itself.
CONFIGS = {
    "none": ({}, 0.9), "fp16": ({}, 0.9), "bf16": ({}, 0.9),
    "scalecom": ({"ratio": 0.05}, 0.9),
    "adacomp": ({}, 0.9), "terngrad": ({}, 0.9), "dgc": ({"ratio": 0.05}, 0.0),
    "topk": ({"ratio": 0.05}, 0.9), "randomk": ({"ratio": 0.05}, 0.9), "onebit": ({}, 0.9),
}

NAMES = list(COMPRESSORS)


def test_every_registered_compressor_is_covered():
    assert set(COMPRESSORS) == set(CONFIGS)


@pytest.fixture(scope="module")
def results():
    return run_ranks(sc.behaviours, NP, [(n, *CONFIGS[n]) for n in NAMES], STEPS, SEED)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", ["plain", "two_passes", "dynamic", "torch.float16", "torch.bfloat16",
                                  "uninterrupted", "resumed"])
def test_identical_parameters_on_every_rank(results, name, case):
    for r in range(1, NP):
        assert torch.equal(results[r][name][case], results[0][name][case])
    assert torch.isfinite(results[0][name][case]).all()


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_resume_is_bit_identical(results, name):
    for r in range(NP):
        assert torch.equal(results[r][name]["resumed"], results[r][name]["uninterrupted"])


@pytest.mark.parametrize("name", NAMES)
def test_variants_take_different_trajectories(results, name):
    # accumulation and the missing gradient really change the run (the cases are not no-ops)
    res = results[0][name]
    assert not torch.equal(res["plain"], res["two_passes"])
    assert not torch.equal(res["plain"], res["dynamic"])
