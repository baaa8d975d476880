"""Measured step time per method on real ranks over an emulated link (issue 24).

    python -m bench.step_times                                  # the whole campaign (about an hour)
    python -m bench.step_times --models mlp --ranks 2 --transports horovod --rates 50mbit
    python -m bench.step_times --models small --ranks 2 --transports ddp --rates unshaped \\
        --methods none "topk 1%" --max-steps 3                   # a quick look

For every (model, ranks, transport, rate) it makes ONE launch (start-up costs seconds):
``python -m launch.link --rate R -- horovodrun -np N ... python -m bench.step_times --rank-side``
(Horovod: ``hvdcomp.DistributedOptimizer``) or ``... torchrun --nproc-per-node N ...`` (DDP
with ``hvdcomp.ddp.compression_hook``), in which every rank calibrates (forward, backward,
update without exchange; per method the compress and decode time and the bytes of every
collective through the real chains) and then trains every method for a few warm-up and
timed steps (:mod:`bench.step_ranks`). Defaults: models ``mlp`` (6.3 M parameters: the
network dominates) and ``small`` (a small CNN: compute dominates on fast links), 2 and 4
ranks, both transports, 50 Mbit/s, 500 Mbit/s and unshaped; every compressor at its
defaults, top-k / random-k / ScaleCom at 1 %, DGC with ``warmup_steps=0`` (past its warm-up)
and with its default warm-up (its first stage), plus the framework's own exchange.

Each launch writes ``<out-dir>/<model>_<transport>_<N>ranks_<rate>.json`` (schema
``hvdcomp.step_times/1``): the command, versions, machine, load average, link shape,
calibration, per method every timed step's time (the slowest rank's), their median, the
bytes each rank handed to the transport (telemetry), the bytes the loopback carried per
step (``wire_bytes_per_step``), the pages faulted in per step (the most any rank did) and
the seconds the hypervisor stole from the machine per step (``steal_s_per_step``).
Each (transport, ranks, rate) is first swept by ``bench.collectives_sweep``, and its
latency under load timed by ``bench.loaded_latency``, where ``--sweeps-dir`` has no record
of it. ``bench.cost_model`` predicts these records.
``--horovod-cycle-time-ms T`` runs the Horovod launches (and their sweeps) with
horovodrun's ``--cycle-time-ms T``; their files end in ``_cycle<T>ms.json``.
``--pin-ranks`` binds each rank, with the threads it starts, to core ``local rank mod cores``
(:func:`bench.collectives_sweep.pin_to_one_core`); files end in ``_pinned.json``. With more
ranks than cores (4 on this 2-core machine) this is what makes a launch repeatable.
On a shared machine, run one group at a time while nothing else runs: the calibration and
the steps share the cores.

Every rank (and every sweep) runs with glibc's heap held steady (:data:`STEADY_HEAP_ENV`):
freed buffers stay in the process for the next step instead of going back to the kernel.
``--glibc-default-heap`` leaves glibc's own settings; its files end in ``_glibcheap``.

On a cluster of your own, start the rank side with your launcher (and the sweep likewise)::

    horovodrun -np 8 -H a:4,b:4 python -m bench.collectives_sweep --out sweep.json
    horovodrun -np 8 -H a:4,b:4 python -m bench.step_times --rank-side --model mlp --iface eth0 --out steps.json
    python -m bench.cost_model --records steps.json --sweep sweep.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

SCHEMA = "hvdcomp.step_times/1"
MODELS = {"mlp": 64, "small": 128}  # model -> batch per rank
RATES = ["50mbit", "500mbit", "unshaped"]
#: Horovod's own ``HOROVOD_CYCLE_TIME`` (ms): how often its background thread wakes to
#: coordinate the ranks, which it does every cycle, idle or not.
HOROVOD_DEFAULT_CYCLE_TIME_MS = 1.0
_REPO = Path(__file__).resolve().parents[1]
#: glibc malloc's settings for the ranks (and sweeps) this module starts: one arena for all
#: threads, the heap's top never trimmed, no chunk served by its own mmap. With glibc's own
#: settings a freed buffer of a few MiB or more goes back to the kernel (a chunk of 32 MiB
#: or more always, a smaller one when the top of the heap is trimmed or a thread's arena
#: deleted), and the next step's buffer of that size is new memory, faulted in a page at a
#: time: which steps pay that depends on what the process freed before, and a
#: calibration's replays paid it where the training steps did not. Held steady, a step
#: faults in next to nothing (docs/performance.md, "Page faults", has the measurements).
#: The price is memory: what is freed stays with the process, and the heap may grow to a
#: few times a buffer's size before every request fits a hole it holds.
STEADY_HEAP_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_TRIM_THRESHOLD_": str(1 << 40), "MALLOC_MMAP_MAX_": "0"}
#: MiB of touched heap every rank holds before the first round (``--heap-reserve-mib``,
#: :func:`bench.step_ranks.reserve_heap`): the heap's growth in the rounds takes its pages
#: from there, not fresh from the kernel. It is more than a rank's heap grew in the rounds
#: of the mlp's launch through DDP on 2 ranks (docs/performance.md, "The heap's reserve").
HEAP_RESERVE_MIB = 512


def default_cycle(cycle_time_ms: float | None) -> bool:
    """Whether a launch ran at Horovod's own cycle time (None: horovodrun was not told one)."""
    return cycle_time_ms in (None, HOROVOD_DEFAULT_CYCLE_TIME_MS)


