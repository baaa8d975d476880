"""``Compression.auto()`` on 2 real Gloo ranks, both transports: the link is measured through
the transport, every rank makes the same choice, the ranks' parameters stay identical, the
choice and its predicted and observed step times are in the telemetry, a redecision on
request runs through the same path, and a proposal's trial reaches one verdict on every rank
(the slowest rank's windows decide)."""
from __future__ import annotations

import pytest
import torch

import scenarios_auto as sa
import scenarios_ddp as sd
from distributed import requires_horovod, run_ranks


def _check(results):
    for phase in ("first", "last"):
        autos = [r[phase]["auto"] for r in results]
        assert all(a["decided"] for a in autos)
        assert all(a["assignment"] == autos[0]["assignment"] for a in autos)  # one choice everywhere
        assert all(a["kept_current"] == autos[0]["kept_current"] for a in autos)
        # the three weights of at least MIN_NUMEL elements, the biases keep small_compression
        assert set(autos[0]["assignment"]) == {"conv.weight", "fc1.weight", "fc2.weight"}
        for a in autos:
            assert a["calibration_s"] > 0
            assert a["link"]["seconds_per_byte"], "the link was not measured through the transport"
            # fp16's chain sums fp16: its allreduce has probes and a fit of its own
            assert "allreduce_float16" in a["link"]["seconds_per_byte"]
            assert a["predicted_step_s"] is not None and a["predicted_step_s"] >= 0
        for r in results[1:]:
            assert torch.equal(r[phase]["params"], results[0][phase]["params"])
    assert results[0]["last"]["auto"]["at_step"] == 5  # the redecision took effect at the asked step
    assert results[0]["first"]["auto"]["at_step"] == 2
    assert results[0]["last"]["iterations"] == sa.STEPS


@requires_horovod
def test_auto_through_horovod():
    _check(run_ranks(sa.horovod_run, 2))


def test_auto_through_the_ddp_hook(tmp_path):
    _check(sd.launch(sa.ddp_run, 2, outdir=tmp_path / "auto", timeout=180))


def _check_trial(results):
    autos = [r["last"]["auto"] for r in results]
    for a in autos:
        # rank 1 timed top-k at 1.5 s against 1 s, rank 0 at 0.5 s: the slowest rank decides
        assert a["trial"] == {"steps": 1, "decided_at": 2, "switched_at": 4, "returned_at": 6, "verdict_at": 8,
                              "baseline_step_s": 1.0, "trial_step_s": 1.5, "second_baseline_step_s": 1.0,
                              "stands": False}
        assert set(a["assignment"].values()) == {"none"} and not a["on_trial"]
    for r in results[1:]:
        assert torch.equal(r["last"]["params"], results[0]["last"]["params"])
    assert results[0]["last"]["iterations"] == sa.TRIAL_STEPS


@requires_horovod
def test_auto_trial_through_horovod():
    _check_trial(run_ranks(sa.horovod_run, 2, True))


def test_auto_trial_through_the_ddp_hook(tmp_path):
    _check_trial(sd.launch(sa.ddp_run, 2, True, outdir=tmp_path / "trial", timeout=180))
