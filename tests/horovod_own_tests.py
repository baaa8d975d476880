"""Horovod 0.28.1's own optimizer tests, run with ``hvd.DistributedOptimizer`` replaced.

Horovod's ``TorchTests`` class is loaded from its unmodified ``test/parallel/test_torch.py``
(found by :mod:`horovod_test_source`) on each of 2 Gloo ranks. The module's global ``hvd``
is swapped for a namespace that is ``horovod.torch`` in every attribute but
``DistributedOptimizer``, which builds the optimizer of one configuration (:data:`CONFIGS`):

``horovod``  Horovod's own class: proves the harness (every selected test must pass).
``none``     ``hvdcomp.DistributedOptimizer(compression=hvdcomp.Compression.none())``.
``topk``     the same with ``Compression.topk(ratio=0.01)`` and ``min_compress_numel=0``,
             so every gradient, biases included, is sparsified (k = max(1, ceil(0.01 n)))
             and travels as a packed allgather payload. None of the selected tests
             asserts an exchanged value (they assert broadcast results, option types,
             names, warnings, gradients before the exchange), so a lossy compressor can
             pass them all; top-k exercises the most of hvdcomp's own machinery
             (error-feedback state, buckets, allgather).
``topk-factory``, ``topk-partial``
             top-k as above, substituted the way a user switches a large code base over:
             by reassigning ``horovod.torch.DistributedOptimizer`` itself (to a factory
             function, or to a ``functools.partial`` of ``hvdcomp.DistributedOptimizer``)
             instead of through a stand-in namespace, so every Horovod helper that reads
             that attribute sees the user's callable.

Horovod itself is not patched: ``hvd.broadcast_optimizer_state`` and the rest run as they
would in a user's script. Two changes to the tests' environment: (1) Horovod's optimizer
loops iterate over ``torch.optim.Optimizer.__subclasses__()``; torch 2.13's ``Muon``
accepts only 2-D parameters and fails in those loops for Horovod's own class too, so it is
left out of that list while the tests run (:func:`without_muon`); (2) Horovod is
initialised once per launch instead of once per test (:func:`initialise_once` says why).

Each rank writes its results to ``<out>/rank<r>.json`` after every test, so a launch that
stalls or is killed still says which tests finished and which one was running. A rank that
waits :data:`STALL_S` seconds in one Horovod ``synchronize`` (the other rank never starts
the matching collective) writes its stack and exits: the test is "hung", with that stack.

    python tests/horovod_own_tests.py --config topk [--timeout 300] [TEST ...]

prints one line per test (launcher); ``--rank-out DIR`` is the form ``horovodrun`` runs.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import faulthandler
import functools
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import types
import unittest
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

#: Tests of TorchTests that build a DistributedOptimizer and run on 2 CPU Gloo ranks.
SELECTED = (
    "test_broadcast_state",
    "test_broadcast_state_options",
    "test_broadcast_state_no_grad",
    "test_force_allreduce",
    "test_duplicate_names",
    "test_dynamic_requires_grad",
    "test_gradient_clipping",
    "test_synchronize_step_warning",
    "test_no_named_parameters",
    "test_missing_named_parameters",
    "test_optimizer_no_named_parameters",
    "test_sparse_embeddings",
    "test_optimizer_process_sets",
)
#: Tests that build a DistributedOptimizer but cannot run here, and why.
EXCLUDED = {
    "test_model_parallelism": "needs 2 GPUs per rank (places the model's layers on two devices); "
                              "skips itself without CUDA",
    "test_delta_optimizer": "needs MPI (Adasum without MPI is unsupported in Horovod 0.28.1: "
                            "skips unless hvd.mpi_enabled()) and a GPU (skips without CUDA)",
}
CONFIGS = ("horovod", "none", "topk", "topk-factory", "topk-partial")
#: Configurations that reassign ``horovod.torch.DistributedOptimizer`` itself.
REASSIGNING = ("topk-factory", "topk-partial")
#: torch.optim classes left out of Horovod's optimizer loops (see the module docstring).
LEFT_OUT_OF_LOOPS = ("Muon",)
#: A rank whose main thread stays this many seconds in one call of Horovod's
#: ``synchronize`` is stalled: the other ranks never submit the matching collective (the
#: selected tests' own collectives finish in well under a second). It writes its stack and
#: exits, which ends the launch at once instead of at its timeout.
STALL_S = 20.0
STATUSES = ("passed", "skipped", "failed", "error", "crashed", "hung", "not run")


# ---- rank side ---------------------------------------------------------------------------
def optimizer_factory(config: str):
    """The callable that stands for ``hvd.DistributedOptimizer`` under ``config``.

    It passes the test's arguments through unchanged, adding only the compression (and
    ``min_compress_numel=0``) for hvdcomp's configurations."""
    import horovod.torch as hvd

    if config == "horovod":
        return hvd.DistributedOptimizer
    import hvdcomp

    if config == "none":
        def compression():
            return hvdcomp.Compression.none()
    elif config in ("topk", *REASSIGNING):
        def compression():
            return hvdcomp.Compression.topk(ratio=0.01)
    else:
        raise ValueError(f"unknown config {config!r}; valid: {', '.join(CONFIGS)}")
    if config == "topk-partial":
        # A partial cannot build a fresh compressor per call: Horovod's tests build many
        # optimizers, each over other parameters, and one instance may serve them all.
        return functools.partial(hvdcomp.DistributedOptimizer, compression=compression(), min_compress_numel=0)

    def distributed_optimizer(optimizer, *args, **kwargs):
        return hvdcomp.DistributedOptimizer(optimizer, *args, compression=compression(), min_compress_numel=0,
                                            **kwargs)

    return distributed_optimizer


