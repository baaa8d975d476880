"""The first GPU hour in one command: kernel tests on CUDA, kernel bench, compress-vs-backward.

    bash launch/gpu_check.sh            # on one H100/H200: about 8 minutes at most
    bash launch/gpu_check.sh --dry      # CPU, tiny sizes, about a minute: what CI runs

Steps (each a subprocess with a time cap, so the whole run stays under
:data:`BUDGET_S` seconds even when a step hangs; a step that fails does not stop the next):

1. **preflight**: Python >= 3.10; torch, triton, numpy, pytest import; CUDA is available
   (not with ``--dry``); ``hvdcomp.kernels`` imports (the package is installed or the
   wrapper made it importable). Any of these missing stops the run at once with a message
   saying what to do; nothing is ever downloaded.
2. **kernel_tests**: ``pytest tests/test_kernels_*.py`` — every kernel (Triton and the CPU
   backend's torch path) against the tests' oracle, on CUDA tensors (``tests/conftest.py``
   puts them on the GPU when there is one); with ``--dry`` on CPU under
   ``TRITON_INTERPRET=1``, one module only.
3. **kernel_bench**: ``python -m bench.kernels`` (GB/s and % of peak per kernel; sizes 1M
   and 64M); with ``--dry`` CPU reference only, 4096 elements.
4. **cvb_resnet50**, **cvb_gpt2-medium**: ``python -m bench.compress_vs_backward`` for
   ResNet-50 (batch 64) and GPT-2-medium (batch 8 x 1024), every compressor, Triton and
   reference paths; with ``--dry`` the small CNN on CPU (``--cpu-smoke``), fp16, AdaComp and
   top-k, one repetition.

Every step writes JSON under ``--out`` (default ``results/gpu_check/``): ``kernel_tests.json``
(one record per test: outcome, seconds, message), ``kernels.json``,
``compress_vs_backward_<model>.json``, each with device, versions and command, and
``summary.json`` (per step: status ok / failed / timeout, seconds, record checked). The
run ends with a table of the steps and exits 1 if any failed.
"""
from __future__ import annotations

import argparse
import glob
import importlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: Wall-clock budget of a full (non-dry) run, in seconds: the sum of the step caps below.
BUDGET_S = 470
#: Keys every JSON record of a step must hold (checked after each step); the versions are
#: under "versions", or at the top level as "torch" (bench.compress_vs_backward).
RECORD_KEYS = ("device", "command")
NEEDED_MODULES = ("torch", "triton", "numpy", "pytest")


def preflight(dry: bool, need_pytest: bool = True) -> dict:
    """What the run needs, checked in seconds; raises SystemExit with a clear message."""
    problems = []
    needed = NEEDED_MODULES if need_pytest else tuple(m for m in NEEDED_MODULES if m != "pytest")
    if sys.version_info < (3, 10):
        problems.append(f"Python {platform.python_version()} is too old: hvdcomp needs >= 3.10 (the GPU image has 3.12)")
    found = {}
    for name in needed:
        try:
            found[name] = getattr(importlib.import_module(name), "__version__", "?")
        except ImportError as exc:
            hint = (" (or skip the kernel tests: --only kernel_bench,cvb_resnet50,cvb_gpt2-medium)"
                    if name == "pytest" else "")
            problems.append(f"module {name} is missing ({exc}); this check installs nothing: use the GPU image "
                            f"or set HVDCOMP_GPU_PYTHON to an interpreter that has it{hint}")
    try:
        importlib.import_module("hvdcomp.kernels")
    except ImportError as exc:
        problems.append(f"hvdcomp.kernels does not import ({exc}): run through launch/gpu_check.sh, which "
                        "installs the checkout (editable, no download), or pip install -e . yourself")
    info = {"python": platform.python_version(), "modules": found, "executable": sys.executable}
    if "torch" in found:
        import torch

        info["cuda_available"] = torch.cuda.is_available()
        info["torch_cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            info["device"] = torch.cuda.get_device_name()
            info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        elif not dry:
            problems.append("CUDA is not available to torch (no GPU, no driver, or a CPU build of torch "
                            f"{torch.__version__}); use --dry for the CPU rehearsal")
    if not dry and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        problems.append("TRITON_INTERPRET is set: the kernels would be interpreted, not compiled; unset it")
    if problems:
        raise SystemExit("gpu_check: cannot run:\n  - " + "\n  - ".join(problems))
    return info


def steps(out: Path, dry: bool, py: str) -> list[dict]:
    """The steps of a run: name, command, time cap (seconds), JSON records it must write."""
    tests = ["tests/test_kernels_casts.py"] if dry else sorted(glob.glob(str(REPO / "tests" / "test_kernels_*.py")))
    xml = out / "kernel_tests.xml"
    kernel_json = out / "kernels.json"
    run = [{"name": "kernel_tests", "cap": 150 if not dry else 120, "records": [out / "kernel_tests.json"],
            "cmd": [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *tests],
            "junit": xml},
           {"name": "kernel_bench", "cap": 90, "records": [kernel_json],
            "cmd": [py, "-m", "bench.kernels", "--out", str(kernel_json)]
            + (["--device", "cpu", "--sizes", "4096", "--reps", "1"] if dry else
               ["--device", "cuda", "--sizes", "1M,64M", "--rep-ms", "50"])}]
    models = [("small", ["--cpu-smoke", "--reps", "1", "--warmup", "0", "--no-plot", "--no-baselines",
                         "--compressors", "fp16", "adacomp", "topk"])] if dry else [
        ("resnet50", ["--model", "resnet50", "--device", "cuda", "--reps", "5", "--warmup", "2"]),
        ("gpt2-medium", ["--model", "gpt2-medium", "--device", "cuda", "--reps", "5", "--warmup", "2"])]
    for model, args in models:
        path = out / f"compress_vs_backward_{model}.json"
        run.append({"name": f"cvb_{model}", "cap": 120 if dry else (100 if model == "resnet50" else 130),
                    "records": [path], "cmd": [py, "-m", "bench.compress_vs_backward", *args, "--out", str(path)]})
    return run


def junit_to_json(xml: Path, out: Path, info: dict, command: list[str]) -> dict:
    """pytest's JUnit XML as one JSON record: every test's outcome, seconds and message."""
    tests = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        outcome, message = "passed", None
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (node.get("message") or node.text or "")[:2000]
        tests.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time") or 0.0), "message": message})
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "error", "skipped")}
    record = {"device": info.get("device", "cpu"), "versions": {**info["modules"], "python": info["python"]},
              "command": " ".join(command), "counts": counts, "tests": tests}
    out.write_text(json.dumps(record, indent=1))
    return record


