"""bench/collectives_sweep.py: its fit recovers known costs, and on real ranks of an emulated
cluster (Horovod and torch.distributed) it writes a complete record. No timing asserted."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from bench import collectives_sweep as sweep
from launch import cluster as emulated
from tests.distributed import HAS_HOROVOD
from tests.test_cluster import requires_netns

SIZES = [4096, 65536, 1 << 20]


def test_fit_recovers_latency_rate_and_free_burst():
    alpha, beta, free = 2e-3, 1 / 6.25e6, 131072.0
    x = [2.0**k for k in range(10, 26)]
    t = [alpha + beta * max(0.0, xi - free) for xi in x]
    fit = sweep.fit_alpha_beta(x, t)
    assert fit["alpha_s"] == pytest.approx(alpha, rel=0.02)
    assert fit["beta_s_per_byte"] == pytest.approx(beta, rel=0.02)
    assert fit["free_bytes_per_rank"] == pytest.approx(free, rel=0.03)
    assert fit["max_abs_rel_error"] < 0.03
    line = sweep.fit_alpha_beta(x, [alpha + beta * xi for xi in x], hinge=False)
    assert (line["alpha_s"], line["beta_s_per_byte"], line["free_bytes_per_rank"]) == pytest.approx((alpha, beta, 0))
    assert sweep.fit_alpha_beta([], [])["points"] == 0
    # predict_seconds reads the fit back: an allreduce of S per rank on 2 ranks sends b = S.
    assert sweep.predict_seconds(fit, "allreduce", 1 << 20, 2) == pytest.approx(
        alpha + beta * ((1 << 20) - free), rel=0.02)


def test_one_disturbed_size_does_not_tilt_the_fit():
    x = [2.0**k for k in range(10, 24)]
    t = [1e-3 + xi / 1e7 for xi in x]
    t[2] *= 8  # sizes slowed by other load
    t[5] *= 5
    fit = sweep.fit_alpha_beta(x, t, hinge=False)
    # plain least squares of the relative errors: alpha 5 % and beta 1.3 % too high
    assert fit["alpha_s"] == pytest.approx(1e-3, rel=0.01)
    assert fit["beta_s_per_byte"] == pytest.approx(1e-7, rel=0.003)


def test_rate_multiple_counts_the_ranks_sharing_one_bucket():
    # 4 ranks on one shared bucket of 1e6 B/s: a byte per rank costs 4 bytes of the bucket.
    points = [{"bytes_per_rank": b, "median_s": 1e-3 + 4 * b / 1e6} for b in (1e3, 1e4, 1e5, 1e6)]
    assert sweep.fits({"allreduce": points}, 1e6)["allreduce"]["rate_multiple"] == pytest.approx(4, rel=1e-3)


def test_bytes_per_rank_are_the_ring_formulas():
    s, n = 1000, 4
    assert [sweep.BYTES_PER_RANK[op][1](s, n) for op in sweep.OPS] == [1500, 3000, 750, 750]


def test_settle_time_refills_the_slowest_bucket():
    link = {"rate_bytes_per_s": 1e6, "burst_bytes": 262144}
    assert sweep.settle_seconds(link, None) == pytest.approx(1.1 * 0.262144)
    cluster = {"nodes": 2, "inter": {"rate_bytes_per_s": None, "burst_bytes": 1}, "intra": link}
    assert sweep.settle_seconds(None, cluster) == pytest.approx(1.1 * 0.262144)
    assert sweep.settle_seconds(None, None) == 0.0
    assert sweep.slowest_rate(None, {**cluster, "inter": {"rate_bytes_per_s": 5e6}}) == 5e6


def test_bad_arguments_stop_before_any_rank_starts():
    for bad in (["--ops", "allreduce,reduce"], ["--sizes", "1k"], ["--reps", "0"]):
        with pytest.raises(SystemExit):
            sweep.main(bad)


class _TwoRanks:
    """Rank 0 of 2 whose collective returns ``result`` (a fake of HorovodRanks/TorchRanks)."""

    name, rank, size = "fake", 0, 2

    def __init__(self, result):
        self.result = result

    def barrier(self):
        pass

    def run(self, op, x):
        return self.result(x)

    def maximum(self, values):
        return values


def test_an_fp16_sum_is_swept_on_random_values_and_checked():
    # Gloo's fp16 sum branches on each value: constants would time the fast path only.
    a, b = (sweep.sweep_values("allreduce_float16", r, 1000) for r in (0, 1))
    assert a.dtype == torch.float16 and len(set(a.tolist())) > 900 and not torch.equal(a, b)
    assert torch.equal(a, sweep.sweep_values("allreduce_float16", 0, 1000))  # seeded with the rank
    assert torch.equal(sweep.sweep_values("allreduce", 1, 4), torch.full((4,), 2.0))
    assert sweep.values_described("allreduce_float16").startswith("standard normal")
    right = _TwoRanks(lambda x: (x.float() + b.float()).half())
    assert len(sweep.time_collective(right, "allreduce_float16", 1000, 2, 0.0, False)) == 2
    wrong = _TwoRanks(lambda x: (x.float() + b.float()).half() + 0.01)
    with pytest.raises(RuntimeError, match="wrong result"):
        sweep.time_collective(wrong, "allreduce_float16", 1000, 1, 0.0, False)
    constant = _TwoRanks(lambda x: x + 2)
    assert len(sweep.time_collective(constant, "allreduce", 8, 1, 0.0, False)) == 1
    with pytest.raises(RuntimeError, match="wrong result"):
        sweep.time_collective(_TwoRanks(lambda x: x + 1), "allreduce", 8, 1, 0.0, False)


@requires_netns
def test_sweep_on_an_emulated_cluster_writes_the_calibration_record(tmp_path):
    frameworks = ["torch"] + (["horovod"] if HAS_HOROVOD else [])
    with emulated.Cluster(2, 1, inter_rate="200mbit") as cluster:
        for framework in frameworks:
            out = tmp_path / f"{framework}.json"
            run = cluster.run([sys.executable, "-m", "bench.collectives_sweep", "--sizes", ",".join(map(str, SIZES)),
                               "--reps", "2", "--out", str(out)], launcher=framework, timeout=240, echo=False)
            assert run.returncode == 0, "\n".join(run.lines)
            record = json.loads(out.read_text())
            assert record["schema"] == sweep.SCHEMA and record["framework"] == framework
            assert record["world_size"] == 2 and record["cluster"]["nodes"] == 2
            assert record["slowest_rate_bytes_per_s"] == 25e6
            assert record["settle_seconds"] == pytest.approx(1.1 * 262144 / 25e6)
            assert set(record["results"]) == set(sweep.SWEPT) and "allreduce_float16" in sweep.SWEPT
            assert record["heap"]["steady"] is False  # launched without bench.step_times's heap settings
            for key, points in record["results"].items():
                op = sweep.op_and_dtype(key)[0]
                assert [p["bytes"] for p in points] == SIZES, key
                for p in points:
                    assert p["bytes_per_rank"] == sweep.BYTES_PER_RANK[op][1](p["bytes"], 2)
                    assert len(p["times_s"]) == 2 and p["median_s"] > 0
                fit = record["fits"][op]
                assert fit["points"] == 3 and fit["beta_s_per_byte"] >= 0
            assert record["values"]["allreduce_float16"] == sweep.values_described("allreduce_float16")
            assert "allreduce" in record["table"] and any("results:" in line for line in run.lines)
            add = [sys.executable, "-m", "bench.collectives_sweep", "--ops", "allreduce_float16", "--sizes", "4096",
                   "--reps", "1", "--add-to", str(out)]
            run = cluster.run(add, launcher=framework, timeout=240, echo=False)
            assert run.returncode == 0, "\n".join(run.lines)
            added = json.loads(out.read_text())
            assert [p["bytes"] for p in added["results"]["allreduce_float16"]] == [4096]  # replaced
            assert added["results"]["allreduce"] == record["results"]["allreduce"]  # kept
            (addition,) = added["added"]
            assert addition["keys"] == ["allreduce_float16"] and "--add-to" in addition["rank_command"]
            other = tmp_path / f"{framework}_other.json"
            other.write_text(json.dumps({**record, "world_size": 3}))
            run = cluster.run(add[:-1] + [str(other)], launcher=framework, timeout=240, echo=False)
            assert run.returncode != 0 and any("swept on another launch: world_size differ" in line
                                               for line in run.lines), "\n".join(run.lines)
