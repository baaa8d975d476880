"""Side-by-side table of launch.train JSON records: ``python -m launch.summarize *.json``.

Rows are grouped by task; the difference column compares each run with the uncompressed
("none") run of the same task and seed(s). With several seeds per configuration the table
shows the mean and the spread (max - min) across seeds. ``ratio`` is cumulative over the
run (it includes DGC's warm-up, when the sparsity is still low); ``last step`` is the
dense / payload bytes of the final step, the steady-state figure the papers quote.
"""
from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict


def _metric(record: dict) -> tuple[str, float]:
    if record.get("final_test_perplexity") is not None:
        return "perplexity", record["final_test_perplexity"]
    return "accuracy", record["final_test_accuracy"]


def _times(ratio) -> str:
    return "-" if ratio is None else f"{ratio:.1f}x"


def summarize(records: list[dict]) -> str:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[(r.get("task", "digits-mlp"), r["compression"]["name"], json.dumps(r["args"].get("param", {}),
                                                                            sort_keys=True))].append(r)
    lines = [f"{'task':<12} {'compression':<32} {'seeds':>5} {'metric':>10} {'mean':>9} {'spread':>7} "
             f"{'vs none':>8} {'ratio':>8} {'last step':>9} {'conv':>7} {'fc/lstm':>8} {'sent B/step':>12} "
             f"{'recv B/step':>12} {'identical':>9}"]
    base = {}
    for (task, name, _), runs in groups.items():
        if name == "none":
            base[task] = statistics.mean(_metric(r)[1] for r in runs)
    for (task, name, params), runs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] != "none", kv[0][1])):
        kind, values = _metric(runs[0])[0], [_metric(r)[1] for r in runs]
        mean = statistics.mean(values)
        spread = max(values) - min(values)
        scale = 100 if kind == "accuracy" else 1
        delta = f"{scale * (mean - base[task]):+.2f}{'%' if kind == 'accuracy' else ''}" if task in base else ""
        last = runs[0]["history"][-1]
        by_kind = runs[0].get("ratio_by_kind", {})
        payload = last["payload_bytes_per_step"]
        last_ratio = last["dense_bytes_per_step"] / payload if payload else None
        label = name + ("" if params == "{}" else " " + ",".join(f"{k}={v}" for k, v in json.loads(params).items()))
        lines.append(
            f"{task:<12} {label:<32} {len(runs):>5} {kind:>10} {scale * mean:>9.2f} {scale * spread:>7.2f} {delta:>8} "
            f"{runs[0]['ratio']:>7.1f}x {_times(last_ratio):>9} {_times(by_kind.get('conv')):>7} "
            f"{_times(by_kind.get('fc')):>8} {last['sent_bytes_per_step']:>12,.0f} "
            f"{last['received_bytes_per_step']:>12,.0f} {str(all(r['parameters_identical_on_all_ranks'] for r in runs)):>9}")
    return "\n".join(lines)


def cost_lines(records: list[dict]) -> str:
    """Per task: steps per run, seconds per step of the baseline and of all runs (mean), and
    the run-seconds summed over the runs (one core each): what sizes a comparison."""
    tasks: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        tasks[r.get("task", "digits-mlp")].append(r)
    lines = []
    for task, runs in sorted(tasks.items()):
        per_step = [r["seconds"] / r["args"]["steps"] for r in runs]
        base = [r["seconds"] / r["args"]["steps"] for r in runs if r["compression"]["name"] == "none"]
        slowest = max(runs, key=lambda r: r["seconds"] / r["args"]["steps"])
        step = f"{runs[0]['ranks']}-rank step"
        uncompressed = (f"{1000 * statistics.mean(base):.0f} ms per {step} uncompressed" if base
                        else f"no uncompressed run (ms per {step})")  # e.g. --methods without none
        lines.append(f"- {task}: {runs[0]['args']['steps']} steps; {uncompressed}, "
                     f"{1000 * statistics.mean(per_step):.0f} ms mean over "
                     f"the {len(runs)} runs (slowest {slowest['compression']['name']} "
                     f"{1000 * max(per_step):.0f} ms); {sum(r['seconds'] for r in runs):.0f} run-seconds")
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarize([json.load(open(p)) for p in sys.argv[1:]]))
