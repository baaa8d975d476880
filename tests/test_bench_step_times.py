"""bench/step_times.py and bench/cost_model.py: real ranks of both transports on a shaped
link write complete records, and the cost model reads them point by point. No timing is
asserted."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import collectives_sweep, cost_model, step_ranks, step_times
from hvdcomp import costs
from tests.distributed import HAS_HOROVOD
from tests.test_link import requires_netns

METHODS = ["none", "topk 1%", "scalecom 1%"]


def test_bad_arguments_stop_before_any_launch():
    for bad in (["--methods", "zip"], ["--rates", "fast"], ["--min-steps", "4", "--max-steps", "2"],
                ["--settle-steps", "0"]):
        with pytest.raises((SystemExit, ValueError)):
            step_times.main(bad + ["--no-sweep", "--out-dir", "/nonexistent"])


def _sweep(path, framework: str, nranks: int) -> None:
    """A calibration record as bench.collectives_sweep writes it (only what the model reads)."""
    fit = {"alpha_s": 1e-3, "beta_s_per_byte": nranks / 25e6, "free_bytes_per_rank": 262144 / nranks}
    path.write_text(json.dumps({"framework": framework, "world_size": nranks,
                                "fits": {op: dict(fit) for op in ("allreduce", "allgather", "alltoall", "broadcast")}}))


@requires_netns
def test_both_transports_on_a_shaped_link_write_records_the_model_reads(tmp_path, capsys):
    transports = ["ddp"] + (["horovod"] if HAS_HOROVOD else [])
    argv = ["--models", "small", "--ranks", "2", "--transports", *transports, "--rates", "200mbit",
            "--methods", *METHODS, "--batch", "4", "--warmup", "1", "--rounds", "1", "--min-steps", "1",
            "--max-steps", "2", "--calib-reps", "1", "--no-sweep", "--out-dir", str(tmp_path), "--timeout", "240",
            "--horovod-cycle-time-ms", "2", "--pin-ranks", "--settle-steps", "2"]
    paths = step_times.main(argv)
    assert [p.name for p in paths] == [step_times.record_name("small", t, 2, "200mbit", 2.0, pinned=True)
                                       for t in transports]
    sweeps = tmp_path / "sweeps"
    sweeps.mkdir()
    for path, transport in zip(paths, transports):
        record = json.loads(path.read_text())
        assert record["schema"] == step_times.SCHEMA and record["framework"] == transport
        assert record["world_size"] == 2 and record["rate"] == "200mbit"
        # horovodrun handed the cycle time to Horovod's ranks; DDP has none.
        assert record.get("horovod_cycle_time_ms") == (2.0 if transport == "horovod" else None)
        # ... and both launchers handed --pin-ranks's request to the ranks, which bound themselves.
        assert record["ranks_pinned"] is True
        assert record["settle_steps"] == 2  # the launcher handed the ranks the untimed steps per turn
        assert record["link"]["rate_bytes_per_s"] == 25e6 and record["qdisc_report"]["qdisc"]["bytes"] > 0
        assert "bench.step_times" in record["launch_command"] and record["load_average_1min"]["start"] >= 0
        assert [row["label"] for row in record["rows"]] == METHODS
        assert record["heap"]["steady"] is True  # the launcher's heap settings reached the ranks
        for row in record["rows"]:
            assert 1 <= len(row["steps_s"]) <= 2 and row["median_s"] > 0
            assert len(row["page_faults_per_step"]) == len(row["steps_s"])
            assert all(isinstance(n, int) and n >= 0 for n in row["page_faults_per_step"])
            assert len(row["steal_s_per_step"]) == len(row["steps_s"])  # Linux reports it
            assert all(s >= 0 for s in row["steal_s_per_step"])
            assert row["wire_bytes_per_step"] > 0
            if row["reference"] is None:
                assert row["handed"]["sent_bytes"] > 0
                handed = row["payload_bytes_per_step"]
                assert len(handed["min"]) == len(handed["max"]) == len(row["steps_s"])
                assert all(0 < lo <= hi for lo, hi in zip(handed["min"], handed["max"]))
        for rank in record["calibration_by_rank"]:
            local = rank["local_step"]
            assert local["backward"]["median"] > 0 and len(local["ready_s"]) == record["tensors"]
            assert local["copy"]["median"] > 0 and local["gradient_bytes"] == 4 * record["parameters"]
            assert local["through"] == step_ranks.framework_class(transport).local_step_through
            for label in METHODS:
                cal = rank["calibration"][label]
                assert cal["compress_s"] > 0 and cal["chains"] and cal["payload_bytes"] > 0
                for chain in cal["chains"]:
                    assert len(chain["local_s"]) == len(chain["phases"]) and chain["tensors"]
        ops = {c["op"] for ch in record["calibration_by_rank"][0]["calibration"]["topk 1%"]["chains"]
               for phase in ch["phases"] for c in phase}
        assert ops == {"allreduce", "allgather"}
        assert {c["dtype"] for ch in record["calibration_by_rank"][0]["calibration"]["scalecom 1%"]["chains"]
                for phase in ch["phases"] for c in phase if c["op"] == "allreduce"} == {"float32"}
        _sweep(sweeps / step_times.sweep_name(transport, 2, "200mbit", 2.0, pinned=True), transport, 2)
    out = tmp_path / "model.json"
    result = cost_model.main(["--records", *map(str, paths), "--sweeps", str(sweeps), "--out", str(out)])
    modelled = [p for p in result["points"] if p["reference"] is None]
    assert len(modelled) == 3 * len(transports)
    for p in modelled:
        assert p["predicted_s"] > 0 and p["bound_s"] > 0 and p["error"] == pytest.approx(
            p["predicted_s"] / p["measured_s"] - 1)
    assert out.with_suffix(".png").exists() and "modelled points" in capsys.readouterr().out



def test_cores_per_rank_counts_the_machines_cores_only_when_every_rank_ran_on_it():
    local = {"machine": "cpu (x86_64, 2 cores)", "world_size": 4, "link": {"emulator": "launch.link"}}
    assert cost_model.cores_per_rank(local) == 0.5
    assert cost_model.cores_per_rank({**local, "link": None}) == float("inf")  # a cluster of one's own
    assert cost_model.cores_per_rank({**local, "machine": "unknown"}) == float("inf")


def test_the_copy_rate_is_the_slowest_ranks_and_free_in_records_from_before_it():
    def rank(copy_s, nbytes=1000):
        return {"local_step": {"copy": {"median": copy_s}, "gradient_bytes": nbytes}}

    record = {"calibration_by_rank": [rank(0.001), rank(0.003)]}
    assert cost_model.copy_s_per_byte(record) == pytest.approx(3e-6)
    old = {"calibration_by_rank": [{"local_step": {}}, rank(0.003)]}
    assert cost_model.copy_s_per_byte(old) == 0.0


def test_horovod_ranks_run_without_tensor_fusion_are_modelled_without_it():
    assert cost_model.driver_of({"framework": "horovod"}) is costs.HOROVOD
    assert cost_model.driver_of({"framework": "horovod", "horovod_fusion_threshold_bytes": 1 << 26}).fuse
    unfused = cost_model.driver_of({"framework": "horovod", "horovod_fusion_threshold_bytes": 0})
    assert not unfused.fuse and unfused.later_on_main
    assert cost_model.driver_of({"framework": "ddp"}) is costs.DDP


def test_only_an_unshaped_emulated_loopback_runs_the_collectives_on_the_ranks_cores():
    loopback = {"emulator": "launch.link", "device": "lo", "rate_bytes_per_s": None, "burst_bytes": 262144}
    assert cost_model.collectives_on_rank_cores({"link": loopback})
    assert not cost_model.collectives_on_rank_cores({"link": {**loopback, "rate_bytes_per_s": 6.25e6}})
    assert not cost_model.collectives_on_rank_cores({"link": None})  # a cluster of one's own
    sweep = {"fits": {op: {"alpha_s": 1e-3, "beta_s_per_byte": 1e-9, "free_bytes_per_rank": 0.0}
                      for op in ("allreduce", "allgather")}}
    record = {"link": loopback, "world_size": 2,
              "calibration_by_rank": [{"local_step": {"idle_wire_bytes_per_s": 50.0}}]}
    assert cost_model.link_of(sweep, record).on_rank_cores
    assert not cost_model.link_of(sweep, {**record, "link": {**loopback, "rate_bytes_per_s": 6.25e6}}).on_rank_cores


def test_the_latencies_under_load_sit_beside_the_sweep_and_price_each_op(tmp_path):
    record = {"framework": "ddp", "world_size": 4, "rate": "50mbit", "ranks_pinned": True, "link": None,
              "calibration_by_rank": [{"local_step": {}}]}
    path = cost_model.loaded_path(tmp_path, record)
    assert path == tmp_path / "loaded_torch_4ranks_50mbit_pinned.json"
    assert path.name == step_times.loaded_name(step_times.sweep_name("ddp", 4, "50mbit", pinned=True))
    assert cost_model.read_loaded(path, record) is None  # none measured: idle latencies
    sweep = {"fits": {op: {"alpha_s": 1e-3, "beta_s_per_byte": 1e-9, "free_bytes_per_rank": 0.0}
                      for op in ("allreduce", "allgather")}}
    assert cost_model.link_of(sweep, record).loaded_latency_s == {}
    loaded = {"world_size": 4, "ops": {"allreduce": {"loaded_median_s": 0.072, "idle_median_s": 0.009},
                                       "allgather": {"loaded_median_s": 0.052, "idle_median_s": 0.005}}}
    path.write_text(json.dumps(loaded))
    link = cost_model.link_of(sweep, record, cost_model.read_loaded(path, record))
    assert link.loaded_latency_s == {"allreduce": 0.072, "allgather": 0.052}
    with pytest.raises(ValueError, match="timed 4 ranks, the record ran 2"):
        cost_model.read_loaded(path, {**record, "world_size": 2})


def test_a_horovod_cycle_time_names_its_records_sweeps_and_launch():
    assert step_times.record_name("mlp", "horovod", 4, "50mbit", 5.0) == "mlp_horovod_4ranks_50mbit_cycle5ms.json"
    assert step_times.record_name("mlp", "horovod", 4, "50mbit", 1.0) == "mlp_horovod_4ranks_50mbit.json"
    assert step_times.record_name("mlp", "ddp", 4, "50mbit", 5.0) == "mlp_ddp_4ranks_50mbit.json"  # Horovod's only
    assert step_times.sweep_name("horovod", 4, "50mbit", 2.5) == "link_horovod_4ranks_50mbit_cycle2.5ms.json"
    argv = step_times.launch_command("horovod", 4, "bench.step_times", ["--rank-side"], 5.0)
    assert argv[argv.index("--cycle-time-ms") + 1] == "5" and argv.index("--cycle-time-ms") < argv.index("-m")
    assert "--cycle-time-ms" not in step_times.launch_command("horovod", 4, "bench.step_times", [])
    assert "--cycle-time-ms" not in step_times.launch_command("ddp", 4, "bench.step_times", [], 5.0)
    record = {"framework": "horovod", "world_size": 4, "rate": "50mbit", "horovod_cycle_time_ms": 5.0}
    assert cost_model.sweep_path(Path("s"), record) == Path("s/link_horovod_4ranks_50mbit_cycle5ms.json")
    assert cost_model.sweep_path(Path("s"), {**record, "horovod_cycle_time_ms": 1.0}).name == \
        "link_horovod_4ranks_50mbit.json"
    for bad in ("0", "-1"):
        with pytest.raises(SystemExit):
            step_times.parse_args(["--horovod-cycle-time-ms", bad])


def test_pinned_ranks_name_their_records_and_sweeps():
    assert step_times.record_name("mlp", "horovod", 4, "50mbit", pinned=True) == "mlp_horovod_4ranks_50mbit_pinned.json"
    assert step_times.record_name("mlp", "horovod", 4, "50mbit", 5.0, True) == \
        "mlp_horovod_4ranks_50mbit_cycle5ms_pinned.json"
    assert step_times.sweep_name("ddp", 4, "unshaped", pinned=True) == "link_torch_4ranks_unshaped_pinned.json"
    record = {"framework": "ddp", "world_size": 4, "rate": "50mbit", "ranks_pinned": True}
    assert step_times.record_variant(record) == "pinned"
    assert cost_model.sweep_path(Path("s"), record) == Path("s/link_torch_4ranks_50mbit_pinned.json")
    assert step_times.record_variant({**record, "ranks_pinned": False}) == ""
    args = step_times.parse_args(["--pin-ranks"])
    assert step_times.rank_env(args)[collectives_sweep.PIN_RANKS_ENV] == "1"
    assert collectives_sweep.PIN_RANKS_ENV not in step_times.rank_env(step_times.parse_args([]))


def test_a_pinned_rank_binds_itself_to_its_local_ranks_core(monkeypatch):
    bound = []
    monkeypatch.setattr(collectives_sweep.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(collectives_sweep.os, "sched_setaffinity", lambda pid, cores: bound.append(cores))
    monkeypatch.delenv(collectives_sweep.PIN_RANKS_ENV, raising=False)
    assert collectives_sweep.pin_to_one_core("LOCAL_RANK") == {} and bound == []
    monkeypatch.setenv(collectives_sweep.PIN_RANKS_ENV, "1")
    for local, core in ((0, 0), (1, 1), (2, 0), (3, 1)):
        monkeypatch.setenv("LOCAL_RANK", str(local))
        assert collectives_sweep.pin_to_one_core("LOCAL_RANK") == {"ranks_pinned": True}
        assert bound.pop() == {core}
    monkeypatch.delenv("LOCAL_RANK")
    with pytest.raises(RuntimeError, match="LOCAL_RANK"):
        collectives_sweep.pin_to_one_core("LOCAL_RANK")


def test_the_rule_of_thumb_reads_the_default_cycle_and_prefers_pinned_ranks():
    def record(n, **kw):
        return {"framework": "horovod", "model": "mlp", "world_size": n, "rate": "50mbit", **kw}

    pinned, plain = record(4, ranks_pinned=True), record(4)
    chosen = cost_model.rule_records([pinned, plain, record(2), record(2, horovod_cycle_time_ms=5.0),
                                      record(8, rate="500mbit"), {**record(8), "model": "small"}])
    assert chosen == {4: pinned, 2: record(2)}
    assert cost_model.rule_records([plain, record(2, horovod_cycle_time_ms=1.0)]) == \
        {4: plain, 2: record(2, horovod_cycle_time_ms=1.0)}


def _calibrated(nranks: int, decode_s: float, op: str) -> dict:
    """A step_times record with one chain of one collective, only what the rule of thumb reads."""
    chain = {"phases": [[{"op": op, "bytes": 1000}]], "local_s": [0.01], "decode_s": decode_s, "tensors": ["w"]}
    rank = {"local_step": {"ready_s": {"w": 0.0}}, "calibration": {"m": {"chains": [chain]}}}
    return {"framework": "horovod", "world_size": nranks, "parameters": 100, "machine": "cpu (x86_64, 2 cores)",
            "link": {"emulator": "launch.link"}, "calibration_by_rank": [rank] * nranks}


def test_the_rule_of_thumb_takes_times_to_one_core_and_scales_only_gathered_decodes():
    # 4 ranks on 2 cores ran on half a core each: 0.04 s there is 0.02 s of one core, so the
    # gathered decode grows by 0.005 s per rank from the 2-rank 0.01 s (then x2 parameters).
    gathered = {2: _calibrated(2, 0.01, "allgather"), 4: _calibrated(4, 0.04, "allgather")}
    (chain,) = cost_model.scaled_chains(gathered, "m", 10, 200)
    assert chain.decode_s == pytest.approx(2 * (0.01 + 0.005 * 8)) and chain.local_s == pytest.approx((0.02,))
    assert chain.phases[0][0].nbytes == 2000
    # An allreduce's decode reads one sum whatever N: the slower 4-rank calibration is sharing.
    summed = {2: _calibrated(2, 0.01, "allreduce"), 4: _calibrated(4, 0.04, "allreduce")}
    (chain,) = cost_model.scaled_chains(summed, "m", 1024, 100)
    assert chain.decode_s == pytest.approx(0.01)


def test_the_rule_of_thumb_scales_the_step_and_keeps_the_copy_rate():
    record = _calibrated(2, 0.01, "allreduce")
    record["calibration_by_rank"] = [{"local_step": {"forward": {"median": 0.1}, "backward": {"median": 0.2},
                                                     "update": {"median": 0.05}, "copy": {"median": 0.002},
                                                     "gradient_bytes": 1000}}] * 2
    compute = cost_model.projected_compute(record, 10.0)
    assert (compute.forward_s, compute.backward_s, compute.update_s) == pytest.approx((1.0, 2.0, 0.5))
    assert compute.copy_s_per_byte == pytest.approx(2e-6) and compute.cores == float("inf")


def test_a_points_spread_is_its_steps_20th_and_80th_percentiles():
    spread = cost_model.steps_spread([0.5, 0.1, 0.3, 0.2, 0.4, 0.6])
    assert spread == {"steps_p20_s": pytest.approx(0.2), "steps_p80_s": pytest.approx(0.5)}
    assert cost_model.steps_spread([0.7]) == {"steps_p20_s": 0.7, "steps_p80_s": 0.7}
    point = {**spread, "predicted_s": 0.45}
    assert cost_model.within_spread(point)
    assert not cost_model.within_spread({**point, "predicted_s": 0.55})
    assert not cost_model.within_spread({**point, "predicted_s": 0.15})


def test_auto_against_its_candidates_paired_by_round():
    """Each row's steps split into the rounds they ran in (7 steps in 3 rounds: 3, 2, 2), and
    auto's round medians over a candidate's, whose median over rounds leaves out the machine
    getting faster between rounds."""
    assert cost_model.round_medians([9, 1, 5, 2, 4, 7, 7], 3) == [5, 3, 7]
    assert cost_model.round_medians([0.1, 0.2], 3) == [0.1, 0.2]
    # none and auto make one exchange, on a machine 30 % faster in the third round
    none = [1.0, 1.0, 1.0, 0.9, 0.9, 0.9, 0.7, 0.7, 0.7]
    auto = [1.02, 1.02, 1.02, 0.7, 0.7, 0.7, 0.72, 0.72, 0.72]
    bf16 = [1.5] * 9
    assert cost_model.paired_by_round(cost_model.round_medians(auto, 3), cost_model.round_medians(none, 3)) == \
        pytest.approx(0.02)
    assert cost_model.paired_by_round([1.0], None) is None and cost_model.paired_by_round([1.0], [1.0, 2.0]) is None

    def point(label, steps, rounds=3):
        return {"model": "mlp", "framework": "ddp", "ranks": 2, "rate": "unshaped", "variant": "pinned",
                "label": label, "measured_s": sorted(steps)[len(steps) // 2],
                "round_medians_s": cost_model.round_medians(steps, rounds) if rounds else None}

    table = cost_model.auto_against_fixed([point("none", none), point("bf16", bf16), point("auto", auto)])
    row = table.splitlines()[-1].split()
    # medians: none 0.9, auto 0.72 (-20 %); by round 1.02, 0.78 and 1.03: +2.0 % against both
    # (three rounds give no quartiles)
    assert row[-5:] == ["-20.0%", "-20.0%", "+2.0%", "+2.0%", "-"]
    old = cost_model.auto_against_fixed([point("none", none, 0), point("bf16", bf16, 0), point("auto", auto, 0)])
    assert old.splitlines()[-1].split()[-3:] == ["-", "-", "-"]
    # five rounds: ratios -2, 0, +1, +3, +5 %; the quartiles lie between the 1st and 2nd, 4th and 5th
    five = cost_model.middle_half_by_round([0.98, 1.03, 1.0, 1.05, 1.01], [1.0] * 5)
    assert five == pytest.approx((-0.01, 0.04))
    assert cost_model.middle_half_by_round([1.0] * 3, [1.0] * 3) is None
    steps = [1.0, 1.0, 1.0, 1.0, 1.0]
    table = cost_model.auto_against_fixed([point("none", steps, 5), point("bf16", [2.0] * 5, 5),
                                           point("auto", [0.98, 1.03, 1.0, 1.05, 1.01], 5)])
    assert table.splitlines()[-1].split()[-1] == "-1.0%..+4.0%"


@pytest.mark.parametrize("transport", ["horovod", "ddp"])
def test_each_rank_calibrates_the_roles_it_plays_a_step_later(monkeypatch, transport):
    """Rank r records and replays step + r, so that across the ranks the simulated rank 0
    plays every rank's role (ScaleCom's leaders rotate with the step)."""
    import torch
    from bench.one_rank import OneRankOfN

    class Ranks:
        def __init__(self, rank):
            self.rank, self.size = rank, 2

        def barrier(self):
            pass

        def maximum(self, values):
            return list(values)

    steps = []
    monkeypatch.setattr(step_ranks, "minor_faults", lambda: 0)  # a settled heap: no settling replays
    record, replay = OneRankOfN.record, OneRankOfN.replay
    monkeypatch.setattr(OneRankOfN, "record", lambda self, step: steps.append(("record", step)) or record(self, step))
    monkeypatch.setattr(OneRankOfN, "replay",
                        lambda self, step, timer: steps.append(("replay", step)) or replay(self, step, timer))
    names, grads = ["w", "v"], [torch.randn(4096), torch.randn(2048)]
    buckets = [names] if transport == "ddp" else None
    for rank in (0, 1):
        steps.clear()
        calib = step_ranks.MethodCalibration(step_ranks.Method("scalecom 1%", "scalecom", {"ratio": 0.01}),
                                             names, grads, 2, step=3, transport=transport, buckets=buckets)
        calib.measure(2, Ranks(rank))
        assert steps == [("record", 3 + rank)] + [("replay", 3 + rank)] * 3  # a warm-up, then two timed
    steps.clear()
    calib.measure(1)
    assert steps == [("record", 3)] + [("replay", 3)] * 2  # without ranks: the step given
    steps.clear()
    timed = (list(calib.timings), list(calib.payload_bytes), list(calib.settling_replays))
    calib.rehearse(Ranks(1))  # untimed: the same world, nothing recorded
    assert steps == [("record", 4), ("replay", 4)]
    assert (calib.timings, calib.payload_bytes, calib.settling_replays) == timed


class _OneRankReplays:
    """Stands in for OneRankOfN in MethodCalibration: counts the replays, and each replay
    faults in the next number of pages of ``pages``."""

    def __init__(self, pages, faults):
        self.pages, self.faults, self.replays = list(pages), faults, 0

    def record(self, step):
        self.recorded, self.plan = {}, []
        self.stats = {"step": {"payload_bytes": 100}}

    def replay(self, step, timer):
        self.replays += 1
        self.faults[0] += self.pages.pop(0) if self.pages else 0
        return step_ranks.Timing(1.0, {"allreduce": 1.0}, {})


@pytest.mark.parametrize("pages, others, settling", [
    ([5000, 3000, 10, 10], 0, 2),     # the warm-up and the next replay grew the heap
    ([10], 0, 0),                     # settled by the warm-up
    ([10, 10, 10], 9000, 1),          # another rank's warm-up faulted: every rank replays once more
    ([9000] * 9, 0, step_ranks.MAX_SETTLING_REPLAYS),  # never settles: bounded
])
def test_replays_go_on_untimed_until_every_ranks_heap_has_settled(monkeypatch, pages, others, settling):
    faults = [0]
    sim = _OneRankReplays(pages, faults)
    monkeypatch.setattr(step_ranks, "OneRankOfN", lambda *a, **k: sim)
    monkeypatch.setattr(step_ranks, "minor_faults", lambda: faults[0])

    class Ranks:
        rank, size, calls = 0, 2, 0

        def barrier(self):
            pass

        def maximum(self, values):
            Ranks.calls += 1
            return [max(values[0], others)] if Ranks.calls == 1 else list(values)

    calib = step_ranks.MethodCalibration(step_ranks.Method("none", "none"), ["w"], [None], 2, step=2)
    calib.chains = []
    calib.measure(2, Ranks())
    assert calib.settling_replays == [settling]
    assert sim.replays == 1 + settling + 2 and len(calib.timings) == 2


def test_the_ranks_reserve_heap_unless_their_heap_is_glibcs():
    def reserve(argv):
        cmd = step_times.rank_command(step_times.parse_args(argv), "mlp", Path("out.json"))
        return int(cmd[cmd.index("--heap-reserve-mib") + 1])

    assert reserve([]) == step_times.HEAP_RESERVE_MIB > 0
    assert reserve(["--heap-reserve-mib", "64"]) == 64
    assert reserve(["--heap-reserve-mib", "64", "--glibc-default-heap"]) == 0  # glibc would give it back
    with pytest.raises(SystemExit):
        step_times.parse_args(["--heap-reserve-mib", "-1"])


def test_the_ranks_hold_a_steady_heap_unless_asked_and_their_records_say_which():
    env = step_times.rank_env(step_times.parse_args([]))
    assert all(env[k] == v for k, v in step_times.STEADY_HEAP_ENV.items())
    glibc = step_times.rank_env(step_times.parse_args(["--glibc-default-heap"]))
    assert all(glibc.get(k) == os.environ.get(k) for k in step_times.STEADY_HEAP_ENV)  # as the launcher's
    assert step_times.heap_settings(env)["steady"] and not step_times.heap_settings({})["steady"]
    assert step_times.record_name("mlp", "ddp", 2, "50mbit", pinned=True, glibc_heap=True) == \
        "mlp_ddp_2ranks_50mbit_pinned_glibcheap.json"
    record = {"framework": "ddp", "ranks_pinned": True, "rows": [], "heap": step_times.heap_settings(env)}
    assert step_times.record_variant(record) == "pinned"
    assert step_times.record_variant({**record, "heap": step_times.heap_settings({})}) == "pinned_glibcheap"
    del record["heap"]  # a record from before the setting: glibc's own heap
    assert step_times.record_variant(record) == "pinned_glibcheap"
    assert step_times.record_variant({"framework": "ddp", "ranks_pinned": True}) == "pinned"  # a sweep


_REUSE_A_BUFFER = """
import resource, torch
def pages():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    before = pages()
    torch.ones(10_000_000)  # 40 MB, freed at once
