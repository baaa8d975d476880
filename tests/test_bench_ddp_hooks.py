"""Smoke test of bench/ddp_hooks.py: tiny settings, 2 Gloo ranks, a few methods."""
from __future__ import annotations

import json
import math

import pytest
import torch

from bench import ddp_hooks


def test_powersgd_byte_rule():
    # 64x32 matrix at rank 1: (64 + 32) * 1 elements; a bias stays whole; a 4x4 matrix at
    # rank 2 would not save 2x ((4 + 4) * 2 * 2 >= 16), so it stays whole too.
    assert ddp_hooks.powersgd_elements([(64, 32), (64,), (4, 4)], rank=1) == (96 + 64 + 16, 2048 + 64 + 16)
    assert ddp_hooks.powersgd_elements([(4, 4)], rank=2) == (16, 16)
    assert ddp_hooks.torch_hook_bytes("fp16_hook", [(10, 10)], 2) == (200.0, 200.0)
    assert ddp_hooks.torch_hook_bytes("nohook", [(10, 10)], 4) == (600.0, 400.0)


def test_bench_runs_and_writes_json(tmp_path):
    methods = ["nohook", "fp16_hook", "bf16_hook", "powersgd1", "fp16", "topk"]
    if "topk" not in ddp_hooks.available_methods():
        methods.remove("topk")
    out = tmp_path / "ddp_hooks.json"
    record = ddp_hooks.main(["--steps", "2", "--warmup", "2", "--batch", "4", "--methods", ",".join(methods),
                             "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["rows"] == record["rows"]
    assert saved["nranks"] == 2 and saved["backend"] in ("gloo", "nccl") and saved["versions"]["torch"] == torch.__version__
    assert "python -m bench.ddp_hooks" in saved["command"]
    rows = {r["method"]: r for r in saved["rows"]}
    assert list(rows) == methods
    if saved["backend"] == "gloo":
        assert rows["bf16_hook"]["skipped"] == "n/a on gloo"
    ran = [r for r in rows.values() if "skipped" not in r]
    for r in ran:
        assert r["median_ms"] > 0 and math.isfinite(r["final_loss"]) and r["sent_bytes"] > 0, r
    # fp16 halves the bytes of the uncompressed exchange, up to the small tensors hvdcomp
    # leaves in fp32 (below min_compress_numel); ours are measured, torch's computed.
    dense = rows["nohook"]["sent_bytes"]
    assert rows["fp16_hook"]["sent_bytes"] == pytest.approx(dense / 2)
    assert dense / 2 <= rows["fp16"]["sent_bytes"] < 0.51 * dense
    assert rows["fp16"]["bytes_source"] == "telemetry" and rows["nohook"]["bytes_source"] == "computed"
    assert rows["powersgd1"]["ratio"] > 10
    if "topk" in rows:
        assert rows["topk"]["ratio"] > 10 and "allgather" in rows["topk"]["collectives"]
    for m in methods:
        assert ddp_hooks._label(m) in saved["table"]
