"""Compressed allreduce (alltoall reduce-scatter + re-encode + allgather) vs allgather,
on 2, 3 and 4 Gloo ranks."""
from __future__ import annotations

import math

import pytest
import torch

from distributed import requires_horovod, run_ranks
import scenarios_collectives as sc

pytestmark = requires_horovod
STEPS = 2


@pytest.fixture(scope="module", params=[2, 3, 4])
def launched(request):
    return request.param, run_ranks(sc.exchange, request.param, ["bf16"], STEPS)


def _bf16_mean(name, shape, t, nranks):
    grads = [sc.rank_gradient(name, r, t, shape).to(torch.bfloat16).float() for r in range(nranks)]
    return torch.stack(grads).sum(0), nranks


def test_identical_on_every_rank(launched):
    nranks, results = launched
    for key in results[0]:
        for r in range(1, nranks):
            for t in range(STEPS):
                for n in sc.SHAPES:
                    assert torch.equal(results[r][key]["history"][t][n], results[0][key]["history"][t][n]), key


def test_bf16_allgather_is_the_exact_mean_of_rounded_values(launched):
    nranks, results = launched
    for t in range(STEPS):
        for n, shape in sc.SHAPES.items():
            total, _ = _bf16_mean(n, shape, t, nranks)
            torch.testing.assert_close(results[0][("bf16", "allgather")]["history"][t][n], total / nranks,
                                       rtol=1e-6, atol=1e-6)


def test_bf16_compressed_allreduce_within_one_bf16_rounding_of_the_sum(launched):
    nranks, results = launched
    for t in range(STEPS):
        for n, shape in sc.SHAPES.items():
            total, _ = _bf16_mean(n, shape, t, nranks)
            got = results[0][("bf16", "compressed_allreduce")]["history"][t][n] * nranks
            # one round-to-nearest-even to bf16: relative error at most 2**-8 per element
            assert ((got - total).abs() <= 2.0**-8 * total.abs() + 1e-30).all(), n
            # and it is the bf16 rounding of that sum (fp32 sum order may differ by an ulp)
            assert (got - total.to(torch.bfloat16).float()).abs().max() <= 2.0**-7 * total.abs().max()


def test_traffic_per_rank(launched):
    nranks, results = launched
    numel = sum(math.prod(s) for s in sc.SHAPES.values())
    ag = results[0][("bf16", "allgather")]["stats"]["step"]
    car = results[0][("bf16", "compressed_allreduce")]["stats"]["step"]
    assert ag["transports"] == ["allgather"] and car["transports"] == ["compressed_allreduce"]
    assert ag["received_bytes"] == (nranks - 1) * 2 * numel
    # (N-1)/N of the payload twice, up to the 8-element chunk granularity
    expected = 2 * (nranks - 1) / nranks * 2 * numel
    assert abs(car["received_bytes"] - expected) <= 2 * 2 * 8 * nranks * len(sc.SHAPES)
    if nranks >= 3:
        assert car["received_bytes"] < ag["received_bytes"]
