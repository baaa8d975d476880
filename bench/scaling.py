"""Projected step time and speed-up over uncompressed allreduce, for N = 8 ... 1024 ranks,
from one device's timings, through the cost model :mod:`hvdcomp.costs`.

    python -m bench.scaling --from results/compress_vs_backward_resnet50_cuda.json

Inputs come from bench/compress_vs_backward.py's JSON: forward/backward time; per method
the compress time of one rank's step, the decode time (an allgather's measured with 2 and
N0 payloads, linear in N between and beyond), and the bytes each rank passes to each kind
of collective per step. Nothing else is measured here. Per method the step's chains are
(:func:`chains_of_row`; bytes per rank as :data:`hvdcomp.costs.BYTES_PER_RANK` counts them):

=========================  ===============================================================
uncompressed               one allreduce of the dense gradients
dense payload              one allreduce of the payloads (fp16, random-k, small tensors)
ScaleCom                   broadcast of the leader's indices, then the allreduce of values
allgather (packed)         [max-allreduce of shared scales], allgather of the sizes, then of
                           the payloads
compressed allreduce       [scales], alltoall of the chunks, allgather of the re-encoded sums
=========================  ===============================================================

on N hosts with full-duplex links of the given rates (:meth:`hvdcomp.costs.Link.full_duplex`),
every message step of an algorithm costing ``--alpha-us`` (:func:`hvdcomp.costs.hop_latencies`),
the compress on the training thread after the backward pass and the decode after the last
collective (``--overlap``: the exchange starts as the backward pass does, a lower bound).
The optimizer update is left out (the same for every method). Validated against real ranks
on throttled links by ``bench.step_times`` and ``bench.cost_model`` (docs/performance.md).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from hvdcomp import costs

DEFAULT_NS = [8, 16, 32, 64, 128, 256, 512, 1024]
DEFAULT_LINKS_GBPS = [10.0, 25.0, 100.0, 400.0]
DEFAULT_ALPHA_US = 10.0


def sum_bits_at(wire: dict, n: int) -> int:
    table = wire.get("car_sum_bits") or {}
    if str(n) not in table:
        raise ValueError(f"the benchmark JSON has no re-encoded sum width for N={n} (has {sorted(table, key=int)})")
    return int(table[str(n)])


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


def chains_of_row(row: dict, n: int, n0: int, ready_s: float) -> list[costs.Chain]:
    """One rank's step of a method as chains (see the module docstring): the compress time
    before the first, the decode after the last; every chain ready at ``ready_s``."""
    wire, chains = row["wire"], []
    if wire.get("broadcasts"):
        chains.append(((costs.Collective("broadcast", wire["broadcast_bytes"]),),
                       (costs.Collective("allreduce", wire["allreduce_bytes"]),)))
    elif wire["allreduce_bytes"]:
        chains.append(((costs.Collective("allreduce", wire["allreduce_bytes"]),),))
    scales = ((costs.Collective("allreduce", 4.0),),) if wire.get("scale_allreduces") else ()
    if wire.get("allgather_buckets"):
        sizes = costs.Collective("allgather", 8.0 * wire["allgather_buckets"])
        chains.append(scales + ((sizes,), (costs.Collective("allgather", wire["allgather_bytes"]),)))
    if wire.get("car_buckets"):
        summed = wire["car_numel"] * sum_bits_at(wire, n) / 8 / n
        chains.append(scales + ((costs.Collective("alltoall", wire["car_payload_bytes"]),),
                                (costs.Collective("allgather", summed),)))
    out = []
    for i, phases in enumerate(chains):
        local = [0.0] * len(phases)
        if i == 0:
            local[0] = row["compress_ms"]["median"] / 1e3
        decode = decode_at(row, n, n0) / 1e3 if i == len(chains) - 1 else 0.0
        out.append(costs.Chain(tuple(phases), tuple(local), decode, ready_s, i))
    return out


def project(record: dict, ns: list[int], links: list[float], alpha_us: float, overlap: bool = False,
            backend: str | None = None) -> dict:
    """Step time (ms) and speed-up of every method for every N and link (Gb/s)."""
    fwd, bwd = record["forward_ms"]["median"] / 1e3, record["backward_ms"]["median"] / 1e3
    compute = costs.Compute(fwd, bwd, 0.0)
    ready = 0.0 if overlap else bwd
    n0 = record["nranks"]
    rows = pick_rows(record, backend)
    dense = rows[0]["dense_bytes"] if rows else 0
    out = {"uncompressed": {}, "methods": []}

    def link_at(gbps: float, n: int) -> costs.Link:
        return costs.Link.full_duplex(gbps * 1e9 / 8, n, costs.hop_latencies(alpha_us * 1e-6, n))

    for link in links:
        for n in ns:
            chain = costs.Chain(((costs.Collective("allreduce", dense),),), (0.0,), 0.0, ready)
            pred = costs.predict_step(compute, [chain], link_at(link, n))
            out["uncompressed"][f"{link:g}/{n}"] = {"step_ms": pred.step_s * 1e3, "comm_ms": pred.network_s * 1e3}
    for row in rows:
        entry = {"label": row["label"], "backend": row["backend"], "transport": row["transport"], "points": {}}
        for link in links:
            for n in ns:
                chains = chains_of_row(row, n, n0, ready)
                pred = costs.predict_step(compute, chains, link_at(link, n))
                base = out["uncompressed"][f"{link:g}/{n}"]["step_ms"]
                entry["points"][f"{link:g}/{n}"] = {"step_ms": pred.step_s * 1e3, "comm_ms": pred.network_s * 1e3,
                                                    "local_ms": pred.local_s * 1e3,
                                                    "speedup": base / (pred.step_s * 1e3)}
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


# ---- command line ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="projected step time and speed-up vs ranks and link speed",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--from", dest="source", default=None,
                   help="bench.compress_vs_backward JSON (default: results/compress_vs_backward_<model>_<device>.json)")
    p.add_argument("--model", default="resnet50")
    p.add_argument("--device", default="cuda")
    p.add_argument("--ranks", type=int, nargs="+", default=DEFAULT_NS, help="N values")
    p.add_argument("--links", type=float, nargs="+", default=DEFAULT_LINKS_GBPS, help="link speeds in Gb/s")
    p.add_argument("--alpha-us", type=float, default=DEFAULT_ALPHA_US, help="latency per message step")
    p.add_argument("--overlap", action="store_true", help="start the exchange with the backward pass (lower bound)")
    p.add_argument("--backend", choices=["triton", "reference"], default=None,
                   help="which kernel path's timings to use (default: triton where measured)")
    p.add_argument("--out", default=None, help="JSON path (default results/scaling_<model>_<device>.json)")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    command = " ".join(["python -m bench.scaling"] + (list(argv) if argv is not None else sys.argv[1:]))
    source = Path(args.source or f"results/compress_vs_backward_{args.model}_{args.device}.json")
    if not source.exists():
        raise SystemExit(f"{source} not found: run python -m bench.compress_vs_backward --model {args.model} "
                         f"--device {args.device} first, or pass --from")
    record = json.loads(source.read_text())
    ns = args.ranks
    proj = project(record, ns, args.links, args.alpha_us, args.overlap, args.backend)
    args_line = (f"alpha {args.alpha_us:g} us per message step, {'overlap' if args.overlap else 'serial'} "
                 f"model, from {source}")
    table = format_projection(record, proj, ns, args.links, args_line)
    print(table)
    out = Path(args.out or f"results/scaling_{record['model']}_{record['device']}.json")
    result = {"command": command, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "source": str(source),
              "model": record["model"], "device_name": record["device_name"], "ranks": ns, "links_gbps": args.links,
              "alpha_us": args.alpha_us, "overlap": args.overlap, "projection": proj, "table": table}
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
