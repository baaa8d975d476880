"""The cost model (:mod:`hvdcomp.costs`) against measured step times, point by point.

    python -m bench.cost_model                                   # every record in bench/results/step_times
    python -m bench.cost_model --records bench/results/step_times/mlp_horovod_2ranks_50mbit_pinned.json
    python -m bench.cost_model --rule-of-thumb                   # break-even link rates, 2 to 1024 ranks
    python -m bench.cost_model --records steps.json --sweep sweep.json   # a cluster of your own

Calibration, from quantities measured on the machine only:

* compute: the slowest rank's median forward, backward and update without exchange, and
  when each gradient is ready in the backward pass (``bench.step_times``'s calibration, all
  ranks at once);
* per method and chain: the slowest rank's local seconds before each phase, its decode
  seconds and the bytes of every collective (the real chains on the model's gradients,
  :mod:`bench.step_ranks`);
* the link: ``bench.collectives_sweep``'s alpha and beta per collective (an fp16
  allreduce's apart, where the sweep has it: ``hvdcomp.costs.DTYPE_FITS``) on the same link,
  rank count and framework (``<sweeps>/link_<framework>_<N>ranks_<rate>.json``; a Horovod
  launch with another cycle time, ``..._cycle<T>ms.json``; ranks bound to a core each,
  ``..._pinned.json``); the bucket's credit is its
  burst / rate;
* where its record is beside the sweep (``loaded_<framework>_<N>ranks_<rate>....json``),
  ``bench.loaded_latency``'s small collectives with a busy process on every rank: the
  latency of each collective during the backward pass on ranks with under 2 cores each.

No step time enters the calibration. A method's bytes are the calibration's, times the
payload its timed steps handed over the payload of the calibration's step
(:func:`payload_ratio`: 1 unless the payload follows the data).

For each measured point the model's prediction,
its error (prediction / measured - 1), the 20th and 80th percentiles of its timed steps
(how far one launch's steps of one exchange spread), the bound (step without exchange +
the byte terms) and measured / bound are printed and written to ``<out>.json``; ``--plot`` draws step time
against link rate, measured points and the model's lines (``<out>.png``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import statistics
import sys
from pathlib import Path

from bench.compress_vs_backward import summarize
from bench.step_ranks import round_share
from bench.step_times import SCHEMA as STEP_TIMES_SCHEMA
from bench.step_times import default_cycle, loaded_name, record_variant, sweep_name
from hvdcomp import costs

DRIVERS = {"horovod": costs.HOROVOD, "ddp": costs.DDP}


def rate_name(link: dict | None) -> str:
    if not link or not link.get("rate_bits_per_s"):
        return "unshaped"
    return f"{link['rate_bits_per_s'] / 1e6:g}mbit"


def sweep_path(sweeps: Path, record: dict) -> Path:
    """The sweep of the record's link, rank count, framework, Horovod cycle time and ranks'
    binding (``--pin-ranks``)."""
    rate = record.get("rate") or rate_name(record["link"])
    return sweeps / sweep_name(record["framework"], record["world_size"], rate, record.get("horovod_cycle_time_ms"),
                               record.get("ranks_pinned", False))


def loaded_path(sweeps: Path, record: dict) -> Path:
    """The ``bench.loaded_latency`` record beside the record's sweep: ``loaded_`` for
    ``link_`` in the sweep's name."""
    path = sweep_path(sweeps, record)
    return path.with_name(loaded_name(path.name))


def read_loaded(path: Path, record: dict) -> dict | None:
    """The ``bench.loaded_latency`` record at ``path`` (None where there is none: the model
    then gives a collective during the backward pass its idle latency); it must be of the
    record's rank count."""
    if not path.exists():
        return None
    loaded = json.loads(path.read_text())
    if loaded["world_size"] != record["world_size"]:
        raise ValueError(f"{path} timed {loaded['world_size']} ranks, the record ran {record['world_size']}")
    return loaded


