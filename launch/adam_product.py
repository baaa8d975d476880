"""The frozen-v Adam recipe through the product path: :func:`launch.simulate.train_inprocess`
(``hvdcomp.inprocess.World.DistributedOptimizer`` over the task's ``torch.optim.AdamW``, only
``compression=`` set, so the recipe of :mod:`hvdcomp.recipes` applies with its default
warm-up), on the comparison's transformer at the schedule where its AdamW baseline
converges, with the uncompressed baseline of the same seeds.

    python -m launch.adam_product run --method onebit --seed 0      # one record
    python -m launch.adam_product all                               # the methods x seeds below
    python -m launch.adam_product all --warmup-steps 40             # the same at another warm-up
    python -m launch.adam_product all --others                      # top-k, DGC, AdaComp, ScaleCom
    python -m launch.adam_product all --steps 1600 --warmup-steps 80  # 4x the schedule
    python -m launch.adam_product all --task lstm --lr 1e-2         # the LSTM under AdamW
    python -m launch.adam_product table                             # gap per seed and ratio

Records: ``launch/results/adam-product/<method>_w<warm-up>_seed<s>.json`` and
``none_seed<s>.json`` (train_inprocess's record, with the warm-up the run had); runs of
another task, length or learning rate than the transformer's default shape are prefixed by
``<task>_s<steps>_lr<lr>_``.
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
from .train import OPTIMIZERS

OUT = os.path.join(os.path.dirname(__file__), "results", "adam-product")
SHAPE = {"task": "stdlib-transformer", "ranks": 4, "steps": 400, "eval_every": 20, "width": 32, "lr": 2e-2,
         "batch_size": 16, "seq": 32, "eval_chars": 8192, "schedule": "cosine"}
#: Per ``--task``: the run's shape (the LSTM is the comparison's ``CharLSTM(hidden=64)`` at its
#: 300 steps, trained with AdamW instead of SGD; its learning rate is chosen on the baseline).
SHAPES = {"transformer": SHAPE,
          "lstm": {**SHAPE, "task": "stdlib-lstm", "steps": 300, "width": 64, "lr": 1e-2, "optimizer": "adamw"}}
METHODS = ("none", "onebit", "terngrad")
#: The other lossy compressors, at launch.train's default parameters (``all --others``).
OTHERS = ("topk", "dgc", "adacomp", "scalecom")
SEEDS = (0, 1, 2)


def shape_for(task: str = "transformer", steps: int | None = None, lr: float | None = None,
              optimizer: str | None = None) -> dict:
    """The run's shape: :data:`SHAPES` ``[task]`` with ``steps``, ``lr`` and ``optimizer``
    (``launch.train.OPTIMIZERS``) when given."""
    shape = dict(SHAPES[task])
    shape.update({k: v for k, v in (("steps", steps), ("lr", lr), ("optimizer", optimizer)) if v is not None})
    if shape["steps"] < 1 or not shape["lr"] > 0:
        raise ValueError(f"steps must be >= 1 and lr > 0, got {shape['steps']} and {shape['lr']}")
    return shape


def record_prefix(shape: dict) -> str:
    """"" for the transformer's default shape, else ``<task>_s<steps>_lr<lr>_[<optimizer>_]``."""
    if all(shape.get(k) == SHAPE.get(k) for k in ("task", "steps", "lr", "optimizer")):
        return ""
    optimizer = f"{shape['optimizer']}_" if shape.get("optimizer") else ""
    return f"{shape['task']}_s{shape['steps']}_lr{shape['lr']:g}_{optimizer}"


def method_label(method: str, params: dict, optimizer: str | None) -> str:
    """``method`` with its parameters, and the exact-exchange ablation marked."""
    label = " ".join([method, *(f"{k}={v}" for k, v in sorted(params.items()))])
    return f"{label} (FrozenAdamW: v frozen, exact exchange)" if optimizer == "frozen-adamw" and method == "none" else label


def run(method: str, seed: int, warmup_steps: int | None = None, shape: dict = SHAPE, params: dict | None = None) -> dict:
    """One record, written to :data:`OUT` (``warmup_steps``: None for the recipe's default;
    the record names the warm-up the run had; ``params``: the compressor's, default its own)."""
    import warnings

    params = dict(params or {})
    with warnings.catch_warnings(record=True) as notices:
        warnings.simplefilter("always")
        record = train_inprocess(name=method, params=params, seed=seed, warmup_steps=warmup_steps, **shape)
    record["recipe_notices"] = sorted({str(w.message) for w in notices})
    frozen = method != "none" or shape.get("optimizer") == "frozen-adamw"
    record["warmup_steps"] = (warmup_steps or DEFAULT_WARMUP_STEPS) if frozen else None
    record["label"] = method_label(method, params, shape.get("optimizer"))
    os.makedirs(OUT, exist_ok=True)
    suffix = "".join(f"_{k}{v}" for k, v in sorted(params.items()))
    suffix += f"_w{record['warmup_steps']}" if frozen else ""
    with open(os.path.join(OUT, f"{record_prefix(shape)}{method}{suffix}_seed{seed}.json"), "w") as f:
        json.dump(record, f, indent=1)
    return record


