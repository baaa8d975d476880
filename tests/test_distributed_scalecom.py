"""ScaleCom (CLT-k) on 2, 3 and 4 Gloo ranks, through hvdcomp's and Horovod's optimizers.

The test simulates every rank's error feedback in this process and checks, per step and
tensor, that the ranks' result is the mean of all ranks' ``x`` at the leader's exact top-k
indices, that the leader rotates ``(t + offset) mod N``, and that the residuals follow
``r <- (1 - beta) r + beta (x - sent)``.
"""
from __future__ import annotations

import math

import pytest
import torch

from distributed import requires_horovod, run_ranks
import kernel_oracle as oracle
import scenarios_scalecom as sc

pytestmark = requires_horovod
STEPS, RATIO, BETA = 4, 0.05, 0.6


def simulate(nranks: int, leaders: dict[str, list[int]] | None, observed):
    """Replay the method on all ranks. With ``leaders`` None, infer each step's leader as the
    one whose prediction matches ``observed`` (and return the inferred sequence)."""
    residual = {(n, r): torch.zeros(math.prod(s)) for n, s in sc.SHAPES.items() for r in range(nranks)}
    found = {n: [] for n in sc.SHAPES}
    for t in range(len(observed)):
        for name, shape in sc.SHAPES.items():
            numel = math.prod(shape)
            k = max(1, math.ceil(RATIO * numel))
            x = [residual[(name, r)] + sc.rank_gradient(name, r, t, shape).reshape(-1) for r in range(nranks)]
            candidates = range(nranks) if leaders is None else [leaders[name][t]]
            got = observed[t][name].reshape(-1)
            match = None
            for leader in candidates:
                idx = oracle.topk_indices(x[leader], k)
                expected = torch.zeros(numel)
                expected[idx] = torch.stack([xr[idx] for xr in x]).sum(0) / nranks
                if torch.allclose(got, expected, rtol=1e-6, atol=1e-6):
                    match = (leader, idx)
                    break
            assert match is not None, f"step {t}, {name}: result is not the mean of x at any rank's top-k"
            leader, idx = match
            found[name].append(leader)
            for r in range(nranks):
                sent = torch.zeros(numel)
                sent[idx] = x[r][idx]
                residual[(name, r)] = (1 - BETA) * residual[(name, r)] + BETA * (x[r] - sent)
    return found, residual


@pytest.fixture(scope="module", params=[2, 3, 4])
def launched(request):
    return request.param, run_ranks(sc.exchange, request.param, STEPS, RATIO, BETA)


def test_every_rank_gets_the_same_result(launched):
    nranks, results = launched
    for front in ("hvdcomp", "horovod"):
        for r in range(1, nranks):
            for t in range(STEPS):
                for name in sc.SHAPES:
                    assert torch.equal(results[r][front][t][name], results[0][front][t][name])


def test_hvdcomp_front_end_leaders_rotate_by_name_index(launched):
    nranks, results = launched
    index = {name: i for i, name in enumerate(sorted(sc.SHAPES))}
    leaders = {name: [(t + index[name]) % nranks for t in range(STEPS)] for name in sc.SHAPES}
    _, residual = simulate(nranks, leaders, results[0]["hvdcomp"])
    for r in range(nranks):
        for name in sc.SHAPES:
            torch.testing.assert_close(results[r]["residuals"][name], residual[(name, r)], rtol=1e-5, atol=1e-6)


def test_horovod_front_end_matches_the_method_and_rotates(launched):
    nranks, results = launched
    found, _ = simulate(nranks, None, results[0]["horovod"])
    for name, seq in found.items():
        assert seq == [(seq[0] + t) % nranks for t in range(STEPS)], (name, seq)


def test_traffic_is_flat_in_the_number_of_ranks(launched):
    nranks, results = launched
    stats = results[0]["stats"]["step"]
    k_total = sum(max(1, math.ceil(RATIO * math.prod(s))) for s in sc.SHAPES.values())
    assert stats["payload_bytes"] == 8 * k_total  # 4k values + 4k indices
    assert stats["transports"] == ["allreduce+broadcast"]
    # ring allreduce 2(N-1)/N * 4k plus the 4k pipelined broadcast: bounded by 12k for any N
    assert stats["sent_bytes"] == pytest.approx(2 * (nranks - 1) / nranks * 4 * k_total + 4 * k_total)
