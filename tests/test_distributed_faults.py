"""The non-finite policy and the run-level checks on real ranks, every compressor: Horovod's
AMP recipe (2 Gloo ranks, tensor fusion off) and DDP with GradScaler, an overflow on one rank
at one step: every rank skips it, and the parameters equal those of the in-process run in
which that step never happened (bit for bit: the in-process transport is proven equal to
real ranks). Ranks resumed at different steps raise ValueError on every rank, before any
gradient travels."""
from __future__ import annotations

import pytest
import torch

import scenarios_ddp as sd
import scenarios_faults as sf
from distributed import requires_horovod, run_ranks
from hvdcomp.registry import COMPRESSORS

NAMES = list(COMPRESSORS)


@pytest.fixture(scope="module")
def horovod():
    return run_ranks(sf.horovod_faults, 2, NAMES, 1, env={"HOROVOD_FUSION_THRESHOLD": "0"})


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    return sd.launch(sf.ddp_faults, 2, NAMES, 1, outdir=tmp_path_factory.mktemp("faults"), timeout=300)


def _check(real, name, transport):
    want, _, want_scales, _ = sf.inprocess_amp(name, 2, skip_bad=True, transport=transport)
    for r in range(2):
        got = real[r][name]
        assert got["scale"] == want_scales[r]  # GradScaler skipped the step on every rank
        assert got["stats"]["dropped_steps"] == 1
        assert got["stats"]["iterations"] == len(sf.schedule(True))
        for k, v in want[r].items():
            assert torch.equal(got["params"][k], v), (name, transport, r, k)


@requires_horovod
@pytest.mark.parametrize("name", NAMES)
def test_horovod_amp_recipe_drops_the_overflow_step(horovod, name):
    _check(horovod, name, "horovod")


@pytest.mark.parametrize("name", NAMES)
def test_ddp_with_grad_scaler_drops_the_overflow_step(ddp, name):
    _check(ddp, name, "ddp")


@requires_horovod
def test_horovod_ranks_at_different_steps_raise_on_every_rank(horovod):
    for r in range(2):
        assert horovod[r]["resume"] and "is at step" in horovod[r]["resume"], horovod[r]["resume"]


def test_ddp_ranks_at_different_steps_raise_on_every_rank(ddp):
    for r in range(2):
        assert ddp[r]["resume"] and "is at step" in ddp[r]["resume"], ddp[r]["resume"]
