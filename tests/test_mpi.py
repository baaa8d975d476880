"""MPI ranks: ``horovodrun --mpi`` and ``mpirun`` with mpi4py communicators (``hvd.init(comm=...)``).

Skipped where Horovod was built without MPI (set-up builds it with MPI where OpenMPI's
``mpicxx`` is present; ``HVDCOMP_WITH_MPI=1 bash launch/setup.sh`` installs OpenMPI first).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from distributed import HAS_HOROVOD

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mpi_ready() -> bool:
    if not HAS_HOROVOD or shutil.which("mpirun") is None:
        return False
    import horovod.torch as hvd

    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return hvd.mpi_built()


pytestmark = pytest.mark.skipif(not _mpi_ready() and os.environ.get("HVDCOMP_REQUIRE_MPI") != "1",
                                reason="Horovod built without MPI, or no mpirun/mpi4py")
# OpenMPI refuses to start as root unless told; CI and containers run as root.
ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
           OMPI_MCA_rmaps_base_oversubscribe="1", HVDCOMP_KERNELS="reference")
TRAIN = ["-m", "launch.train", "--quiet", "--epochs", "1", "--steps-per-epoch", "3", "--compression", "fp16"]


def run(cmd):
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_horovodrun_with_mpi(tmp_path):
    out = tmp_path / "r.json"
    horovodrun = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    run([horovodrun, "-np", "2", "-H", "localhost:2", "--mpi", sys.executable, *TRAIN, "--json", str(out)])
    record = json.loads(out.read_text())
    assert record["ranks"] == 2 and record["parameters_identical_on_all_ranks"]


def test_mpirun_with_mpi4py_world_communicator(tmp_path):
    out = tmp_path / "r.json"
    run(["mpirun", "-np", "2", sys.executable, *TRAIN, "--mpi4py-groups", "1", "--json", str(out)])
    record = json.loads(out.read_text())
    assert record["ranks"] == 2 and record["communicator"].startswith("mpi4py group 0 of 1")


def test_mpirun_with_mpi4py_sub_communicators(tmp_path):
    out = tmp_path / "r.json"
    run(["mpirun", "-np", "4", sys.executable, *TRAIN, "--mpi4py-groups", "2", "--json", str(out)])
    records = [json.loads((tmp_path / f"r.json.mpi4pygroup{g}").read_text()) for g in range(2)]
    for g, record in enumerate(records):
        # each group of the 4 world ranks is its own 2-rank Horovod job
        assert record["ranks"] == 2 and record["communicator"].startswith(f"mpi4py group {g} of 2")
        assert record["parameters_identical_on_all_ranks"]
