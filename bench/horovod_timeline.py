"""Where Horovod's time goes per fused group: a summary of a Horovod timeline.

Horovod writes a timeline (Chrome's trace format) where ``HOROVOD_TIMELINE`` names a file:
per tensor, its negotiation, and for the collective that carried it each activity Horovod
times (``MEMCPY_IN_FUSION_BUFFER``, ``GLOO_ALLREDUCE``, ``MEMCPY_OUT_FUSION_BUFFER``, ...).
Tensors reduced as one share the same activities, starting at the same moment. This groups
every activity of the tensors named ``--match`` by the set of tensors it carried and gives,
per group and activity, how often it ran and the median and 20th/80th percentile of its
duration. It is a diagnostic for the cost model (``hvdcomp.costs``): which tensors
Horovod fuses in a training step, and what the fusion buffer's copies and the collective
on the fused buffer take. For example, 20 steps of ``none`` on the ``mlp``, 2 bound ranks::

    HOROVOD_TIMELINE=/tmp/on.json python -m bench.step_times --models mlp --ranks 2 \\
        --transports horovod --rates unshaped --methods none --pin-ranks --no-sweep --max-steps 20
    python -m bench.horovod_timeline /tmp/on.json --out timeline_on.json

Only the coordinator (rank 0) writes the timeline: an activity's time includes waiting for
the other ranks to reach it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench._record import emit
from bench.compress_vs_backward import summarize

#: Activities of tensors that start within this many microseconds are one collective's.
SAME_START_US = 100.0


def read_events(path: str | Path) -> list[dict]:
    """The timeline's events. Horovod writes a JSON list it only closes at shutdown, so a
    file without its closing bracket (a run that was killed) is read as far as it goes."""
    text = Path(path).read_text().rstrip().rstrip(",")
    if not text.endswith("]"):
        text += "]"
    return json.loads(text)


def spans(events: list[dict]) -> list[tuple[str, str, float, float]]:
    """``(tensor, activity, start_us, duration_us)`` of every begin/end pair, per tensor
    (Horovod gives each tensor a ``pid`` named by a ``process_name`` event; its activities
    nest)."""
    names = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name" and "name" in e.get("args", {})}
    open_: dict = {}
    out = []
    for e in events:
        if e.get("ph") == "B":
            open_.setdefault(e["pid"], []).append((e["name"], e["ts"]))
        elif e.get("ph") == "E" and open_.get(e["pid"]):
            activity, start = open_[e["pid"]].pop()
            out.append((names.get(e["pid"], str(e["pid"])), activity, float(start), float(e["ts"] - start)))
    return out


def fused_groups(found: list[tuple[str, str, float, float]]) -> list[tuple[tuple[str, ...], str, float]]:
    """``(tensors, activity, duration_us)`` per run of an activity: the spans of one activity
    that start within :data:`SAME_START_US` of the first of them are one run (its duration:
    the longest span's)."""
    out = []
    by_activity: dict = {}
    for tensor, activity, start, duration in found:
        by_activity.setdefault(activity, []).append((start, tensor, duration))
    for activity, runs in by_activity.items():
        runs.sort()
        group: list = []
        for start, tensor, duration in runs + [(float("inf"), "", 0.0)]:
            if group and start - group[0][0] > SAME_START_US:
                out.append((tuple(sorted({t for _, t, _ in group})), activity, max(d for _, _, d in group)))
                group = []
            group.append((start, tensor, duration))
    return out


def by_group(groups: list[tuple[tuple[str, ...], str, float]]) -> list[dict]:
    """Per (tensors, activity): runs and the median, 20th and 80th percentile in ms (the
    benches' ``summarize``), most frequent first."""
    durations: dict = {}
    for tensors, activity, duration in groups:
        durations.setdefault((tensors, activity), []).append(duration / 1e3)
    rows = []
    for (tensors, activity), ms in durations.items():
        stats = summarize(ms)
        rows.append({"tensors": list(tensors), "activity": activity, "runs": stats["reps"],
                     "median_ms": stats["median"], "p20_ms": stats["p20"], "p80_ms": stats["p80"]})
    return sorted(rows, key=lambda r: (-r["runs"], r["tensors"], r["activity"]))


def format_table(rows: list[dict], min_runs: int) -> str:
    lines = [f"{'activity':26} {'runs':>5} {'median ms':>10} {'p20-p80 ms':>14}  tensors"]
    for r in rows:
        if r["runs"] >= min_runs:
            lines.append(f"{r['activity']:26} {r['runs']:5d} {r['median_ms']:10.2f} "
                         f"{r['p20_ms']:6.2f}-{r['p80_ms']:<7.2f}  {', '.join(r['tensors'])}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("timeline", help="the file HOROVOD_TIMELINE named")
    p.add_argument("--match", default="hvdcomp.slot",
                   help="only tensors whose name contains this (default: hvdcomp's gradient slots)")
    p.add_argument("--min-runs", type=int, default=5, help="table rows: groups that ran at least this often")
    p.add_argument("--out", default="bench/results/horovod_timeline.json")
    args = p.parse_args(argv)
    found = [s for s in spans(read_events(args.timeline)) if args.match in s[0]]
    if not found:
        raise SystemExit(f"no activity of a tensor named like {args.match!r} in {args.timeline}")
    rows = by_group(fused_groups(found))
    record = {"command": " ".join(["python -m bench.horovod_timeline", *(sys.argv[1:] if argv is None else argv)]),
              "timeline": str(args.timeline), "match": args.match, "rows": rows}
    emit(record, format_table(rows, args.min_runs), args.out)
    return record


if __name__ == "__main__":
    main()
