"""The launcher as users run it: real ``horovodrun`` on 2 Gloo ranks (1-epoch smoke runs),
and checkpoint/resume continuing exactly where an uninterrupted run would be."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from distributed import requires_horovod

pytestmark = requires_horovod
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def horovodrun(*train_args, np=2):
    horovodrun_bin = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    cmd = [horovodrun_bin, "-np", str(np), "-H", f"localhost:{np}", "--gloo", sys.executable, "-m", "launch.train",
           "--quiet", *train_args]
    env = dict(os.environ, HVDCOMP_KERNELS=os.environ.get("HVDCOMP_KERNELS", "reference"))
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.parametrize("task,compression", [("digits-mlp", "fp16"), ("stdlib-lstm", "scalecom")])
def test_one_epoch_smoke(tmp_path, task, compression):
    out = tmp_path / "run.json"
    stdout = horovodrun("--task", task, "--compression", compression, "--epochs", "1", "--steps-per-epoch", "5",
                        "--json", str(out))
    record = json.loads(out.read_text())
    assert record["ranks"] == 2 and record["parameters_identical_on_all_ranks"]
    assert record["history"][0]["payload_bytes_per_step"] < record["history"][0]["dense_bytes_per_step"]
    assert "final test" in stdout


def test_resume_continues_exactly(tmp_path):
    common = ["--task", "digits-cnn", "--compression", "scalecom", "--param", "ratio=0.05", "--steps-per-epoch", "4"]
    full, part = tmp_path / "full.json", tmp_path / "part.json"
    horovodrun(*common, "--epochs", "2", "--json", str(full))
    ckpt = str(tmp_path / "ckpt")
    horovodrun(*common, "--epochs", "1", "--checkpoint", ckpt)
    horovodrun(*common, "--epochs", "2", "--checkpoint", ckpt, "--resume", "--json", str(part))
    a, b = json.loads(full.read_text()), json.loads(part.read_text())
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    assert a["final_test_accuracy"] == b["final_test_accuracy"]
