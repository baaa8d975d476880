"""The frozen-v Adam recipe through the product path: :func:`launch.simulate.train_inprocess`
(``hvdcomp.inprocess.World.DistributedOptimizer`` over the task's ``torch.optim.AdamW``, only
``compression=`` set, so the recipe of :mod:`hvdcomp.recipes` applies with its default
warm-up), on the comparison's transformer at the schedule where its AdamW baseline
converges, with the uncompressed baseline of the same seeds.

    python -m launch.adam_product run --method onebit --seed 0      # one record
    python -m launch.adam_product all                               # the methods x seeds below
    python -m launch.adam_product all --warmup-steps 40             # the same at another warm-up
    python -m launch.adam_product all --others                      # top-k, DGC, AdaComp, ScaleCom
    python -m launch.adam_product table                             # gap per seed and ratio

Records: ``launch/results/adam-product/<method>_w<warm-up>_seed<s>.json`` and
``none_seed<s>.json`` (train_inprocess's record, with the warm-up the run had).
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

from hvdcomp.core.frozen_adam import DEFAULT_WARMUP_STEPS

from .simulate import train_inprocess

OUT = os.path.join(os.path.dirname(__file__), "results", "adam-product")
SHAPE = {"task": "stdlib-transformer", "ranks": 4, "steps": 400, "eval_every": 20, "width": 32, "lr": 2e-2,
         "batch_size": 16, "seq": 32, "eval_chars": 8192, "schedule": "cosine"}
METHODS = ("none", "onebit", "terngrad")
#: The other lossy compressors, at launch.train's default parameters (``all --others``).
OTHERS = ("topk", "dgc", "adacomp", "scalecom")
SEEDS = (0, 1, 2)


def run(method: str, seed: int, warmup_steps: int | None = None) -> dict:
    """One record, written to :data:`OUT` (``warmup_steps``: None for the recipe's default;
    the record names the warm-up the run had)."""
    import warnings

    with warnings.catch_warnings(record=True) as notices:
        warnings.simplefilter("always")
        record = train_inprocess(name=method, params={}, seed=seed, warmup_steps=warmup_steps, **SHAPE)
    record["recipe_notices"] = sorted({str(w.message) for w in notices})
    record["warmup_steps"] = None if method == "none" else warmup_steps or DEFAULT_WARMUP_STEPS
    os.makedirs(OUT, exist_ok=True)
    suffix = "" if method == "none" else f"_w{record['warmup_steps']}"
    with open(os.path.join(OUT, f"{method}{suffix}_seed{seed}.json"), "w") as f:
        json.dump(record, f, indent=1)
    return record


def table() -> str:
    """Markdown: per method the final perplexity gap to ``none`` of the same seed (%), its
    mean, and the cumulative payload ratio over the run (warm-up included)."""
    records = {}
    for path in glob.glob(os.path.join(OUT, "*.json")):
        with open(path) as f:
            r = json.load(f)
        warmup = r.get("warmup_steps") or "none"
        records[(r["compression"]["name"], warmup, r["args"]["seed"])] = r
    rows = ["| method | warm-up | gap % per seed | mean gap % | payload ratio | seconds per run |",
            "|---|---|---|---|---|---|"]
    for method, warmup in sorted({(m, w) for m, w, _ in records if m != "none"}):
        base = {s: records[("none", "none", s)]["final_test_perplexity"] for s in SEEDS
                if ("none", "none", s) in records}
        gaps = {s: 100 * (records[(method, warmup, s)]["final_test_perplexity"] / base[s] - 1)
                for s in SEEDS if (method, warmup, s) in records and s in base}
        if not gaps:
            continue
        runs = [records[(method, warmup, s)] for s in gaps]
        rows.append(f"| {method} | {warmup} | " + ", ".join(f"s{s}: {g:+.2f}" for s, g in gaps.items())
                    + f" | {statistics.mean(gaps.values()):+.2f} | {statistics.mean(r['ratio'] for r in runs):.1f}x"
                    + f" | {statistics.mean(r['seconds'] for r in runs):.0f} |")
    return "\n".join(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    one = sub.add_parser("run")
    one.add_argument("--method", choices=METHODS + OTHERS, required=True)
    one.add_argument("--seed", type=int, default=0)
    one.add_argument("--warmup-steps", type=int, default=None, help="default: the recipe's")
    every = sub.add_parser("all")
    every.add_argument("--warmup-steps", type=int, default=None, help="default: the recipe's (and the baseline)")
    every.add_argument("--others", action="store_true", help="the other lossy compressors instead")
    sub.add_parser("table")
    args = p.parse_args(argv)
    if args.command == "run":
        r = run(args.method, args.seed, args.warmup_steps)
        print(args.method, args.seed, r["final_test_perplexity"], r["ratio"])
    elif args.command == "all":
        for seed in SEEDS:
            for method in OTHERS if args.others else METHODS if args.warmup_steps is None else METHODS[1:]:
                r = run(method, seed, args.warmup_steps)
                print(method, seed, r["final_test_perplexity"], r["ratio"], flush=True)
    else:
        print(table())


if __name__ == "__main__":
    main()
