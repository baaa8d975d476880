"""The Adam study's summary (``summary.md``) from its records (:mod:`launch.adam_study`).

    python -m launch.adam_study table

Gaps are the % perplexity above plain AdamW of the same task, schedule, seed and learning
rate (the bound is :data:`launch.convergence.PERPLEXITY_BOUND`, 3 %); ``payload`` is the
fp32 bytes of every exchanged tensor over the payload bytes, ``sent`` the bytes a rank sends
in an fp32 ring allreduce of every step over the bytes it sent, both over the whole run,
warm-up included.
"""
from __future__ import annotations

import glob
import json
import math
import os
import statistics

from .convergence import PERPLEXITY_BOUND

#: The comparison's own runs of the transformer at 400 steps (AdamW on the compressed
#: gradient sum): the numbers before this study.
BEFORE = os.path.join(os.path.dirname(__file__), "results", "inprocess-transformer400")


def load(out: str) -> list[dict]:
    """Every record in ``out``."""
    records = []
    for path in sorted(glob.glob(os.path.join(out, "*.json"))):
        with open(path) as f:
            records.append(json.load(f))
    return records


def is_plain(c: dict) -> bool:
    """Plain AdamW: exact fp32 exchange on every step."""
    return c["method"] == "none" and c["exact"] == "none" and c["warmup"] >= c["steps"]


def baselines(records: list[dict]) -> dict:
    """(task, steps, seed, lr) -> plain AdamW's final perplexity."""
    return {(r["config"]["task"], r["config"]["steps"], r["config"]["seed"], r["config"]["lr"]):
            r["final_test_perplexity"] for r in records if is_plain(r["config"])}


def gap_of(record: dict, base: dict) -> float | None:
    c = record["config"]
    b, ppl = base.get((c["task"], c["steps"], c["seed"], c["lr"])), record["final_test_perplexity"]
    return None if b is None or ppl is None or not math.isfinite(ppl) else 100 * (ppl / b - 1)


def method_label(c: dict) -> str:
    return c["method"] + "".join(f" {k}={v}" for k, v in sorted(c["params"].items()))


def recipe_label(c: dict) -> str:
    """The exchange's settings in one cell."""
    exact = f"{c['warmup']} exact ({c['exact']})"
    if c["refresh_every"]:
        exact += f" + refresh every {c['refresh_every']}, gap x2 every {c['refresh_doubling']}"
    units = f"alpha {c['units_power']:g}" + (", lr units" if c.get("lr_units") else "")
    return f"{exact}; {c['message']}, {units}"


def groups(records: list[dict], keep, min_seeds: int = 1) -> list[list[dict]]:
    """Records with ``keep(config)``, grouped by configuration (all seeds), sorted; only
    configurations run on at least ``min_seeds`` seeds."""
    out: dict = {}
    for r in records:
        c = r["config"]
        if keep(c) and not is_plain(c):
            key = json.dumps({k: v for k, v in c.items() if k != "seed"}, sort_keys=True)
            out.setdefault(key, []).append(r)
    return [sorted(g, key=lambda r: r["config"]["seed"]) for _, g in sorted(out.items()) if len(g) >= min_seeds]


def table(runs_by_config: list[list[dict]], base: dict, before: dict | None = None) -> str:
    """One row per configuration: gap per seed, mean, verdict, both ratios."""
    head = "| method | exchange | steps | gap % per seed (s0, s1, s2) | mean | within 3 % | payload | sent |"
    if before is not None:
        head += " before: mean gap, ratio |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for runs in runs_by_config:
        c = runs[0]["config"]
        gaps = [gap_of(r, base) for r in runs]
        known = [g for g in gaps if g is not None]
        cells = ", ".join(f"{g:+.2f}" if g is not None else "-" for g in gaps)
        mean = f"{statistics.mean(known):+.2f}" if known else "-"
        verdict = ("yes" if max(known) <= 100 * PERPLEXITY_BOUND else "no") if known and len(known) == len(gaps) else "-"
        row = (f"| {method_label(c)} | {recipe_label(c)} | {c['steps']} | {cells} | {mean} | {verdict} "
               f"({len(runs)} seed{'s' if len(runs) > 1 else ''}) | "
               f"{statistics.mean(r['payload_ratio'] for r in runs):.1f}x | "
               f"{statistics.mean(r['sent_ratio'] for r in runs):.1f}x |")
        if before is not None:
            b = before.get((c["method"].removesuffix("+ef"), c["params"].get("ratio")))
            row += f" {b[0]:+.1f} %, {b[1]:.1f}x |" if b else " - |"
        lines.append(row)
    return "\n".join(lines)


