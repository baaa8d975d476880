"""Time to accuracy on a slow link: each method's held-out metric against its training seconds.

    python -m bench.time_to_accuracy                          # digits-cnn (width 64), 2 ranks, 50 Mbit/s
    python -m bench.time_to_accuracy --rate 200mbit --methods none fp16 topk auto
    python -m bench.time_to_accuracy --summarize bench/results/time_to_accuracy/digits-cnn_2ranks_50mbit

One launch (``python -m launch.link --rate R -- horovodrun -np N ... python -m
launch.run_many PLAN``) trains the same task once per method through
``hvdcomp.DistributedOptimizer`` (``launch.train``: same seed, data and schedule; only
``--compression`` changes), each run writing its record with the metric and the cumulative
training seconds after every epoch (evaluation excluded). The target is the uncompressed
run's final held-out metric; a method's time to accuracy is the training seconds at the end
of the first epoch whose metric reaches it (accuracy at least, perplexity at most), or "not
reached" within the schedule; likewise to within the comparison's bound of it (1 accuracy
point, 3 % perplexity). The result (``<out-dir>/<task>_<N>ranks_<rate>.json``, schema
``hvdcomp.time_to_accuracy/1``) holds the command, versions, machine, load average and
every run's history, with a PNG of metric against seconds beside it.

The default task has 289 k parameters (1.2 MB of fp32 gradient per step, 22 steps per epoch
on 2 ranks): at 50 Mbit/s the exchange dominates its step, as in the step-time records of
``bench.step_times``. Timing figures need a quiet machine: run nothing else meanwhile.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

SCHEMA = "hvdcomp.time_to_accuracy/1"
DEFAULT_METHODS = ("none", "fp16", "bf16", "onebit", "terngrad", "topk", "randomk", "scalecom", "dgc",
                   "adacomp", "auto")
_REPO = Path(__file__).resolve().parent.parent


def plan(args, runs_dir: Path) -> list[list[str]]:
    """``launch.train`` argument lists, one per method (the uncompressed run first)."""
    methods = list(dict.fromkeys(["none", *args.methods]))
    common = ["--task", args.task, "--epochs", str(args.epochs), "--seed", str(args.seed), "--quiet"]
    if args.width is not None:
        common += ["--width", str(args.width)]
    return [common + ["--compression", m, "--json", str(runs_dir / f"{m}.json")] for m in methods]


def metric_of(record: dict) -> tuple[str, bool]:
    """The held-out metric's key in a run's history and whether higher is better."""
    final = record["final"]
    if "test_accuracy" in final:
        return "test_accuracy", True
    if "test_perplexity" in final:
        return "test_perplexity", False
    raise ValueError(f"no held-out metric in the record's final row: {sorted(final)}")


def time_to_target(history: list[dict], key: str, target: float, higher_is_better: bool) -> float | None:
    """Training seconds at the end of the first epoch whose ``key`` reaches ``target``;
    None when no epoch does."""
    for row in history:
        if (row[key] >= target) if higher_is_better else (row[key] <= target):
            return row["train_seconds"]
    return None


#: The comparison's bound on a method's gap (docs/results.md): 1 accuracy point, 3 % perplexity.
ACCURACY_BOUND, PERPLEXITY_BOUND = 0.01, 0.03


def bound_target(target: float, higher_is_better: bool) -> float:
    """The metric within the comparison's bound of ``target``."""
    return target - ACCURACY_BOUND if higher_is_better else target * (1 + PERPLEXITY_BOUND)


def summarize(runs: dict[str, dict]) -> tuple[list[dict], str]:
    """One row per method and the printed table. ``runs`` maps method to ``launch.train``
    record and must hold ``none``, whose final metric is the target; each method's time to
    that target and to within the comparison's bound of it."""
    if "none" not in runs:
        raise ValueError("the uncompressed run ('none') is the target and is missing")
    key, higher = metric_of(runs["none"])
    target = runs["none"]["history"][-1][key]
    near = bound_target(target, higher)
    base = {t: time_to_target(runs["none"]["history"], key, t, higher) for t in (target, near)}
    rows = []
    for method, rec in runs.items():
        hist = rec["history"]
        row = {"method": method, "final": hist[-1][key], "seconds_per_epoch": hist[-1]["train_seconds"] / len(hist),
               "ratio": rec["ratio"], "epochs": len(hist)}
        for name, t in (("target", target), ("bound", near)):
            reached = time_to_target(hist, key, t, higher)
            row[f"time_to_{name}_s"] = reached
            row[f"speedup_to_{name}"] = (base[t] / reached) if reached else None
        rows.append(row)
    head = f"{'method':10s} {'final':>8s} {'s/epoch':>8s} {'to target':>12s} {'speed-up':>9s} {'to bound':>12s} {'speed-up':>9s} {'traffic':>8s}"
    lines = [f"target: the uncompressed run's final {key.replace('_', ' ')} {target:.4f}; "
             f"bound: {near:.4f} (the comparison's {'1 point' if higher else '3 %'})", head, "-" * len(head)]
    for r in rows:
        cells = []
        for name in ("target", "bound"):
            when, speed = r[f"time_to_{name}_s"], r[f"speedup_to_{name}"]
            cells.append(f"{(f'{when:.1f} s' if when is not None else 'not reached'):>12s} "
                         f"{(f'{speed:.2f}x' if speed else '-'):>9s}")
        lines.append(f"{r['method']:10s} {r['final']:8.4f} {r['seconds_per_epoch']:8.2f} {' '.join(cells)} {r['ratio']:7.1f}x")
    return rows, "\n".join(lines)