def horovod_namespace(distributed_optimizer) -> types.ModuleType:
    """A module that is ``horovod.torch`` except for ``DistributedOptimizer``."""
    import horovod.torch as hvd

    namespace = types.ModuleType("horovod.torch", "horovod.torch with DistributedOptimizer replaced")
    namespace.DistributedOptimizer = distributed_optimizer
    namespace.__getattr__ = lambda name: getattr(hvd, name)  # PEP 562: everything else is Horovod's
    return namespace


def _utils_standin() -> types.ModuleType:
    """Stand-in for Horovod's ``test/utils/common.py`` (which needs the ``mock`` package):
    the three helpers test_torch.py imports from it, with the same behaviour."""
    common = types.ModuleType("common")

    def mpi_env_rank_and_size():
        for rank_var, size_var in (("PMI_RANK", "PMI_SIZE"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE")):
            if rank_var in os.environ and size_var in os.environ:
                return int(os.environ[rank_var]), int(os.environ[size_var])
        return 0, 1

    def skip_or_fail_gpu_test(test, message):
        if int(os.environ.get("HOROVOD_TEST_GPU", 0)):
            test.fail(message)
        test.skipTest(message)

    @contextlib.contextmanager
    def temppath():
        with tempfile.TemporaryDirectory() as folder:
            yield os.path.join(folder, "temp_test_file")

    common.mpi_env_rank_and_size = mpi_env_rank_and_size
    common.skip_or_fail_gpu_test = skip_or_fail_gpu_test
    common.temppath = temppath
    return common


def load_torch_tests(test_file: Path, distributed_optimizer, reassign: bool = False) -> type:
    """Horovod's ``TorchTests`` from ``test_file``, its ``hvd`` global replaced by
    :func:`horovod_namespace`, or (``reassign``) ``horovod.torch.DistributedOptimizer``
    itself reassigned to ``distributed_optimizer``, as a user's script would."""
    sys.modules.setdefault("common", _utils_standin())
    spec = importlib.util.spec_from_file_location("horovod_test_torch", test_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if reassign:
        import horovod.torch as hvd

        hvd.DistributedOptimizer = distributed_optimizer
    else:
        module.hvd = horovod_namespace(distributed_optimizer)
    return module.TorchTests


@contextlib.contextmanager
def without_muon():
    """Leave :data:`LEFT_OUT_OF_LOOPS` out of ``torch.optim.Optimizer.__subclasses__()``."""
    import torch

    base = torch.optim.Optimizer

    def subclasses(cls):
        return [c for c in type.__subclasses__(cls) if c.__name__ not in LEFT_OUT_OF_LOOPS]

    base.__subclasses__ = classmethod(subclasses)
    try:
        yield
    finally:
        del base.__subclasses__


def _outcome(result: unittest.TestResult) -> dict:
    for status, entries in (("error", result.errors), ("failed", result.failures)):
        if entries:
            return {"status": status, "detail": entries[0][1]}
    if result.skipped:
        return {"status": "skipped", "detail": result.skipped[0][1]}
    return {"status": "passed", "detail": ""}


def initialise_once() -> None:
    """Initialise Horovod for the whole launch, and make the tests' own set-up a no-op.

    Each test calls ``hvd.init()`` (a no-op once initialised) and ``TorchTests.tearDown``
    calls ``hvd.barrier(); hvd.shutdown()`` only when ``HOROVOD_RANK`` is set (Horovod's
    marker of a Gloo launch). Re-initialising Gloo after every test, as Horovod's CI does,
    aborts a rank now and then on this machine (``gloo::IoException: Connect timeout`` or
    ``Connection refused`` to a peer's port of the previous initialisation, exit 134, under
    Horovod's own optimizer as under ours), so the variable is removed once Horovod has read
    it and Horovod stays initialised from the first test to the last."""
    import horovod.torch as hvd

    hvd.init()
    del os.environ["HOROVOD_RANK"]


def watch_for_stall(record: dict, save, stack_file, stall_s: float) -> None:
    """Daemon thread body: end this rank when its main thread has waited ``stall_s`` seconds
    in a single ``horovod.torch.mpi_ops.synchronize`` call (marks ``record["stalled"]``)."""
    main = threading.main_thread().ident
    waiting, since = None, time.monotonic()
    while True:
        time.sleep(0.5)
        frame = sys._current_frames().get(main)
        while frame is not None and not (frame.f_code.co_name == "synchronize"
                                         and frame.f_globals.get("__name__") == "horovod.torch.mpi_ops"):
            frame = frame.f_back
        if frame is not waiting:
            waiting, since = frame, time.monotonic()
        elif frame is not None and time.monotonic() - since > stall_s:
            record["stalled"] = stall_s
            save()
            faulthandler.dump_traceback(file=stack_file)
            stack_file.flush()
            os._exit(3)


def run_rank(test_file: Path, config: str, names: list[str], out_dir: Path, stack_after_s: float) -> None:
    """Run ``names`` one by one on this rank, rewriting ``out_dir/rank<r>.json`` after each
    (``{"running": name, "results": {name: {"status", "detail"}}}``). After
    ``stack_after_s`` seconds every thread's stack is written to ``out_dir/rank<r>.stack``
    (by faulthandler's watchdog thread, so also while the main thread waits in Horovod)."""
    rank = int(os.environ["HOROVOD_RANK"])
    path = out_dir / f"rank{rank}.json"
    stack_file = open(out_dir / f"rank{rank}.stack", "w")
    faulthandler.dump_traceback_later(stack_after_s, file=stack_file)
    faulthandler.enable(file=stack_file)  # and on an abort
    record = {"running": None, "stalled": None, "results": {}}

    def save():
        tmp = path.with_suffix(f".tmp{threading.get_ident()}")  # the stall watchdog saves too
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(path)

    torch_tests = load_torch_tests(test_file, optimizer_factory(config), config in REASSIGNING)  # sets Horovod's env first
    initialise_once()
    threading.Thread(target=watch_for_stall, args=(record, save, stack_file, STALL_S), daemon=True).start()
    with without_muon():
        for name in names:
            record["running"] = name
            save()
            result = unittest.TestResult()
            torch_tests(name).run(result)
            record["results"][name] = _outcome(result)
            record["running"] = None
            save()


# ---- launcher side -----------------------------------------------------------------------
@dataclasses.dataclass
class Outcome:
    """One test's result over all ranks: the worst status (last in :data:`STATUSES`), with
    each rank's detail (traceback or skip reason)."""

    status: str
    detail: str = ""


def _main_thread_stack(dump: str) -> str:
    """The main thread's block of a faulthandler dump (the one that reaches ``<module>``)."""
    blocks = [b for b in dump.split("\n\n") if "in <module>" in b]
    return (blocks[-1] if blocks else dump)[-2500:]


def _combine(names: list[str], records: list[dict], stacks: list[str], timed_out: bool,
             log: str) -> dict[str, Outcome]:
    outcomes = {}
    for name in names:
        per_rank = [rec["results"].get(name) for rec in records]
        if all(r is not None for r in per_rank) and records:
            worst = max(per_rank, key=lambda r: STATUSES.index(r["status"]))
            detail = "\n".join(f"[rank {i}] {r['detail']}" for i, r in enumerate(per_rank) if r["detail"])
            outcomes[name] = Outcome(worst["status"], detail)
        elif any(rec["running"] == name for rec in records):
            running = [i for i, rec in enumerate(records) if rec["running"] == name]
            stalled = [i for i, rec in enumerate(records) if rec["stalled"] is not None]
            if stalled:
                where = "\n".join(f"[rank {i}] {_main_thread_stack(stacks[i])}" for i in running)
                outcomes[name] = Outcome("hung", f"ranks {stalled} waited {STALL_S:.0f} s in one Horovod "
                                                 f"synchronize:\n{where}")
            elif timed_out:
                where = "\n".join(f"[rank {i}] {_main_thread_stack(stacks[i])}" for i in running)
                outcomes[name] = Outcome("hung", f"still running on ranks {running} when the launch was killed:\n"
                                                 f"{where}")
            else:
                where = "\n".join(f"[rank {i}] {_main_thread_stack(stacks[i])}" for i in running)
                outcomes[name] = Outcome("crashed", f"a rank exited while ranks {running} ran it:\n{where}\n"
                                                    f"launcher output:\n{log[-3000:]}")
        else:
            outcomes[name] = Outcome("not run", f"launch ended before it started:\n{log[-3000:]}")
    return outcomes


def _launch(config: str, names: list[str], test_file: Path, timeout_s: float, np: int) -> tuple[dict, str]:
    """One ``horovodrun`` launch of ``names``; the outcomes and the launcher's output."""
    out_dir = Path(tempfile.mkdtemp(prefix=f"hvd-own-tests-{config}-"))
    horovodrun = Path(sys.executable).parent / "horovodrun"
    cmd = [str(horovodrun), "-np", str(np), "-H", f"localhost:{np}", "--gloo", sys.executable, __file__,
           "--config", config, "--test-file", str(test_file), "--rank-out", str(out_dir),
           "--stack-after", str(max(1.0, timeout_s - 10)), *names]
    env = {**os.environ, "HVDCOMP_KERNELS": os.environ.get("HVDCOMP_KERNELS", "reference")}
    log_path = out_dir / "launcher.log"
    timed_out = False
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            # horovodrun terminates its ranks on SIGTERM; SIGKILL if it does not exit.
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    records = [json.loads(p.read_text()) for p in sorted(out_dir.glob("rank*.json"))]
    stacks = [p.read_text(errors="replace") for p in sorted(out_dir.glob("rank*.stack"))]
    if len(records) < np:
        records = []  # a rank never started: nothing can be said per test
    output = log_path.read_text(errors="replace")
    outcomes = _combine(names, records, stacks, timed_out, output)
    shutil.rmtree(out_dir)
    return outcomes, output


def run_own_tests(config: str, names: list[str], test_file: Path, timeout_s: float = 300.0,
               np: int = 2) -> dict[str, Outcome]:
    """Run ``names`` under ``config`` in one launch on ``np`` Gloo ranks; a launch still
    running after ``timeout_s`` seconds is killed and its unfinished test is "hung"."""
    if config not in CONFIGS:
        raise ValueError(f"unknown config {config!r}; valid: {', '.join(CONFIGS)}")
    unknown = [n for n in names if n not in SELECTED]
    if unknown:
        raise ValueError(f"not selected tests: {unknown}; selected: {', '.join(SELECTED)}")
    return _launch(config, list(names), test_file, timeout_s, np)[0]


def main() -> None:
    from horovod_test_source import find_test_file

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=CONFIGS, required=True)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds before the launch is killed")
    parser.add_argument("--test-file", type=Path, help="default: the verified copy (horovod_test_source)")
    # Set by the launcher for the ranks:
    parser.add_argument("--rank-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--stack-after", type=float, default=290.0, help=argparse.SUPPRESS)
    parser.add_argument("tests", nargs="*", help=f"default: all {len(SELECTED)} selected tests")
    args = parser.parse_args()
    names = args.tests or list(SELECTED)
    test_file = args.test_file or find_test_file()
    if test_file is None:
        raise SystemExit("Horovod's test_torch.py is not available: see tests/horovod_test_source.py")
    if args.rank_out is not None:
        run_rank(test_file, args.config, names, args.rank_out, args.stack_after)
        return
    for name, outcome in run_own_tests(args.config, names, test_file, args.timeout).items():
        print(f"{args.config:12s} {name:36s} {outcome.status}")
        if outcome.status != "passed":
            print("    " + outcome.detail.strip().replace("\n", "\n    ")[-1500:])


if __name__ == "__main__":
    main()
