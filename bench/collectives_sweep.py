"""Time allreduce, allgather, alltoall and broadcast over a sweep of sizes on real ranks, and
fit each collective's latency and seconds per byte: the link calibration of a cost model.

Run it on ranks started by any launcher, usually on an emulated link (docs/emulator.md):

    python -m launch.link --rate 50mbit -- horovodrun -np 2 -H localhost:2 --gloo \\
        python -m bench.collectives_sweep --out results/sweep_hvd.json
    python -m launch.link --rate 50mbit -- torchrun --nproc-per-node 2 --master-addr 127.0.0.1 \\
        -m bench.collectives_sweep
    python -m launch.cluster --nodes 2 --ranks-per-node 2 --inter-rate 50mbit --launcher torch \\
        -- python -m bench.collectives_sweep

The framework is Horovod where ``HOROVOD_RANK`` is set, torch.distributed where ``RANK`` is
(``--framework`` overrides); both use Gloo on CPU tensors. Per collective and size S (bytes
of float32 each rank passes in), after one warm-up call: ``--reps`` timed calls, each one
started after a barrier; a call lasts from the first rank's entry to the last rank's exit
(ranks on one machine share its monotonic clock; across machines, the longest rank's own
window), the size's time is the median over calls. Each rank passes in the values r + 1, except
for a :data:`DTYPE_FITS` allreduce (fp16), whose sum Gloo converts value by value through
fp32 with branches on each value: constants predict every branch and, on the unshaped
loopback through Horovod, sum 1.7x faster than random values, so that sweep passes in
standard-normal values (:func:`sweep_values`). Before each call every rank idles until the
link's token buckets are full again (``--settle-seconds``), as they are when a training
step's exchange starts after its backward pass. A size whose warm-up exceeds
``--max-call-seconds`` ends that collective's sweep. The last call's result of every size
is checked. With ``HVDCOMP_BENCH_PIN_RANKS=1`` in the launcher's
environment each rank binds itself to one core first (:func:`pin_to_one_core`).

Then per collective, the fit t = alpha + beta * max(0, b - free), where b is the average
bytes a rank sends (``BYTES_PER_RANK``; the algorithms Gloo runs): alpha the latency in
seconds, beta the seconds per byte, free the bytes per rank a full bucket lets through at
once (0 on an unshaped link, burst / rate_multiple on a shaped one). Relative errors under
Huber's loss, so every size counts and one disturbed size does not tilt the fit.
``rate_multiple`` = beta * the link's rate in bytes/s says how many ranks' bytes queue in
the slowest bucket: N on ``launch.link``'s one loopback bucket shared by all N ranks, 1 for
a ring's hop over ``launch.cluster``'s per-direction buckets.

Rank 0 prints a table and writes the record (schema in docs/emulator.md, ``SCHEMA``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from bench._record import emit
from hvdcomp.costs import BYTES_PER_RANK, DTYPE_FITS, OPS, fit_alpha_beta, op_and_dtype

SCHEMA = "hvdcomp.collectives_sweep/1"
#: What a sweep can time: the four collectives on float32, and allreduce on the dtypes
#: whose sum costs differently (``hvdcomp.costs.DTYPE_FITS``: ``allreduce_float16``).
SWEPT = OPS + tuple(DTYPE_FITS)
DEFAULT_SIZES = [2**k for k in range(10, 26)]  # 1 KiB .. 32 MiB, doubling
#: Set (to 1) by ``bench.step_times --pin-ranks`` for the ranks it starts; horovodrun and
#: torchrun hand the environment on to them.
PIN_RANKS_ENV = "HVDCOMP_BENCH_PIN_RANKS"


def pin_to_one_core(local_rank_var: str) -> dict:
    """Where ``PIN_RANKS_ENV`` is set, bind this rank to core ``local rank mod cores`` (of the
    cores it may use) and return ``{"ranks_pinned": True}``, else ``{}`` (nothing changes).

    Call it before the framework starts: the threads it starts later (Horovod's background
    thread, Gloo's) inherit the binding. With more ranks than cores, a rank and its threads
    then share one fixed core with the same other ranks all launch long, as an MPI launcher's
    ``--bind-to core`` places them. Unbound, 4 Horovod ranks on 2 cores measured the same
    exchange's steps spread by factors within one launch (docs/performance.md).
    """
    if not os.environ.get(PIN_RANKS_ENV):
        return {}
    if local_rank_var not in os.environ:
        raise RuntimeError(f"{PIN_RANKS_ENV} is set but the launcher did not set {local_rank_var}")
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[int(os.environ[local_rank_var]) % len(cores)]})
    return {"ranks_pinned": True}


class HorovodRanks:
    """Horovod (Gloo) collectives on CPU tensors, in place where Horovod offers it."""

    name = "horovod"

    def __init__(self):
        import horovod
        import horovod.torch as hvd

        from bench.step_times import HOROVOD_DEFAULT_CYCLE_TIME_MS

        pinned = pin_to_one_core("HOROVOD_LOCAL_RANK")
        hvd.init()
        self.hvd, self.rank, self.size = hvd, hvd.rank(), hvd.size()
        self.versions = {"horovod": horovod.__version__}
        # horovodrun --cycle-time-ms sets this for the ranks; it names the record's variant.
        self.settings = {"horovod_cycle_time_ms": float(os.environ.get("HOROVOD_CYCLE_TIME",
                                                                      HOROVOD_DEFAULT_CYCLE_TIME_MS)), **pinned}
        # Set by the user around the launch (0: no tensor fusion); the cost model reads it.
        if os.environ.get("HOROVOD_FUSION_THRESHOLD"):
            self.settings["horovod_fusion_threshold_bytes"] = int(os.environ["HOROVOD_FUSION_THRESHOLD"])

    def barrier(self):
        self.hvd.barrier()

    def close(self):
        pass  # Horovod shuts down at exit

    def run(self, op: str, x: torch.Tensor) -> torch.Tensor:
        hvd = self.hvd
        if op == "allreduce":
            return hvd.allreduce_(x, op=hvd.Sum, name="sweep")
        if op == "allgather":
            return hvd.allgather(x, name="sweep")
        if op == "alltoall":
            return hvd.alltoall(x, name="sweep")
        return hvd.broadcast_(x, root_rank=0, name="sweep")

    def maximum(self, values: list[float]) -> list[float]:
        """Element-wise maximum over the ranks (float64)."""
        return self.hvd.allreduce(torch.tensor(values, dtype=torch.float64), op=self.hvd.Max, name="maximum").tolist()


class TorchRanks:
    """torch.distributed (Gloo) collectives on CPU tensors."""

    name = "torch"

    def __init__(self):
        import torch.distributed as dist

        pinned = pin_to_one_core("LOCAL_RANK")
        dist.init_process_group("gloo")
        self.dist, self.rank, self.size = dist, dist.get_rank(), dist.get_world_size()
        self.versions, self.settings = {}, pinned

    def barrier(self):
        self.dist.barrier()

    def close(self):
        # A process that exits with its Gloo group alive can abort in the group's threads.
        self.dist.barrier()
        self.dist.destroy_process_group()

    def run(self, op: str, x: torch.Tensor) -> torch.Tensor:
        dist = self.dist
        if op == "allreduce":
            dist.all_reduce(x)
            return x
        if op == "allgather":
            out = torch.empty(self.size * x.numel(), dtype=x.dtype)
            gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # newer name first
            gather(out, x)
            return out
        if op == "alltoall":
            out = torch.empty_like(x)
            dist.all_to_all_single(out, x)
            return out
        dist.broadcast(x, src=0)
        return x

    def maximum(self, values: list[float]) -> list[float]:
        """Element-wise maximum over the ranks (float64)."""
        t = torch.tensor(values, dtype=torch.float64)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX)
        return t.tolist()


#: Where a swept key passes in random values (see the module docstring): standard normal,
#: drawn from a generator seeded with the rank.
RANDOM_VALUES = frozenset(DTYPE_FITS)
#: What every other key passes in, in the records' words (also what a record without
#: ``values`` summed).
RANK_PLUS_ONE = "rank + 1"


def sweep_values(key: str, rank: int, numel: int) -> torch.Tensor:
    """What ``rank`` passes in for swept ``key`` (:data:`SWEPT`), ``numel`` values of its
    dtype: r + 1 (small integers, exact in fp16 too) or, for :data:`RANDOM_VALUES`, standard
    normal values seeded with the rank."""
    dtype = getattr(torch, op_and_dtype(key)[1])
    if key in RANDOM_VALUES:
        return torch.randn(numel, generator=torch.Generator().manual_seed(rank)).to(dtype)
    return torch.full((numel,), float(rank + 1), dtype=dtype)


def values_described(key: str) -> str:
    """What :func:`sweep_values` passes in for ``key``, in words (the records' ``values``)."""
    return "standard normal, seeded with the rank" if key in RANDOM_VALUES else RANK_PLUS_ONE


def expected(op: str, n: int, rank: int, numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """What ``op`` must return on ``rank`` when rank r passes in ``numel`` values r + 1 of
    ``dtype`` (small integers: exact in fp16 too)."""
    if op == "allreduce":
        return torch.full((numel,), n * (n + 1) / 2, dtype=dtype)
    if op == "allgather":
        return torch.arange(1, n + 1, dtype=dtype).repeat_interleave(numel)
    if op == "alltoall":  # chunk j comes from rank j
        return torch.arange(1, n + 1, dtype=dtype).repeat_interleave(numel // n)
    return torch.ones(numel, dtype=dtype)


def one_machine(ranks) -> bool:
    """Whether every rank runs on this machine (same boot id): then their monotonic clocks
    are one clock, and a call can be timed from the first rank's entry to the last's exit."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            mine = float(int(f.read().strip().replace("-", "")[:12], 16))  # 48 bits: exact in float64
    except OSError:
        return False
    low, high = ranks.maximum([-mine, mine])
    return -low == high


def random_sum(key: str, n: int, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 sum over ``n`` ranks of what :func:`sweep_values` passes in for ``key``,
    and the sum of their magnitudes (what bounds the rounding of every partial sum)."""
    values = [sweep_values(key, r, numel).float() for r in range(n)]
    return sum(values), sum(v.abs() for v in values)


def time_collective(ranks, key: str, numel: int, reps: int, settle_s: float, shared_clock: bool) -> list[float]:
    """``reps`` calls of swept ``key``'s collective on ``numel`` values (:func:`sweep_values`),
    each after ``settle_s`` idle seconds and a barrier; the same list of seconds on every
    rank. With ``shared_clock`` a call lasts from the first rank's entry to the last rank's
    exit (a rank that enters late finds bytes already waiting in its sockets, so its own
    window is too short); otherwise it is the longest of the ranks' own windows. The last
    result is checked: against :func:`expected`, or for random values against their float32
    sum to within the dtype's rounding of each partial sum."""
    op, dtype_name = op_and_dtype(key)
    dtype = getattr(torch, dtype_name)
    starts, ends, out = [], [], None
    for _ in range(reps):
        x = sweep_values(key, ranks.rank, numel)
        time.sleep(settle_s)
        ranks.barrier()
        starts.append(time.monotonic())
        out = ranks.run(op, x)
        ends.append(time.monotonic())
    if key in RANDOM_VALUES:
        # n - 1 partial sums and the result, each rounded to the dtype (half an eps each).
        want, magnitude = random_sum(key, ranks.size, numel)
        right = bool(((out.float() - want).abs() <= ranks.size * torch.finfo(dtype).eps * magnitude).all())
    else:
        right = torch.equal(out, expected(op, ranks.size, ranks.rank, numel, dtype))
    if not right:
        raise RuntimeError(f"{ranks.name} {op} of {numel} {dtype} values on rank {ranks.rank}: wrong result")
    if shared_clock:
        latest = ranks.maximum([-t for t in starts] + ends)
        return [end + first for first, end in zip(latest[:reps], latest[reps:])]
    return ranks.maximum([end - start for start, end in zip(starts, ends)])


def sweep(ranks, keys, sizes, reps: int, max_call_s: float, settle_s: float, shared_clock: bool) -> dict:
    """Per swept key (:data:`SWEPT`), a list of points: bytes S, elements, bytes_per_rank,
    median_s, min_s, times_s."""
    n, results = ranks.size, {}
    for key in keys:
        op, dtype_name = op_and_dtype(key)
        item = getattr(torch, dtype_name).itemsize
        points = []
        for size in sizes:
            # alltoall splits each rank's input into N equal chunks
            numel = max(n, size // item // n * n) if op == "alltoall" else max(1, size // item)
            (warm,) = time_collective(ranks, key, numel, 1, settle_s, shared_clock)
            if warm > max_call_s:
                break
            times = time_collective(ranks, key, numel, reps, settle_s, shared_clock)
            points.append({"bytes": numel * item, "elements": numel,
                           "bytes_per_rank": BYTES_PER_RANK[op][1](numel * item, n),
                           "median_s": statistics.median(times), "min_s": min(times), "times_s": times})
        results[key] = points
    return results


def fits(results: dict, rate_bytes_per_s: float | None) -> dict:
    """Per op, :func:`fit_alpha_beta` of median_s on bytes_per_rank, with ``rate_multiple`` =
    beta * the slowest link's bytes/s (None when unshaped)."""
    out = {}
    for op, points in results.items():
        fit = fit_alpha_beta([p["bytes_per_rank"] for p in points], [p["median_s"] for p in points])
        beta = fit.get("beta_s_per_byte")
        fit["rate_multiple"] = beta * rate_bytes_per_s if beta and rate_bytes_per_s else None
        out[op] = fit
    return out


def predict_seconds(fit: dict, op: str, size_bytes: float, n: int) -> float:
    """A fit's time for ``op`` on ``size_bytes`` per rank (S as in BYTES_PER_RANK) and ``n``
    ranks: alpha + beta * max(0, b - free). The fit holds for the link and rank count it was
    measured on (on one shared bucket beta grows with n: see docs/emulator.md)."""
    b = BYTES_PER_RANK[op][1](size_bytes, n)
    return fit["alpha_s"] + fit["beta_s_per_byte"] * max(0.0, b - fit["free_bytes_per_rank"])


def settle_seconds(link: dict | None, cluster: dict | None) -> float:
    """Idle time before each call that refills every token bucket: burst / rate of the
    slowest shaped device, plus 10 %; 0 where nothing is shaped."""
    shapes = [link] if link else [cluster["inter"], cluster["intra"]] if cluster else []
    waits = [s["burst_bytes"] / s["rate_bytes_per_s"] for s in shapes if s and s.get("rate_bytes_per_s")]
    return 1.1 * max(waits, default=0.0)


def slowest_rate(link: dict | None, cluster: dict | None) -> float | None:
    """Bytes/s of the bucket a cross-rank byte must pass: the link's, or the cluster's
    inter-node rate (its loopbacks' where there is a single node)."""
    if link:
        return link.get("rate_bytes_per_s")
    if cluster:
        side = "inter" if cluster["nodes"] > 1 else "intra"
        return cluster[side].get("rate_bytes_per_s")
    return None


def format_table(record: dict) -> str:
    ops = list(record["results"])
    sizes = sorted({p["bytes"] for pts in record["results"].values() for p in pts})
    lines = [f"{record['framework']} (Gloo), {record['world_size']} ranks, {record['link_description']}",
             f"{'bytes S':>12}" + "".join(f"{op + ' ms':>16}" for op in ops)]
    for s in sizes:
        cells = []
        for op in ops:
            hit = [p["median_s"] for p in record["results"][op] if p["bytes"] == s]
            cells.append(f"{hit[0] * 1e3:>16.2f}" if hit else f"{'-':>16}")
        lines.append(f"{s:>12,}" + "".join(cells))
    lines.append("fit t = alpha + beta * max(0, b - free), b = bytes_per_rank; x rate = beta * link bytes/s:")
    for op, f in record["fits"].items():
        if not f["points"]:
            continue
        bandwidth = f["max_abs_rel_error_bandwidth"]
        formula = BYTES_PER_RANK[op_and_dtype(op)[0]][0]
        lines.append(f"  {op:<17} b = {formula:<12} alpha {f['alpha_s'] * 1e3:7.3f} ms  beta "
                     f"{f['beta_s_per_byte'] * 1e9:8.3f} ns/B  free {f['free_bytes_per_rank']:>11,.0f} B  x rate "
                     f"{_multiple(f):>5}  max |err| {f['max_abs_rel_error']:4.0%} (bandwidth-bound sizes "
                     + (f"{bandwidth:.0%})" if bandwidth is not None else "-)"))
    return "\n".join(lines)


def _multiple(fit: dict) -> str:
    return f"{fit['rate_multiple']:.2f}" if fit.get("rate_multiple") else "-"


def _from_env(name: str) -> dict | None:
    return json.loads(os.environ[name]) if os.environ.get(name) else None


def _framework(choice: str):
    if choice == "auto":
        choice = "horovod" if "HOROVOD_RANK" in os.environ else "torch" if "RANK" in os.environ else None
    if choice is None:
        raise SystemExit("bench.collectives_sweep runs on ranks: start it with horovodrun, torchrun or "
                         "python -m launch.cluster (or pass --framework)")
    return HorovodRanks() if choice == "horovod" else TorchRanks()


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.collectives_sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--framework", choices=("auto", "horovod", "torch"), default="auto")
    p.add_argument("--ops", default=",".join(SWEPT), help=f"comma-separated subset of {','.join(SWEPT)}")
    p.add_argument("--sizes", help="comma-separated bytes per rank (default 1 KiB .. 32 MiB, doubling)")
    p.add_argument("--reps", type=int, default=5, help="timed calls per size after one warm-up (median)")
    p.add_argument("--max-call-seconds", type=float, default=2.0,
                   help="a size whose warm-up call takes longer ends that collective's sweep")
    p.add_argument("--settle-seconds", type=float,
                   help="idle seconds before each call (default: what refills the link's token buckets)")
    p.add_argument("--out", default="results/collectives_sweep.json")
    p.add_argument("--add-to", metavar="RECORD",
                   help="sweep --ops on the same launch as RECORD and add (or replace) their results and fits "
                        "in it, in place, instead of writing --out")
    p.add_argument("--refit", metavar="RECORD", nargs="+",
                   help="no ranks: recompute the fits and table of these records from their points, in place")
    args = p.parse_args(argv)
    args.ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    if not args.ops or any(o not in SWEPT for o in args.ops):
        p.error(f"--ops must name some of {', '.join(SWEPT)}; got {args.ops}")
    try:
        args.sizes = sorted(int(s) for s in args.sizes.split(",")) if args.sizes else DEFAULT_SIZES
    except ValueError:
        p.error(f"--sizes takes integers (bytes), got {args.sizes!r}")
    if args.sizes[0] < 4 or args.reps < 1 or args.max_call_seconds <= 0:
        p.error("sizes must be >= 4 bytes, --reps >= 1, --max-call-seconds > 0")
    return args


def refit(path: str) -> dict:
    """Recompute a stored record's fits and table from its points (after a change of the
    fit), noting the command that did it."""
    with open(path) as f:
        record = json.load(f)
    record["fits"] = fits(record["results"], record["slowest_rate_bytes_per_s"])
    record["refit_command"] = shlex.join(["python", "-m", "bench.collectives_sweep", "--refit", path])
    emit(record, format_table(record), path)
    return record


def main(argv=None) -> dict | list | None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)  # every rank parses alike, so bad input stops all before a collective
    if args.refit:
        return [refit(path) for path in args.refit]
    torch.set_num_threads(1)
    ranks = _framework(args.framework)
    link, cluster = _from_env("HVDCOMP_LINK"), _from_env("HVDCOMP_CLUSTER")
    target = _record_to_extend(ranks, args.add_to, link, cluster) if args.add_to else None
    settle = settle_seconds(link, cluster) if args.settle_seconds is None else args.settle_seconds
    load_before = os.getloadavg()
    shared_clock = one_machine(ranks)
    results = sweep(ranks, args.ops, args.sizes, args.reps, args.max_call_seconds, settle, shared_clock)
    ranks.close()
    if ranks.rank != 0:
        return None
    rate = slowest_rate(link, cluster)
    from bench.step_times import heap_settings

    heap = heap_settings(os.environ)
    if target is not None:
        return _extend(target, args.add_to, results, rate, argv, load_before, heap)

    record = {
        **record_header(SCHEMA, "bench.collectives_sweep", argv, ranks),
        "load_average_1min": {"start": load_before[0], "end": os.getloadavg()[0]},
        "dtype": "float32",
        "heap": heap,
        "reps": args.reps, "max_call_seconds": args.max_call_seconds, "settle_seconds": settle,
        "timing": "first entry to last exit (one machine's clock)" if shared_clock else "longest rank's own window",
        "link": link, "cluster": cluster, "slowest_rate_bytes_per_s": rate,
        "link_description": _describe(link, cluster),
        "bytes_per_rank_formulas": {op: BYTES_PER_RANK[op_and_dtype(op)[0]][0] for op in args.ops},
        "values": {key: values_described(key) for key in args.ops},
        "results": results,
        "fits": fits(results, rate),
    }
    emit(record, format_table(record), args.out)
    return record


def record_header(schema: str, module: str, argv, ranks) -> dict:
    """What every rank-side bench record starts with: schema, the launcher's and the
    rank's command, time, device, versions, framework and world size."""
    import hvdcomp

    return {"schema": schema, "command": os.environ.get("HVDCOMP_LAUNCH_COMMAND"),
            "rank_command": shlex.join(["python", "-m", module, *argv]),
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
            "versions": {"torch": torch.__version__, "python": platform.python_version(),
                         "hvdcomp": hvdcomp.__version__, **ranks.versions},
            "framework": ranks.name, "backend": "gloo", "world_size": ranks.size, **ranks.settings}


#: What must match for a sweep to be added to a record: the same launch, link and binding.
SAME_LAUNCH = ("framework", "world_size", "link", "cluster", "horovod_cycle_time_ms", "ranks_pinned")


def _record_to_extend(ranks, path: str, link: dict | None, cluster: dict | None) -> dict | None:
    """``--add-to``'s record, read and checked on rank 0 before any timed call; every rank
    stops alike where it is missing or was swept on another launch (rank 0 says why)."""
    record, why = None, ""
    if ranks.rank == 0:
        try:
            record = json.loads(Path(path).read_text())
            here = {"framework": ranks.name, "world_size": ranks.size, "link": link, "cluster": cluster,
                    "horovod_cycle_time_ms": ranks.settings.get("horovod_cycle_time_ms"),
                    "ranks_pinned": ranks.settings.get("ranks_pinned")}
            differ = [k for k in SAME_LAUNCH if record.get(k) != here[k]]
            if record.get("schema") != SCHEMA:
                why = f"{path} is not a {SCHEMA} record"
            elif differ:
                why = f"{path} was swept on another launch: {', '.join(differ)} differ"
        except (OSError, ValueError) as e:
            why = f"cannot read {path}: {e}"
    (refused,) = ranks.maximum([1.0 if why else 0.0])
    if refused:
        ranks.close()
        raise SystemExit(f"bench.collectives_sweep --add-to: {why or 'rank 0 refused the record'}")
    return record


def _extend(record: dict, path: str, results: dict, rate: float | None, argv, load_before, heap: dict) -> dict:
    """``record`` with ``results`` and their fits added (a key swept again is replaced),
    and what added them in ``added`` (command, time, load, the ranks' heap, keys)."""
    record["results"].update(results)
    record["fits"].update(fits(results, rate))
    record["bytes_per_rank_formulas"].update({k: BYTES_PER_RANK[op_and_dtype(k)[0]][0] for k in results})
    record.setdefault("values", {}).update({k: values_described(k) for k in results})
    record.setdefault("added", []).append({
        "command": os.environ.get("HVDCOMP_LAUNCH_COMMAND"),
        "rank_command": shlex.join(["python", "-m", "bench.collectives_sweep", *argv]),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "load_average_1min": {"start": load_before[0], "end": os.getloadavg()[0]},
        "heap": heap, "keys": list(results)})
    emit(record, format_table(record), path)
    return record


def _describe(link: dict | None, cluster: dict | None) -> str:
    def rate(shape):
        return "unshaped" if not shape or shape.get("rate_bits_per_s") is None else f"{shape['rate_bits_per_s'] / 1e6:g} Mbit/s"

    if cluster:
        return (f"launch.cluster {cluster['nodes']} nodes x {cluster['ranks_per_node']} ranks, inter-node "
                f"{rate(cluster['inter'])} per direction, intra-node {rate(cluster['intra'])}")
    if link:
        return f"launch.link loopback {rate(link)} (one bucket shared by all ranks)"
    return "no emulated link (as launched)"


if __name__ == "__main__":
    main()
