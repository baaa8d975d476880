"""bench/loaded_latency.py: the busy process lives only while the loaded calls run, and on
real ranks of an emulated cluster (torch.distributed and Horovod) it writes a complete
record. No timing asserted."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from bench import loaded_latency
from hvdcomp.costs import OPS
from launch import cluster as emulated
from tests.distributed import HAS_HOROVOD
from tests.test_cluster import requires_netns


class _TwoRanks:
    """Two ranks as seen from rank 0: the other passes in rank + 1 = 2 everywhere."""

    name, rank, size = "fake", 0, 2

    def __init__(self, fail_when_loaded=False):
        self.fail_when_loaded, self.busy = fail_when_loaded, None

    def barrier(self):
        pass

    def run(self, op, x):
        if self.fail_when_loaded and self.busy is not None:
            raise RuntimeError("a rank died")
        if op == "allreduce":
            return x + 2
        if op == "allgather":
            return torch.cat([x, x + 1])
        if op == "alltoall":
            half = x.numel() // 2
            return torch.cat([x[:half], x[half:] + 1])
        return x

    def maximum(self, values):
        return values


def _watch(monkeypatch, ranks):
    started = []

    def start():
        ranks.busy = subprocess.Popen([sys.executable, "-c", loaded_latency.BUSY_LOOP])
        started.append(ranks.busy)
        return ranks.busy

    monkeypatch.setattr(loaded_latency, "start_busy_process", start)
    return started


def test_every_op_is_timed_idle_then_loaded_and_the_busy_process_ends(monkeypatch):
    ranks = _TwoRanks()
    started = _watch(monkeypatch, ranks)
    got = loaded_latency.time_loaded(ranks, 3, 0.0, False)
    assert set(got) == set(OPS)
    for op, timed in got.items():
        assert len(timed["idle_s"]) == len(timed["loaded_s"]) == 3
        assert timed["elements"] == loaded_latency.NUMEL  # 256 splits evenly over 2 ranks
    (busy,) = started
    assert busy.poll() is not None  # killed and reaped


def test_the_busy_process_ends_when_a_loaded_call_fails(monkeypatch):
    ranks = _TwoRanks(fail_when_loaded=True)
    started = _watch(monkeypatch, ranks)
    with pytest.raises(RuntimeError, match="a rank died"):
        loaded_latency.time_loaded(ranks, 1, 0.0, False)
    assert started[0].poll() is not None


def test_bad_reps_stop_before_any_rank_starts():
    with pytest.raises(SystemExit):
        loaded_latency.parse_args(["--reps", "0"])


@requires_netns
def test_loaded_latency_on_an_emulated_cluster_writes_its_record(tmp_path):
    frameworks = ["torch"] + (["horovod"] if HAS_HOROVOD else [])
    with emulated.Cluster(2, 1, inter_rate="200mbit") as cluster:
        for framework in frameworks:
            out = tmp_path / f"{framework}.json"
            run = cluster.run([sys.executable, "-m", "bench.loaded_latency", "--reps", "2", "--out", str(out)],
                              launcher=framework, timeout=240, echo=False)
            assert run.returncode == 0, "\n".join(run.lines)
            record = json.loads(out.read_text())
            assert record["schema"] == loaded_latency.SCHEMA and record["framework"] == framework
            assert record["world_size"] == 2 and record["cluster"]["nodes"] == 2 and record["reps"] == 2
            assert set(record["ops"]) == set(OPS)
            for timed in record["ops"].values():
                assert len(timed["idle_s"]) == len(timed["loaded_s"]) == 2
                assert timed["loaded_median_s"] > 0 and timed["idle_median_s"] > 0
            assert "allreduce" in record["table"] and record["load"].startswith("one busy process per rank")