def link_of(sweep: dict, record: dict, loaded: dict | None = None) -> costs.Link:
    """The link from the sweep's fits; the credit cap is the bucket's burst / rate; the
    idle share is the traffic measured while no rank exchanged, over the rate; the loaded
    latencies are :func:`loaded_latencies`."""
    link = record.get("link") or {}
    rate = link.get("rate_bytes_per_s")
    cap = link["burst_bytes"] / rate if rate else 0.0
    idle = record["calibration_by_rank"][0]["local_step"].get("idle_wire_bytes_per_s") or 0.0
    fitted = costs.Link.from_fits(sweep["fits"], record["world_size"], cap, min(1.0, idle / rate) if rate else 0.0)
    return dataclasses.replace(fitted, on_rank_cores=collectives_on_rank_cores(record),
                               loaded_latency_s=loaded_latencies(loaded))


def loaded_latencies(loaded: dict | None) -> dict:
    """Per op, ``bench.loaded_latency``'s median with a busy process on every rank ({}:
    no record)."""
    return {op: timed["loaded_median_s"] for op, timed in (loaded or {}).get("ops", {}).items()}


def collectives_on_rank_cores(record: dict) -> bool:
    """Whether a collective is CPU work on the ranks' own cores: ``launch.link``'s loopback
    without a qdisc (no token bucket: the ranks' threads copy and reduce every byte)."""
    link = record.get("link") or {}
    return link.get("emulator") == "launch.link" and not link.get("rate_bytes_per_s")


def slowest(values) -> float:
    return max(values)


def cores_per_rank(record: dict) -> float:
    """Cores per rank where every rank ran on this one machine (under ``launch.link``,
    whose ``link`` the record holds): its cores (``machine`` reads "cpu (..., C cores)")
    over the ranks. On a cluster of one's own (no ``link``), a core per thread."""
    found = re.search(r"(\d+) cores", str(record.get("machine", "")))
    if not found or not record.get("link"):
        return math.inf
    return int(found.group(1)) / record["world_size"]


def compute_of(record: dict) -> costs.Compute:
    ranks = record["calibration_by_rank"]
    return costs.Compute(*(slowest(r["local_step"][k]["median"] for r in ranks) for k in ("forward", "backward", "update")),
                         cores=cores_per_rank(record), copy_s_per_byte=copy_s_per_byte(record))


def copy_s_per_byte(record: dict) -> float:
    """The slowest rank's seconds per byte copying its gradients into one buffer
    (``LocalStep``'s ``copy``); 0 for a record from before it was timed (copies free)."""
    steps = [r["local_step"] for r in record["calibration_by_rank"]]
    if not all("copy" in s and s.get("gradient_bytes") for s in steps):
        return 0.0
    return slowest(s["copy"]["median"] / s["gradient_bytes"] for s in steps)


def pads_to_largest(record: dict) -> bool:
    """Whether the record's transport pads an allgather of variable sizes to the largest
    rank's (``hvdcomp.ddp``: torch's all_gather needs equal sizes), so every rank sends
    the largest payload; Horovod's allgather sends each rank's own."""
    return record["framework"] == "ddp"


def chains_of(record: dict, label: str) -> list[costs.Chain]:
    """The method's chains, every time the slowest rank's; an allgather of variable sizes
    passes in the ranks' mean bytes, or the largest where the transport pads to it."""
    gathered = max if pads_to_largest(record) else statistics.fmean
    ranks = [r["calibration"][label] for r in record["calibration_by_rank"]]
    ready = [r["local_step"]["ready_s"] for r in record["calibration_by_rank"]]
    chains = []
    for order, per_rank in enumerate(zip(*(r["chains"] for r in ranks))):
        first = per_rank[0]
        # A record from before requests carried their dtype priced every sum as float32's.
        phases = tuple(tuple(costs.Collective(c["op"], gathered(c.get("bytes_by_rank") or [c["bytes"]]),
                                              c.get("dtype", "float32"))
                             for c in phase) for phase in first["phases"])
        local = tuple(slowest(ch["local_s"][k] for ch in per_rank) for k in range(len(phases)))
        when = slowest(r[name] for r in ready for name in first["tensors"] if name in r)
        chains.append(costs.Chain(phases, local, slowest(ch["decode_s"] for ch in per_rank), when, order))
    return chains


def steps_spread(steps_s: list[float]) -> dict:
    """The 20th and 80th percentiles of a row's timed steps (``summarize``'s, linear between
    order statistics): how far one launch's steps of one exchange spread around their median."""
    summary = summarize(steps_s)
    return {"steps_p20_s": summary["p20"], "steps_p80_s": summary["p80"]}


