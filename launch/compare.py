"""Convergence evidence: the baseline and every compressor, same seeds, on N Gloo ranks.

    python -m launch.compare                      # 4 ranks, 2 seeds, digits-cnn and stdlib-lstm
    python -m launch.compare --ranks 2 --seeds 0 --tasks digits-cnn --epochs 2   # quick look

Each run is a real ``launch.train`` run on N Gloo ranks whose JSON record lands in ``--out``
(runs already there are reused unless ``--force``); the runs of one task and seed share one
``horovodrun -np N --gloo python -m launch.run_many`` launch, since starting the ranks costs
more than a short run. Then it writes
``table.md`` (final test accuracy or perplexity, difference to the uncompressed baseline,
compression ratio overall and split by conv / FC-and-LSTM layers, bytes per rank per step)
and ``curves.png`` (the test metric per epoch for every method, per task).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from .summarize import summarize

#: (compressor, parameters) compared against the baseline; the papers' default settings.
METHODS = [
    ("none", {}), ("fp16", {}), ("bf16", {}), ("adacomp", {}), ("terngrad", {}),
    ("dgc", {"ratio": 0.001, "warmup_steps": 50}), ("topk", {"ratio": 0.01}), ("randomk", {"ratio": 0.01}),
    ("onebit", {}), ("scalecom", {"ratio": 0.01}),
]
#: Epochs per task: what lets the whole comparison (2 tasks x 2 seeds x 10 methods) finish in
#: 30 minutes on a 2-core machine. Short schedules: README's Results say what they cost.
EPOCHS = {"digits-cnn": 10, "digits-mlp": 10, "teacher-mlp": 8, "stdlib-lstm": 3}


def horovodrun() -> str:
    """The horovodrun of this interpreter's venv (works without activating it), else PATH's."""
    beside = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    found = beside if os.path.exists(beside) else shutil.which("horovodrun")
    if found is None:
        raise SystemExit("horovodrun not found: run bash launch/setup.sh, then use .venv/bin/python")
    return found


def train_args(task: str, name: str, params: dict, seed: int, ranks: int, epochs: int, out: str) -> tuple[str, list]:
    """The JSON record's path and the ``launch.train`` arguments of one run."""
    tag = "_".join([task, name] + [f"{k}{v}" for k, v in params.items()] + [f"seed{seed}", f"np{ranks}"])
    path = os.path.join(out, tag + ".json")
    args = ["--task", task, "--compression", name, "--epochs", str(epochs), "--seed", str(seed), "--json", path,
            "--quiet"]
    for k, v in params.items():
        args += ["--param", f"{k}={v!r}"]
    return path, args


def run_together(label: str, runs: list[list], ranks: int, out: str) -> None:
    """Run ``launch.train`` argument lists one after the other in one ``horovodrun`` launch
    (``launch.run_many``): N ranks start, import torch and connect once for all of them."""
    if not runs:
        return
    with tempfile.NamedTemporaryFile("w", suffix=".json", dir=out, prefix=".plan-", delete=False) as f:
        json.dump(runs, f)
    cmd = [horovodrun(), "-np", str(ranks), "-H", f"localhost:{ranks}", "--gloo", sys.executable, "-m",
           "launch.run_many", f.name]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    print(f"[compare] {label}: {len(runs)} runs in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)


def plot(records: list[dict], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[compare] matplotlib is not installed: no plot (pip install 'hvdcomp[bench]')", file=sys.stderr)
        return False
    tasks = sorted({r["task"] for r in records})
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        seed = min(r["args"]["seed"] for r in records if r["task"] == task)
        for r in sorted((r for r in records if r["task"] == task and r["args"]["seed"] == seed),
                        key=lambda r: r["compression"]["name"]):
            key = "test_perplexity" if r.get("final_test_perplexity") is not None else "test_accuracy"
            xs = [h["epoch"] for h in r["history"]]
            ys = [h[key] for h in r["history"]]
            ax.plot(xs, ys, marker="o", ms=3, label=f"{r['compression']['name']} ({r['ratio']:.0f}x)",
                    lw=2.5 if r["compression"]["name"] == "none" else 1.2)
        ax.set_title(f"{task}, {records[0]['ranks']} ranks, seed {seed}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("test perplexity" if "lstm" in task else "test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=["digits-cnn", "stdlib-lstm"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--epochs", type=int, default=None, help="override the per-task default")
    p.add_argument("--methods", nargs="+", default=None, help="subset of compressor names")
    p.add_argument("--out", default="results/compare")
    p.add_argument("--force", action="store_true", help="rerun runs whose JSON exists")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    methods = [m for m in METHODS if args.methods is None or m[0] in args.methods]
    paths = []
    start = time.perf_counter()
    for task in args.tasks:
        epochs = args.epochs or EPOCHS[task]
        for seed in args.seeds:
            pending = []
            for name, params in methods:
                path, run = train_args(task, name, params, seed, args.ranks, epochs, args.out)
                paths.append(path)
                if args.force or not os.path.exists(path):
                    pending.append(run)
            run_together(f"{task} seed {seed}", pending, args.ranks, args.out)
    records = [json.load(open(p)) for p in paths]
    table = summarize(records)
    command = " ".join(["python -m launch.compare"] + (argv if argv is not None else sys.argv[1:]))
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(f"Generated by `{command}` ({args.ranks} Gloo ranks, seeds {args.seeds}, "
                f"{time.strftime('%Y-%m-%d')}).\n\n```\n{table}\n```\n")
    plot(records, os.path.join(args.out, "curves.png"))
    print(table)
    print(f"[compare] {len(paths)} runs, {time.perf_counter() - start:.0f} s; wrote {args.out}/table.md and curves.png",
          file=sys.stderr)


if __name__ == "__main__":
    main()