def variant(transport: str, cycle_time_ms: float | None, pinned: bool = False, glibc_heap: bool = False) -> str:
    """What names a launch apart from the defaults: ``"cycle5ms"`` for a Horovod launch with
    a cycle time other than Horovod's default, ``"pinned"`` for ranks bound to one core each
    (``--pin-ranks``), ``"glibcheap"`` for ranks with glibc's own heap settings
    (``--glibc-default-heap``), joined by ``_``; ``""`` for the defaults."""
    parts = []
    if transport == "horovod" and not default_cycle(cycle_time_ms):
        parts.append(f"cycle{cycle_time_ms:g}ms")
    if pinned:
        parts.append("pinned")
    if glibc_heap:
        parts.append("glibcheap")
    return "_".join(parts)


def record_variant(record: dict) -> str:
    """:func:`variant` of a step_times or collectives_sweep record (a step_times record
    without ``heap``, from before :data:`STEADY_HEAP_ENV`, ran with glibc's settings)."""
    glibc_heap = "rows" in record and record.get("heap", {}).get("steady") is not True
    return variant(record["framework"], record.get("horovod_cycle_time_ms"), record.get("ranks_pinned", False),
                   glibc_heap)


def heap_settings(environ) -> dict:
    """What a rank's record says of its heap: ``steady`` (every :data:`STEADY_HEAP_ENV`
    setting in ``environ``) and the values it saw."""
    seen = {k: environ.get(k) for k in STEADY_HEAP_ENV}
    return {"steady": seen == STEADY_HEAP_ENV, "env": seen}


def _suffix(name: str) -> str:
    return f"_{name}" if name else ""


def record_name(model: str, transport: str, nranks: int, rate: str, cycle_time_ms: float | None = None,
                pinned: bool = False, glibc_heap: bool = False) -> str:
    name = variant(transport, cycle_time_ms, pinned, glibc_heap)
    return f"{model}_{transport}_{nranks}ranks_{rate}{_suffix(name)}.json"


