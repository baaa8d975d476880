"""The study behind the frozen-preconditioner AdamW exchange (:mod:`launch.adam_prototype`):
which recipe keeps each compressor within 3 % perplexity of uncompressed AdamW, at what
traffic, on 4 in-process ranks.

    python -m launch.adam_study run --method topk --param ratio=0.01 --warmup 40 --seed 0
    python -m launch.adam_study plan screen          # a named set of runs (records kept)
    python -m launch.adam_study table                # summary.md from every record

A run is :func:`launch.simulate.train_inprocess`'s run of the comparison's transformer
(``TinyTransformerLM(width=32)``, AdamW 2e-2 with betas 0.9/0.99 and weight decay 0.01,
cosine schedule, 16 windows of 32 characters per rank, held-out perplexity on 8,192 test
characters), the same data, batch order and initialisation, with the exchange replaced by
:class:`launch.adam_prototype.FrozenAdamW` over :class:`launch.adam_prototype.InProcessExchange`.
With ``--method none --exact none --warmup`` equal to the run's length it is plain AdamW on
the fp32 average: the record says whether its parameters equal ``train_inprocess``'s bit for
bit (``--check-baseline``).

Traffic, over the whole run (warm-up and refreshes included), from the worlds' traffic
logs: ``payload_ratio`` = fp32 bytes of every exchanged tensor / payload bytes (the ratio
the papers and the README quote), ``sent_ratio`` = bytes a rank sends in an fp32 ring
allreduce of every step's gradients / bytes it sent (allgather payloads cost ``N - 1``
copies, a ring allreduce ``2 (N - 1) / N``).
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import platform
import re
import statistics
import sys
import time

import torch

import hvdcomp.kernels as kernels

from .adam_prototype import ExactSteps, FrozenAdamW, InProcessExchange, with_error_feedback
from .simulate import BatchOrder, build_compression, lr_factor, rank_task
from .train import parse_param

OUT = os.path.join(os.path.dirname(__file__), "results", "adam-study")
#: The comparison's shapes per task (launch.compare.INPROCESS_TASKS at 2x the transformer's
#: steps, where its AdamW baseline converges); the LSTM under AdamW at the peak chosen on
#: its baseline alone (see the plans).
TASKS = {
    "stdlib-transformer": {"steps": 400, "eval_every": 20, "width": 32, "batch_size": 16, "seq": 32, "lr": 2e-2},
    "stdlib-lstm": {"steps": 300, "eval_every": 20, "width": 64, "batch_size": 16, "seq": 32, "lr": 1e-2},
}
EVAL_CHARS, SCHEDULE, RANKS = 8192, "cosine", 4
BETAS, WEIGHT_DECAY = (0.9, 0.99), 0.01


def tag(cfg: dict) -> str:
    """The record's file name (without .json) for a configuration."""
    params = "".join(f"_{k}{v}" for k, v in sorted(cfg["params"].items()))
    params = re.sub(r"[^A-Za-z0-9_.+-]", "", params.replace(", ", "-"))
    refresh = f"_r{cfg['refresh_every']}d{cfg['refresh_doubling']}" if cfg["refresh_every"] else ""
    lr = "" if cfg["lr"] == TASKS[cfg["task"]]["lr"] else f"_lr{cfg['lr']:g}"
    units = "L" if cfg.get("lr_units") else ""
    return (f"{cfg['task']}_{cfg['method']}{params}_w{cfg['warmup']}{refresh}_{cfg['message']}"
            f"_a{cfg['units_power']:g}{units}_x{cfg['exact']}_s{cfg['steps']}{lr}_seed{cfg['seed']}")


def config(task="stdlib-transformer", method="none", params=None, warmup=40, refresh_every=0,
           refresh_doubling=1, message="momentum", units_power=1.0, lr_units=False, exact="bf16", steps=None,
           seed=0, lr=None, **_) -> dict:
    """A run's settings with the task's defaults filled in."""
    shape = TASKS[task]
    return {"task": task, "method": method, "params": dict(params or {}), "warmup": warmup,
            "refresh_every": refresh_every, "refresh_doubling": refresh_doubling, "message": message,
            "units_power": float(units_power), "lr_units": bool(lr_units), "exact": exact, "steps": steps or shape["steps"], "seed": seed,
            "lr": lr if lr is not None else shape["lr"]}


