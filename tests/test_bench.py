"""Smoke tests of the benchmarks (crashes and arithmetic, never timings)."""
import json
import math

import pytest
import torch

from bench import compress_vs_backward as cvb
from bench import scaling
from bench.models import get_model, gpt2_param_count, param_stats
from hvdcomp import compression_from_name, costs


# ---- models ---------------------------------------------------------------------------------------


def test_resnet50_parameter_count():
    with torch.device("meta"):
        model = get_model("resnet50").build()
    assert param_stats(model) == (25_557_032, 161)


def test_gpt2_medium_parameter_count():
    with torch.device("meta"):
        model = get_model("transformer").build()
    params, tensors = param_stats(model)
    assert params == gpt2_param_count() == 354_823_168
    assert abs(params - 355e6) / 355e6 < 0.03
    assert tensors == 2 + 24 * 12 + 2  # embeddings, 24 blocks, final norm (head tied)


def test_small_model_trains_a_step():
    spec = get_model("small")
    model = spec.build()
    spec.loss(model, spec.batch(2, "cpu")).backward()
    kinds = {len(p.shape) for p in model.parameters()}
    assert {1, 2, 4} <= kinds  # norm/bias, FC and conv tensors


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="resnet50"):
        get_model("vgg")


# ---- compress_vs_backward -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "smoke.json"
    rc = cvb.main(["--cpu-smoke", "--reps", "1", "--warmup", "0", "--out", str(out)])
    return rc, json.loads(out.read_text()), out


def test_cpu_smoke_has_a_row_per_available_compressor(smoke):
    rc, record, out = smoke
    assert rc == 0 and record["errors"] == []
    for key in ("device_name", "torch", "command", "timestamp", "forward_ms", "backward_ms"):
        assert key in record
    configs, skipped, _ = cvb.discover()
    available = {c.name for c in configs}
    assert {s["label"] for s in record["skipped"] if not s.get("backend")} == {s["label"] for s in skipped}
    assert available <= {r["compressor"] for r in record["rows"]}
    assert record["backward_ms"]["median"] > 0
    for row in record["rows"]:
        assert row["compress_ms"]["median"] > 0, row["label"]
        assert row["decode_total_ms"] > 0, row["label"]
        assert row["payload_bytes"] > 0 and math.isfinite(row["ratio"]), row["label"]
        assert 0.99 <= row["ratio"] <= 2000, (row["label"], row["ratio"])
        assert sum(k["dense_bytes"] for k in row["by_kind"].values()) == row["dense_bytes"]
        assert row["wire"]["received_bytes"] > 0, row["label"]
    ratios = {(r["label"], r["transport"]): r["ratio"] for r in record["rows"]}
    assert ratios[("none", "allreduce")] == pytest.approx(1.0)
    assert 1.9 < ratios[("fp16", "allreduce")] <= 2.0
    baselines = {r["label"] for r in record["rows"] if r["compressor"] == "baseline"}
    assert baselines == {label for label, _ in cvb.BASELINES}


def test_cpu_smoke_chart(smoke):
    pytest.importorskip("matplotlib")
    _, record, out = smoke
    assert out.with_suffix(".png").stat().st_size > 0


def _grads():
    torch.manual_seed(0)
    return ["a.weight", "b.weight", "c.bias"], [torch.randn(32, 16, 3, 3), torch.randn(100, 40), torch.randn(10)]


@pytest.mark.parametrize("name,params,collective", [
    ("none", {}, "auto"),
    ("bf16", {}, "allgather"),
    ("bf16", {}, "compressed_allreduce"),
    ("scalecom", {"ratio": 1.0}, "auto"),
])
def test_rank_zero_of_n_gets_the_average_of_every_rank(name, params, collective, monkeypatch):
    """The recorded step of N in-process ranks averages the simulated ranks' gradients, and
    rank 0's replays run on the same state."""
    from bench.one_rank import OneRankOfN

    monkeypatch.setenv("HVDCOMP_KERNELS", "reference")
    names, grads = _grads()
    nranks = 4
    sim = OneRankOfN(lambda: compression_from_name(name, **params), names, grads, nranks, min_numel=1024,
                     bucket_cap_mb=25, collective=collective)
    sim.record(step=3)
    for i, (n, g) in enumerate(zip(names, grads)):
        want = sum(cvb.rank_grad(g, r, i, sim.noise) for r in range(nranks)) / nranks
        got = sim.rank0._params[n].grad
        assert torch.allclose(got, want, rtol=2e-2, atol=2e-2), n
    timing = sim.replay(4, cvb.Timer(torch.device("cpu")))
    assert timing.compress_ms > 0 and timing.decode_ms
    assert sim.wire(cvb.SUM_BITS_NS)["received_bytes"] > 0


def _recorded_two_ranks(name: str, params: dict, transport: str):
    """A :class:`bench.one_rank.OneRankOfN` of 2 ranks on :func:`_grads` (through DDP, one
    bucket of every tensor), step 3 recorded; and the gradients."""
    from bench.one_rank import OneRankOfN

    names, grads = _grads()
    buckets = [names] if transport == "ddp" else None
    sim = OneRankOfN(lambda: compression_from_name(name, **params), names, grads, 2, min_numel=1024,
                     bucket_cap_mb=25, transport=transport, buckets=buckets)
    sim.record(step=3)
    return sim, grads