def rank_command(args, model: str, out: Path) -> list[str]:
    cmd = ["--rank-side", "--model", model, "--batch", str(args.batch or MODELS.get(model, 64)), "--out", str(out),
           "--warmup", str(args.warmup), "--budget-seconds", str(args.budget_seconds),
           "--max-steps", str(args.max_steps), "--min-steps", str(args.min_steps), "--rounds", str(args.rounds),
           "--calib-reps", str(args.calib_reps)]
    if args.settle_steps is not None:
        cmd += ["--settle-steps", str(args.settle_steps)]
    # glibc's own heap would hand the reserve back to the kernel as soon as it is freed.
    cmd += ["--heap-reserve-mib", "0" if args.glibc_default_heap else str(args.heap_reserve_mib)]
    if args.methods:
        cmd += ["--methods", *args.methods]
    return cmd


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(transport: str, nranks: int, module: str, rank_args: list[str],
                   cycle_time_ms: float | None = None) -> list[str]:
    """The launcher's argv (run inside launch.link's namespace) for ``python -m module``;
    ``cycle_time_ms``: horovodrun's ``--cycle-time-ms`` (Horovod only; None: its default)."""
    bindir = Path(sys.executable).parent
    if transport == "horovod":
        horovodrun = shutil.which("horovodrun", path=str(bindir)) or "horovodrun"
        cycle = [] if cycle_time_ms is None else ["--cycle-time-ms", f"{cycle_time_ms:g}"]
        return [horovodrun, "-np", str(nranks), "-H", f"localhost:{nranks}", "--gloo", *cycle,
                sys.executable, "-m", module, *rank_args]
    torchrun = shutil.which("torchrun", path=str(bindir)) or "torchrun"
    return [torchrun, "--nproc-per-node", str(nranks), "--master-addr", "127.0.0.1",
            "--master-port", str(_free_port()), "-m", module, *rank_args]


def sweep_name(transport: str, nranks: int, rate: str, cycle_time_ms: float | None = None,
               pinned: bool = False) -> str:
    """The calibration record ``bench.cost_model`` looks for (docs/emulator.md's names)."""
    framework = "horovod" if transport == "horovod" else "torch"
    return f"link_{framework}_{nranks}ranks_{rate}{_suffix(variant(transport, cycle_time_ms, pinned))}.json"


def loaded_name(sweep: str) -> str:
    """The ``bench.loaded_latency`` record beside sweep ``sweep`` (a :func:`sweep_name`):
    ``loaded_`` for its ``link_``."""
    return "loaded_" + sweep.removeprefix("link_")


def rank_env(args, **extra) -> dict:
    """The launcher's environment: one thread per rank, the steady heap unless
    ``--glibc-default-heap``, and ``--pin-ranks``'s request."""
    from bench.collectives_sweep import PIN_RANKS_ENV

    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    if not args.glibc_default_heap:
        env.update(STEADY_HEAP_ENV)
    if args.pin_ranks:
        env[PIN_RANKS_ENV] = "1"
    return env


def run_sweep(args, transport: str, nranks: int, rate: str) -> Path | None:
    """``bench.collectives_sweep`` on the same link, launcher and rank count, unless its
    record exists (``--resweep`` replaces it); a record that lacks some of what a sweep
    times now (one from before ``allreduce_float16``), or timed a key on other values than
    a sweep passes in now (fp16 on constants, before its random values), has only those
    swept again (``--add-to``)."""
    from bench.collectives_sweep import RANK_PLUS_ONE, SWEPT, values_described

    out = Path(args.sweeps_dir) / sweep_name(transport, nranks, rate, args.horovod_cycle_time_ms, args.pin_ranks)
    sweep_args = ["--out", str(out)]
    if out.exists() and not args.resweep:
        stored = json.loads(out.read_text())
        values = stored.get("values", {})
        missing = [k for k in SWEPT
                   if k not in stored["results"] or values.get(k, RANK_PLUS_ONE) != values_described(k)]
        if not missing:
            return out
        sweep_args = ["--ops", ",".join(missing), "--add-to", str(out)]
    print(f"[step_times] collectives sweep: {transport} {nranks} ranks {rate} {' '.join(sweep_args)}", flush=True)
    run_calibration(args, transport, nranks, rate, "bench.collectives_sweep", sweep_args, "sweep")
    return out


def run_loaded_latency(args, transport: str, nranks: int, rate: str) -> Path:
    """``bench.loaded_latency`` on the same link, launcher and rank count, unless its record
    exists beside the sweep (``--resweep`` replaces it)."""
    sweep = sweep_name(transport, nranks, rate, args.horovod_cycle_time_ms, args.pin_ranks)
    out = Path(args.sweeps_dir) / loaded_name(sweep)
    if out.exists() and not args.resweep:
        return out
    print(f"[step_times] loaded latency: {transport} {nranks} ranks {rate}", flush=True)
    run_calibration(args, transport, nranks, rate, "bench.loaded_latency", ["--out", str(out)], "loaded latency")
    return out


