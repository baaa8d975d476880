"""``hvdcomp.DistributedOptimizer`` as a drop-in for ``hvd.DistributedOptimizer``: every
Horovod argument and recipe on 2 real Gloo ranks, against Horovod's own optimizer on the
same model and data (bit for bit with compression none), and with a lossy compressor on
every tensor (identical parameters on every rank). See tests/scenarios_horovod_arguments.py."""
from __future__ import annotations

import inspect

import pytest
import torch

import scenarios_horovod_arguments as sp
from distributed import requires_horovod, run_ranks

pytestmark = requires_horovod

CASES = ["plain", "sum", "predivide", "positional", "accumulation", "fp16", "checkpoint", "process_set",
         "sparse_as_dense=False", "sparse_as_dense=True", "groups:num_groups", "groups:count", "groups:lists"]


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(sp.parity_ranks, 2)


def _params(result):
    return result["params"] if isinstance(result, dict) and "params" in result else result


@pytest.mark.parametrize("case", [c for c in CASES if c != "fp16"])
def test_compression_none_equals_horovods_optimizer(ranks, case):
    for r in range(2):
        want, got = _params(ranks[r][(case, "horovod")]), _params(ranks[r][(case, "none")])
        assert want.keys() == got.keys()
        for k in want:
            assert torch.equal(want[k], got[k]), (case, r, k)


def test_horovods_fp16_compressor_matches_up_to_the_division_before_the_sum(ranks):
    """``hvd.Compression.fp16`` in our optimizer: compress, allreduce, decompress as Horovod
    does, except that the average divides by N before the fp16 sum (so that sums of many
    ranks stay in range) where Horovod divides after it: halving is exact but for fp16
    subnormals (below 6.1e-5, about 0.05 % of these gradients), so after three steps the
    parameters agree within fp16's resolution (6e-5 at 0.1) and are not fp32's."""
    for r in range(2):
        want, got = ranks[r][("fp16", "horovod")], ranks[r][("fp16", "none")]
        fp32 = ranks[r][("plain", "none")]
        for k in want:
            assert torch.allclose(want[k], got[k], rtol=0, atol=1e-4), (r, k, (want[k] - got[k]).abs().max())
        assert any(not torch.equal(got[k], fp32[k]) for k in got)


@pytest.mark.parametrize("case", [c for c in CASES if c not in ("positional", "fp16")])
def test_lossy_compression_keeps_every_rank_identical(ranks, case):
    first, second = _params(ranks[0][(case, "topk")]), _params(ranks[1][(case, "topk")])
    if case == "process_set":  # rank 1 is outside the set: it trained alone
        assert any(not torch.equal(first[k], second[k]) for k in first)
        return
    for k in first:
        assert torch.equal(first[k], second[k]), (case, k)
    # and the compressor did change the result (it is not Horovod's uncompressed average)
    horovod = _params(ranks[0][(case, "horovod")])
    assert any(not torch.equal(first[k], horovod[k]) for k in first), case


@pytest.mark.parametrize("case", ["sparse_as_dense=False", "sparse_as_dense=True",
                                  "groups:num_groups", "groups:count", "groups:lists"])
def test_inprocess_ranks_equal_real_ranks(ranks, case):
    """Sparse gradients and explicit groups on the in-process transport: bit-identical to the
    real ranks, so longer studies of them can run in one process."""
    if case.startswith("sparse"):
        want = sp.inprocess_sparse(case.endswith("True"))
    else:
        want = sp.inprocess_grouped(case.split(":")[1])
    for r in range(2):
        got = ranks[r][(case, "topk")]
        for k in want[r]:
            assert torch.equal(got[k], want[r][k]), (case, r, k)


def test_process_set_outside_rank_trains_alone(ranks):
    """Rank 1 is outside the set: its parameters differ from rank 0's (as with Horovod's)."""
    for config in sp.CONFIGS:
        a, b = ranks[0][("process_set", config)], ranks[1][("process_set", config)]
        assert any(not torch.equal(a[k], b[k]) for k in a), config


def test_checkpoint_recipe_resumes_at_the_saved_step(ranks):
    """Rank 0 loads, both broadcasts, two steps: no hang, no exchange inside
    ``broadcast_optimizer_state`` (it would have counted a step on rank 1 only), rank 1
    continues at rank 0's step, identical parameters, for every compressor."""
    for config in ("none", "topk") + sp.RECIPE_COMPRESSORS:
        for r in range(2):
            result = ranks[r][("checkpoint", config)]
            assert result["iterations"] == sp.STEPS + 2, (config, r)  # rank 1 adopted rank 0's step
        a, b = ranks[0][("checkpoint", config)]["params"], ranks[1][("checkpoint", config)]["params"]
        for k in a:
            assert torch.equal(a[k], b[k]), (config, k)


def test_default_parameter_names_are_horovods(ranks):
    for r in range(2):
        assert ranks[r][("no_names", "none")] == ranks[r][("no_names", "horovod")]
        assert ranks[r][("no_names", "topk")] == ranks[r][("no_names", "horovod")]


def test_signature_is_horovods_then_keyword_only_extras():
    import horovod.torch as hvd

    import hvdcomp

    theirs = list(inspect.signature(hvd.DistributedOptimizer).parameters.values())
    ours = list(inspect.signature(hvdcomp.DistributedOptimizer).parameters.values())
    assert [p.name for p in ours[:len(theirs)]] == [p.name for p in theirs]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in ours[len(theirs):])
    for mine, horovods in zip(ours, theirs):
        if mine.default is not None:  # None stands for a Horovod constant (see the docstring)
            assert mine.default == horovods.default, mine.name


def test_adasum_is_refused_before_any_collective():
    import horovod.torch as hvd

    import hvdcomp

    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="Adasum"):
        hvdcomp.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), op=hvd.Adasum)


@pytest.mark.parametrize("kwargs, match", [
    ({"sparse_as_dense": "yes"}, "sparse_as_dense"),
    ({"groups": 0}, "groups"),
    ({"groups": [[1.0]]}, "torch.Tensor"),
    ({"compression": "topk"}, "Horovod compressor"),
])
def test_bad_arguments_raise_before_any_collective(kwargs, match):
    import hvdcomp

    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match=match):
        hvdcomp.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)
