"""bench.ddp_timeline on 2 torchrun ranks over launch.link's shaped loopback: the record holds
the local work of every phase of TernGrad's chains and their collectives, in order."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.test_link import requires_netns

REPO = Path(__file__).resolve().parents[1]


@requires_netns
def test_a_terngrad_step_logs_every_phase_and_collective(tmp_path):
    out = tmp_path / "timeline.json"
    cmd = [sys.executable, "-m", "launch.link", "--rate", "500mbit", "--",
           sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", "29547", "-m", "bench.ddp_timeline", "--model", "small", "--batch", "8",
           "--compression", "terngrad", "--warmup", "1", "--steps", "1", "--out", str(out)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["schema"] == "hvdcomp.ddp_timeline/1" and record["world_size"] == 2
    (step,) = record["steps"]
    assert 0 < step["forward_ms"] < step["backward_ms"] < step["step_ms"]
    events = step["events"]
    assert all(begin <= end <= step["step_ms"] for begin, end, *_ in events)
    work = [what for _, _, _, kind, what in events if kind == "local work"]
    collectives = [what for _, _, _, kind, what in events if kind == "collective"]
    # TernGrad's packed chain: encode, scale max-allreduce, payload sizes, payload, decode.
    packed = {what.split(" (")[0] for what in work if "(allgather)" in what}
    assert packed
    for chain in packed:
        assert [w.split(") ", 1)[1] for w in work if w.startswith(chain + " ")] == \
            ["encode", "after phase 0", "after phase 1", "after phase 2: decode"]
    assert any(c.startswith("AllgatherV ") for c in collectives)
    assert any(c.startswith("Allreduce ") for c in collectives)
    assert "local work" in record["table"] and "collective" in record["table"]
