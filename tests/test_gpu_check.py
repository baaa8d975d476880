"""launch/gpu_check.sh, the first GPU hour's one command, rehearsed on CPU (``--dry``) so it
cannot rot: every step runs with tiny sizes and writes its JSON record; and it stops at once,
with a message, when CUDA or a module is missing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = str(REPO / "launch" / "gpu_check.sh")


def _run(*args, python=sys.executable, timeout=900):
    env = dict(os.environ, HVDCOMP_GPU_PYTHON=python)
    return subprocess.run(["bash", SCRIPT, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_dry_run_writes_every_record(tmp_path):
    proc = _run("--dry", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["dry"] and summary["versions"]["torch"] == torch.__version__
    assert [s["step"] for s in summary["steps"]] == ["kernel_tests", "kernel_bench", "cvb_small"]
    assert all(s["status"] == "ok" for s in summary["steps"]), summary["steps"]
    tests = json.loads((tmp_path / "kernel_tests.json").read_text())
    assert tests["counts"]["passed"] > 0 and tests["counts"]["failed"] == 0
    assert all({"test", "outcome", "seconds"} <= set(t) for t in tests["tests"])
    for name in ("kernels.json", "compress_vs_backward_small.json"):
        record = json.loads((tmp_path / name).read_text())
        assert record["device"] and record["command"], name
    # The closing table names every step.
    assert all(s["step"] in proc.stdout for s in summary["steps"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_without_cuda_it_stops_at_once_and_says_why(tmp_path):
    proc = _run("--out", str(tmp_path), timeout=120)
    assert proc.returncode != 0
    assert "CUDA is not available" in proc.stderr and "--dry" in proc.stderr
    assert not (tmp_path / "summary.json").exists()


def test_an_interpreter_without_the_package_is_refused(tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    proc = _run("--dry", python=str(fake), timeout=60)
    assert proc.returncode == 2 and "cannot import hvdcomp.kernels" in proc.stderr
