"""Step times of flat and hierarchical exchange, allgather and sparse allreduce, on an
emulated cluster (``launch.cluster``: 2 nodes x 2 ranks, a slow link between nodes, fast
loopbacks inside them), against the cost model of :mod:`bench.cluster_costs`::

    python -m bench.cluster_steps --out bench/results/cluster/steps_2x2_50mbit.json

For every configuration (compressor, collective, flat or ``hierarchical=True``) it runs the
same job twice, on the shaped cluster and on an unshaped one, through the DDP hook on
torch.distributed (Gloo): one parameter of ``--numel`` elements whose gradient is a seeded
N(0, 1) vector per rank and step (the gradient of ``sum(w * g)`` is g, so the step is the
exchange and the optimizer's step, with no model compute to blur it). Before each step the
ranks idle until the link's buckets are full (as after a backward pass) and pass a barrier;
a step lasts from the first rank's start to the last rank's end (one machine's clock). Each
node's first rank reads its link's byte counters around the timed steps, and the launcher
reads every qdisc's counters around each job (``Cluster.counters()``).

Prediction per configuration: the median unshaped step time plus the link's time from the
bytes each phase puts on the busiest bucket (:func:`bench.cluster_costs.link_seconds`), those
bytes taken from an in-process replay of the same steps (bit-identical to the DDP ranks, so
every payload size is the real one); calibrated: the same with the link's efficiency (its
measured time over the modelled one) taken from the uncompressed flat run. The record (JSON)
holds the command, versions, the machine's load, every step time and counter, and the
predictions with their errors. The replay takes about as long as the runs, so it can be
left out of a quiet measurement (``--no-predict``) and added afterwards::

    python -m bench.cluster_steps --no-predict --out R.json
    python -m bench.cluster_steps --predict-from R.json --out R.json
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import time

import torch

from bench._record import emit
from bench.cluster_costs import FRAMING, dense_gradient, link_seconds, phase_bytes, uplink_bytes_per_rank

SCHEMA = "hvdcomp.cluster_steps/1"
#: name -> (compressor, its parameters, collective, hierarchical, share of --numel): the
#: uncompressed runs use a quarter of the elements (their link time is 50 times top-k's), and
#: so does TernGrad (a 2-bit quantizer: 16 times fewer bytes than fp32, not 50).
CONFIGS = {
    "none flat": ("none", {}, "auto", False, 0.25),
    "none hierarchical": ("none", {}, "auto", True, 0.25),
    "topk allgather flat": ("topk", {"ratio": 0.01}, "allgather", False, 1.0),
    "topk sparse_allreduce flat": ("topk", {"ratio": 0.01}, "sparse_allreduce", False, 1.0),
    "topk allgather hierarchical": ("topk", {"ratio": 0.01}, "allgather", True, 1.0),
    "topk sparse_allreduce hierarchical": ("topk", {"ratio": 0.01}, "sparse_allreduce", True, 1.0),
    "terngrad flat": ("terngrad", {}, "auto", False, 0.25),
    "terngrad hierarchical": ("terngrad", {}, "auto", True, 0.25),
}
#: The configuration whose link time calibrates the link's efficiency (bytes per second it
#: really passes, against its rate) for the "calibrated" predictions.
CALIBRATION = "none flat"


class Weighted(torch.nn.Module):
    """loss = sum(weight * g): the gradient of ``weight`` is g."""

    def __init__(self, numel: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(numel))

    def forward(self, g):
        return (self.weight * g).sum()


def _compressor(config: str):
    import hvdcomp

    name, params = CONFIGS[config][:2]
    return hvdcomp.compression_from_name(name, **params)


def numel_of(config: str, numel: int) -> int:
    return int(numel * CONFIGS[config][4])


# ---- on every rank -----------------------------------------------------------------------------

def _link_counters(iface: str) -> dict:
    stats = f"/sys/class/net/{iface}/statistics"
    return {k: int(open(f"{stats}/{k}").read()) for k in ("tx_bytes", "rx_bytes")}


def rank_job(job: dict) -> None:
    """One configuration on this rank (started by launch.cluster's torch launcher)."""
    import torch.distributed as dist
    from torch import nn

    from hvdcomp.ddp import CompressionState, compression_hook

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ["LOCAL_RANK"])
    collective, hierarchical = CONFIGS[job["config"]][2:4]
    model = Weighted(job["numel"])
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=4 * job["numel"] / 2**20 + 1)
    state = CompressionState(_compressor(job["config"]), min_compress_numel=0, collective=collective,
                             named_parameters=model.named_parameters(), hierarchical=hierarchical)
    ddp.register_comm_hook(state, compression_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    windows, before = [], None
    for step in range(job["warmup"] + job["steps"]):
        g = dense_gradient(job["numel"], rank, step)
        dist.barrier()
        time.sleep(job["settle_s"])
        dist.barrier()
        if step == job["warmup"] and local_rank == 0:
            before = _link_counters(job["iface"])
        start = time.monotonic()
        opt.zero_grad()
        ddp(g).backward()
        opt.step()
        windows.append((start, time.monotonic()))
    dist.barrier()
    counters = None
    if local_rank == 0:
        after = _link_counters(job["iface"])
        counters = {k: after[k] - before[k] for k in after}
    everyone = [None] * size
    dist.all_gather_object(everyone, {"windows": windows, "counters": counters})
    if rank == 0:
        steps = [max(w[s][1] for w in (e["windows"] for e in everyone)) -
                 min(w[s][0] for w in (e["windows"] for e in everyone)) for s in range(len(windows))]
        node_counters = [e["counters"] for e in everyone if e["counters"] is not None]
        print("RESULT " + json.dumps({"step_seconds": steps[job["warmup"]:], "warmup_seconds": steps[:job["warmup"]],
                                      "node_link_bytes": node_counters,
                                      "collectives": state.compression_stats()["collectives"]}), flush=True)
    # DDP and the hook's groups go before the default group (destroying it under a live
    # reducer aborts the process at exit).
    dist.barrier()
    del opt, ddp, state, model
    gc.collect()
    dist.destroy_process_group()


# ---- the launcher side -----------------------------------------------------------------------------

def replay(config: str, numel: int, nranks: int, nodes: int, steps: int) -> list:
    """Per step, per phase, the bytes on each bucket (in-process DDP ranks, same gradients)."""
    from hvdcomp.inprocess import World

    collective, hierarchical = CONFIGS[config][2:4]
    world = World(nranks, transport="ddp", nodes=nodes)
    params = [torch.nn.Parameter(torch.zeros(numel)) for _ in range(nranks)]
    comp = _compressor(config)
    for r, p in enumerate(params):
        world.DistributedOptimizer(r, torch.optim.SGD([p], lr=0.01), named_parameters=[("weight", p)],
                                   compression=comp, min_compress_numel=0, collective=collective,
                                   hierarchical=hierarchical)

    def set_gradients(step: int) -> None:
        for r, p in enumerate(params):
            p.grad = dense_gradient(numel, r, step)

    return phase_bytes(world, set_gradients, steps)


def run_jobs(cluster, configs: list, args, settle_s: float) -> dict:
    out = {}
    for config in configs:
        job = {"config": config, "numel": numel_of(config, args.numel), "warmup": args.warmup, "steps": args.steps,
               "settle_s": settle_s, "iface": "eth0"}
        before = cluster.counters()
        run = cluster.run([sys.executable, "-m", "bench.cluster_steps", "--rank-job", json.dumps(job)],
                          launcher="torch", timeout=args.timeout, echo=False)
        after = cluster.counters()
        lines = [line.split("RESULT ", 1)[1] for line in run.lines if "RESULT " in line]
        if run.returncode != 0 or not lines:
            raise RuntimeError(f"{config}: ranks failed ({run.returncode}):\n" + "\n".join(run.lines[-30:]))
        result = json.loads(lines[0])
        result["qdisc_bytes"] = [{key: (a[key]["bytes"] - b[key]["bytes"]) if a[key] else None
                                  for key in ("uplink_qdisc", "downlink_qdisc")} for a, b in zip(after, before)]
        out[config] = result
        print(f"[cluster_steps] {config} on {cluster.describe()}: median step "
              f"{statistics.median(result['step_seconds']):.3f} s", flush=True)
    return out


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def predictions(args, shaped: dict, unshaped: dict, rate: float, burst: float, nodes: int, per_node: int) -> dict:
    from hvdcomp.core.hierarchy import Topology

    topology = Topology.of(nodes * per_node, per_node, 0)
    out = {}
    for config in shaped:
        steps = replay(config, numel_of(config, args.numel), nodes * per_node, nodes,
                       args.warmup + args.steps)[args.warmup:]
        base = statistics.median(unshaped[config]["step_seconds"])
        link = statistics.median(link_seconds(p, rate, burst) for p in steps)
        measured = statistics.median(shaped[config]["step_seconds"])
        node_tx = [c["tx_bytes"] for c in shaped[config]["node_link_bytes"]]
        out[config] = {
            "unshaped_median_s": base, "link_s": link, "predicted_s": base + link,
            "measured_median_s": measured, "rel_error": (base + link) / measured - 1,
            "internode_bytes_per_rank_predicted": statistics.mean(uplink_bytes_per_rank(p, topology) for p in steps),
            "internode_bytes_per_rank_predicted_on_wire": FRAMING * statistics.mean(
                uplink_bytes_per_rank(p, topology) for p in steps),
            "internode_bytes_per_rank_measured": sum(node_tx) / (nodes * per_node) / args.steps,
            "busiest_bucket_bytes_per_step": statistics.mean(sum(max(x.values(), default=0) for x in p)
                                                             for p in steps)}
    if CALIBRATION in out and out[CALIBRATION]["link_s"] > 0:
        cal = out[CALIBRATION]
        efficiency = (cal["measured_median_s"] - cal["unshaped_median_s"]) / cal["link_s"]
        for p in out.values():
            p["link_efficiency"] = efficiency
            p["calibrated_predicted_s"] = p["unshaped_median_s"] + efficiency * p["link_s"]
            p["calibrated_rel_error"] = p["calibrated_predicted_s"] / p["measured_median_s"] - 1
    return out


def _or_dash(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def format_table(record: dict) -> str:
    rows = ["| configuration | elements | unshaped s | link s (model) | predicted s | measured s | error "
            "| calibrated: predicted s | error | inter-node B/rank/step: model (on the wire) | measured |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for config, p in record["predictions"].items():
        rows.append(f"| {config} | {numel_of(config, record['numel']):,} | {p['unshaped_median_s']:.3f} "
                    f"| {p['link_s']:.3f} | {p['predicted_s']:.3f} | {p['measured_median_s']:.3f} "
                    f"| {100 * p['rel_error']:+.1f} % | {_or_dash(p.get('calibrated_predicted_s'), '{:.3f}')} "
                    f"| {_or_dash(p.get('calibrated_rel_error'), '{:+.1%}')} "
                    f"| {p['internode_bytes_per_rank_predicted_on_wire']:,.0f} "
                    f"| {p['internode_bytes_per_rank_measured']:,.0f} |")
    eff = next(iter(record["predictions"].values())).get("link_efficiency")
    if eff is not None:
        rows.append(f"\nlink efficiency from '{CALIBRATION}': the link took {eff:.3f} x the modelled time")
    return "\n".join(rows)


def main(argv=None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench/results/cluster/steps_2x2_50mbit.json")
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--ranks-per-node", type=int, default=2)
    p.add_argument("--inter-rate", default="50mbit")
    p.add_argument("--burst", default="256kb")
    p.add_argument("--numel", type=int, default=16 * 2**20,
                   help="elements of the one parameter (fp32; uncompressed configurations use a quarter)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--no-predict", action="store_true",
                   help="measure only (the replay that predicts takes as long again); see --predict-from")
    p.add_argument("--predict-from", metavar="RECORD",
                   help="no measurement: add the predictions to RECORD's measurements (written to --out)")
    p.add_argument("--rank-job", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rank_job:
        rank_job(json.loads(args.rank_job))
        return None
    if args.predict_from:
        return predict_from(args)
    from launch.cluster import Cluster

    load_start = _load()
    runs = {}
    for label, rate in (("shaped", args.inter_rate), ("unshaped", "unshaped")):
        with Cluster(args.nodes, args.ranks_per_node, inter_rate=rate, burst=args.burst) as cluster:
            settle = 1.1 * cluster.inter.burst_bytes / cluster.inter.rate_bytes_per_s if rate != "unshaped" else 0.0
            runs[label] = run_jobs(cluster, args.configs, args, settle)
            if label == "shaped":
                shape, topology = cluster.inter, cluster.to_record()
    record = {
        "schema": SCHEMA, "command": "python -m bench.cluster_steps " + shlex.join(argv or sys.argv[1:]),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": f"cpu ({platform.machine()}, "
                                                                       f"{os.cpu_count()} cores)",
        "load_average_1min": {"start": load_start, "end": _load()},
        "versions": {"torch": torch.__version__, "python": platform.python_version(), "hvdcomp": _version()},
        "framework": "torch.distributed (DDP hook), gloo", "cluster": topology, "numel": args.numel,
        "steps": args.steps, "warmup": args.warmup, "configs": {c: list(CONFIGS[c]) for c in args.configs},
        "framing": FRAMING, "shaped": runs["shaped"], "unshaped": runs["unshaped"],
    }
    if args.no_predict:
        emit(record, "measured; predictions: --predict-from " + args.out, args.out)
        return record
    record["predictions"] = predictions(args, runs["shaped"], runs["unshaped"], shape.rate_bytes_per_s,
                                        shape.burst_bytes, args.nodes, args.ranks_per_node)
    emit(record, format_table(record), args.out)
    return record


def predict_from(args) -> dict:
    """The predictions for a record measured with --no-predict (its settings, not the flags')."""
    with open(args.predict_from) as f:
        record = json.load(f)
    args.numel, args.steps, args.warmup = record["numel"], record["steps"], record["warmup"]
    cluster = record["cluster"]
    record["predictions"] = predictions(args, record["shaped"], record["unshaped"],
                                        cluster["inter"]["rate_bytes_per_s"], cluster["inter"]["burst_bytes"],
                                        cluster["nodes"], cluster["ranks_per_node"])
    record["predict_command"] = "python -m bench.cluster_steps " + shlex.join(sys.argv[1:])
    emit(record, format_table(record), args.out)
    return record


def _version() -> str:
    import hvdcomp

    return hvdcomp.__version__


if __name__ == "__main__":
    main()