def before_numbers(path: str = BEFORE) -> dict:
    """(compressor, ratio) -> (mean gap %, payload ratio) of the comparison's 400-step runs."""
    recs = [r for r in load(path) if r.get("task") == "stdlib-transformer"]
    base = {r["args"]["seed"]: r["final_test_perplexity"] for r in recs if r["compression"]["name"] == "none"}
    out: dict = {}
    for r in recs:
        key = (r["compression"]["name"], r["args"]["param"].get("ratio"))
        if key[0] != "none" and r["args"]["seed"] in base:
            out.setdefault(key, []).append((100 * (r["final_test_perplexity"] / base[r["args"]["seed"]] - 1),
                                            r["ratio"]))
    return {k: (statistics.mean(g for g, _ in v), statistics.mean(x for _, x in v)) for k, v in out.items()}


def sweep_matrix(records: list[dict], base: dict, steps: int = 400, seed: int = 0) -> str:
    """Warm-up length (columns) against method (rows), frozen-v momentum exchanges, one seed."""
    cells: dict = {}
    for r in records:
        c = r["config"]
        if (c["task"] != "stdlib-transformer" or c["steps"] != steps or c["seed"] != seed or c["refresh_every"]
                or c["message"] != "momentum" or c.get("lr_units") or is_plain(c)):
            continue
        g = gap_of(r, base)
        if g is not None:
            row = f"{method_label(c)}, alpha {c['units_power']:g}" + ("" if c["exact"] == "bf16" else f", {c['exact']}")
            cells.setdefault(row, {})[c["warmup"]] = f"{g:+.1f} ({r['payload_ratio']:.1f}x)"
    widths = sorted({w for row in cells.values() for w in row})
    lines = ["| method | " + " | ".join(f"w={w}" for w in widths) + " |", "|---" * (len(widths) + 1) + "|"]
    for row, by_w in sorted(cells.items()):
        if len(by_w) >= 3:
            lines.append(f"| {row} | " + " | ".join(by_w.get(w, "") for w in widths) + " |")
    return "\n".join(lines)


def _recipe_like(c: dict) -> bool:
    """A 1-bit-Adam-shaped run: bf16 warm-up, then v frozen for good, momentum messages."""
    return c["exact"] == "bf16" and not c["refresh_every"] and c["message"] == "momentum" and not c.get("lr_units")


def summary(records: list[dict], default_warmup: int) -> str:
    """Markdown sections (see the headings)."""
    base = baselines(records)
    tr = lambda c: c["task"] == "stdlib-transformer"  # noqa: E731
    plain = sorted((r for r in records if is_plain(r["config"])), key=lambda r: (r["config"]["task"],
                                                                                  r["config"]["steps"],
                                                                                  r["config"]["seed"]))
    check = "\n".join(f"- {r['config']['task']}, {r['config']['steps']} steps, lr {r['config']['lr']:g}, seed "
                       f"{r['config']['seed']}: perplexity {r['final_test_perplexity']:.4f}" +
                       (f", bit-identical to train_inprocess: {r['bit_identical_to_train_inprocess']}"
                        if "bit_identical_to_train_inprocess" in r else "") for r in plain)
    freeze_only = lambda c: c["method"] == "none" and c["exact"] == "none" and c["warmup"] < c["steps"]  # noqa: E731
    variants = lambda c: (tr(c) and c["steps"] == 400 and c["seed"] == 0 and not freeze_only(c)  # noqa: E731
                          and not (_recipe_like(c) and c["warmup"] in (20, 30, 40)))
    return "\n\n".join([
        "## Plain AdamW (the baselines)\n\nExact fp32 exchange every step through the prototype; "
        "`bit-identical` compares the final parameters with `launch.simulate.train_inprocess` "
        "(the comparison's AdamW run).\n\n" + check,
        f"## The recipe at 400 steps, 3 seeds (warm-up {default_warmup} steps)\n\n"
        "`before`: the same compressor in the comparison (`launch/results/inprocess-transformer400`: AdamW on "
        "the compressed gradient sum), mean gap over its 3 seeds and payload ratio.\n\n" +
        table(groups(records, lambda c: tr(c) and c["steps"] == 400 and c["warmup"] == default_warmup
                     and _recipe_like(c), min_seeds=3), base, before_numbers()),
        "## Warm-up length, 3 seeds\n\n" +
        table(groups(records, lambda c: tr(c) and c["steps"] == 400 and c["warmup"] in (20, 30, 40)
                     and (_recipe_like(c) or freeze_only(c)), min_seeds=3), base),
        "## Warm-up sweep, seed 0\n\nGap % (payload ratio over the run); `none ... , none`: exact fp32 "
        "exchange with v frozen after the warm-up (the cost of freezing alone).\n\n" + sweep_matrix(records, base),
        "## 4x the schedule (1600 steps, seed 0, warm-up 10 %)\n\n" +
        table(groups(records, lambda c: tr(c) and c["steps"] == 1600), base),
        "## Exchange variants, seed 0 (400 steps)\n\n" + table(groups(records, variants), base),
        "## The LSTM under AdamW\n\n" + table(groups(records, lambda c: c["task"] == "stdlib-lstm"), base),
    ])
