"""Convergence evidence: the baseline and every compressor, same seeds, on N ranks.

    python -m launch.compare --world inprocess    # docs/results.md's comparison (4 simulated ranks,
                                                  # 3 seeds, 3 tasks, real-rank spot check first)
    python -m launch.compare --world inprocess --steps-scale 0.25 --seeds 0   # reduced, quick look
    python -m launch.compare                      # the older one: real Gloo ranks via horovodrun

``--world inprocess`` runs every configuration on N ranks simulated in one process
(:mod:`launch.simulate`, bit-identical to real Gloo ranks), ``--jobs`` runs at a time in
worker processes (:mod:`launch.jobs`): before the runs, a spot check
trains the first steps of two methods on real Horovod Gloo ranks and in process and
requires every parameter to match bit for bit (``spot_check.json``); then each run's record
lands in ``--out``, the table (``table.md``) and the curves (``curves.png``, the held-out
metric against steps, mean over seeds) are written from them, with the baseline's
convergence check and each method's gap to it along the run (:mod:`launch.convergence`).

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
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from .convergence import convergence_notes, converged, gap_table  # noqa: F401 (converged: API)
from .summarize import cost_lines, summarize

#: (compressor, parameters) of the in-process comparison: every compressor at its paper's
#: defaults, top-k / random-k / ScaleCom at 1 % and 0.1 %. DGC: the library default (ratio
#: 0.001, warm-up, momentum from the optimizer) with the warm-up scaled to the schedule
#: (:data:`DGC_WARMUP_SHARE`).
INPROCESS_METHODS = [
    ("none", {}), ("fp16", {}), ("bf16", {}), ("adacomp", {}), ("terngrad", {}), ("dgc", {}), ("onebit", {}),
    ("topk", {"ratio": 0.01}), ("topk", {"ratio": 0.001}), ("randomk", {"ratio": 0.01}),
    ("randomk", {"ratio": 0.001}), ("scalecom", {"ratio": 0.01}), ("scalecom", {"ratio": 0.001}),
]
#: Each task's run in the in-process comparison: steps, evaluation interval and the
#: :func:`launch.simulate.train_inprocess` arguments. Sized from per-step costs measured on
#: the 2-core machine (docs/results.md) so that 117 runs fit in about 30 minutes on 2
#: workers and each baseline converges (:func:`launch.convergence.converged`); the learning
#: rate is the best of a sweep on the baseline alone, the same for every method.
INPROCESS_TASKS = {
    "digits-cnn": {"steps": 200, "eval_every": 20, "width": 16, "batch_size": 16, "lr": 0.05},
    "stdlib-lstm": {"steps": 300, "eval_every": 20, "width": 64, "batch_size": 16, "seq": 32, "lr": 2.0},
    "stdlib-transformer": {"steps": 200, "eval_every": 20, "width": 32, "batch_size": 16, "seq": 32, "lr": 2e-2},
}
#: Every in-process run anneals its learning rate (cosine to 0 over the run, the same for
#: every method), so a short schedule ends converged; held-out perplexity on this many test
#: characters (256 windows of 32).
INPROCESS_SCHEDULE, INPROCESS_EVAL_CHARS = "cosine", 8192
#: The paper warms DGC up over its first 4 of ~90 epochs (ImageNet) and 1 of 40 (PTB); our
#: schedules are far shorter than DGC_WARMUP's default 1000 steps, so the comparison warms up
#: over this share of the run.
DGC_WARMUP_SHARE = 0.25
#: The spot check: (task, compressor, parameters, seed, steps) on real Gloo ranks.
SPOT_CHECK = [("digits-cnn", "dgc", {"ratio": 0.01, "warmup_steps": 4}, 0, 6),
              ("stdlib-transformer", "topk", {"ratio": 0.01}, 0, 4)]

#: (compressor, parameters) compared against the baseline; the papers' default settings.
METHODS = [
    ("none", {}), ("fp16", {}), ("bf16", {}), ("adacomp", {}), ("terngrad", {}),
    ("dgc", {"ratio": 0.001, "warmup_steps": 50}), ("topk", {"ratio": 0.01}), ("randomk", {"ratio": 0.01}),
    ("onebit", {}), ("scalecom", {"ratio": 0.01}),
]
#: Epochs per task: what lets the whole comparison (2 tasks x 2 seeds x 10 methods) finish in
#: 30 minutes on a 2-core machine. Short schedules: docs/results.md says what they cost.
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


def _pyplot():
    """matplotlib.pyplot with the Agg backend, or None (with a message) when missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[compare] matplotlib is not installed: no plot (pip install 'hvdcomp[bench]')", file=sys.stderr)
        return None
    return plt


