"""The frozen-v Adam recipe on 2 real Horovod Gloo ranks (tensor fusion off):
``hvdcomp.DistributedOptimizer(AdamW or FrozenAdamW, compression=X)`` gives bit for bit the
parameters of the in-process ranks (and so everything tests/test_adam.py proves of them);
with ``none`` and no freeze, those of torch.optim.AdamW on the plain average; a bad warm-up
raises ValueError on every rank before any collective."""
from __future__ import annotations

import warnings

import pytest
import torch

import scenarios_adam as sa
from distributed import requires_horovod, run_ranks
from hvdcomp.recipes import RecipeNotice

NRANKS, STEPS, WARMUP = 2, 10, 4
#: (compressor, warm-up, collective): "plain" is torch.optim.AdamW, the recipe's default.
RUNS = [("none", "plain", "auto"), ("none", None, "auto"), ("none", WARMUP, "auto"), ("onebit", WARMUP, "auto"),
        ("terngrad", WARMUP, "allgather"), ("terngrad", WARMUP, "compressed_allreduce"), ("topk", WARMUP, "auto"),
        ("scalecom", WARMUP, "auto"), ("dgc", WARMUP, "auto"), ("adacomp", WARMUP, "auto")]


@pytest.fixture(scope="module")
def horovod():
    return run_ranks(sa.horovod_ranks, NRANKS, RUNS, STEPS, env={"HOROVOD_FUSION_THRESHOLD": "0"})


@requires_horovod
@pytest.mark.parametrize("run", RUNS, ids=lambda run: "-".join(map(str, run)))
def test_real_ranks_equal_inprocess_ranks(horovod, run):
    name, warmup, collective = run
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RecipeNotice)
        want = sa.inprocess(name, NRANKS, STEPS, warmup, collective)
    for r in range(NRANKS):
        got = horovod[r][run]
        for k, v in want[r].items():
            assert torch.equal(got[k], v), (run, r, k)
    assert not torch.equal(want[0]["fc1.weight"], sa.fresh().fc1.weight.detach())  # it trained


@requires_horovod
@pytest.mark.parametrize("warmup", ["plain", None])
def test_none_without_freeze_is_torch_adamw_on_real_ranks(horovod, warmup):
    want = sa.reference_adamw(NRANKS, STEPS)
    for r in range(NRANKS):
        got = horovod[r][("none", warmup, "auto")]
        for k, v in want.items():
            assert torch.equal(got[k], v), (warmup, r, k)


@requires_horovod
def test_horovod_broadcast_optimizer_state_works_with_the_recipe(horovod):
    got = [horovod[r]["broadcast"] for r in range(NRANKS)]
    assert got[0]["warmup_steps"] == got[1]["warmup_steps"] == 2
    for k, v in got[0]["params"].items():
        assert torch.equal(got[1]["params"][k], v), k
    assert not torch.equal(got[0]["params"]["fc1.weight"], sa.fresh().fc1.weight.detach())


@requires_horovod
def test_horovod_amp_recipe_with_a_grad_scaler_is_the_unscaled_run(horovod):
    want = sa.inprocess("onebit", NRANKS, STEPS, WARMUP)
    for r in range(NRANKS):
        for k, v in want[r].items():
            assert torch.equal(horovod[r]["grad_scaler"][k], v), (r, k)


@requires_horovod
def test_bad_warmup_raises_on_every_rank_before_any_collective(horovod):
    for r in range(NRANKS):
        assert "warmup_steps must be an integer >= 1" in horovod[r]["bad_warmup"]
        assert horovod[r]["after"] == NRANKS  # no rank was left inside a collective


# ---- the DDP hook with hvdcomp.FrozenAdamW ------------------------------------------------------------

DDP_RUNS = [("none", None, "auto"), ("onebit", WARMUP, "auto"), ("terngrad", WARMUP, "allgather"),
            ("topk", WARMUP, "auto"), ("scalecom", WARMUP, "auto")]
POISONED = frozenset({(1, 6)})  # after the freeze
RESUME = ("onebit", WARMUP, 6)


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    import scenarios_ddp as sd

    return sd.launch(sa.ddp_ranks, NRANKS, DDP_RUNS, STEPS, POISONED, RESUME,
                     outdir=tmp_path_factory.mktemp("adam"), timeout=300)


def _inprocess_ddp(name, warmup, collective="auto", poisoned=frozenset()):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RecipeNotice)
        return sa.inprocess(name, NRANKS, STEPS, warmup, collective, transport="ddp", poisoned=poisoned)


@pytest.mark.parametrize("run", DDP_RUNS, ids=lambda run: "-".join(map(str, run)))
def test_ddp_hook_with_frozen_adamw_equals_inprocess_ranks(ddp, run):
    want = _inprocess_ddp(*run)
    for r in range(NRANKS):
        for k, v in want[r].items():
            assert torch.equal(ddp[r][run][k], v), (run, r, k)


def test_ddp_none_without_freeze_is_torch_adamw(ddp):
    want = sa.reference_adamw(NRANKS, STEPS)
    for r in range(NRANKS):
        for k, v in want.items():
            assert torch.equal(ddp[r][("none", None, "auto")][k], v), (r, k)


def test_ddp_drops_a_non_finite_step_as_inprocess_ranks_do(ddp):
    want = _inprocess_ddp("onebit", WARMUP, poisoned=POISONED)
    for r in range(NRANKS):
        assert ddp[r]["poisoned"]["dropped"] == 1
        for k, v in want[r].items():
            assert torch.equal(ddp[r]["poisoned"]["params"][k], v), (r, k)


def test_ddp_with_a_grad_scaler_is_the_unscaled_run(ddp):
    want = _inprocess_ddp("onebit", WARMUP)
    for r in range(NRANKS):
        for k, v in want[r].items():
            assert torch.equal(ddp[r]["grad_scaler"][k], v), (r, k)


def test_ddp_resume_after_the_freeze_is_bit_identical(ddp):
    name, warmup, _ = RESUME
    for r in range(NRANKS):
        for k, v in ddp[r][(name, warmup, "auto")].items():
            assert torch.equal(ddp[r]["resumed"][k], v), (r, k)
