"""Smoke test of bench/kernels.py in its CPU mode (reference only), on a tiny size."""
from __future__ import annotations

import json

import pytest
import torch

from bench import kernels as bench
from hvdcomp import kernels


def test_cpu_mode_writes_a_row_per_op(tmp_path):
    out = tmp_path / "sub" / "kernels.json"
    record = bench.main(["--device", "cpu", "--sizes", "4096", "--reps", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["rows"] == record["rows"]
    assert saved["mode"] == "cpu-reference-only"
    assert saved["command"] == "python -m bench.kernels --device cpu --sizes 4096 --reps 1 --out " + str(out)
    assert saved["versions"]["torch"] == torch.__version__ and saved["timestamp"]
    assert [r["op"] for r in saved["rows"]] == list(kernels.OPERATIONS)
    for r in saved["rows"]:
        assert r["n"] == 4096 and r["bytes"] > 0, r
        assert r["reference"]["median_ms"] > 0 and r["reference"]["gbs"] > 0, r
        assert "triton" not in r  # the interpreter is not timed
        assert r["op"] in saved["table"]
    assert set(saved["byte_models"]) == set(kernels.OPERATIONS)


def test_size_parsing_and_peak_table():
    assert [bench.parse_size(s) for s in ("4096", "64K", "1M", "64M")] == [4096, 1 << 16, 1 << 20, 1 << 26]
    with pytest.raises(Exception):
        bench.parse_size("0")
    assert bench.peak_gbs("NVIDIA H100 80GB HBM3") == 3350.0
    assert bench.peak_gbs("NVIDIA H100 PCIe") == 2000.0
    assert bench.peak_gbs("NVIDIA H200") == 4800.0
    assert bench.peak_gbs("NVIDIA GeForce RTX 4090") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU stand-in for the CUDA path")
def test_triton_comparison_path_runs_under_the_interpreter():
    """The CUDA mode's Triton-vs-reference rows and table, exercised on CPU tensors under
    ``TRITON_INTERPRET=1`` (set by conftest) with the CPU timer: every kernel accepts the
    bench's inputs and the row carries GB/s, % of peak and speed-up."""
    pytest.importorskip("triton")
    rows = bench.run(list(kernels.OPERATIONS), [4096], torch.device("cpu"), True,
                     lambda f: bench._time_cpu(f, 1), peak=1000.0, log=print)
    for r in rows:
        assert "triton_error" not in r, r
        assert r["triton"]["median_ms"] > 0 and r["triton"]["peak_fraction"] > 0 and r["speedup"] > 0, r
    record = {"device": "cpu", "with_triton": True, "timer": "perf_counter", "peak_gbs": 1000.0, "rows": rows}
    table = bench.format_table(record)
    assert all(op in table for op in kernels.OPERATIONS) and "speedup" in table