def run_calibration(args, transport: str, nranks: int, rate: str, module: str, module_args: list[str],
                    what: str) -> None:
    """``python -m module module_args`` on ``nranks`` ranks of ``transport``'s launcher on the
    shaped link; a failed launch stops the campaign, naming ``what`` failed."""
    from launch import link

    cmd = launch_command(transport, nranks, module, module_args, args.horovod_cycle_time_ms)
    done = link.run(cmd, rate=rate, env=rank_env(args), cwd=_REPO, timeout=args.timeout)
    if done.returncode != 0:
        raise SystemExit(f"[step_times] {what} failed ({done.returncode}): {shlex.join(cmd)}")


def run_group(args, model: str, transport: str, nranks: int, rate: str) -> Path:
    """One launch on one shaped link; returns the record's path."""
    from launch import link

    out = Path(args.out_dir) / record_name(model, transport, nranks, rate, args.horovod_cycle_time_ms, args.pin_ranks,
                                          args.glibc_default_heap)
    qdisc = out.with_suffix(".qdisc.json")
    cmd = launch_command(transport, nranks, "bench.step_times", rank_command(args, model, out),
                         args.horovod_cycle_time_ms)
    env = rank_env(args, PYTHONUNBUFFERED="1")
    print(f"[step_times] {model} {transport} {nranks} ranks {rate}", flush=True)
    t0 = time.monotonic()
    done = link.run(cmd, rate=rate, report_qdisc=qdisc, env=env, cwd=_REPO, timeout=args.timeout)
    if done.returncode != 0:
        raise SystemExit(f"[step_times] launch failed ({done.returncode}): {shlex.join(cmd)}")
    record = json.loads(out.read_text())
    record["rate"] = rate
    record["launch_command"] = shlex.join(link.command_in_shaped_namespace(cmd, rate=rate))
    record["campaign_command"] = args.command
    record["launch_wall_s"] = time.monotonic() - t0
    if qdisc.exists():
        record["qdisc_report"] = json.loads(qdisc.read_text())
        qdisc.unlink()
    out.write_text(json.dumps(record, indent=1, default=str))
    return out


