"""Reading a comparison's records: has the baseline converged, and how far is each method
from it, at the end and along the way.

Records are :func:`launch.simulate.train_inprocess`'s: ``history`` rows with ``step`` and
``test_accuracy`` (a share in [0, 1]) or ``test_perplexity``. The papers' bounds docs/results.md
holds the methods to: within :data:`ACCURACY_BOUND` (1 accuracy point) of the baseline's
accuracy, within :data:`PERPLEXITY_BOUND` (3 %) of its perplexity.
"""
from __future__ import annotations

import json
import statistics
from collections import defaultdict

#: Largest accuracy loss against the baseline that counts as "within the paper's bound".
ACCURACY_BOUND = 0.01
#: Largest relative perplexity increase against the baseline that counts as within it.
PERPLEXITY_BOUND = 0.03
#: Convergence: over the last quarter of the run the baseline's accuracy moves by less than
#: 1 point, its perplexity by less than 3 %: what is left of the baseline's learning is below
#: the resolution at which the methods are judged (the bounds above), so a method's gap at
#: the end is not the baseline still running away.
CONVERGED_ACCURACY, CONVERGED_PERPLEXITY = ACCURACY_BOUND, PERPLEXITY_BOUND


def metric_key(record: dict) -> str:
    return "test_perplexity" if record.get("final_test_perplexity") is not None else "test_accuracy"


def converged(record: dict, tail: float = 0.25) -> dict:
    """The baseline's convergence check: the held-out metric's change from the last
    evaluation at or before ``1 - tail`` of the run to the end, relative (perplexity) or in
    accuracy points, against :data:`CONVERGED_PERPLEXITY` / :data:`CONVERGED_ACCURACY`.
    Returns the numbers and the verdict (``converged``)."""
    rows = record["history"]
    key = metric_key(record)
    last_step = rows[-1]["step"]
    earlier = [r for r in rows if r["step"] <= last_step * (1 - tail)]
    if not earlier:
        return {"metric": key, "change": None, "converged": False}
    before, after = earlier[-1][key], rows[-1][key]
    if key == "test_perplexity":
        change, bound = (before - after) / before, CONVERGED_PERPLEXITY
    else:
        change, bound = after - before, CONVERGED_ACCURACY
    return {"metric": key, "from_step": earlier[-1]["step"], "to_step": last_step, "before": before, "after": after,
            "change": change, "bound": bound, "converged": abs(change) < bound}


def label(record: dict) -> str:
    """``name`` plus its ratio when given (``topk 0.01``): one row per configuration."""
    ratio = record["args"]["param"].get("ratio")
    return record["compression"]["name"] + ("" if ratio is None else f" {ratio}")


def gap(key: str, value: float, base: float) -> float:
    """Accuracy points lost (base - value, in points) or the relative perplexity increase
    (value / base - 1, in %): positive is worse than the baseline, both in percent."""
    return 100 * (base - value) if key == "test_accuracy" else 100 * (value / base - 1)


def _by_config(records: list[dict]) -> dict:
    groups: dict = defaultdict(list)
    for r in records:
        groups[(r["task"], label(r))].append(r)
    return groups


def _mean_at(runs: list[dict], i: int, key: str) -> float:
    return statistics.mean(r["history"][i][key] for r in runs)


def gap_table(records: list[dict], points: int = 4) -> str:
    """Per task and configuration, the gap to the baseline (:func:`gap`, of the means over
    seeds) at ``points`` evenly spaced evaluations ending at the last step, and the verdict
    against the papers' bound at the end (``within`` / ``misses``). Markdown."""
    groups = _by_config(records)
    lines = []
    for task in sorted({t for t, _ in groups}):
        base = groups.get((task, "none"))
        if not base:
            continue
        key, n = metric_key(base[0]), len(base[0]["history"])
        picks = sorted({max(0, round(n * (j + 1) / points) - 1) for j in range(points)})
        steps = [base[0]["history"][i]["step"] for i in picks]
        unit = "accuracy points lost" if key == "test_accuracy" else "% perplexity above the baseline"
        bound = 100 * (ACCURACY_BOUND if key == "test_accuracy" else PERPLEXITY_BOUND)
        lines += [f"\n{task}: gap to the baseline ({unit}; bound {bound:g}) at step\n",
                  "| method | " + " | ".join(str(s) for s in steps) + " | verdict |",
                  "|---" * (len(steps) + 2) + "|"]
        for (t, name), runs in sorted(groups.items()):
            if t != task or name == "none":
                continue
            gaps = [gap(key, _mean_at(runs, i, key), _mean_at(base, i, key)) for i in picks]
            lines.append(f"| {name} | " + " | ".join(f"{g:+.2f}" for g in gaps) +
                         f" | {'within' if gaps[-1] <= bound else 'misses'} |")
    return "\n".join(lines)


def _moved(check: dict) -> str:
    if check["metric"] == "test_perplexity":
        return f"{100 * (check['after'] / check['before'] - 1):+.2f} %"
    return f"{100 * check['change']:+.2f} points"


def convergence_notes(records: list[dict]) -> str:
    """One line per task: the baseline's convergence check on every seed (Markdown list)."""
    lines = []
    for (task, name), runs in sorted(_by_config(records).items()):
        if name != "none":
            continue
        checks = [converged(r) for r in sorted(runs, key=lambda r: r["args"]["seed"])]
        parts = [f"seed {r['args']['seed']}: {c['before']:.4g} -> {c['after']:.4g} ({_moved(c)})"
                 for r, c in zip(sorted(runs, key=lambda r: r["args"]["seed"]), checks) if c["change"] is not None]
        verdict = all(c["converged"] for c in checks)
        lines.append(f"- baseline {task}, {checks[0]['metric']} from step {checks[0].get('from_step')} to "
                     f"{checks[0].get('to_step')}: {'; '.join(parts)} -> "
                     f"{'converged' if verdict else 'NOT converged'} (bound {100 * checks[0].get('bound', 0):g} "
                     f"{'%' if checks[0]['metric'] == 'test_perplexity' else 'points'})")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    recs = [json.load(open(p)) for p in sys.argv[1:]]
    print(convergence_notes(recs))
    print(gap_table(recs))