def round_medians(steps_s: list[float], rounds: int) -> list[float]:
    """The median of a row's timed steps in each round, in the order they ran, shared out
    over the rounds as ``bench.step_ranks.run_methods`` runs them (``round_share``)."""
    out, start = [], 0
    for r in range(rounds):
        share = round_share(len(steps_s), rounds, r)
        if share:
            out.append(statistics.median(steps_s[start:start + share]))
        start += share
    return out


def round_ratios(a: list[float] | None, b: list[float] | None) -> list[float] | None:
    """Row a's round median over row b's, less 1, round by round (None where a record does
    not say its rounds or the rows' rounds differ)."""
    if not a or not b or len(a) != len(b):
        return None
    return [x / y - 1 for x, y in zip(a, b)]


def paired_by_round(a: list[float] | None, b: list[float] | None) -> float | None:
    """The median over rounds of :func:`round_ratios`. Rows of one launch take turns in
    rounds, and the machine's speed can drift between rounds (docs/performance.md,
    `Compression.auto()` against its candidates); a ratio within each round leaves that
    drift out."""
    ratios = round_ratios(a, b)
    return None if ratios is None else statistics.median(ratios)


def middle_half_by_round(a: list[float] | None, b: list[float] | None) -> tuple[float, float] | None:
    """The first and third quartiles of :func:`round_ratios` (None under 4 rounds): how far
    one round's comparison of the two rows strays, the resolution of the median."""
    ratios = round_ratios(a, b)
    if ratios is None or len(ratios) < 4:
        return None
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return q1, q3


def within_spread(point: dict) -> bool:
    """Whether the prediction lies between the point's steps' 20th and 80th percentiles."""
    return point["steps_p20_s"] <= point["predicted_s"] <= point["steps_p80_s"]


def is_modelled(row: dict) -> bool:
    """A row the model predicts: one of ours, calibrated (not the framework's own exchange,
    not a selector measured only)."""
    return row.get("reference") is None and row.get("modelled", True)


def driver_of(record: dict) -> costs.Driver:
    """The record's transport as the model runs it: Horovod without tensor fusion where the
    ranks ran with ``HOROVOD_FUSION_THRESHOLD=0``."""
    driver = DRIVERS[record["framework"]]
    if record.get("horovod_fusion_threshold_bytes") == 0:
        return dataclasses.replace(driver, fuse=False)
    return driver


def predict_record(record: dict, sweep: dict, loaded: dict | None = None) -> list[dict]:
    """Every modelled row of a step_times record: measured, predicted, error, bound."""
    link = link_of(sweep, record, loaded)
    compute = compute_of(record)
    driver = driver_of(record)
    out = []
    for row in record["rows"]:
        point = {"model": record["model"], "framework": record["framework"], "ranks": record["world_size"],
                 "rate": rate_name(record["link"]), "variant": record_variant(record), "label": row["label"],
                 "measured_s": row["median_s"], "reference": row.get("reference"),
                 **steps_spread(row["steps_s"]),
                 # Records since the methods' order turns from round to round say their rounds.
                 "round_medians_s": (round_medians(row["steps_s"], len(record["round_orders"]))
                                     if "round_orders" in record else None)}
        if is_modelled(row):
            ratio = payload_ratio(record, row)
            chains = [scaled_bytes(ch, ratio) for ch in chains_of(record, row["label"])]
            pred = costs.predict_step(compute, chains, link, driver)
            bound = costs.bound_s(compute, chains, link)
            point.update(predicted_s=pred.step_s, error=pred.step_s / row["median_s"] - 1, bound_s=bound,
                         over_bound=row["median_s"] / bound, network_s=pred.network_s, local_s=pred.local_s,
                         payload_ratio=ratio)
        out.append(point)
    return out


