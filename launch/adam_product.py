"""The frozen-v Adam recipe through the product path: :func:`launch.simulate.train_inprocess`
(``hvdcomp.inprocess.World.DistributedOptimizer`` over the task's ``torch.optim.AdamW``, only
``compression=`` set, so the recipe of :mod:`hvdcomp.recipes` applies with its default
warm-up), on the comparison's transformer at the schedule where its AdamW baseline
converges, with the uncompressed baseline of the same seeds.

    python -m launch.adam_product run --method onebit --seed 0      # one record
    python -m launch.adam_product all                               # the methods x seeds below
    python -m launch.adam_product table                             # gap per seed and ratio

Records: ``launch/results/adam-product/<method>_seed<s>.json`` (train_inprocess's record).
The run's shape is the Adam study's (branch adam-research, ``launch/adam_study.py``): width
32, AdamW 2e-2 with betas 0.9/0.99 and weight decay 0.01 (``launch.train.make_optimizer``),
cosine schedule, 16 windows of 32 characters per rank, 4 ranks, 400 steps, held-out
perplexity on 8,192 test characters. Unlike the study's prototype, the warm-up travels as
the product sends it: uncompressed fp32 (``small_compression``'s default).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics

from .simulate import train_inprocess

OUT = os.path.join(os.path.dirname(__file__), "results", "adam-product")
SHAPE = {"task": "stdlib-transformer", "ranks": 4, "steps": 400, "eval_every": 20, "width": 32, "lr": 2e-2,
         "batch_size": 16, "seq": 32, "eval_chars": 8192, "schedule": "cosine"}
METHODS = ("none", "onebit", "terngrad")
SEEDS = (0, 1, 2)


def run(method: str, seed: int) -> dict:
    """One record, written to :data:`OUT`."""
    import warnings

    with warnings.catch_warnings(record=True) as notices:
        warnings.simplefilter("always")
        record = train_inprocess(name=method, params={}, seed=seed, **SHAPE)
    record["recipe_notices"] = sorted({str(w.message) for w in notices})
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, f"{method}_seed{seed}.json"), "w") as f:
        json.dump(record, f, indent=1)
    return record


def table() -> str:
    """Markdown: per method the final perplexity gap to ``none`` of the same seed (%), its
    mean, and the cumulative payload ratio over the run (warm-up included)."""
    records = {}
    for path in glob.glob(os.path.join(OUT, "*.json")):
        with open(path) as f:
            r = json.load(f)
        records[(r["compression"]["name"], r["args"]["seed"])] = r
    rows = ["| method | optimizer | gap % per seed | mean gap % | payload ratio | seconds per run |", "|---|---|---|---|---|---|"]
    for method in sorted({m for m, _ in records} - {"none"}):
        gaps = {s: 100 * (records[(method, s)]["final_test_perplexity"] / records[("none", s)]["final_test_perplexity"] - 1)
                for s in SEEDS if (method, s) in records and ("none", s) in records}
        if not gaps:
            continue
        runs = [records[(method, s)] for s in gaps]
        rows.append(f"| {method} | {runs[0]['optimizer']} | " + ", ".join(f"s{s}: {g:+.2f}" for s, g in gaps.items())
                    + f" | {statistics.mean(gaps.values()):+.2f} | {statistics.mean(r['ratio'] for r in runs):.1f}x"
                    + f" | {statistics.mean(r['seconds'] for r in runs):.0f} |")
    return "\n".join(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    one = sub.add_parser("run")
    one.add_argument("--method", choices=METHODS, required=True)
    one.add_argument("--seed", type=int, default=0)
    sub.add_parser("all")
    sub.add_parser("table")
    args = p.parse_args(argv)
    if args.command == "run":
        r = run(args.method, args.seed)
        print(args.method, args.seed, r["final_test_perplexity"], r["ratio"])
    elif args.command == "all":
        for seed in SEEDS:
            for method in METHODS:
                r = run(method, seed)
                print(method, seed, r["final_test_perplexity"], r["ratio"], flush=True)
    else:
        print(table())


if __name__ == "__main__":
    main()
