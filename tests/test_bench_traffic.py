"""Smoke test of bench/traffic.py on 2 Gloo ranks: runs, and its bytes follow the collectives."""
from __future__ import annotations

import json

from bench import traffic
from tests.distributed import requires_horovod


@requires_horovod
def test_traffic_table_on_two_ranks(tmp_path):
    out = tmp_path / "traffic.json"
    record = traffic.main(["--ranks", "2", "--steps", "1", "--out", str(out)])
    rows = json.loads(out.read_text())["results"]["2"]
    assert set(rows) == {label for label, *_ in traffic.CONFIGS}
    dense = rows["uncompressed allreduce"]["step"]["dense_bytes"]
    # ring allreduce of the dense fp32 gradient: 2(N-1)/N * S = S at N = 2
    assert rows["uncompressed allreduce"]["step"]["sent_bytes"] == dense
    fp16 = rows["fp16 allreduce"]["step"]["sent_bytes"]
    assert dense / 2 <= fp16 < dense / 2 * 1.05  # half the bytes plus small per-tensor headers
    for label in ("scalecom 1%", "topk 1% allgather", "adacomp allgather"):
        assert rows[label]["step"]["sent_bytes"] < dense / 10, label
    assert "uncompressed allreduce" in record["table"]