def payload_ratio(record: dict, row: dict) -> float:
    """The payload the row's timed steps handed over the payload its calibration's step
    handed: a step's median over the timed steps (each step's the mean of the fewest and
    the most any rank handed) over the mean of the ranks' calibrations; where the transport
    pads to the largest payload (:func:`pads_to_largest`), the most any rank handed over
    the largest calibration. 1 for a record from before either was kept.

    The calibration records one step from fresh state. Where a method's payload follows the
    data (AdaComp sends what its residual and the gradient make worth sending, DGC what
    passes its sampled threshold), the timed steps hand other bytes; the model prices the
    bytes they handed, as issue 24's bound does. A payload fixed by the method's settings
    gives 1."""
    handed = row.get("payload_bytes_per_step")
    calibrated = [r["calibration"][row["label"]].get("payload_bytes") for r in record["calibration_by_rank"]]
    if not handed or not handed["max"] or None in calibrated or not all(calibrated):
        return 1.0
    if pads_to_largest(record):
        return statistics.median(handed["max"]) / max(calibrated)
    steps = statistics.median((lo + hi) / 2 for lo, hi in zip(handed["min"], handed["max"]))
    return steps / statistics.fmean(calibrated)


def scaled_bytes(chain: costs.Chain, ratio: float) -> costs.Chain:
    """``chain`` with every collective's bytes times ``ratio``."""
    if ratio == 1.0:
        return chain
    return dataclasses.replace(chain, phases=tuple(tuple(dataclasses.replace(c, nbytes=c.nbytes * ratio) for c in ph)
                                                   for ph in chain.phases))


def line_link(entries: list, rate_bytes_per_s: float) -> costs.Link:
    """The link of the model's line at any rate: launch.link's one bucket (beta = N / R,
    the burst's seconds of credit, the measured idle traffic's share), each collective's
    latency from the sweep of the slowest shaped link measured (``entries``: (record,
    sweep) pairs of one model, framework and rank count)."""
    shaped = [e for e in entries if (e[0].get("link") or {}).get("rate_bytes_per_s")] or entries
    record, sweep = min(shaped, key=lambda e: (e[0].get("link") or {}).get("rate_bytes_per_s") or math.inf)
    alphas = {op: f["alpha_s"] for op, f in sweep["fits"].items() if f.get("alpha_s") is not None}
    burst = (record.get("link") or {}).get("burst_bytes") or 262144
    idle = record["calibration_by_rank"][0]["local_step"].get("idle_wire_bytes_per_s") or 0.0
    base = costs.Link.shared_bucket(rate_bytes_per_s, burst, record["world_size"], alphas)
    return costs.Link(base.fits, base.nranks, base.credit_cap_s, min(1.0, idle / rate_bytes_per_s))


def effective_rate(sweep: dict, nranks: int) -> float:
    """An unshaped loopback's rate as the shared bucket's formula reads it: N / beta of
    the allreduce fit (memory copies and the reduction on the machine's cores)."""
    return nranks / sweep["fits"]["allreduce"]["beta_s_per_byte"]


def plot(groups: dict, path: Path) -> str | None:
    """Step time against link rate per (model, transport, ranks): measured points (the
    unshaped loopback at its effective rate) and the model's lines (launch.link's bucket
    at every rate; the unshaped point from its own sweep)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no chart"
    keys = sorted(groups)
    cols = min(4, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    colours = {}
    for ax, key in zip(axes.flat, keys):
        model, framework, nranks, variant = key
        entries = groups[key]  # [(record, sweep, points)]
        template = entries[0][0]
        compute = compute_of(template)
        rates = [10 ** (6 + k / 8) for k in range(0, 33)]  # 1 MB/s .. 10 GB/s
        for label in [r["label"] for r in template["rows"] if is_modelled(r)]:
            colour = colours.setdefault(label, f"C{len(colours) % 10}")
            chains = chains_of(template, label)
            line = [costs.predict_step(compute, chains, line_link([e[:2] for e in entries], r),
                                       DRIVERS[framework]).step_s for r in rates]
            ax.plot([r * 8 / 1e6 for r in rates], line, color=colour, linewidth=0.9,
                    linestyle="--" if label.startswith(("dgc", "bf16")) else "-", label=label)
            for record, sweep, points in entries:
                link = record.get("link") or {}
                rate = link.get("rate_bytes_per_s") or effective_rate(sweep, nranks)
                for p in points:
                    if p["label"] == label:
                        ax.plot(rate * 8 / 1e6, p["measured_s"], "o", color=colour, markersize=4)
                        ax.plot(rate * 8 / 1e6, p["predicted_s"], "x", color=colour, markersize=5)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("link rate, Mbit/s (unshaped: effective)")
        ax.set_ylabel("step, s")
        ax.set_title(f"{model}, {framework}{' ' + variant if variant else ''}, {nranks} ranks", fontsize=9)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=6)
    fig.suptitle("step time against link rate: measured (o), predicted at the measured point (x), "
                 "the model's line", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return None


# ---- rule of thumb ----------------------------------------------------------------------------

RULE_RANKS = [2, 4, 8, 16, 64, 256, 1024]
RULE_PARAMS = [6_316_042, 100_000_000]


def one_core(record: dict) -> float:
    """What turns a time calibrated with every rank of ``record`` busy at once into one
    core's: its cores per rank, at most 1 (4 ranks on 2 cores each ran on half a core)."""
    return min(1.0, cores_per_rank(record))


