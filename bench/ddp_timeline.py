"""Where one DDP step's time goes: a timeline of rank 0's step through ``hvdcomp.ddp``'s hook.

For each of a few steps after a warm-up it logs, against the step's start (ms): the end of
the forward and backward passes and of the optimizer's step, every chain's local work
(``ChainRun.advance``: the encode, then the work after each phase's results, the last ending
in the decode; from when it began to when it returned, and on which thread), and every
collective (from its issue to the callback of its completion). It is a diagnostic
for the cost model (``hvdcomp.costs``), whose DDP driver assumes each collective costs its
latency plus its bytes and each piece of local work its calibrated time, slowed only by the
other work runnable on the rank's core: here one sees a small collective wait for the other
rank, or a decode run in a completion callback beside the backward pass. It wraps
``ChainRun.advance`` and ``TorchCollectives._issue`` in this process only (timing, nothing
else). Run it under torchrun, on a shaped link if wanted::

    python -m launch.link --rate 500mbit -- torchrun --nproc-per-node 2 --master-addr 127.0.0.1 \\
        -m bench.ddp_timeline --model mlp --compression terngrad --pin-ranks --out timeline.json

Prints the table of each logged step and writes the JSON (events, command, versions,
machine).
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import threading
import time

import torch
import torch.distributed as dist

from bench import collectives_sweep as sweep
from bench._record import emit
from bench.models import get_model


class Timeline:
    """Events of the current step (ms since :meth:`start`): ``(begin, end, thread, kind,
    what)``; appended from any thread."""

    def __init__(self):
        self.lock = threading.Lock()
        self.start()

    def start(self) -> None:
        with self.lock:
            self.events = []
            self.chains: dict = {}  # id of a ChainRun -> its number in this step
            self.origin = time.perf_counter()

    def chain_name(self, run) -> str:
        """``chain <n> (<kind>)``, numbered in the order the step's chains first ran."""
        with self.lock:
            number = self.chains.setdefault(id(run), len(self.chains))
        return f"chain {number} ({run.key})"

    def now(self) -> float:
        return (time.perf_counter() - self.origin) * 1e3

    def add(self, begin: float, kind: str, what: str) -> None:
        with self.lock:
            self.events.append((round(begin, 2), round(self.now(), 2), threading.current_thread().name, kind, what))


def instrument(timeline: Timeline) -> None:
    """Wrap the chains' phases and the DDP transport's collectives to log into ``timeline``."""
    from hvdcomp.core.chains import ChainRun
    from hvdcomp.ddp.collectives import TorchCollectives

    advance, issue = ChainRun.advance, TorchCollectives._issue

    def timed_advance(self, *args, **kwargs):
        begin, phase, name = timeline.now(), self.phase, timeline.chain_name(self)
        more = advance(self, *args, **kwargs)
        work = "encode" if phase < 0 else f"after phase {phase}" + ("" if more else ": decode")
        timeline.add(begin, "local work", f"{name} {work}")
        return more

    def timed_issue(self, req, *args, **kwargs):
        begin = timeline.now()
        future, done = issue(self, req, *args, **kwargs)
        what = f"{type(req).__name__} {req.tensor.numel() * req.tensor.element_size()} B"
        future.then(lambda _: timeline.add(begin, "collective", what))
        return future, done

    ChainRun.advance, TorchCollectives._issue = timed_advance, timed_issue


def table(steps: list) -> str:
    lines = []
    for step in steps:
        lines.append(f"step {step['step']}: forward {step['forward_ms']:.1f}, backward (with the exchange) "
                     f"{step['backward_ms']:.1f}, optimizer step {step['step_ms']:.1f} ms")
        lines.append(f"  {'begin ms':>9} {'end ms':>9}  {'thread':<24} {'kind':<10} what")
        for begin, end, thread, kind, what in sorted(step["events"]):
            lines.append(f"  {begin:9.1f} {end:9.1f}  {thread[:24]:<24} {kind:<10} {what}")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="mlp", help="bench.models name")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--compression", default="terngrad", help="registered compressor name")
    ap.add_argument("--ratio", type=float, default=None, help="for topk, randomk, scalecom")
    ap.add_argument("--warmup", type=int, default=8, help="untimed steps first")
    ap.add_argument("--steps", type=int, default=2, help="steps logged")
    ap.add_argument("--pin-ranks", action="store_true", help="bind each rank to core <local rank> mod <cores>")
    ap.add_argument("--out", default="ddp_timeline.json")
    args = ap.parse_args(argv)
    if args.warmup < 0 or args.steps < 1:
        ap.error("--warmup must be >= 0 and --steps >= 1")
    if "LOCAL_RANK" not in os.environ:
        ap.error("run it under torchrun (it needs LOCAL_RANK, RANK, WORLD_SIZE)")
    if args.pin_ranks:
        os.environ[sweep.PIN_RANKS_ENV] = "1"
    pinned = sweep.pin_to_one_core("LOCAL_RANK")
    torch.set_num_threads(1)

    import hvdcomp
    import hvdcomp.ddp

    spec = get_model(args.model)
    params = {} if args.ratio is None else {"ratio": args.ratio}
    compression = hvdcomp.compression_from_name(args.compression, **params)
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = spec.build()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
    ddp.register_comm_hook(hvdcomp.ddp.CompressionState(compression, named_parameters=model.named_parameters(),
                                                        optimizer=opt), hvdcomp.ddp.compression_hook)
    batch = spec.batch(args.batch, "cpu")
    timeline = Timeline()
    instrument(timeline)
    steps = []
    for i in range(args.warmup + args.steps):
        dist.barrier()
        timeline.start()
        opt.zero_grad()
        loss = spec.loss(ddp, batch)
        forward = timeline.now()
        loss.backward()
        backward = timeline.now()
        opt.step()
        if i >= args.warmup:
            steps.append({"step": i, "forward_ms": forward, "backward_ms": backward, "step_ms": timeline.now(),
                          "events": list(timeline.events)})
    rank, size = dist.get_rank(), dist.get_world_size()
    dist.barrier()
    # The hook's state, DDP and the optimizer hold one another (and the hook's phase
    # groups) in reference cycles, which would otherwise be collected at interpreter exit,
    # their Gloo threads still running: a process torn down so can abort.
    del ddp, opt
    gc.collect()
    dist.destroy_process_group()
    if rank != 0:
        return
    record = {"schema": "hvdcomp.ddp_timeline/1", "model": args.model, "batch_per_rank": args.batch,
              "compression": args.compression, "params": params, "world_size": size, **pinned,
              "machine": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
              "versions": {"torch": torch.__version__, "python": platform.python_version(),
                           "hvdcomp": hvdcomp.__version__},
              "command": "python -m bench.ddp_timeline " + " ".join(sys.argv[1:] if argv is None else argv),
              "timing": "rank 0's perf_counter from just after a barrier; events from any of its threads",
              "steps": steps}
    emit(record, table(steps), args.out)


if __name__ == "__main__":
    main()
