"""Every packed compressor across 2 and 4 real Gloo ranks: the averaged update equals the
mean of what each rank's compressor sent (decoded), identically on every rank — with a rank
whose gradients are all zero (it selects nothing), ranks selecting different counts, a
tensor smaller than one AdaComp bin, and parameters listed in a different order on odd ranks. Plus: Horovod's own optimizer refuses packed payloads
with an error that names hvdcomp.DistributedOptimizer."""
from __future__ import annotations

import pytest
import torch

from distributed import requires_horovod, run_ranks
from hvdcomp.registry import compressor_class
import scenarios_compressors as sc

pytestmark = requires_horovod
STEPS = 3
CONFIGS = [("adacomp", {}), ("terngrad", {}), ("dgc", {"ratio": 0.05}), ("topk", {"ratio": 0.05}),
           ("onebit", {}), ("randomk", {"ratio": 0.05}), ("bf16", {})]


AVAILABLE = CONFIGS
NAMES = [c[0] for c in AVAILABLE]


@pytest.fixture(scope="module", params=[2, 4])
def launched(request):
    return request.param, run_ranks(sc.exchange, request.param, AVAILABLE, STEPS)


@pytest.mark.parametrize("name", NAMES)
def test_average_equals_mean_of_what_ranks_sent(launched, name):
    nranks, results = launched
    for t in range(STEPS):
        for n in sc.SHAPES:
            sent = torch.stack([results[r][name]["history"][t]["own"][n] for r in range(nranks)])
            expected = sent.sum(0) / nranks
            for r in range(nranks):
                got = results[r][name]["history"][t]["result"][n].reshape(-1)
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=f"{name} step {t} {n} rank {r}")


@pytest.mark.parametrize("name", NAMES)
def test_rank_with_zero_gradients_sends_nothing_while_others_send(launched, name):
    nranks, results = launched
    step0 = [results[r][name]["history"][0]["own"] for r in range(nranks)]
    # rank 1's gradient is zero at step 0 and its state starts at zero: it contributes
    # nothing (sparse methods select no element) while rank 0 does — different counts
    for n in sc.SHAPES:
        assert torch.count_nonzero(step0[1][n]) == 0, (name, n)
    assert sum(int(torch.count_nonzero(step0[0][n])) for n in sc.SHAPES) > 0


def test_packed_compressors_are_refused_by_horovods_optimizer():
    # bf16 and TernGrad have a dense form for Horovod's optimizer (fp32 container, fp16
    # levels with a shared scale); every other packed format must be refused.
    packed = [(n, p) for n, p in AVAILABLE
              if compressor_class(n).transport == "allgather" and n not in ("bf16", "terngrad")]
    assert packed, "no packed compressor to refuse"
    per_rank = run_ranks(sc.horovod_optimizer_rejects, 2, packed)
    for messages in per_rank:
        for name, _ in packed:
            msg = messages[name]
            assert msg is not None and "hvdcomp.DistributedOptimizer" in msg, (name, msg)