def gathers(chain: costs.Chain) -> bool:
    """Whether the chain's decode reads one payload per rank (an allgather in it)."""
    return any(c.op == "allgather" for phase in chain.phases for c in phase)


def scaled_chains(by_ranks: dict, label: str, nranks: int, params: int) -> list[costs.Chain]:
    """A method's chains for ``params`` parameters on ``nranks`` ranks, one core per rank,
    from its calibration on the measured rank counts (``by_ranks``: N -> record): bytes and
    local times scale with the parameters; each record's times are taken to one core's
    (:func:`one_core`); the decode time of a chain that gathers one payload per rank is
    interpolated linearly in N, clamped at the measured ends' slope (others do not depend on
    N); allgather payload sizes per rank do not depend on N."""
    ns = sorted(by_ranks)
    lo, hi = by_ranks[ns[0]], by_ranks[ns[-1]]
    scale = params / lo["parameters"]
    low, high = chains_of(lo, label), chains_of(hi, label)
    out = []
    for a, b in zip(low, high):
        low_decode, high_decode = a.decode_s * one_core(lo), b.decode_s * one_core(hi)
        slope = 0.0
        if ns[-1] > ns[0] and gathers(a):
            slope = max(0.0, (high_decode - low_decode) / (ns[-1] - ns[0]))
        decode = max(0.0, low_decode + slope * (nranks - ns[0]))
        out.append(costs.Chain(scaled_bytes(a, scale).phases, tuple(x * scale * one_core(lo) for x in a.local_s),
                               decode * scale, a.ready_s * scale, a.main_order))
    return out


def projected_compute(record: dict, scale: float) -> costs.Compute:
    """The record's step without exchange for ``scale`` times its parameters, on hosts with a
    core per thread: forward, backward and update scaled, the copy rate per byte kept."""
    compute = compute_of(record)
    return costs.Compute(compute.forward_s * scale, compute.backward_s * scale, compute.update_s * scale,
                         copy_s_per_byte=compute.copy_s_per_byte)


def break_even_rate(by_ranks: dict, sweep: dict, label: str, nranks: int, params: int) -> float | None:
    """The link rate (bytes/s per host and direction, one rank per host) below which
    ``label`` makes a step faster than uncompressed, by bisection on the model; None when
    it never does (down to 1 Mbit/s), inf when it always does (up to 10 Tbit/s)."""
    record = by_ranks[min(by_ranks)]
    scale = params / record["parameters"]
    compute = projected_compute(record, scale)
    alphas = {op: f["alpha_s"] for op, f in sweep["fits"].items() if f.get("alpha_s") is not None}
    mine, none = scaled_chains(by_ranks, label, nranks, params), scaled_chains(by_ranks, "none", nranks, params)

    def gain(rate: float) -> float:
        link = costs.Link.full_duplex(rate, nranks, alphas)
        return (costs.predict_step(compute, none, link).step_s - costs.predict_step(compute, mine, link).step_s)

    lo, hi = 1e6 / 8, 1e13 / 8
    if gain(lo) <= 0:
        return None
    if gain(hi) > 0:
        return math.inf
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if gain(mid) > 0 else (lo, mid)
    return lo


def rule_records(records: list[dict]) -> dict[int, dict]:
    """The records the rule of thumb reads, by rank count: the communication-bound model on
    Horovod at 50mbit and Horovod's default cycle, a launch with pinned ranks preferred where
    both exist (its steps repeat)."""
    usable = [r for r in records if r["framework"] == "horovod" and r["model"] == "mlp"
              and (r.get("rate") or rate_name(r["link"])) == "50mbit"
              and default_cycle(r.get("horovod_cycle_time_ms"))]
    return {r["world_size"]: r for r in sorted(usable, key=lambda r: bool(r.get("ranks_pinned")))}


