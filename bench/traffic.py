"""Bytes each rank sends and receives per step, by method and collective, for N ranks.

    python -m bench.traffic                    # N = 2, 3, 4 real Gloo ranks, demo model
    python -m bench.traffic --ranks 2 3 --steps 3 --out results/traffic.json

Trains the demo model (launch/train.py's MLP on scikit-learn's digits) for a few steps on N
real Horovod ranks per configuration and reads ``compression_stats()``: payload sizes are
measured, the bytes on the wire follow the collective's algorithm:

======================  =======================================  =====================
collective              sent per rank                            received per rank
======================  =======================================  =====================
allreduce (ring)        2 (N-1)/N * S                            2 (N-1)/N * S
allgather               (N-1) * S_me                             sum_{r != me} S_r
compressed allreduce    (N-1)/N * (S + S')                       (N-1)/N * (S + S')
ScaleCom                2 (N-1)/N * 4k  +  4k (index broadcast)  same
======================  =======================================  =====================

``S`` a payload, ``S'`` the re-encoded sum (bf16: S; TernGrad: ``ceil(log2(2N+1))`` bits
per element), ``k`` the selected count. Only allgather grows with N.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

from bench._ranks import run_on_ranks

#: (label, compressor name, params, collective)
CONFIGS = [
    ("uncompressed allreduce", "none", {}, "auto"),
    ("fp16 allreduce", "fp16", {}, "auto"),
    ("bf16 allgather", "bf16", {}, "allgather"),
    ("bf16 compressed allreduce", "bf16", {}, "compressed_allreduce"),
    ("terngrad allgather", "terngrad", {}, "allgather"),
    ("terngrad compressed allreduce", "terngrad", {}, "compressed_allreduce"),
    ("scalecom 1%", "scalecom", {"ratio": 0.01}, "auto"),
    ("topk 1% allgather", "topk", {"ratio": 0.01}, "auto"),
    ("adacomp allgather", "adacomp", {}, "auto"),
]


def measure(configs: list, steps: int, seed: int):
    """Runs on every rank: a few training steps per config; returns each config's stats."""
    # torch imported here, not as a global: cloudpickle would otherwise ship every torch
    # submodule whose name the code mentions (``.classes`` -> torch.classes, unpicklable).
    import horovod.torch as hvd
    import torch

    import hvdcomp
    from launch import data, models

    hvd.init()
    torch.manual_seed(seed)
    shard = data.digits(seed).shard(hvd.rank(), hvd.size())
    xtr, ytr = shard.xtr, shard.ytr
    out = {}
    for label, name, params, collective in configs:
        model = models.MLP(xtr.shape[1], shard.classes)
        opt = hvdcomp.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05),
                                           named_parameters=model.named_parameters(),
                                           compression=hvdcomp.compression_from_name(name, **params),
                                           collective=collective)
        for s in range(steps):
            opt.zero_grad()
            idx = slice(32 * s, 32 * (s + 1))
            torch.nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
        stats = opt.compression_stats()
        out[label] = {"step": stats["step"], "cumulative": stats["cumulative"]}
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description="bytes per rank per step by collective")
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/traffic.json")
    args = p.parse_args(argv)
    os.environ.setdefault("HVDCOMP_KERNELS", "reference")
    configs = CONFIGS
    results = {}
    for n in args.ranks:
        per_rank = run_on_ranks(measure, n, (configs, args.steps, args.seed))
        results[n] = per_rank
    header = f"{'method / collective':<32}" + "".join(f"{'N=%d sent' % n:>13}{'N=%d recv' % n:>13}" for n in args.ranks)
    lines = [header, "-" * len(header)]
    for label, *_ in configs:
        row = f"{label:<32}"
        for n in args.ranks:
            step = results[n][0][label]["step"]  # rank 0; rows of other ranks agree up to chunk rounding
            row += f"{step['sent_bytes']:>13,.0f}{step['received_bytes']:>13,.0f}"
        lines.append(row)
    table = "\n".join(lines)
    print("bytes per rank per step (rank 0), demo model:", results[args.ranks[0]][0][configs[0][0]]["step"]["dense_bytes"],
          "dense bytes")
    print(table)
    record = {"command": " ".join(["python -m bench.traffic"] + (argv if argv is not None else sys.argv[1:])),
              "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "torch": torch.__version__,
              "python": platform.python_version(), "device": "cpu (Gloo)", "steps": args.steps,
              "results": {str(n): {label: results[n][0][label] for label, *_ in configs} for n in args.ranks},
              "table": table}
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(record, f, indent=2, default=str)
    return record


if __name__ == "__main__":
    main()
