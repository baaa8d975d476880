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


def launch(module, *args, np=2):
    """``horovodrun -np N --gloo python -m module args`` from the repo; its stdout."""
    horovodrun_bin = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    cmd = [horovodrun_bin, "-np", str(np), "-H", f"localhost:{np}", "--gloo", sys.executable, "-m", module, *args]
    # Tensor fusion groups tensors by when they are ready, and the ring allreduce's summation
    # order follows the fused layout: unless fusion is off, fp32 sums may differ in the last
    # bit between two launches, and the exact comparisons below would be flaky.
    env = dict(os.environ, HVDCOMP_KERNELS=os.environ.get("HVDCOMP_KERNELS", "reference"),
               HOROVOD_FUSION_THRESHOLD="0")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def horovodrun(*train_args, np=2):
    return launch("launch.train", "--quiet", *train_args, np=np)


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


def test_run_many_is_the_same_as_separate_launches(tmp_path):
    """launch.compare runs several configurations in one launch (launch.run_many): the second
    of them must end exactly as in a launch of its own (no state leaks from the first)."""
    common = ["--task", "digits-mlp", "--epochs", "2", "--steps-per-epoch", "3", "--quiet"]
    first = common + ["--compression", "fp16", "--json", str(tmp_path / "fp16.json")]
    second = common + ["--compression", "topk", "--param", "ratio=0.05", "--seed", "1"]
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps([first, second + ["--json", str(tmp_path / "together.json")]]))
    launch("launch.run_many", str(plan))
    horovodrun(*second, "--json", str(tmp_path / "alone.json"))
    together, alone = (json.loads((tmp_path / f).read_text()) for f in ("together.json", "alone.json"))
    assert json.loads((tmp_path / "fp16.json").read_text())["compression"]["name"] == "fp16"
    assert together["compression"]["name"] == "topk"
    assert [h["loss"] for h in together["history"]] == [h["loss"] for h in alone["history"]]
    assert together["final_test_accuracy"] == alone["final_test_accuracy"]