def rule_of_thumb(records: list[dict], sweeps: Path) -> tuple[dict, str]:
    """Break-even rates for every method, rank count and model size (:func:`rule_records`;
    see :func:`break_even_rate`)."""
    mlp = rule_records(records)
    if not mlp:
        raise SystemExit("the rule of thumb needs bench.step_times records of mlp on Horovod at 50mbit")
    sweep = json.loads(sweep_path(sweeps, mlp[min(mlp)]).read_text())
    labels = [r["label"] for r in mlp[min(mlp)]["rows"] if is_modelled(r) and r["label"] != "none"]
    table, lines = {}, []
    for params in RULE_PARAMS:
        lines.append(f"break-even link rate, Gbit/s per host (compression wins below it), {params / 1e6:.1f} M "
                     f"parameters, this machine's CPU compress/decode times, one rank per host:")
        lines.append(f"{'method':<18}" + "".join(f"{'N=' + str(n):>10}" for n in RULE_RANKS))
        for label in labels:
            cells = []
            for n in RULE_RANKS:
                rate = break_even_rate(mlp, sweep, label, n, params)
                table[(label, n, params)] = rate
                cells.append("never" if rate is None else "always" if rate == math.inf else f"{rate * 8 / 1e9:.3g}")
            lines.append(f"{label:<18}" + "".join(f"{c:>10}" for c in cells))
        lines.append("")
    return {f"{k[0]}|{k[1]}|{k[2]}": v for k, v in table.items()}, "\n".join(lines)


def launch_of(p: dict) -> str:
    """A point's rate and, where its launch differs from the defaults, that difference."""
    return f"{p['rate']} {p['variant']}" if p.get("variant") else p["rate"]


def format_points(points: list[dict]) -> str:
    head = (f"{'model':<6}{'fw':<8}{'N':>2} {'rate':<9}{'method':<32}{'measured ms':>12}{'p20-p80 ms':>17}"
            f"{'predicted':>11}{'error':>8}{'bound ms':>10}{'x bound':>8}")
    lines = [head, "-" * len(head)]
    for p in points:
        launch = f"{launch_of(p):<9}{' ' if p.get('variant') else ''}"
        if p.get("predicted_s") is None:
            lines.append(f"{p['model']:<6}{p['framework']:<8}{p['ranks']:>2} {launch}{p['label']:<32}"
                         f"{p['measured_s'] * 1e3:>12.1f}{'(reference)' if p.get('reference') else '(measured)':>11}")
            continue
        spread = f"{p['steps_p20_s'] * 1e3:.1f}-{p['steps_p80_s'] * 1e3:.1f}"
        lines.append(f"{p['model']:<6}{p['framework']:<8}{p['ranks']:>2} {launch}{p['label']:<32}"
                     f"{p['measured_s'] * 1e3:>12.1f}{spread:>17}{p['predicted_s'] * 1e3:>11.1f}{p['error']:>8.1%}"
                     f"{p['bound_s'] * 1e3:>10.1f}{p['over_bound']:>8.2f}")
    modelled = [p for p in points if p.get("error") is not None]
    if modelled:
        misses = [p for p in modelled if abs(p["error"]) > 0.15]
        lines.append(f"{len(modelled)} modelled points; |error| <= 15 % at {len(modelled) - len(misses)}; "
                     f"largest {max(abs(p['error']) for p in modelled):.1%}; of the {len(misses)} beyond 15 %, "
                     f"{sum(map(within_spread, misses))} predicted within their steps' p20-p80")
    return "\n".join(lines)


