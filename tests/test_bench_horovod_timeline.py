"""bench.horovod_timeline: fused groups and their activities from a Horovod timeline."""
from __future__ import annotations

import json

import pytest

from bench import horovod_timeline


def _tensor(pid: int, name: str) -> list[dict]:
    return [{"name": "process_name", "ph": "M", "pid": pid, "args": {"name": name}}]


def _activity(pid: int, name: str, start: int, duration: int) -> list[dict]:
    return [{"ph": "B", "name": name, "ts": start, "pid": pid}, {"ph": "E", "ts": start + duration, "pid": pid}]


def _timeline(steps: int) -> list[dict]:
    """Per step: w and b copied in, reduced and copied out as one; then c reduced alone."""
    events = _tensor(1, "allreduce.hvdcomp.slot.w") + _tensor(2, "allreduce.hvdcomp.slot.b")
    events += _tensor(3, "allreduce.hvdcomp.slot.c") + _tensor(4, "allreduce.maximum")
    for step in range(steps):
        t = step * 100_000
        for pid in (1, 2):
            events += [{"ph": "B", "name": "ALLREDUCE", "ts": t + pid, "pid": pid}]
            events += _activity(pid, "MEMCPY_IN_FUSION_BUFFER", t + pid, 1000 + 1000 * step)
            events += _activity(pid, "GLOO_ALLREDUCE", t + 5000, 8000)
            events += _activity(pid, "MEMCPY_OUT_FUSION_BUFFER", t + 13_000, 900)
            events += [{"ph": "E", "ts": t + 14_000, "pid": pid}]
        events += _activity(3, "GLOO_ALLREDUCE", t + 20_000, 3000)
        events += _activity(4, "GLOO_ALLREDUCE", t + 30_000, 50)
    return events


def test_tensors_reduced_as_one_are_one_group_with_their_copies(tmp_path):
    path = tmp_path / "timeline.json"
    path.write_text(json.dumps(_timeline(5)))
    record = horovod_timeline.main([str(path), "--out", str(tmp_path / "out.json")])
    rows = {(tuple(r["tensors"]), r["activity"]): r for r in record["rows"]}
    pair = ("allreduce.hvdcomp.slot.b", "allreduce.hvdcomp.slot.w")
    assert rows[(pair, "MEMCPY_IN_FUSION_BUFFER")]["runs"] == 5
    copy_in = rows[(pair, "MEMCPY_IN_FUSION_BUFFER")]  # 1, 2, 3, 4, 5 ms
    assert (copy_in["median_ms"], copy_in["p20_ms"], copy_in["p80_ms"]) == pytest.approx((3.0, 1.8, 4.2))
    assert rows[(pair, "GLOO_ALLREDUCE")]["median_ms"] == pytest.approx(8.0)
    assert rows[(pair, "ALLREDUCE")]["median_ms"] == pytest.approx(14.0 - 0.001, abs=2e-3)
    assert rows[(("allreduce.hvdcomp.slot.c",), "GLOO_ALLREDUCE")]["median_ms"] == pytest.approx(3.0)
    # Tensors that do not match (the bench's own maximum) are left out.
    assert not any("maximum" in t for r in record["rows"] for t in r["tensors"])
    assert json.loads((tmp_path / "out.json").read_text())["rows"] == record["rows"]


def test_a_timeline_horovod_never_closed_is_read_as_far_as_it_goes(tmp_path):
    text = json.dumps(_timeline(2))
    path = tmp_path / "killed.json"
    path.write_text(text[:-1] + ",\n")  # no closing bracket, a trailing comma: as Horovod leaves it
    assert horovod_timeline.read_events(path) == json.loads(text)


def test_a_timeline_without_the_tensors_asked_for_says_so(tmp_path):
    path = tmp_path / "timeline.json"
    path.write_text(json.dumps(_timeline(1)))
    with pytest.raises(SystemExit, match="no activity of a tensor named like 'nothing'"):
        horovod_timeline.main([str(path), "--match", "nothing", "--out", str(tmp_path / "out.json")])
