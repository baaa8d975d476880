"""Projected step time and speed-up over uncompressed allreduce, for N = 8 ... 1024 ranks.

    python -m bench.scaling --from results/compress_vs_backward_resnet50_cuda.json
    python -m bench.scaling --validate            # 2 real Gloo ranks on this machine (needs Horovod)

Inputs come from bench/compress_vs_backward.py's JSON: forward/backward time ``T_f``,
``T_b``; per method the compress time ``T_c`` of one rank's step and the decode time, and
the bytes of each kind of payload per rank per step. Nothing else is measured here.

Model, per rank and step (``B`` the link bandwidth in bytes/s, ``alpha`` the per-message
latency, ``S`` the dense fp32 gradient bytes, ``F`` the Horovod fusion buffer):

=========================  ==================================  =================================
exchange                   bytes received per rank             latency per collective
=========================  ==================================  =================================
uncompressed allreduce     ``2 (N-1)/N * S``                   ``2 (N-1) alpha`` x ceil(S/F)
dense payload allreduce    ``2 (N-1)/N * S_d``                 ``2 (N-1) alpha`` x ceil(S_d/F)
  (fp16, random-k, small uncompressed tensors, ScaleCom's k values)
ScaleCom index broadcast   ``4k`` (every rank receives once)   ``ceil(log2 N) alpha`` per tensor
allgather (packed)         ``(N-1) * S_c``                     ``(N-1) alpha`` x 2 per bucket
                                                               (sizes + payload)
compressed allreduce       ``(N-1)/N * (S + S')``              ``(N-1) alpha`` x 2 per bucket
  (alltoall + allgather)   ``S' = numel * sum_bits(N) / 8``    (alltoall + allgather)
TernGrad shared scale      (a few bytes)                       ``2 (N-1) alpha`` per bucket
=========================  ==================================  =================================

The latency column is the ring algorithm's (``--latency ring``, default); ``--latency tree``
uses ``2 ceil(log2 N) alpha`` for allreduce and ``ceil(log2 N) alpha`` for allgather (recursive
doubling); alltoall stays ``(N-1) alpha``.

    T_comm(N) = bytes(N) / B + latency(N)
    T_dec(N)  = allreduce part + compressed-allreduce part   (do not grow with N)
                + allgather part, linear in N through the times measured with 2 and N0 payloads
    serial    T(N) = T_f + T_b + T_c + T_comm(N) + T_dec(N)          (default; an upper bound)
    overlap   T(N) = T_f + max(T_b, T_c + T_comm(N)) + T_dec(N)      (--overlap; a lower bound)
    speed-up  = T_uncompressed(N) / T(N),  T_uncompressed with T_c = T_dec = 0

The optimizer update is left out (the same for every method). Links: 10/25/100/400 Gb/s,
``B = Gb/s * 1e9 / 8``. ``--validate`` checks the model against real runs: 2-4 Gloo ranks
on this machine (``horovod.run``), a small CNN, ``hvdcomp.DistributedOptimizer``. Each rank
times its own compress/decode/forward/backward (bench.compress_vs_backward, reference
kernels, N payloads), a sweep of plain allreduces (the uncompressed exchange) to which
``t(S) = 2(N-1) alpha + 2(N-1)/N S / B`` is fitted, then real training steps per method
(the methods take turns, three rounds); the report gives predicted against measured step
time and the error, raw and "calibrated": the uncompressed run's own misfit (Horovod's
per-step overhead, its background thread competing for the cores) added to every method.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

from bench._ranks import run_on_ranks

DEFAULT_NS = [8, 16, 32, 64, 128, 256, 512, 1024]
DEFAULT_LINKS_GBPS = [10.0, 25.0, 100.0, 400.0]
DEFAULT_ALPHA_US = 10.0
DEFAULT_FUSION_MB = 128.0  # Horovod's HOROVOD_FUSION_THRESHOLD default


# ---- formulas ------------------------------------------------------------------------------------


def allreduce_bytes(nbytes: float, n: int) -> float:
    """Bytes each rank receives (and sends) in a ring allreduce of ``nbytes``."""
    return 2.0 * (n - 1) / n * nbytes


def allgather_bytes(payload: float, n: int) -> float:
    """Bytes each rank receives when each of ``n`` ranks contributes ``payload`` bytes."""
    return (n - 1) * payload


def compressed_allreduce_bytes(numel: int, bits: int, sum_bits: int, n: int) -> float:
    """Bytes each rank receives by compressed allreduce: ``(N-1)/N (S + S')``."""
    return (n - 1) / n * numel * (bits + sum_bits) / 8.0


def scalecom_bytes(k: int, n: int, value_bytes: int = 4) -> float:
    """ScaleCom per tensor: allreduce of k values plus a broadcast of k int32 indices."""
    return allreduce_bytes(value_bytes * k, n) + 4.0 * k


def latency_steps(collective: str, n: int, mode: str = "ring") -> int:
    """Message steps (each costing alpha) of one collective among ``n`` ranks."""
    if n <= 1:
        return 0
    log = math.ceil(math.log2(n))
    if collective == "allreduce":
        return 2 * (n - 1) if mode == "ring" else 2 * log
    if collective == "allgather":
        return (n - 1) if mode == "ring" else log
    if collective == "alltoall":
        return n - 1
    if collective == "broadcast":
        return log
    raise ValueError(f"unknown collective {collective!r}")


def sum_bits_at(wire: dict, n: int) -> int:
    table = wire.get("car_sum_bits") or {}
    if str(n) not in table:
        raise ValueError(f"the benchmark JSON has no re-encoded sum width for N={n} (has {sorted(table, key=int)})")
    return int(table[str(n)])


def comm_model(wire: dict, n: int, fusion_bytes: float, mode: str = "ring") -> tuple[float, dict]:
    """(bytes received per rank, {collective: count of alpha steps}) for one step of a method
    whose per-rank wire figures are ``wire`` (see bench.one_rank.OneRankOfN.wire)."""
    moved = allreduce_bytes(wire["allreduce_bytes"], n)
    steps = {}
    if wire["allreduce_bytes"]:
        steps["allreduce"] = math.ceil(wire["allreduce_bytes"] / fusion_bytes) * latency_steps("allreduce", n, mode)
    if wire.get("broadcasts"):
        moved += wire["broadcast_bytes"] if n > 1 else 0.0
        steps["broadcast"] = wire["broadcasts"] * latency_steps("broadcast", n, mode)
    if wire.get("allgather_buckets"):
        moved += allgather_bytes(wire["allgather_bytes"], n)
        steps["allgather"] = 2 * wire["allgather_buckets"] * latency_steps("allgather", n, mode)
    if wire.get("car_buckets"):
        moved += compressed_allreduce_bytes(wire["car_numel"], wire["car_bits"], sum_bits_at(wire, n), n)
        steps["alltoall+allgather"] = wire["car_buckets"] * (latency_steps("alltoall", n, mode)
                                                            + latency_steps("allgather", n, mode))
    if wire.get("scale_allreduces"):
        steps["scale allreduce"] = wire["scale_allreduces"] * latency_steps("allreduce", n, mode)
    return moved, steps


def decode_at(row: dict, n: int, n0: int) -> float:
    """Decode time (ms) with ``n`` ranks from the times measured with ``n0`` (and 2) payloads."""
    parts = row["decode_ms"]
    t = sum(v["median"] for k, v in parts.items() if k in ("allreduce", "compressed_allreduce"))
    if "allgather" in parts:
        t_n0 = parts["allgather"]["median"]
        t_2 = parts.get("allgather@2", parts["allgather"])["median"]
        slope = max(0.0, (t_n0 - t_2) / (n0 - 2)) if n0 > 2 else t_n0 / max(n0, 1)
        t += max(t_n0 + slope * (n - n0), t_2 if n >= 2 else 0.0)
    return t


def step_time(fwd_ms: float, bwd_ms: float, compress_ms: float, decode_ms: float, comm_bytes: float,
              alpha_steps: int, link_gbps: float, alpha_us: float, overlap: bool = False) -> dict:
    """Projected step time (ms) and its parts."""
    comm = comm_bytes / (link_gbps * 1e9 / 8) * 1e3 + alpha_steps * alpha_us * 1e-3
    if overlap:
        total = fwd_ms + max(bwd_ms, compress_ms + comm) + decode_ms
    else:
        total = fwd_ms + bwd_ms + compress_ms + comm + decode_ms
    return {"step_ms": total, "comm_ms": comm, "compress_ms": compress_ms, "decode_ms": decode_ms}


def uncompressed_wire(dense_bytes: int) -> dict:
    return {"allreduce_bytes": dense_bytes, "broadcasts": 0, "allgather_buckets": 0, "car_buckets": 0}


def pick_rows(record: dict, backend: str | None) -> list[dict]:
    """One row per method (label + collective): ``backend`` if measured, else triton, else
    reference, else the baselines' torch."""
    order = [backend] if backend else []
    order += ["triton", "reference", "torch"]
    chosen: dict[tuple, dict] = {}
    for row in record["rows"]:
        key = (row["label"], row["transport"])
        have = chosen.get(key)
        if have is None or order.index(row["backend"]) < order.index(have["backend"]):
            chosen[key] = row
    return list(chosen.values())


def project(record: dict, ns: list[int], links: list[float], alpha_us: float, fusion_mb: float,
            mode: str = "ring", overlap: bool = False, backend: str | None = None) -> dict:
    """Step time and speed-up of every method for every N and link."""
    fwd, bwd = record["forward_ms"]["median"], record["backward_ms"]["median"]
    n0 = record["nranks"]
    fusion = fusion_mb * 2**20
    rows = pick_rows(record, backend)
    dense = rows[0]["dense_bytes"] if rows else 0
    out = {"uncompressed": {}, "methods": []}
    for link in links:
        for n in ns:
            moved, steps = comm_model(uncompressed_wire(dense), n, fusion, mode)
            out["uncompressed"][f"{link:g}/{n}"] = {"bytes": moved, **step_time(
                fwd, bwd, 0.0, 0.0, moved, sum(steps.values()), link, alpha_us, overlap)}
    for row in rows:
        entry = {"label": row["label"], "backend": row["backend"], "transport": row["transport"], "points": {}}
        for link in links:
            for n in ns:
                moved, steps = comm_model(row["wire"], n, fusion, mode)
                t = step_time(fwd, bwd, row["compress_ms"]["median"], decode_at(row, n, n0), moved,
                              sum(steps.values()), link, alpha_us, overlap)
                base = out["uncompressed"][f"{link:g}/{n}"]["step_ms"]
                entry["points"][f"{link:g}/{n}"] = {"bytes": moved, "alpha_steps": steps, **t,
                                                    "speedup": base / t["step_ms"]}
        out["methods"].append(entry)
    return out


def format_projection(record: dict, proj: dict, ns: list[int], links: list[float], args_line: str) -> str:
    lines = [f"{record['model']} on {record['device_name']}: forward {record['forward_ms']['median']:.2f} ms, "
             f"backward {record['backward_ms']['median']:.2f} ms, dense {proj_dense(record) / 1e6:.1f} MB; {args_line}"]
    for link in links:
        lines.append("")
        lines.append(f"link {link:g} Gb/s: speed-up over uncompressed ring allreduce (uncompressed step ms below)")
        head = f"{'method':<22}{'kernels':<10}{'collective':<21}" + "".join(f"{'N=' + str(n):>9}" for n in ns)
        lines.append(head)
        lines.append("-" * len(head))
        lines.append(f"{'uncompressed (ms)':<53}" + "".join(
            f"{proj['uncompressed'][f'{link:g}/{n}']['step_ms']:>9.1f}" for n in ns))
        for m in proj["methods"]:
            lines.append(f"{m['label']:<22}{m['backend']:<10}{m['transport']:<21}" + "".join(
                f"{m['points'][f'{link:g}/{n}']['speedup']:>9.2f}" for n in ns))
    return "\n".join(lines)


def proj_dense(record: dict) -> int:
    return record["rows"][0]["dense_bytes"] if record["rows"] else 0


def plot(proj: dict, ns: list[int], links: list[float], path: Path, title: str) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no chart (pip install -r launch/requirements.txt)"
    cols = min(2, len(links))
    rows = math.ceil(len(links) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.2 * rows), squeeze=False)
    for ax, link in zip(axes.flat, links):
        for i, m in enumerate(proj["methods"]):
            ax.plot(ns, [m["points"][f"{link:g}/{n}"]["speedup"] for n in ns], marker=".",
                    linestyle=("-", "--", ":", "-.")[i // 10 % 4],
                    label=f"{m['label']} [{m['backend']}, {m['transport']}]")
        ax.axhline(1.0, color="k", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("ranks N")
        ax.set_ylabel("speed-up over uncompressed")
        ax.set_title(f"{link:g} Gb/s", fontsize=9)
    for ax in list(axes.flat)[len(links):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.legend(handles, labels, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return None


# ---- validation on real Gloo ranks ------------------------------------------------------------------

#: (label, compressor, params, collective) trained for real by --validate
VALIDATE_CONFIGS = [
    ("none", "none", {}, "auto"),
    ("fp16", "fp16", {}, "auto"),
    ("topk 1%", "topk", {"ratio": 0.01}, "auto"),
    ("scalecom 1%", "scalecom", {"ratio": 0.01}, "auto"),
]
FIT_SIZES = [256, 4096, 65536, 262144, 1048576]  # fp32 elements


def fit_link(sizes_bytes: list[float], times_ms: list[float], n: int) -> tuple[float, float]:
    """Least-squares ``t = 2(N-1) alpha + 2(N-1)/N S / B``: returns (alpha in us, B in Gb/s)."""
    xs = [allreduce_bytes(s, n) for s in sizes_bytes]
    mx, my = statistics.fmean(xs), statistics.fmean(times_ms)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, times_ms)) / sum((x - mx) ** 2 for x in xs)
    intercept = my - slope * mx
    alpha_us = max(intercept, 0.0) * 1e3 / latency_steps("allreduce", n)
    gbps = 8 / (slope * 1e-3) / 1e9 if slope > 0 else float("inf")
    return alpha_us, gbps


def _validate_worker(configs: list, steps: int, warmup: int, reps: int, batch: int, threads: int) -> dict:
    """On every rank: local timings (bench.compress_vs_backward), an allreduce sweep, and real
    training steps through hvdcomp.DistributedOptimizer for each config."""
    import horovod.torch as hvd
    import torch

    import hvdcomp
    from bench import compress_vs_backward as cvb
    from bench.models import get_model

    hvd.init()
    torch.set_num_threads(threads)
    os.environ["HVDCOMP_KERNELS"] = "reference"
    n = hvd.size()
    cfgs = [cvb.Config(label, name, params, coll) for label, name, params, coll in configs]
    local = cvb.run_benchmark("small", "cpu", batch, n, ["reference"], reps=reps, warmup=warmup, baselines=False,
                              configs=cfgs, log=lambda s: None)
    spec = get_model("small")

    # the optimizer update, local and uncompressed (added to the prediction)
    torch.manual_seed(0)
    model = spec.build()
    data = spec.batch(batch, "cpu")
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    spec.loss(model, data).backward()
    samples = []
    for _ in range(warmup + reps):
        t = time.perf_counter()
        opt.step()
        samples.append((time.perf_counter() - t) * 1e3)
    opt_ms = statistics.median(samples[warmup:])

    # uncompressed exchange: sweep of plain allreduces
    sweep = []
    for size in FIT_SIZES:
        x = torch.ones(size)
        ts = []
        for i in range(warmup + reps):
            hvd.allreduce(torch.zeros(1), name="barrier", op=hvd.Sum)
            t = time.perf_counter()
            hvd.allreduce(x, name=f"fit{size}", op=hvd.Sum)
            ts.append((time.perf_counter() - t) * 1e3)
        sweep.append((4 * size, statistics.median(ts[warmup:])))

    # real steps; the methods take turns in rounds so that load drifts hit them alike
    runs = {}
    for label, name, params, coll in configs:
        torch.manual_seed(0)
        model = spec.build()
        opt = hvdcomp.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
                                           named_parameters=model.named_parameters(),
                                           compression=hvdcomp.compression_from_name(name, **params),
                                           collective=coll)
        runs[f"{label}|{coll}"] = (model, opt, [])
    data = spec.batch(batch, "cpu")
    rounds = 3
    for rnd in range(rounds):
        for key, (model, opt, ts) in runs.items():
            for i in range((warmup if rnd == 0 else 0) + max(1, steps // rounds)):
                hvd.allreduce(torch.zeros(1), name="barrier", op=hvd.Sum)
                t = time.perf_counter()
                opt.zero_grad()
                spec.loss(model, data).backward()
                opt.step()
                if rnd > 0 or i >= warmup:
                    ts.append((time.perf_counter() - t) * 1e3)
    measured = {key: summarize_ms(ts) for key, (_, _, ts) in runs.items()}
    return {"rank": hvd.rank(), "size": n, "local": local, "opt_ms": opt_ms, "sweep": sweep, "measured": measured}


def summarize_ms(ts: list[float]) -> dict:
    s = sorted(ts)
    return {"median": statistics.median(s), "min": s[0], "max": s[-1], "reps": len(s)}


def validate(ranks: list[int], steps: int, warmup: int, reps: int, batch: int, fusion_mb: float,
             mode: str) -> dict:
    """Run :func:`_validate_worker` on each rank count and compare predictions with measurements."""
    configs = list(VALIDATE_CONFIGS)
    threads = max(1, (os.cpu_count() or 2) // max(ranks))
    report = {"ranks": {}, "configs": configs, "mode": mode, "fusion_mb": fusion_mb}
    for n in ranks:
        per_rank = run_on_ranks(_validate_worker, n, (configs, steps, warmup, reps, batch, threads))
        r0 = per_rank[0]
        local = r0["local"]
        sizes, times = zip(*r0["sweep"])
        alpha_us, gbps = fit_link(list(sizes), list(times), n)
        fwd, bwd = local["forward_ms"]["median"], local["backward_ms"]["median"]
        rows = {(row["label"], row.get("collective", "auto")): row for row in local["rows"]}
        results = []
        for label, name, params, coll in configs:
            row = rows.get((label, coll))
            meas = max(r["measured"][f"{label}|{coll}"]["median"] for r in per_rank)
            if row is None:
                results.append({"label": label, "collective": coll, "measured_ms": meas, "predicted_ms": None,
                                "error": "no local timing (see local errors)"})
                continue
            moved, steps_ = comm_model(row["wire"], n, fusion_mb * 2**20, mode)
            pred = {m: step_time(fwd, bwd, row["compress_ms"]["median"], decode_at(row, n, n), moved,
                                 sum(steps_.values()), gbps, alpha_us, overlap=(m == "overlap"))["step_ms"]
                    + r0["opt_ms"] for m in ("serial", "overlap")}
            results.append({"label": label, "collective": coll, "transport": row["transport"], "measured_ms": meas,
                            "predicted_ms": pred["serial"], "predicted_overlap_ms": pred["overlap"],
                            "error_pct": (pred["serial"] - meas) / meas * 100,
                            "error_overlap_pct": (pred["overlap"] - meas) / meas * 100,
                            "compress_ms": row["compress_ms"]["median"], "decode_ms": decode_at(row, n, n),
                            "comm_bytes": moved})
        # Calibration from the uncompressed run: what the model misses there (framework
        # overhead, CPU contention of Horovod's background thread) is added to every method.
        base = next((r for r in results if r["label"] == "none" and r["predicted_ms"] is not None), None)
        overhead = base["measured_ms"] - base["predicted_ms"] if base else 0.0
        for r in results:
            if r["predicted_ms"] is not None:
                r["calibrated_ms"] = r["predicted_ms"] + overhead
                r["error_calibrated_pct"] = (r["calibrated_ms"] - r["measured_ms"]) / r["measured_ms"] * 100
        report["ranks"][str(n)] = {"alpha_us": alpha_us, "overhead_ms": overhead, "link_gbps": gbps, "sweep": r0["sweep"],
                                   "forward_ms": fwd, "backward_ms": bwd, "opt_ms": r0["opt_ms"],
                                   "local_errors": local["errors"], "results": results}
        print(f"\nN={n} Gloo ranks (loopback), small CNN batch {batch}, {threads} thread(s) per rank: "
              f"fitted alpha {alpha_us:.1f} us, B {gbps:.2f} Gb/s from {len(sizes)} allreduce sizes; "
              f"forward {fwd:.2f} ms, backward {bwd:.2f} ms, optimizer {r0['opt_ms']:.2f} ms")
        print(f"uncompressed run: measured - predicted = {overhead:.2f} ms per step, added below as 'calibrated'")
        print(f"{'method':<16}{'collective':<22}{'measured ms':>12}{'serial ms':>11}{'err %':>8}"
              f"{'overlap ms':>12}{'err %':>8}{'calibrated':>12}{'err %':>8}")
        for r in results:
            if r["predicted_ms"] is None:
                print(f"{r['label']:<16}{r['collective']:<22}{r['measured_ms']:>12.2f}  {r['error']}")
                continue
            print(f"{r['label']:<16}{r['transport']:<22}{r['measured_ms']:>12.2f}{r['predicted_ms']:>11.2f}"
                  f"{r['error_pct']:>8.1f}{r['predicted_overlap_ms']:>12.2f}{r['error_overlap_pct']:>8.1f}"
                  f"{r['calibrated_ms']:>12.2f}{r['error_calibrated_pct']:>8.1f}")
    return report


# ---- command line ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="projected step time and speed-up vs ranks and link speed",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--from", dest="source", default=None,
                   help="bench.compress_vs_backward JSON (default: results/compress_vs_backward_<model>_<device>.json)")
    p.add_argument("--model", default="resnet50")
    p.add_argument("--device", default="cuda")
    p.add_argument("--ranks", type=int, nargs="+", default=None, help=f"N values (default {DEFAULT_NS}; "
                   "--validate: 2)")
    p.add_argument("--links", type=float, nargs="+", default=DEFAULT_LINKS_GBPS, help="link speeds in Gb/s")
    p.add_argument("--alpha-us", type=float, default=DEFAULT_ALPHA_US, help="latency per message step")
    p.add_argument("--latency", choices=["ring", "tree"], default="ring")
    p.add_argument("--fusion-mb", type=float, default=DEFAULT_FUSION_MB, help="Horovod tensor fusion buffer")
    p.add_argument("--overlap", action="store_true", help="hide compress+comm behind backward (lower bound)")
    p.add_argument("--backend", choices=["triton", "reference"], default=None,
                   help="which kernel path's timings to use (default: triton where measured)")
    p.add_argument("--out", default=None, help="JSON path (default results/scaling_<model>_<device>.json)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--validate", action="store_true", help="compare with real Gloo ranks (needs Horovod)")
    p.add_argument("--steps", type=int, default=12, help="--validate: timed training steps per method")
    p.add_argument("--batch", type=int, default=32, help="--validate: batch of the small CNN")
    args = p.parse_args(argv)
    command = " ".join(["python -m bench.scaling"] + (list(argv) if argv is not None else sys.argv[1:]))

    if args.validate:
        report = validate(args.ranks or [2], args.steps, 2, 5, args.batch, args.fusion_mb, args.latency)
        report.update({"command": command, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        out = Path(args.out or "results/scaling_validate.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1, default=str))
        print(f"results: {out}")
        return 0

    source = Path(args.source or f"results/compress_vs_backward_{args.model}_{args.device}.json")
    if not source.exists():
        raise SystemExit(f"{source} not found: run python -m bench.compress_vs_backward --model {args.model} "
                         f"--device {args.device} first, or pass --from")
    record = json.loads(source.read_text())
    ns = args.ranks or DEFAULT_NS
    proj = project(record, ns, args.links, args.alpha_us, args.fusion_mb, args.latency, args.overlap, args.backend)
    args_line = (f"alpha {args.alpha_us:g} us ({args.latency}), fusion {args.fusion_mb:g} MB, "
                 f"{'overlap' if args.overlap else 'serial'} model, from {source}")
    table = format_projection(record, proj, ns, args.links, args_line)
    print(table)
    out = Path(args.out or f"results/scaling_{record['model']}_{record['device']}.json")
    result = {"command": command, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "source": str(source),
              "model": record["model"], "device_name": record["device_name"], "ranks": ns, "links_gbps": args.links,
              "alpha_us": args.alpha_us, "latency": args.latency, "fusion_mb": args.fusion_mb,
              "overlap": args.overlap, "projection": proj, "table": table}
    out.parent.mkdir(parents=True, exist_ok=True)
    if not args.no_plot:
        note = plot(proj, ns, args.links, out.with_suffix(".png"),
                    f"{record['model']} on {record['device_name']}: {args_line}")
        print(note or f"chart: {out.with_suffix('.png')}")
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