def plot(runs: dict[str, dict], target: float, key: str, title: str, path: Path) -> str:
    """Metric against training seconds, one line per method; a note when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "(matplotlib missing: no plot)"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = plt.cm.tab20.colors  # more methods than the default cycle's 10 colours
    for i, (method, rec) in enumerate(runs.items()):
        hist = rec["history"]
        style = {"color": "black", "linewidth": 2} if method == "none" else {"color": colours[(2 * i) % 20 + (i >= 10)]}
        ax.plot([r["train_seconds"] for r in hist], [r[key] for r in hist], marker=".", label=method, **style)
    ax.axhline(target, color="grey", linestyle=":", label="target (uncompressed, final)")
    ax.set_xscale("log")
    ax.set_xlabel("training seconds (log)")
    ax.set_ylabel(key.replace("_", " "))
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot: {path}"


def load_runs(runs_dir: Path, methods: list[str]) -> dict[str, dict]:
    runs = {}
    for m in methods:
        path = runs_dir / f"{m}.json"
        if path.exists():
            runs[m] = json.loads(path.read_text())
    return runs


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="digits-cnn")
    p.add_argument("--width", type=int, default=64, help="the task's model width (launch.train --width)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--rate", default="50mbit", help="launch.link rate (or 'unshaped')")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    p.add_argument("--timeout", type=float, default=3600, help="seconds for the launch")
    p.add_argument("--out-dir", default="bench/results/time_to_accuracy")
    p.add_argument("--summarize", metavar="RUNS_DIR", help="only summarize the records in RUNS_DIR")
    return p.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    from bench._record import emit
    from bench.step_times import launch_command

    name = f"{args.task}_{args.ranks}ranks_{args.rate}"
    runs_dir = Path(args.summarize) if args.summarize else Path(args.out_dir) / name
    record = {"schema": SCHEMA, "task": args.task, "width": args.width, "epochs": args.epochs, "seed": args.seed,
              "ranks": args.ranks, "rate": args.rate,
              "command": shlex.join(["python", "-m", "bench.time_to_accuracy", *(sys.argv[1:] if argv is None else argv)]),
              "machine": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
              "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if not args.summarize:
        from launch import link

        runs_dir.mkdir(parents=True, exist_ok=True)
        plan_path = runs_dir / "plan.json"
        plan_path.write_text(json.dumps(plan(args, runs_dir)))
        cmd = launch_command("horovod", args.ranks, "launch.run_many", [str(plan_path)])
        record["launch_command"] = shlex.join(link.command_in_shaped_namespace(cmd, rate=args.rate))
        load_start = os.getloadavg()[0]
        done = link.run(cmd, rate=args.rate, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"),
                        cwd=_REPO, timeout=args.timeout)
        record["load_average_1min"] = {"start": load_start, "end": os.getloadavg()[0]}
        if done.returncode != 0:
            raise SystemExit(f"[time_to_accuracy] launch failed ({done.returncode}): {record['launch_command']}")
    out = Path(args.out_dir) / f"{name}.json" if not args.summarize else runs_dir.with_suffix(".json")
    if args.summarize and out.exists():  # keep what the launch recorded; add this command
        launched = json.loads(out.read_text())
        record = {**record, **{k: launched[k] for k in ("command", "launch_command", "load_average_1min", "timestamp")
                               if k in launched}, "summarize_command": record["command"]}
    runs = load_runs(runs_dir, list(dict.fromkeys(["none", *args.methods])))
    rows, table = summarize(runs)
    key, _ = metric_of(runs["none"])
    target = runs["none"]["history"][-1][key]
    record.update({"target": {"metric": key, "value": target}, "rows": rows,
                   "versions": {"torch": runs["none"].get("torch"), "python": runs["none"].get("python")},
                   "runs": runs})
    note = plot(runs, target, key, f"{args.task}, {args.ranks} ranks, {args.rate}", out.with_suffix(".png"))
    emit(record, table + "\n" + note, out)
    return out


if __name__ == "__main__":
    main()