def check_record(path: Path) -> str | None:
    """None when ``path`` is a JSON record with device, versions and command; else why not."""
    if not path.exists():
        return f"{path.name} was not written"
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        return f"{path.name} is not JSON: {exc}"
    missing = [k for k in RECORD_KEYS if k not in record]
    if "versions" not in record and "torch" not in record:
        missing.append("versions")
    return f"{path.name} lacks {missing}" if missing else None


def run_step(step: dict, env: dict, info: dict, log) -> dict:
    t0 = time.perf_counter()
    log(f"[gpu_check] {step['name']} (cap {step['cap']} s): {' '.join(map(str, step['cmd']))}")
    proc = subprocess.Popen(step["cmd"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        output, _ = proc.communicate(timeout=step["cap"])
        status = "ok" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        # SIGINT first: pytest then still writes the JUnit XML of the tests that ran.
        proc.send_signal(signal.SIGINT)
        try:
            output, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        status = "timeout"
    tail = (output or "")[-3000:]
    result = {"step": step["name"], "status": status, "seconds": round(time.perf_counter() - t0, 1),
              "command": " ".join(map(str, step["cmd"])), "output_tail": tail}
    if "junit" in step and step["junit"].exists():
        rec = junit_to_json(step["junit"], step["records"][0], info, step["cmd"])
        result["counts"] = rec["counts"]
    problems = [p for p in (check_record(r) for r in step["records"]) if p]
    if problems:
        result["record_problems"] = problems
        if status == "ok":
            result["status"] = "failed"
    log(tail.rstrip()[-1500:])
    log(f"[gpu_check] {step['name']}: {result['status']} in {result['seconds']} s")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="kernel tests, kernel bench and compress-vs-backward on one GPU")
    p.add_argument("--dry", action="store_true", help="CPU rehearsal with tiny sizes (CI)")
    p.add_argument("--out", default="results/gpu_check", help="directory for the JSON records")
    p.add_argument("--only", default=None, help="comma list of steps to run (default all)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    only = {s.strip() for s in args.only.split(",")} if args.only else None
    info = preflight(args.dry, need_pytest=only is None or "kernel_tests" in only)
    out = Path(args.out)
    if not out.is_absolute():
        out = REPO / out
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if args.dry:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    env.setdefault("PYTHONUNBUFFERED", "1")
    todo = steps(out, args.dry, sys.executable)
    if only:
        unknown = only - {s["name"] for s in todo}
        if unknown:
            raise SystemExit(f"gpu_check: unknown steps {sorted(unknown)}; steps: {[s['name'] for s in todo]}")
        todo = [s for s in todo if s["name"] in only]
    print(f"[gpu_check] {'dry run on CPU' if args.dry else info.get('device')}; python {info['python']}; "
          + ", ".join(f"{k} {v}" for k, v in info["modules"].items()) + f"; records in {out}", flush=True)
    results = [run_step(s, env, info, lambda m: print(m, flush=True)) for s in todo]
    summary = {"device": info.get("device", "cpu (dry run)"), "dry": args.dry,
               "versions": {**info["modules"], "python": info["python"], "cuda": info.get("torch_cuda")},
               "command": "bash launch/gpu_check.sh" + (" " + " ".join(argv) if argv else ""),
               "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "preflight": info,
               "seconds": round(time.perf_counter() - t0, 1), "steps": results}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\n{'step':<22}{'status':<9}{'seconds':>8}  record")
    for r in results:
        extra = r.get("counts") or "; ".join(r.get("record_problems", [])) or ""
        print(f"{r['step']:<22}{r['status']:<9}{r['seconds']:>8.1f}  {extra}")
    print(f"total {summary['seconds']:.1f} s; summary: {out / 'summary.json'}")
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