def compressor(method: str, params: dict):
    """The compressor of a method name; ``NAME+ef`` adds a worker error buffer
    (:func:`launch.adam_prototype.with_error_feedback`)."""
    if method.endswith("+ef"):
        return with_error_feedback(build_compression(method[:-3], params))
    return build_compression(method, params)


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def run(cfg: dict, check_baseline: bool = False) -> dict:
    """One run (see the module docstring); returns its record."""
    torch.set_num_threads(1)
    shape = TASKS[cfg["task"]]
    steps, eval_every = cfg["steps"], shape["eval_every"]
    tasks = [rank_task(cfg["task"], cfg["seed"], r, RANKS, shape["batch_size"], shape["width"], shape["seq"],
                       EVAL_CHARS) for r in range(RANKS)]
    schedule = ExactSteps(cfg["warmup"], cfg["refresh_every"], cfg["refresh_doubling"])
    opts = [FrozenAdamW(torch.optim.AdamW(t.model.parameters(), lr=cfg["lr"], betas=BETAS,
                                          weight_decay=WEIGHT_DECAY),
                        schedule, steps, cfg["message"], cfg["units_power"], cfg.get("lr_units", False))
            for t in tasks]
    exchange = InProcessExchange([list(t.model.named_parameters()) for t in tasks],
                                 build_compression(cfg["exact"], {}), compressor(cfg["method"], cfg["params"]))
    per_epoch = min(t.steps() for t in tasks)
    orders = [BatchOrder(t, cfg["seed"], per_epoch) for t in tasks]
    numel = sum(p.numel() for p in tasks[0].model.parameters())
    ring_fp32 = 2.0 * (RANKS - 1) / RANKS * 4 * numel  # bytes a rank sends per uncompressed step
    history, total, count, start = [], 0.0, 0, time.perf_counter()
    for step in range(steps):
        for opt in opts:
            for group in opt.adamw.param_groups:
                group["lr"] = cfg["lr"] * lr_factor(SCHEDULE, step, steps)
        for t, opt, order in zip(tasks, opts, orders):
            opt.adamw.zero_grad()
            loss = t.loss(order(step))
            loss.backward()
            total += loss.item()
        count += 1
        phase = opts[0].phase()
        averages = exchange.exchange(phase, [opt.message() for opt in opts])
        for opt, avg in zip(opts, averages):
            opt.apply(avg)
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            traffic = exchange.traffic()["total"]
            row = {"step": step + 1, "loss": total / (count * RANKS), **tasks[0].evaluate(),
                   "payload_ratio": traffic["dense_bytes"] / traffic["payload_bytes"],
                   "sent_ratio": (step + 1) * ring_fp32 / traffic["sent_bytes"],
                   "seconds": time.perf_counter() - start}
            if not all(math.isfinite(v) for v in row.values()):
                history.append(row)
                break
            history.append(row)
            total, count = 0.0, 0
    identical = all(torch.equal(_flat(tasks[0].model), _flat(t.model)) for t in tasks[1:])
    flushed = _flush_diagnostic(exchange, opts, tasks[0]) if cfg.get("lr_units") else None
    traffic = exchange.traffic()
    final = history[-1]
    record = {
        "config": cfg, "tag": tag(cfg), "ranks": RANKS, "schedule": SCHEDULE, "eval_chars": EVAL_CHARS,
        "shape": shape, "betas": BETAS, "weight_decay": WEIGHT_DECAY,
        "exact_steps": schedule.count(steps), "refresh_steps": schedule.refresh_steps(steps),
        "final_test_perplexity": final.get("test_perplexity"), "steps_done": final["step"],
        "flushed_test_perplexity": flushed,
        "payload_ratio": final["payload_ratio"], "sent_ratio": final["sent_ratio"], "traffic": traffic,
        "ring_fp32_bytes_per_step": ring_fp32, "history": history, "parameters_identical_on_all_ranks": identical,
        "seconds": time.perf_counter() - start, "torch": torch.__version__, "python": platform.python_version(),
        "git": _git_head(), "kernels": os.path.dirname(kernels.__file__),
        "command": "python -m launch.adam_study run " + " ".join(cli_args(cfg)),
    }
    if check_baseline:
        record["bit_identical_to_train_inprocess"] = _same_as_train_inprocess(cfg, tasks)
    return record


