"""Dense compressors (none, fp16, bf16) across 2 real Gloo ranks, both transports."""
from __future__ import annotations

import pytest
import torch

from distributed import requires_horovod, run_ranks
import scenarios_dense as sc

pytestmark = requires_horovod

SHAPES = {"w": (37, 29), "b": (5,), "conv": (4, 3, 3, 3)}
SEED = 11
NP = 2


@pytest.fixture(scope="module")
def averaged():
    return run_ranks(sc.averaged_gradients, NP, ["none", "fp16", "bf16"], SHAPES, SEED)


def _expected(cast=None):
    out = {}
    for i, (k, s) in enumerate(sorted(SHAPES.items())):
        grads = [sc.rank_gradient(SEED + i, r, s) for r in range(NP)]
        if cast is not None:
            grads = [g.to(cast).to(torch.float32) for g in grads]
        out[k] = torch.stack(grads).sum(0) / NP
    return out


@pytest.mark.parametrize("front", ["hvdcomp", "horovod"])
def test_none_is_the_exact_average_on_every_rank(averaged, front):
    exp = _expected()
    for rank_result in averaged:
        for k, v in rank_result[("none", front)].items():
            torch.testing.assert_close(v, exp[k], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("front", ["hvdcomp", "horovod"])
def test_fp16_within_fp16_rounding(averaged, front):
    exact = _expected()
    for rank_result in averaged:
        for k, v in rank_result[("fp16", front)].items():
            bound = 4 * NP * 2.0**-11 * exact[k].abs().max().item()
            err = (v - exact[k]).abs().max().item()
            assert err <= bound, (k, err, bound)
        assert rank_result[("fp16", front)]["w"].equal(averaged[0][("fp16", front)]["w"])


@pytest.mark.parametrize("front", ["hvdcomp", "horovod"])
def test_bf16_is_the_average_of_bf16_rounded_gradients(averaged, front):
    rounded = _expected(torch.bfloat16)
    exact = _expected()
    for rank_result in averaged:
        for k, v in rank_result[("bf16", front)].items():
            torch.testing.assert_close(v, rounded[k], rtol=1e-6, atol=1e-6)
            # and it differs from the fp32 average by no more than bf16's rounding
            assert (v - exact[k]).abs().max() <= 2.0**-8 * exact[k].abs().max()
        assert not torch.equal(rank_result[("bf16", front)]["w"], exact["w"])


def test_wire_bytes_by_compressor(averaged):
    numel = sum(torch.Size(s).numel() for s in SHAPES.values())
    for name, width, transport in (("none", 4, "allreduce"), ("fp16", 2, "allreduce"), ("bf16", 2, "allgather")):
        step = averaged[0][(name, "stats")]["step"]
        assert step["dense_bytes"] == 4 * numel
        assert step["payload_bytes"] == width * numel
        assert step["transports"] == [transport]


def test_training_keeps_every_rank_identical():
    names = ["none", "fp16", "bf16"]
    results = run_ranks(sc.train_identical, NP, names, 4, SEED)
    for name in names:
        for r in range(1, NP):
            assert torch.equal(results[r][name], results[0][name]), name
    # compression changes the trajectory only by rounding
    assert (results[0]["fp16"] - results[0]["none"]).abs().max() < 1e-2
    assert not torch.equal(results[0]["fp16"], results[0]["none"])


def test_mismatched_settings_fail_on_every_rank_without_hanging():
    cases = list(sc.MISMATCHES)
    results = run_ranks(sc.mismatched_settings, NP, cases)
    for case in cases:
        # groups=2 is resolved to explicit groups: the record names its members
        key = "groups" if case == "num_groups" else case
        for rank, messages in enumerate(results):
            msg = messages[case]
            assert msg is not None, f"rank {rank} accepted a different {case}"
            assert "differ between ranks" in msg and key in msg, (case, msg)