def _shape_key(r: dict) -> tuple:
    a = r["args"]
    return (r["task"], a["steps"], a["lr"])


def table() -> str:
    """Markdown: per run shape (task, steps, peak learning rate) and method, the final
    perplexity gap to ``none`` of the same shape and seed (%), its mean, and the cumulative
    payload ratio over the run (warm-up included)."""
    records = {}
    for path in glob.glob(os.path.join(OUT, "*.json")):
        with open(path) as f:
            r = json.load(f)
        warmup = r.get("warmup_steps") or "none"
        records[(_shape_key(r), r.get("label", r["compression"]["name"]), warmup, r["args"]["seed"])] = r
    rows = ["| task | steps | lr | method | warm-up | gap % per seed | mean gap % | payload ratio | seconds per run |",
            "|---|---|---|---|---|---|---|---|---|"]
    for shape, method, warmup in sorted({k[:3] for k in records if k[1] != "none"}, key=str):
        base = {s: records[(shape, "none", "none", s)]["final_test_perplexity"] for s in SEEDS
                if (shape, "none", "none", s) in records}
        gaps = {s: 100 * (records[(shape, method, warmup, s)]["final_test_perplexity"] / base[s] - 1)
                for s in SEEDS if (shape, method, warmup, s) in records and s in base}
        if not gaps:
            continue
        runs = [records[(shape, method, warmup, s)] for s in gaps]
        rows.append(f"| {shape[0]} | {shape[1]} | {shape[2]:g} | {method} | {warmup} | "
                    + ", ".join(f"s{s}: {g:+.2f}" for s, g in gaps.items())
                    + f" | {statistics.mean(gaps.values()):+.2f} | {statistics.mean(r['ratio'] for r in runs):.1f}x"
                    + f" | {statistics.mean(r['seconds'] for r in runs):.0f} |")
    return "\n".join(rows)


def baselines(shape: dict) -> str:
    """Markdown: the uncompressed runs of ``shape`` per seed, final perplexity and whether
    the baseline converged (``launch.convergence.converged``: under 3 % of movement over the
    last quarter of the run)."""
    from .convergence import converged

    rows = ["| seed | final perplexity | converged (change) |", "|---|---|---|"]
    for seed in SEEDS:
        path = os.path.join(OUT, f"{record_prefix(shape)}none_seed{seed}.json")
        if os.path.exists(path):
            with open(path) as f:
                r = json.load(f)
            verdict = converged(r)
            change = "" if verdict["change"] is None else f" ({100 * verdict['change']:+.2f} % over the last quarter)"
            rows.append(f"| {seed} | {r['final_test_perplexity']:.3f} | {verdict['converged']}{change} |")
    return "\n".join(rows)


def parse_params(pairs: list) -> dict:
    """``["bin_size=25", "ratio=0.05"]`` -> ``{"bin_size": 25, "ratio": 0.05}`` (ints, else floats)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--param takes KEY=VALUE, got {pair!r}")
        try:
            out[key] = int(value)
        except ValueError:
            try:
                out[key] = float(value)
            except ValueError:
                raise SystemExit(f"--param {key}: a number, got {value!r}") from None
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    one = sub.add_parser("run")
    one.add_argument("--method", choices=METHODS + OTHERS, required=True)
    one.add_argument("--seed", type=int, default=0)
    every = sub.add_parser("all")
    every.add_argument("--others", action="store_true", help="the other lossy compressors instead")
    every.add_argument("--methods", nargs="+", choices=METHODS + OTHERS, help="instead of the default list")
    base = sub.add_parser("baselines")
    for parser in (one, every, base):
        parser.add_argument("--task", choices=sorted(SHAPES), default="transformer")
        parser.add_argument("--steps", type=int, default=None, help="default: the task's")
        parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the task's)")
    for parser in (one, every):
        parser.add_argument("--warmup-steps", type=int, default=None, help="default: the recipe's")
        parser.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                            help="instead of the task's (frozen-adamw with none: the cost of freezing v alone)")
        parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                            help="a compressor parameter (a number), e.g. bin_size=25")
    sub.add_parser("table")
    args = p.parse_args(argv)
    if args.command == "table":
        print(table())
        return
    shape = shape_for(args.task, args.steps, args.lr, getattr(args, "optimizer", None))
    params = parse_params(getattr(args, "param", []))
    if args.command == "baselines":
        print(baselines(shape))
    elif args.command == "run":
        r = run(args.method, args.seed, args.warmup_steps, shape, params)
        print(args.method, args.seed, r["final_test_perplexity"], r["ratio"])
    else:
        methods = args.methods or (OTHERS if args.others else METHODS)
        for seed in SEEDS:
            for method in methods:
                done = os.path.exists(os.path.join(OUT, f"{record_prefix(shape)}none_seed{seed}.json"))
                if method == "none" and done and args.warmup_steps is not None:
                    continue  # the baseline has no warm-up: one record serves every warm-up
                r = run(method, seed, args.warmup_steps, shape, params)
                print(method, seed, r["final_test_perplexity"], r["ratio"], flush=True)


if __name__ == "__main__":
    main()