def _task_panels(records: list[dict], height: float):
    """``(figure, [(axes, task)])``: one panel per task, or None without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return None
    tasks = sorted({r["task"] for r in records})
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), height), squeeze=False)
    return fig, list(zip(axes[0], tasks))


def _save(fig, path: str) -> bool:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def plot(records: list[dict], path: str) -> bool:
    panels = _task_panels(records, 4.5)
    if panels is None:
        return False
    fig, pairs = panels
    for ax, task in pairs:
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
    return _save(fig, path)



def _tag(task: str, name: str, params: dict, seed: int, ranks: int) -> str:
    return "_".join([task, name] + [f"{k}{v}" for k, v in params.items()] + [f"seed{seed}", f"np{ranks}", "inproc"])


def inprocess_specs(args) -> list[dict]:
    """The runs of the in-process comparison (:func:`launch.jobs.run_one`'s specs), the most
    expensive task first so that parallel workers finish together."""
    methods = [m for m in INPROCESS_METHODS if args.methods is None or m[0] in args.methods]
    specs = []
    for task in sorted(args.tasks, key=lambda t: list(INPROCESS_TASKS).index(t), reverse=True):
        spec = INPROCESS_TASKS[task]
        steps = max(spec["eval_every"], int(spec["steps"] * args.steps_scale))
        every = min(steps, max(10, int(spec["eval_every"] * min(1.0, args.steps_scale))))
        shape = {k: v for k, v in spec.items() if k not in ("steps", "eval_every")}
        for seed in args.seeds:
            for name, params in methods:
                if name == "dgc":
                    params = {**params, "warmup_steps": int(DGC_WARMUP_SHARE * steps)}
                specs.append({"path": os.path.join(args.out, _tag(task, name, params, seed, args.ranks) + ".json"),
                              "task": task, "name": name, "params": params, "seed": seed, "ranks": args.ranks,
                              "steps": steps, "eval_every": every, "schedule": INPROCESS_SCHEDULE,
                              "eval_chars": INPROCESS_EVAL_CHARS, **shape})
    return specs


def run_spot_check(args) -> None:
    """The first steps of :data:`SPOT_CHECK`'s runs on real Gloo ranks and in process, with
    the comparison's model shapes; stops the comparison unless every step is bit-identical."""
    from . import simulate

    start = time.perf_counter()
    runs = [(t, n, p, seed, steps, INPROCESS_TASKS[t]["width"], INPROCESS_TASKS[t].get("seq", 64),
             INPROCESS_TASKS[t]["batch_size"]) for t, n, p, seed, steps in SPOT_CHECK]
    report = simulate.spot_check(runs, args.ranks)
    with open(os.path.join(args.out, "spot_check.json"), "w") as f:
        json.dump(report, f, indent=2)
    for r in report:
        print(f"[compare] spot check {r['task']} {r['compression']}: {r['identical_steps']}/{r['steps']} steps "
              f"bit-identical on {r['ranks']} real Gloo ranks (max |diff| {r['max_abs_difference']:.3g})",
              file=sys.stderr, flush=True)
    if any(r["identical_steps"] != r["steps"] for r in report):
        raise SystemExit("[compare] the in-process runs are not the real ranks' runs: see spot_check.json")
    print(f"[compare] spot check took {time.perf_counter() - start:.0f} s", file=sys.stderr)


def run_inprocess(args) -> list[str]:
    """The spot check, then every (task, seed, method) in process, ``args.jobs`` runs at a
    time; returns the record paths (runs whose record exists are kept unless ``--force``)."""
    from .jobs import run_all

    if not args.no_spot_check:
        run_spot_check(args)
    specs = inprocess_specs(args)
    run_all([s for s in specs if args.force or not os.path.exists(s["path"])], args.jobs)
    return [s["path"] for s in specs]


def plot_steps(records: list[dict], path: str) -> bool:
    """Held-out metric against steps, mean over seeds, one panel per task."""
    panels = _task_panels(records, 4.8)
    if panels is None:
        return False
    fig, pairs = panels
    for ax, task in pairs:
        groups: dict = {}
        for r in records:
            if r["task"] == task:
                label = r["compression"]["name"] + "".join(f" {v}" for k, v in r["args"]["param"].items()
                                                           if k == "ratio")
                groups.setdefault(label, []).append(r)
        for label, runs in sorted(groups.items()):
            key = "test_perplexity" if runs[0].get("final_test_perplexity") is not None else "test_accuracy"
            xs = [h["step"] for h in runs[0]["history"]]
            ys = [sum(r["history"][i][key] for r in runs) / len(runs) for i in range(len(xs))]
            ax.plot(xs, ys, label=f"{label} ({runs[0]['ratio']:.0f}x)", lw=2.5 if label == "none" else 1.1)
        ax.set_title(f"{task}, {records[0]['ranks']} in-process ranks, mean over the seeds run")
        ax.set_xlabel("step")
        ax.set_ylabel("held-out perplexity" if "stdlib" in task else "held-out accuracy")
        if "stdlib" in task:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    return _save(fig, path)

def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", choices=("gloo", "inprocess"), default="gloo",
                   help="gloo: horovodrun launches (the older comparison); inprocess: launch.simulate")
    p.add_argument("--tasks", nargs="+", default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 (gloo), 0 1 2 (inprocess)")
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--epochs", type=int, default=None, help="gloo: override the per-task default")
    p.add_argument("--steps-scale", type=float, default=1.0, help="inprocess: scale every task's steps")
    p.add_argument("--jobs", type=int, default=2, help="inprocess: runs in parallel (one core each)")
    p.add_argument("--no-spot-check", action="store_true", help="inprocess: skip the real-rank spot check")
    p.add_argument("--methods", nargs="+", default=None, help="subset of compressor names")
    p.add_argument("--out", default=None, help="default: results/compare (gloo), results/inprocess")
    p.add_argument("--force", action="store_true", help="rerun runs whose JSON exists")
    p.add_argument("--report-only", action="store_true",
                   help="inprocess: no runs, the table and curves from the records already in --out")
    args = p.parse_args(argv)
    inproc = args.world == "inprocess"
    args.tasks = args.tasks or (list(INPROCESS_TASKS) if inproc else ["digits-cnn", "stdlib-lstm"])
    args.seeds = args.seeds if args.seeds is not None else ([0, 1, 2] if inproc else [0, 1])
    args.out = args.out or ("results/inprocess" if inproc else "results/compare")
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    if inproc and args.report_only:
        paths = sorted(glob.glob(os.path.join(args.out, "*_inproc.json")))
        args.seeds = sorted({json.load(open(p))["args"]["seed"] for p in paths})
    else:
        paths = run_inprocess(args) if inproc else run_gloo(args)
    records = [json.load(open(p)) for p in paths]
    table = summarize(records)
    command = " ".join(["python -m launch.compare"] + (argv if argv is not None else sys.argv[1:]))
    where = f"{args.ranks} in-process ranks" if inproc else f"{args.ranks} Gloo ranks"
    notes = ""
    if inproc:
        notes = f"Baseline convergence (`launch.convergence.converged`):\n\n{convergence_notes(records)}\n" \
                f"{gap_table(records)}\n\nCost (training loop only, under the load of the run):\n\n" \
                f"{cost_lines(records)}\n"
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(f"Generated by `{command}` ({where}, seeds {args.seeds}, {time.strftime('%Y-%m-%d')}, "
                f"{time.perf_counter() - start:.0f} s).\n\n```\n{table}\n```\n\n{notes}\n")
    (plot_steps if inproc else plot)(records, os.path.join(args.out, "curves.png"))
    print(table)
    print(notes)
    print(f"[compare] {len(paths)} runs, {time.perf_counter() - start:.0f} s; wrote {args.out}/table.md and curves.png",
          file=sys.stderr)


def run_gloo(args) -> list[str]:
    """Every (task, seed) as one horovodrun launch of all methods; returns the record paths."""
    methods = [m for m in METHODS if args.methods is None or m[0] in args.methods]
    paths = []
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
    return paths


if __name__ == "__main__":
    main()
