"""Print a side-by-side table of launch.train JSON records: ``python -m launch.summarize *.json``."""
from __future__ import annotations

import json
import sys


def summarize(paths: list[str]) -> str:
    rows = [json.load(open(p)) for p in paths]
    base = next((r for r in rows if r["compression"]["name"] == "none"), None)
    lines = [f"{'compression':<12} {'ranks':>5} {'test acc':>9} {'vs none':>8} {'payload B/step':>15} "
             f"{'sent B/step':>12} {'recv B/step':>12} {'ratio':>8} {'identical':>9}"]
    for r in rows:
        last = r["history"][-1]
        delta = "" if base is None else f"{100 * (r['final_test_accuracy'] - base['final_test_accuracy']):+.2f}%"
        lines.append(f"{r['compression']['name']:<12} {r['ranks']:>5} {r['final_test_accuracy']:>9.4f} {delta:>8} "
                     f"{last['payload_bytes_per_step']:>15,} {last['sent_bytes_per_step']:>12,.0f} "
                     f"{last['received_bytes_per_step']:>12,.0f} {r['ratio']:>7.1f}x "
                     f"{str(r['parameters_identical_on_all_ranks']):>9}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarize(sys.argv[1:]))