def rank_side(args) -> None:
    """On every rank: :func:`bench.step_ranks.launch`; rank 0 writes the record."""
    from bench import step_ranks

    iface = args.iface or os.environ.get("HVDCOMP_CLUSTER_IFACE") or "lo"
    record = step_ranks.launch("horovod" if "HOROVOD_RANK" in os.environ else "ddp", args.model,
                               args.batch or MODELS.get(args.model, 64), args.methods, args.warmup,
                               args.budget_seconds, args.max_steps, args.min_steps, args.rounds, args.calib_reps,
                               0.01, lambda s: print(s, flush=True), iface,
                               step_ranks.SETTLE_STEPS if args.settle_steps is None else args.settle_steps,
                               args.heap_reserve_mib << 20)
    if record is None:
        return
    link = json.loads(os.environ["HVDCOMP_LINK"]) if os.environ.get("HVDCOMP_LINK") else None
    record.update({"schema": SCHEMA, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "link": link,
                   "heap": heap_settings(os.environ),
                   "rank_command": shlex.join(["python", "-m", "bench.step_times", *sys.argv[1:]]),
                   "command": os.environ.get("HVDCOMP_LAUNCH_COMMAND"),
                   "timing": "per step: the slowest rank's perf_counter from zero_grad to the end of step(); "
                             "steps back to back after the warm-up; median over the timed steps"})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1, default=str))


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.step_times", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), help="bench.models names")
    p.add_argument("--ranks", nargs="+", type=int, default=[2, 4])
    p.add_argument("--transports", nargs="+", choices=("horovod", "ddp"), default=["horovod", "ddp"])
    p.add_argument("--rates", nargs="+", default=RATES, help="launch.link rates")
    p.add_argument("--methods", nargs="+", default=None, help="labels (default: all; see bench.step_ranks.METHODS)")
    p.add_argument("--batch", type=int, default=None, help=f"per rank (default: {MODELS})")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per method")
    p.add_argument("--budget-seconds", type=float, default=20.0, help="timed seconds per method (about)")
    p.add_argument("--max-steps", type=int, default=10)
    p.add_argument("--min-steps", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="the methods take turns, this many times")
    p.add_argument("--calib-reps", type=int, default=6,
                   help="per round: steps without exchange; and, split over the rounds, replays per method")
    p.add_argument("--settle-steps", type=int, default=None,
                   help="untimed steps before each method's timed steps in every round, where its steps are "
                        "shorter than 1 s (default: bench.step_ranks.SETTLE_STEPS)")
    p.add_argument("--horovod-cycle-time-ms", type=float, default=None,
                   help="Horovod launches only: horovodrun's --cycle-time-ms (default: Horovod's, "
                        f"{HOROVOD_DEFAULT_CYCLE_TIME_MS:g} ms); named in the records' and sweeps' file names")
    p.add_argument("--pin-ranks", action="store_true",
                   help="bind each rank (and the threads it starts) to core <local rank> mod <cores>; named "
                        "in the records' and sweeps' file names (_pinned)")
    p.add_argument("--glibc-default-heap", action="store_true",
                   help="leave glibc malloc's own settings to the ranks instead of STEADY_HEAP_ENV; named in "
                        "the records' file names (_glibcheap)")
    p.add_argument("--heap-reserve-mib", type=int, default=HEAP_RESERVE_MIB,
                   help="MiB of touched heap every rank holds before the first round, so that the heap's "
                        "growth in the rounds faults in no fresh pages (bench.step_ranks.reserve_heap; "
                        "0 with --glibc-default-heap)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per launch")
    p.add_argument("--out-dir", default="bench/results/step_times")
    p.add_argument("--sweeps-dir", default="bench/results/collectives",
                   help="bench.collectives_sweep records: each (transport, ranks, rate) is swept first if missing")
    p.add_argument("--resweep", action="store_true", help="sweep again even where a record exists")
    p.add_argument("--no-sweep", action="store_true", help="never run the sweep")
    ranks = p.add_argument_group("on ranks your launcher started (a cluster of your own)")
    ranks.add_argument("--rank-side", action="store_true",
                       help="run as one rank of one launch (horovodrun: Horovod; torchrun: DDP) and write --out")
    ranks.add_argument("--model", default="mlp", help="bench.models name")
    ranks.add_argument("--out", default="results/step_times.json")
    ranks.add_argument("--iface", default=None,
                       help="the interface whose counters give the bytes sent (default: HVDCOMP_CLUSTER_IFACE or lo)")
    args = p.parse_args(argv)
    if args.warmup < 1 or args.min_steps < 1 or args.max_steps < args.min_steps:
        p.error("--warmup >= 1 and 1 <= --min-steps <= --max-steps")
    if args.settle_steps is not None and args.settle_steps < 1:
        p.error("--settle-steps must be >= 1")
    if args.heap_reserve_mib < 0:
        p.error("--heap-reserve-mib must be >= 0")
    if args.horovod_cycle_time_ms is not None and not args.horovod_cycle_time_ms > 0:
        p.error("--horovod-cycle-time-ms must be > 0")
    return args


def main(argv=None) -> list[Path]:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    args.command = shlex.join(["python", "-m", "bench.step_times", *argv])
    if args.rank_side:
        rank_side(args)
        return []
    from bench.step_ranks import methods_named
    from launch import link

    for transport in args.transports:  # bad names stop here, before any launch
        methods_named(args.methods, transport)
    for rate in args.rates:
        link.shape(rate)
    out = []
    for n, transport, rate in itertools.product(args.ranks, args.transports, args.rates):
        if not args.no_sweep:
            run_sweep(args, transport, n, rate)
            run_loaded_latency(args, transport, n, rate)
        out += [run_group(args, model, transport, n, rate) for model in args.models]
    return out


if __name__ == "__main__":
    main()
