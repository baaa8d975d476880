"""bench.vs_grace: runs on tiny shapes without the peer and writes valid JSON (never a timing)."""
import json
import math

import pytest
import torch

from bench import vs_grace


@pytest.mark.parametrize("clock", ["wall", "cpu"])
def test_runs_without_the_peer_and_writes_json(tmp_path, monkeypatch, capsys, clock):
    monkeypatch.delenv("HVDCOMP_GRACE_PATH", raising=False)
    out = tmp_path / "vs.json"
    rc = vs_grace.main(["--model", "small", "--grads", "randn", "--reps", "1", "--warmup", "0",
                        "--clock", clock, "--out", str(out)])
    assert rc == 0
    assert "peer not found" in capsys.readouterr().out
    record = json.loads(out.read_text())
    assert record["peer"] is None and record["geomean_speedup"] is None
    assert record["clock"] == clock and record["timing"].startswith(vs_grace.CLOCKS[clock].__name__)
    for key in ("device", "device_name", "torch", "python", "command", "timestamp", "cpu_threads"):
        assert key in record
    assert [r["method"] for r in record["rows"]] == list(vs_grace.METHODS)
    for row in record["rows"]:
        assert row["ours_ms"]["median"] > 0 and "speedup" not in row
        assert row["ours_payload_bytes"] > 0 and row["ours_wire_ratio"] > 1.0


def test_a_missing_peer_directory_is_reported(tmp_path):
    root, why = vs_grace.find_peer(str(tmp_path))
    assert root is None and "peer not found" in why


def test_our_sender_matches_the_front_end_protocol():
    """One step of the bench's sender per method: payload sizes as the compressors define
    them (top-k: 8 bytes per kept element; TernGrad: 4 + ceil(n/4) bytes per tensor)."""
    names = ["a", "b"]
    grads = [torch.randn(40, 30), torch.randn(7)]
    from hvdcomp.registry import compression_from_name

    s = vs_grace.OurSender(compression_from_name("topk", ratio=0.1), names, grads)
    s.step(0)
    assert s.payload_bytes == 8 * (math.ceil(0.1 * 1200) + 1)
    s = vs_grace.OurSender(compression_from_name("terngrad"), names, grads)
    s.step(0)
    assert s.payload_bytes == (4 + 300) + (4 + 2)
    assert all("shared_scale" not in st for st in s.states)  # per-step entries dropped