@pytest.mark.parametrize("transport", ["horovod", "ddp"])
def test_every_replay_compresses_a_fresh_gradient(transport, monkeypatch):
    """A replay is timed as a training step runs: on rank 0's own gradient, freshly written,
    so what a compressor caches per tensor version (TernGrad's clipping bound) is computed
    in every replay, not found in the cache of the one before."""
    from hvdcomp.compressors.terngrad import TernGradCompressor

    sim, grads = _recorded_two_ranks("terngrad", {}, transport)
    own = {g.numel(): g.reshape(-1) for g in grads}
    calls = []
    real = TernGradCompressor.clip_bound

    def clip_bound(self, g):
        calls.append((g.numel(), torch.equal(g.reshape(-1), own[g.numel()])))
        return real(self, g)

    monkeypatch.setattr(TernGradCompressor, "clip_bound", clip_bound)
    compressed = sorted((g.numel(), True) for g in grads if g.numel() >= 1024)
    for step in (4, 5):
        calls.clear()
        sim.replay(step, cvb.Timer(torch.device("cpu")))
        assert sorted(set(calls)) == compressed


@pytest.mark.parametrize("transport", ["horovod", "ddp"])
def test_a_ddp_replay_times_writing_the_bucket_output(transport, monkeypatch):
    """Through DDP a chain's decode ends with its outputs written into the bucket's output
    tensor (the hook's ``write_output``), inside the timed decode; Horovod has no bucket."""
    import bench.one_rank as one_rank

    sim, grads = _recorded_two_ranks("topk", {"ratio": 0.1}, transport)
    written = []
    real = one_rank.write_output
    monkeypatch.setattr(one_rank, "write_output", lambda part, avg, flag: written.append(avg.numel()) or real(part, avg, flag))
    sim.replay(3, cvb.Timer(torch.device("cpu")))
    assert sorted(written) == (sorted(g.numel() for g in grads) if transport == "ddp" else [])
    if transport == "ddp":
        for key, out in sim.bucket_outputs.items():
            assert torch.isfinite(out).all(), key


# ---- scaling ---------------------------------------------------------------------------------------


def test_scaling_chains_of_a_row_follow_its_collectives():
    row = {"compress_ms": {"median": 3.0}, "decode_ms": {"allgather": {"median": 8.0}, "allgather@2": {"median": 2.0}},
           "wire": {"allreduce_bytes": 400, "broadcasts": 0, "broadcast_bytes": 0, "allgather_buckets": 1,
                    "allgather_bytes": 1000, "car_buckets": 0, "scale_allreduces": 1}}
    dense, packed = scaling.chains_of_row(row, 8, 4, ready_s=0.02)
    assert dense.phases == ((costs.Collective("allreduce", 400),),) and dense.local_s == (0.003,)
    assert [[c.op for c in ph] for ph in packed.phases] == [["allreduce"], ["allgather"], ["allgather"]]
    assert packed.phases[2][0].nbytes == 1000
    # decode linear in N through the 2- and 4-payload times: 8 ms at 4, slope 3 ms per rank
    assert packed.decode_s == pytest.approx(0.020) and dense.decode_s == 0.0
    assert packed.ready_s == dense.ready_s == 0.02


def test_scaling_projection_from_smoke(smoke, tmp_path):
    _, record, out = smoke
    # "none" moves what uncompressed allreduce moves: with its measured local work taken out
    # its projected speed-up is exactly 1 (the arithmetic, independent of timings) ...
    quiet = json.loads(json.dumps(record))
    for row in quiet["rows"]:
        if row["label"] == "none":
            row["compress_ms"] = {**row["compress_ms"], "median": 0.0}
            row["decode_ms"] = {k: {**v, "median": 0.0} for k, v in row["decode_ms"].items()}
    none = next(m for m in scaling.project(quiet, [8, 64], [10.0], 10.0)["methods"] if m["label"] == "none")
    assert none["points"]["10/8"]["speedup"] == pytest.approx(1.0, rel=1e-9)
    # ... and with it, no more than 1.
    proj = scaling.project(record, [8, 64], [10.0], 10.0)
    none = next(m for m in proj["methods"] if m["label"] == "none")
    assert none["points"]["10/8"]["speedup"] <= 1.0
    assert all(p["step_ms"] > 0 for m in proj["methods"] for p in m["points"].values())
    assert scaling.main(["--from", str(out), "--ranks", "8", "1024", "--no-plot",
                         "--out", str(tmp_path / "s.json")]) == 0


def test_peak_bandwidth_table():
    assert cvb.peak_gbs("NVIDIA H100 80GB HBM3") == 3350
    assert cvb.peak_gbs("NVIDIA H100 PCIe") == 2000
    assert cvb.peak_gbs("NVIDIA H200") == 4800
    assert cvb.peak_gbs("some CPU") is None