print(pages() - before)
"""


@pytest.mark.parametrize("steady", [True, False])
def test_a_steady_heap_reuses_a_freed_buffer_where_glibc_returns_it(steady):
    """What STEADY_HEAP_ENV is for: a 40 MB buffer allocated and freed 20 times faults in its
    9,766 pages every time with glibc's settings (served by mmap, unmapped when freed). With
    the steady heap the last time faults none: the heap grew over the first ten or so (an
    aligned request does not fit the exact hole the last one left) and then serves it from
    the pages it holds."""
    env = {k: v for k, v in os.environ.items() if k not in step_times.STEADY_HEAP_ENV}
    if steady:
        env.update(step_times.STEADY_HEAP_ENV)
    out = subprocess.run([sys.executable, "-c", _REUSE_A_BUFFER], env=env, capture_output=True, text=True,
                         check=True, timeout=120)
    third = int(out.stdout.split()[-1])
    assert (third < 1000) if steady else (third > 9000)


_GROW_AFTER_A_RESERVE = """
import sys, torch
from bench import step_ranks
reserved = step_ranks.reserve_heap(int(sys.argv[1]) << 20)
before = step_ranks.minor_faults()
keep = [torch.ones(4 << 20) for _ in range(4)]  # 64 MB the heap has no hole for
print(reserved, step_ranks.minor_faults() - before)
"""


@pytest.mark.parametrize("steady, reserve_mib", [(True, 128), (True, 0), (False, 128)])
def test_a_reserve_gives_the_heap_growth_pages_already_touched(steady, reserve_mib):
    """64 MB of new buffers grow the heap by 15,625 pages. After a 128 MiB reserve (32,768
    pages faulted in once) the steady heap takes them from the reserve and faults in next to
    none; without a reserve, or with glibc's own heap (which gave the reserve back when it
    was freed), every page faults."""
    env = {k: v for k, v in os.environ.items() if k not in step_times.STEADY_HEAP_ENV}
    if steady:
        env.update(step_times.STEADY_HEAP_ENV)
    out = subprocess.run([sys.executable, "-c", _GROW_AFTER_A_RESERVE, str(reserve_mib)], env=env,
                         capture_output=True, text=True, check=True, timeout=120, cwd=Path(step_times.__file__).parents[1])
    reserved, grown = map(int, out.stdout.split()[-2:])
    assert reserved >= (32_000 if reserve_mib else 0)
    assert (grown < 1000) if steady and reserve_mib else (grown > 15_000)


def test_steal_seconds_are_read_from_the_cpu_line_of_proc_stat(tmp_path):
    stat = tmp_path / "stat"
    ticks = os.sysconf("SC_CLK_TCK")
    stat.write_text(f"cpu  10 0 5 100 0 0 0 {3 * ticks} 0 0\ncpu0 5 0 2 50 0 0 0 {ticks} 0 0\n")
    assert step_ranks.steal_s(str(stat)) == pytest.approx(3.0)
    stat.write_text("cpu  10 0 5 100\n")  # a kernel that does not report steal
    assert step_ranks.steal_s(str(stat)) is None
    assert step_ranks.steal_s(str(tmp_path / "missing")) is None
    assert step_ranks.steal_s() is not None and step_ranks.steal_s() >= 0  # this Linux machine's


def test_an_allreduce_request_carries_the_dtype_it_sums_and_the_model_prices_it_so():
    import torch

    from hvdcomp.core import requests as rq

    assert step_ranks.request_bytes(rq.Allreduce(torch.zeros(6, dtype=torch.float16))) == {
        "op": "allreduce", "bytes": 12, "dtype": "float16"}
    gather = step_ranks.request_bytes(rq.Allgather(torch.zeros(6, dtype=torch.uint8)))
    assert gather == {"op": "allgather", "bytes": 6}  # a gather moves bytes: no dtype to price
    chain = {"tensors": ["w"], "phases": [[{"op": "allreduce", "bytes": 12, "dtype": "float16"}],
                                          [{"op": "allreduce", "bytes": 8}]],  # a record from before dtypes
             "local_s": [0.1, 0.2], "decode_s": 0.3}
    rank = {"calibration": {"fp16": {"chains": [chain]}}, "local_step": {"ready_s": {"w": 0.01}}}
    (got,) = cost_model.chains_of({"framework": "horovod", "calibration_by_rank": [rank, rank]}, "fp16")
    assert got.phases == ((costs.Collective("allreduce", 12, "float16"),), (costs.Collective("allreduce", 8),))
    assert got.local_s == (0.1, 0.2) and got.decode_s == 0.3 and got.ready_s == 0.01


def test_ddp_prices_an_allgather_of_variable_sizes_at_the_largest_ranks_bytes():
    chain = {"tensors": ["w"], "phases": [[{"op": "allgather", "bytes": 100, "bytes_by_rank": [100, 300]}]],
             "local_s": [0.1], "decode_s": 0.3}
    rank = {"calibration": {"dgc": {"chains": [chain]}}, "local_step": {"ready_s": {"w": 0.01}}}
    for framework, nbytes in (("horovod", 200), ("ddp", 300)):  # Horovod sends each rank's own
        (got,) = cost_model.chains_of({"framework": framework, "calibration_by_rank": [rank, rank]}, "dgc")
        assert got.phases == ((costs.Collective("allgather", nbytes),),), framework


def test_a_sweep_record_that_lacks_a_swept_key_gets_only_that_swept(tmp_path, monkeypatch):
    from launch import link

    args = step_times.parse_args(["--sweeps-dir", str(tmp_path), "--pin-ranks"])
    out = tmp_path / step_times.sweep_name("ddp", 2, "50mbit", None, pinned=True)
    old = {op: [] for op in collectives_sweep.OPS}  # a record from before allreduce_float16
    out.write_text(json.dumps({"results": old}))
    commands = []
    monkeypatch.setattr(link, "run", lambda cmd, **kw: commands.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    assert step_times.run_sweep(args, "ddp", 2, "50mbit") == out
    assert commands[-1][-4:] == ["--ops", "allreduce_float16", "--add-to", str(out)]
    out.write_text(json.dumps({"results": {k: [] for k in collectives_sweep.SWEPT}}))
    step_times.run_sweep(args, "ddp", 2, "50mbit")
    assert commands[-1][-4:] == ["--ops", "allreduce_float16", "--add-to", str(out)]  # fp16 on constants
    values = {k: collectives_sweep.values_described(k) for k in collectives_sweep.SWEPT}
    out.write_text(json.dumps({"results": {k: [] for k in collectives_sweep.SWEPT}, "values": values}))
    step_times.run_sweep(args, "ddp", 2, "50mbit")
    assert len(commands) == 2  # complete: nothing to sweep
    args.resweep = True
    step_times.run_sweep(args, "ddp", 2, "50mbit")
    assert commands[-1][-2:] == ["--out", str(out)]


def test_the_model_prices_the_payload_the_timed_steps_handed():
    chain = costs.Chain(((costs.Collective("allgather", 8),), (costs.Collective("allgather", 992),)), (0.1, 0.2), 0.3)
    ranks = [{"calibration": {"adacomp": {"payload_bytes": n}}} for n in (900, 1100)]
    row = {"label": "adacomp", "payload_bytes_per_step": {"min": [3000, 100, 1000], "max": [3000, 300, 3000]}}
    # per step (fewest + most) / 2: 3000, 200, 2000; median 2000 over the calibrations' mean 1000
    assert cost_model.payload_ratio({"framework": "horovod", "calibration_by_rank": ranks}, row) == 2.0
    # DDP pads every rank's payload to the largest: most per step 3000, 300, 3000 over 1100
    assert cost_model.payload_ratio({"framework": "ddp", "calibration_by_rank": ranks}, row) == 3000 / 1100
    before = [{"calibration": {"adacomp": {}}}] * 2  # records from before either was kept
    assert cost_model.payload_ratio({"framework": "horovod", "calibration_by_rank": before}, row) == 1.0
    assert cost_model.payload_ratio({"framework": "ddp", "calibration_by_rank": ranks}, {"label": "adacomp"}) == 1.0
    doubled = cost_model.scaled_bytes(chain, 2.0)
    assert doubled.phases == ((costs.Collective("allgather", 16),), (costs.Collective("allgather", 1984),))
    assert (doubled.local_s, doubled.decode_s) == (chain.local_s, chain.decode_s)
    assert cost_model.scaled_bytes(chain, 1.0) is chain


def test_every_method_is_calibrated_after_all_the_rounds_timed_steps(monkeypatch):
    """A calibration's replays leave the caches and the heap to what runs next: no method's
    timed steps may follow one, in any round."""
    events = []

    class Ranks:
        rank, size, name, local_step_through, without_exchange = 0, 2, "horovod", "the bare model", None

        def barrier(self):
            pass

        def maximum(self, values):
            return list(values)

    class Local:
        def __init__(self, *args):
            pass

        def measure(self, reps, ranks=None):
            events.append("local")

        def gradients(self):
            return ["w"], [None]

        def summary(self):
            return {}

    class FakeTrainer:
        def __init__(self, ranks, spec, method, batch, lr, iface):
            self.method, self.ours = method, object()

        def step(self):
            return 0.01

        def timed_steps(self, count):
            events.append(("steps", self.method.label))

        def ddp_buckets(self):
            return None

        def row(self, ranks):
            return {"label": self.method.label, "median_s": 0.01, "steps_s": [0.01]}

    class Calibration:
        def __init__(self, method, *args):
            self.label = method.label

        def measure(self, reps, ranks=None):
            events.append(("calibration", self.label))

        def rehearse(self, ranks=None):
            events.append(("rehearsal", self.label))

        def summary(self):
            return {}

    monkeypatch.setattr(step_ranks, "LocalStep", Local)
    monkeypatch.setattr(step_ranks, "Trainer", FakeTrainer)
    monkeypatch.setattr(step_ranks, "MethodCalibration", Calibration)
    monkeypatch.setattr(step_ranks, "idle_traffic", lambda ranks, iface: None)
    monkeypatch.setattr(step_ranks.gc, "collect", lambda: events.append("collect"))
    monkeypatch.setattr(step_ranks, "reserve_heap", lambda nbytes: events.append(("reserve", nbytes)))
    methods = step_ranks.methods_named(["none", "bf16", "topk 1%"], "horovod")
    step_ranks.run_methods(Ranks(), None, methods, None, warmup=1, budget_s=1.0, max_steps=4, min_steps=2,
                           rounds=2, calib_reps=2, lr=0.1, log=lambda line: None, settle_steps=0,
                           heap_reserve_bytes=5 << 20)
    labels = ["none", "bf16", "topk 1%"]

    def one_round(order):
        return (["local"] + [e for x in order for e in ("collect", ("steps", x))]
                + [("calibration", x) for x in labels])

    # Every calibration rehearses once before the first timed step, then the heap's reserve,
    # and the cyclic collector runs before every method's turn (all keep fresh pages out of
    # the timed steps). The second round's order is turned round by 3 * 1 // 2 = 1 place.
    assert events == (["local"] + [("rehearsal", x) for x in labels] + [("reserve", 5 << 20)]
                      + one_round(labels) + one_round(["bf16", "topk 1%", "none"]))


def test_every_method_takes_every_place_when_rounds_match_methods():
    for count, rounds in [(3, 3), (11, 11), (2, 4)]:
        orders = [step_ranks.round_order(count, rounds, r) for r in range(rounds)]
        assert all(sorted(order) == list(range(count)) for order in orders)
        for place in range(count):
            assert {order[place] for order in orders} == set(range(count))
    # fewer rounds than methods: the shifts spread over the cycle, each round a rotation
    assert [step_ranks.round_order(11, 3, r)[0] for r in range(3)] == [0, 3, 7]
    assert step_ranks.round_order(4, 1, 0) == [0, 1, 2, 3]
