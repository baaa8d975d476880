"""Independent in-process runs (:func:`launch.simulate.train_inprocess`) in worker processes.

Each run is single-threaded (``torch.set_num_threads(1)``) and owns its N simulated ranks,
so runs share nothing and ``jobs`` of them use ``jobs`` cores. A run's record is the same
whichever worker makes it (its numbers depend only on its arguments; only the timing keys
differ), which ``tests/test_simulate.py`` checks against the serial path.
"""
from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import sys
import time


def run_one(spec: dict) -> str:
    """Train one run and write its record to ``spec["path"]``; returns a one-line summary.
    ``spec``: ``path`` plus :func:`launch.simulate.train_inprocess`'s arguments by name."""
    import torch

    from .simulate import train_inprocess

    torch.set_num_threads(1)
    kwargs = {k: v for k, v in spec.items() if k != "path"}
    record = train_inprocess(**kwargs)
    with open(spec["path"], "w") as f:
        json.dump(record, f, indent=2, default=str)
    return (f"{spec['task']} seed {spec['seed']} {spec['name']} {spec['params']}: {record['final']} "
            f"ratio {record['ratio']:.1f}x in {record['seconds']:.0f} s")


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)


def run_all(specs: list[dict], jobs: int = 1) -> None:
    """Run every spec, ``jobs`` at a time (``jobs <= 1``: in this process, in order). Workers
    are spawned, not forked: the parent may hold torch's thread pools (the spot check ran in
    it), which a forked child can inherit in a locked state."""
    start = time.perf_counter()

    def report(line: str, done: int) -> None:
        print(f"[compare] {done}/{len(specs)} {line} ({time.perf_counter() - start:.0f} s elapsed)",
              file=sys.stderr, flush=True)

    if jobs <= 1:
        for i, spec in enumerate(specs):
            report(run_one(spec), i + 1)
        return
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init) as pool:
        futures = [pool.submit(run_one, spec) for spec in specs]
        try:
            for i, fut in enumerate(concurrent.futures.as_completed(futures)):
                report(fut.result(), i + 1)
        except BaseException:
            pool.shutdown(cancel_futures=True)  # a failed run stops the comparison, not after the rest
            raise