def _flush_diagnostic(exchange: InProcessExchange, opts: list, task) -> float | None:
    """Diagnostic (not a recipe): the held-out perplexity once every rank has applied what its
    compressor still owes (the mean of the ranks' ``residual``, in parameter units under
    ``lr_units``), as one exact exchange at the end would. Reads the compressing world's
    private slot state; None for compressors without a ``residual``."""
    from .adam_prototype import COMPRESSED

    world = exchange.worlds[COMPRESSED]
    tables = [opt._table for opt in world.ranks]
    if not all("residual" in slot.state for slot in tables[0].slots.values()
               if slot.compressor is tables[0].compression):
        return None
    with torch.no_grad():
        for (name, p) in exchange.named[0]:
            slot = tables[0].slots[name]
            if slot.compressor is not tables[0].compression:
                continue
            owed = sum(t.slots[name].state["residual"] for t in tables) / len(tables)
            state = opts[0].adamw.state[p]
            units = state["denom"].pow(opts[0].units_power - 1.0) * state["live"]
            p.sub_(owed.view(p.shape) * units)
    return task.evaluate()["test_perplexity"]


def _git_head() -> str:
    """The worktree's commit, with ``+dirty`` when launch/ or hvdcomp/ has uncommitted changes."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "launch/adam_prototype.py", "launch/adam_study.py",
                                "hvdcomp", "kernels"], cwd=root, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"
    return head + ("+dirty" if dirty else "")


def _same_as_train_inprocess(cfg: dict, tasks: list) -> bool:
    """Whether the run's final parameters equal ``launch.simulate.train_inprocess``'s (plain
    AdamW through ``World.DistributedOptimizer``) bit for bit."""
    from .simulate import train_inprocess

    shape, finals = TASKS[cfg["task"]], []
    train_inprocess(cfg["task"], "none", {}, cfg["seed"], RANKS, cfg["steps"], cfg["steps"], shape["width"],
                    cfg["lr"], batch_size=shape["batch_size"], seq=shape["seq"], eval_chars=EVAL_CHARS,
                    schedule=SCHEDULE,
                    observe=lambda step, ts: finals.append(_flat(ts[0].model)) if step + 1 == cfg["steps"] else None)
    return bool(torch.equal(finals[-1], _flat(tasks[0].model)))


def cli_args(cfg: dict) -> list[str]:
    """The ``run`` arguments that reproduce ``cfg``."""
    args = ["--task", cfg["task"], "--method", cfg["method"], "--warmup", str(cfg["warmup"]),
            "--message", cfg["message"], "--units-power", f"{cfg['units_power']:g}", "--exact", cfg["exact"],
            "--steps", str(cfg["steps"]), "--seed", str(cfg["seed"]), "--lr", f"{cfg['lr']:g}"]
    if cfg.get("lr_units"):
        args.append("--lr-units")
    if cfg["refresh_every"]:
        args += ["--refresh-every", str(cfg["refresh_every"]), "--refresh-doubling", str(cfg["refresh_doubling"])]
    for k, v in sorted(cfg["params"].items()):
        args += ["--param", f"{k}={v!r}"]
    return args


def run_and_save(cfg: dict, out: str, force: bool = False, check_baseline: bool = False) -> dict:
    """Run ``cfg`` unless its record exists in ``out`` (then load it); print one line."""
    path = os.path.join(out, tag(cfg) + ".json")
    if os.path.exists(path) and not force:
        with open(path) as f:
            return json.load(f)
    record = run(cfg, check_baseline)
    os.makedirs(out, exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    print(f"{record['tag']}: perplexity {record['final_test_perplexity']:.4f}, payload ratio "
          f"{record['payload_ratio']:.1f}x, sent ratio {record['sent_ratio']:.1f}x, {record['seconds']:.0f} s",
          flush=True)
    return record


# ---- plans ---------------------------------------------------------------------------------------

#: The compressors of the issue's target, at the comparison's settings.
METHODS = [("onebit", {}), ("terngrad", {}), ("topk", {"ratio": 0.01}), ("dgc", {"ratio": 0.001, "warmup_steps": 0}),
           ("adacomp", {}), ("scalecom", {"ratio": 0.01})]


#: (method, parameters, units power) of the recipe runs: quantizers in momentum units (1-bit
#: Adam's), sparsifiers in update units; TernGrad with a worker error buffer, AdaComp with
#: 25-element bins (the paper's 500 for FC layers selects too little for Adam's dense update).
ADACOMP_ADAM = {"fc_bin_size": 25, "conv_bin_size": 25}
RECIPE_METHODS = [("onebit", {}, 0.0), ("terngrad+ef", {}, 0.0), ("adacomp", ADACOMP_ADAM, 1.0),
                  ("adacomp", ADACOMP_ADAM, 0.0), ("topk", {"ratio": 0.01}, 1.0)]


#: The ones that end within the bound on seed 0 (the warm-up sweep), and the others.
CONFIRMED = [RECIPE_METHODS[0], RECIPE_METHODS[1], RECIPE_METHODS[2]]
OTHERS = [("topk", {"ratio": 0.01}), ("dgc", {"ratio": 0.001, "warmup_steps": 0}), ("scalecom", {"ratio": 0.01}),
          ("adacomp", {})]
SEEDS = (0, 1, 2)
#: Exact steps before the freeze in the recipe (10 % of the 400-step schedule; see the sweep).
DEFAULT_WARMUP = 40


def plan(name: str) -> list[dict]:
    """The configurations of a named plan (see the README of the records)."""
    if name == "baseline":
        return [config(method="none", exact="none", warmup=400, seed=s) for s in (0, 1, 2)]
    if name == "screen":  # every method, 1 seed, the starting recipe and update units
        return [config(method=m, params=p, warmup=60, units_power=a) for m, p in METHODS for a in (0.0, 1.0)]
    if name == "freeze-cost":  # exact fp32 exchange, v frozen after w steps: what freezing alone costs
        return [config(method="none", exact="none", warmup=w) for w in (20, 40, 60, 100)]
    if name == "gradient":  # the gradient message (momentum recursion after the exchange)
        return ([config(method=m, params=p, warmup=60, message="gradient") for m, p in METHODS] +
                [config(method="topk", params={"ratio": 0.01}, warmup=60, message="gradient", units_power=0.0)])
    if name == "probe":  # worker error feedback for TernGrad; density and warm-up scaling of top-k
        return ([config(method="terngrad+ef", warmup=60, message=msg, units_power=a)
                 for msg, a in (("momentum", 1.0), ("momentum", 0.0), ("gradient", 1.0))] +
                [config(method="topk", params={"ratio": r}, warmup=60) for r in (0.05, 0.1)] +
                [config(method="topk", params={"ratio": 0.01}, warmup=w) for w in (100, 150)] +
                [config(method="dgc", params={"ratio": 0.001, "warmup_steps": 170}, warmup=60)])
    if name == "delta":  # EF21-style: each rank's own momentum, only its change sent
        return ([config(method=m, params=p, warmup=60, message="delta") for m, p in METHODS[2:]] +
                [config(method="topk", params={"ratio": 0.01}, warmup=60, message="delta", units_power=0.0)] +
                [config(method=m, warmup=60, message="delta") for m in ("onebit", "terngrad+ef")])
    if name == "density":  # what the bytes buy: a constant density or DGC's decaying one, after 40 exact steps
        decay = (0.25, 0.0625, 0.015625)
        return ([config(method=m, warmup=40, units_power=a) for m in ("onebit", "terngrad+ef") for a in (0.0, 1.0)] +
                [config(method="topk", params={"ratio": r}, warmup=40) for r in (0.01, 0.04)] +
                [config(method="dgc", params={"ratio": r, "warmup_steps": 120, "warmup_ratios": decay}, warmup=40)
                 for r in (0.01, 0.001)])
    if name == "lr-units":  # error feedback owed in parameter units: a release keeps the lr it was earned at
        return [config(method="topk", params={"ratio": 0.01}, warmup=40, message=msg, units_power=a, lr_units=True)
                for msg, a in (("momentum", 1.0), ("momentum", 0.0), ("gradient", 1.0))]
    if name == "adacomp-bins":  # AdaComp's FC bins (paper: 500): denser selection of sign-coded values
        return [config(method="adacomp", params={"fc_bin_size": b}, warmup=40, units_power=a)
                for b in (50, 100, 200) for a in (1.0, 0.0)]
    if name == "velocity":  # DGC's momentum correction does the momentum; the ranks apply what arrives
        return [config(method="dgc", params={"ratio": r, "momentum": 0.9, "warmup_steps": 0}, warmup=40,
                       message="velocity", units_power=a) for r in (0.01, 0.001) for a in (1.0, 0.0)]
    if name == "zero-one":  # 0/1 Adam's exponentially spaced exact steps instead of a long warm-up
        return [config(method=m, params=p, warmup=4, refresh_every=1, refresh_doubling=d, units_power=a)
                for d in (1, 2, 4)
                for m, p, a in (("onebit", {}, 0.0), ("terngrad+ef", {}, 0.0), ("topk", {"ratio": 0.01}, 1.0),
                                ("adacomp", {"fc_bin_size": 50}, 1.0))]
    if name == "adacomp-bins2":
        return [config(method="adacomp", params={"fc_bin_size": b, "conv_bin_size": b}, warmup=40) for b in (10, 25)]
    if name == "refresh-vs-freeze":  # the same number of exact steps, spread (0/1 Adam) or all first (1-bit Adam)
        return [config(method=m, params=p, warmup=w, units_power=a, **({"refresh_every": 1, "refresh_doubling": 4}
                                                                       if w == 4 else {}))
                for w in (4, 30) for m, p, a in (("onebit", {}, 0.0), ("terngrad+ef", {}, 0.0),
                                                 ("adacomp", {"fc_bin_size": 25, "conv_bin_size": 25}, 1.0))]
    if name == "long":  # 4x the schedule (1600 steps), the warm-up at the same 10 % share
        return ([config(method="none", exact="none", warmup=1600, steps=1600)] +
                [config(method=m, params=p, warmup=160, steps=1600, units_power=a)
                 for m, p, a in (("onebit", {}, 0.0), ("terngrad+ef", {}, 0.0), ("topk", {"ratio": 0.01}, 1.0),
                                 ("adacomp", {"fc_bin_size": 25, "conv_bin_size": 25}, 1.0))])
    if name == "warmup-sweep":  # the warm-up's length, seed 0 (the recipe's default comes from here)
        return [config(method=m, params=p, warmup=w, units_power=a) for w in (10, 20, 30, 40, 60, 100)
                for m, p, a in RECIPE_METHODS] + [config(method="none", exact="none", warmup=w) for w in (10, 30)]
    if name == "confirm":  # 3 seeds: the recipe's candidates at warm-ups of 20, 30, 40 steps, exact-and-frozen beside
        return [config(method=m, params=p, warmup=w, units_power=a, seed=s)
                for w in (30, 40, 20) for s in SEEDS for m, p, a in CONFIRMED] + \
               [config(method="none", exact="none", warmup=w, seed=s) for w in (30, 40, 20) for s in SEEDS]
    if name == "confirm-others":  # 3 seeds: the compressors the recipe does not carry at 400 steps
        return [config(method=m, params=p, warmup=DEFAULT_WARMUP, units_power=1.0, seed=s)
                for s in SEEDS for m, p in OTHERS]
    raise ValueError(f"unknown plan {name!r}")


# ---- summary ----------------------------------------------------------------------------------

def load(out: str) -> list[dict]:
    records = []
    for path in sorted(glob.glob(os.path.join(out, "*.json"))):
        with open(path) as f:
            records.append(json.load(f))
    return records


def _baselines(records: list[dict]) -> dict:
    """(task, steps, seed, lr) -> the plain AdamW run's final perplexity."""
    out = {}
    for r in records:
        c = r["config"]
        if c["method"] == "none" and c["exact"] == "none" and c["warmup"] >= c["steps"]:
            out[(c["task"], c["steps"], c["seed"], c["lr"])] = r["final_test_perplexity"]
    return out


