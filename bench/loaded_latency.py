"""Time a small collective while every rank's core is busy: the latency a collective has
during a backward pass on ranks that share their cores with it.

A Gloo collective moves one message after another, and each message wakes a thread of
every rank on its way (Horovod's background thread, Gloo's and torch.distributed's
workers). During a training step those threads share their rank's core with the training
thread, which computes the backward pass without pause, so each wake-up waits for the
scheduler. A 1 KiB allreduce that takes a few ms on idle ranks can take ten or fifty
times that; the cost model (:mod:`hvdcomp.costs`, ``Link.loaded_latency_s``) holds a collective
issued during the backward pass to it.

Run it on ranks started by any launcher, as ``bench.collectives_sweep``::

    python -m launch.link --rate 500mbit -- horovodrun -np 4 -H localhost:4 --gloo \\
        python -m bench.loaded_latency --out bench/results/collectives/loaded_horovod_4ranks_500mbit_pinned.json

Each rank first times ``--reps`` calls of every collective (allreduce, allgather, alltoall,
broadcast) on 256 float32 (1 KiB) as the sweep times a call (after the link's token buckets
refill and a barrier; from the first rank's entry to the last rank's exit), then starts one
busy process (a Python loop that never sleeps), which inherits the rank's binding
(``HVDCOMP_BENCH_PIN_RANKS``: the rank's one core) and stands for its training thread, and
times the same calls again. Rank 0 prints a table and writes the record: per op
``idle_median_s``, ``loaded_median_s`` and every call's seconds.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch

from bench._record import emit
from bench.collectives_sweep import (_describe, _framework, _from_env, one_machine, record_header, settle_seconds,
                                     time_collective)
from hvdcomp.costs import OPS

SCHEMA = "hvdcomp.loaded_latency/1"
#: The timed calls: every collective on this many float32 values per rank (1 KiB), small
#: enough that its time is the latency and not the bytes.
NUMEL = 256
#: The busy process each rank starts: one runnable thread that never sleeps.
BUSY_LOOP = "while True: pass"


def start_busy_process() -> subprocess.Popen:
    """One process that keeps a core busy; it inherits this rank's core binding."""
    return subprocess.Popen([sys.executable, "-c", BUSY_LOOP], stdin=subprocess.DEVNULL)


def time_ops(ranks, reps: int, settle_s: float, shared_clock: bool) -> dict:
    """Per op (:data:`hvdcomp.costs.OPS`), seconds of ``reps`` calls on :data:`NUMEL`
    float32 (an alltoall: the nearest multiple of the rank count) after one warm-up call;
    the same on every rank."""
    out = {}
    for op in OPS:
        numel = max(ranks.size, NUMEL // ranks.size * ranks.size) if op == "alltoall" else NUMEL
        time_collective(ranks, op, numel, 1, settle_s, shared_clock)
        out[op] = (numel, time_collective(ranks, op, numel, reps, settle_s, shared_clock))
    return out


def time_loaded(ranks, reps: int, settle_s: float, shared_clock: bool) -> dict:
    """Per op: its calls' seconds on idle ranks, then with one busy process per rank, and
    their medians."""
    idle = time_ops(ranks, reps, settle_s, shared_clock)
    busy = start_busy_process()
    try:
        time.sleep(0.2)  # the busy process is running before the first timed call
        loaded = time_ops(ranks, reps, settle_s, shared_clock)
    finally:
        busy.kill()
        busy.wait()
    return {op: {"elements": idle[op][0], "idle_s": idle[op][1], "loaded_s": loaded[op][1],
                 "idle_median_s": statistics.median(idle[op][1]), "loaded_median_s": statistics.median(loaded[op][1])}
            for op in OPS}


def format_table(record: dict) -> str:
    lines = [f"{record['world_size']} {record['framework']} ranks, {record['link_description']}, "
             f"{record['reps']} calls each, medians in ms",
             f"{'op':<10} {'elements':>8} {'idle ranks':>11} {'one busy process per rank':>26}"]
    for op, timed in record["ops"].items():
        lines.append(f"{op:<10} {timed['elements']:>8} {timed['idle_median_s'] * 1e3:>11.2f} "
                     f"{timed['loaded_median_s'] * 1e3:>26.2f}")
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.loaded_latency", description=__doc__.split("\n\n")[0])
    p.add_argument("--framework", choices=("auto", "horovod", "torch"), default="auto")
    p.add_argument("--reps", type=int, default=15, help="timed calls each way (median)")
    p.add_argument("--out", default="results/loaded_latency.json")
    args = p.parse_args(argv)
    if args.reps < 1:
        p.error(f"--reps must be >= 1, got {args.reps}")
    return args


def main(argv=None) -> dict | None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)  # every rank parses alike, so bad input stops all before a collective
    torch.set_num_threads(1)
    ranks = _framework(args.framework)
    link, cluster = _from_env("HVDCOMP_LINK"), _from_env("HVDCOMP_CLUSTER")
    settle = settle_seconds(link, cluster)
    shared_clock = one_machine(ranks)
    timed = time_loaded(ranks, args.reps, settle, shared_clock)
    ranks.close()
    if ranks.rank != 0:
        return None
    record = {
        **record_header(SCHEMA, "bench.loaded_latency", argv, ranks),
        "dtype": "float32", "reps": args.reps, "settle_seconds": settle,
        "load": f"one busy process per rank ({BUSY_LOOP!r}), bound as the rank is",
        "timing": "first entry to last exit (one machine's clock)" if shared_clock else "longest rank's own window",
        "link": link, "cluster": cluster, "link_description": _describe(link, cluster),
        "ops": timed,
    }
    emit(record, format_table(record), args.out)
    return record


if __name__ == "__main__":
    main()