def auto_against_fixed(points: list[dict]) -> str:
    """Per measured (model, framework, ranks, rate) with an ``auto`` row: its step against
    the fastest of its default candidates (none, bf16) and against uncompressed, as the
    ratio of the rows' medians and, where the record says its rounds, paired by round
    (:func:`paired_by_round`), with the quartiles of the rounds' ratios against uncompressed
    (:func:`middle_half_by_round`)."""
    groups: dict = {}
    for p in points:
        groups.setdefault((p["model"], p["framework"], p["ranks"], launch_of(p)), {})[p["label"]] = p
    lines = []

    def paired(a: dict, b: dict) -> str:
        ratio = paired_by_round(a.get("round_medians_s"), b.get("round_medians_s"))
        return "-" if ratio is None else f"{ratio:+.1%}"

    def middle_half(a: dict, b: dict) -> str:
        quartiles = middle_half_by_round(a.get("round_medians_s"), b.get("round_medians_s"))
        return "-" if quartiles is None else f"{quartiles[0]:+.1%}..{quartiles[1]:+.1%}"

    for (model, fw, n, rate), by in sorted(groups.items()):
        if "auto" not in by or "none" not in by or "bf16" not in by:
            continue
        auto, none = by["auto"], by["none"]
        best = min(none, by["bf16"], key=lambda p: p["measured_s"])
        lines.append(f"{model:<6}{fw:<8}{n:>2} {rate:<9}{none['measured_s'] * 1e3:>10.1f}"
                     f"{by['bf16']['measured_s'] * 1e3:>10.1f}{auto['measured_s'] * 1e3:>10.1f}"
                     f"{auto['measured_s'] / best['measured_s'] - 1:>+15.1%}{auto['measured_s'] / none['measured_s'] - 1:>+11.1%}"
                     f"{paired(auto, best):>18}{paired(auto, none):>18}{middle_half(auto, none):>20}")
    if not lines:
        return ""
    head = (f"{'model':<6}{'fw':<8}{'N':>2} {'rate':<9}{'none ms':>10}{'bf16 ms':>10}{'auto ms':>10}"
            f"{'vs best fixed':>15}{'vs none':>11}{'by round vs best':>18}{'by round vs none':>18}"
            f"{'rounds q1..q3':>20}")
    return "Compression.auto() against its candidates (measured):\n" + "\n".join([head, "-" * len(head), *lines])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.cost_model", description=__doc__.split("\n\n")[0])
    p.add_argument("--records", nargs="+", help="bench.step_times records (default: every one in --dir)")
    p.add_argument("--dir", default="bench/results/step_times")
    p.add_argument("--sweeps", default="bench/results/collectives",
                   help="bench.collectives_sweep records, found by framework, ranks and rate")
    p.add_argument("--sweep", default=None, help="one bench.collectives_sweep record for every record")
    p.add_argument("--loaded", default=None,
                   help="one bench.loaded_latency record for every record (default: loaded_<...>.json beside "
                        "each record's sweep in --sweeps, where there is one)")
    p.add_argument("--out", default="bench/results/cost_model.json")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--rule-of-thumb", action="store_true",
                   help="also: break-even link rates for 2 to 1024 ranks from the model")
    args = p.parse_args(argv)
    # Only bench.step_times records: the folder may hold other files (qdisc reports, notes).
    paths = [Path(x) for x in args.records] if args.records else sorted(Path(args.dir).glob("*.json"))
    records = [(path, json.loads(path.read_text())) for path in paths]
    if not args.records:
        records = [(path, r) for path, r in records if r.get("schema") == STEP_TIMES_SCHEMA]
    paths = [path for path, _ in records]
    points, groups = [], {}
    for path, record in records:
        sweep = json.loads(Path(args.sweep or sweep_path(Path(args.sweeps), record)).read_text())
        loaded = read_loaded(Path(args.loaded) if args.loaded else loaded_path(Path(args.sweeps), record), record)
        mine = predict_record(record, sweep, loaded)
        points += mine
        groups.setdefault((record["model"], record["framework"], record["world_size"], record_variant(record)),
                          []).append(
            (record, sweep, mine))
    table = format_points(points)
    selectors = auto_against_fixed(points)
    if selectors:
        table += "\n\n" + selectors
    if not args.no_plot:
        note = plot(groups, Path(args.out).with_suffix(".png"))
        print(note or f"chart: {Path(args.out).with_suffix('.png')}")
    from bench._record import emit

    result = {"command": " ".join(["python -m bench.cost_model", *(sys.argv[1:] if argv is None else argv)]),
              "records": [str(x) for x in paths], "points": points}
    if args.rule_of_thumb:
        result["rule_of_thumb"], rule = rule_of_thumb([e[0] for g in groups.values() for e in g], Path(args.sweeps))
        table += "\n\n" + rule
    emit(result, table, args.out)
    return result


if __name__ == "__main__":
    main()