def summary(records: list[dict]) -> str:
    """Markdown: per configuration, the gap to plain AdamW per seed and its mean, the ratios."""
    base = _baselines(records)
    groups: dict = {}
    for r in records:
        c = dict(r["config"])
        key = tag({**c, "seed": "*"})
        groups.setdefault(key, []).append(r)
    lines = ["| task | method | warm-up | refresh | message | alpha | exact | steps | gap % per seed | mean gap % | "
             "payload ratio | sent ratio |", "|---" * 12 + "|"]
    for key, runs in sorted(groups.items()):
        c = runs[0]["config"]
        gaps = []
        for r in sorted(runs, key=lambda r: r["config"]["seed"]):
            b = base.get((c["task"], c["steps"], r["config"]["seed"], c["lr"]))
            ppl = r["final_test_perplexity"]
            gaps.append((r["config"]["seed"], None if b is None or ppl is None else 100 * (ppl / b - 1)))
        known = [g for _, g in gaps if g is not None and math.isfinite(g)]
        per_seed = ", ".join(f"s{s}: {g:+.2f}" if g is not None else f"s{s}: -" for s, g in gaps)
        mean = f"{statistics.mean(known):+.2f}" if known else "-"
        method = c["method"] + "".join(f" {k}={v}" for k, v in sorted(c["params"].items()))
        refresh = f"{c['refresh_every']}x2/{c['refresh_doubling']}" if c["refresh_every"] else "-"
        lines.append(f"| {c['task']} | {method} | {c['warmup']} | {refresh} | {c['message']} | {c['units_power']:g} | "
                     f"{c['exact']} | {c['steps']} | {per_seed} | {mean} | "
                     f"{statistics.mean(r['payload_ratio'] for r in runs):.1f}x | "
                     f"{statistics.mean(r['sent_ratio'] for r in runs):.1f}x |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    one = sub.add_parser("run", help="one run")
    one.add_argument("--task", choices=sorted(TASKS), default="stdlib-transformer")
    one.add_argument("--method", default="none")
    one.add_argument("--param", action="append", type=parse_param, default=[], metavar="KEY=VALUE")
    one.add_argument("--warmup", type=int, default=40)
    one.add_argument("--refresh-every", type=int, default=0)
    one.add_argument("--refresh-doubling", type=int, default=1)
    one.add_argument("--message", choices=("momentum", "gradient", "delta", "velocity"), default="momentum")
    one.add_argument("--units-power", type=float, default=1.0)
    one.add_argument("--lr-units", action="store_true", help="messages in parameter units (lr / (1 - b1^s) m)")
    one.add_argument("--exact", default="bf16", help="codec of the exact steps (none, fp16, bf16)")
    one.add_argument("--steps", type=int, default=None)
    one.add_argument("--seed", type=int, default=0)
    one.add_argument("--lr", type=float, default=None)
    one.add_argument("--check-baseline", action="store_true")
    one.add_argument("--force", action="store_true")
    one.add_argument("--out", default=OUT)
    many = sub.add_parser("plan", help="a named set of runs")
    many.add_argument("name")
    many.add_argument("--out", default=OUT)
    many.add_argument("--force", action="store_true")
    table = sub.add_parser("table", help="summary.md from the records")
    table.add_argument("--out", default=OUT)
    args = p.parse_args(argv)
    if args.cmd == "run":
        cfg = config(task=args.task, method=args.method, params=dict(args.param), warmup=args.warmup,
                     refresh_every=args.refresh_every, refresh_doubling=args.refresh_doubling, message=args.message,
                     units_power=args.units_power, lr_units=args.lr_units, exact=args.exact, steps=args.steps, seed=args.seed, lr=args.lr)
        run_and_save(cfg, args.out, args.force, args.check_baseline)
    elif args.cmd == "plan":
        for cfg in plan(args.name):
            plain = cfg["method"] == "none" and cfg["exact"] == "none" and cfg["warmup"] >= cfg["steps"]
            run_and_save(cfg, args.out, args.force, check_baseline=plain and cfg["task"] == "stdlib-transformer")
    else:
        text = summary(load(args.out))
        with open(os.path.join(args.out, "summary.md"), "w") as f:
            f.write(f"Generated by `python -m launch.adam_study table` ({time.strftime('%Y-%m-%d')}).\n\n{text}\n")
        print(text)


if __name__ == "__main__":
    main()
