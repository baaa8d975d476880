"""The package imports without Horovod or Triton, and every package ships in the wheel."""
from __future__ import annotations

import os
import subprocess
import sys
import tomllib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _source_packages() -> set[str]:
    found = set()
    roots = {"hvdcomp": "hvdcomp", "hvdcomp.kernels": "kernels", "launch": "launch", "bench": "bench"}
    for name, folder in roots.items():
        for dirpath, _, files in os.walk(os.path.join(REPO, folder)):
            if "__init__.py" in files and "__pycache__" not in dirpath:
                rel = os.path.relpath(dirpath, os.path.join(REPO, folder))
                found.add(name if rel == "." else f"{name}.{rel.replace(os.sep, '.')}")
    return found


def test_every_package_is_listed_in_pyproject():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    assert _source_packages() == listed


def test_imports_without_horovod_and_triton():
    # Make both unimportable in a fresh interpreter: the library, its kernels' reference path
    # and the DDP transport must still work, and the Horovod transport must say what is missing.
    code = """
import sys
sys.modules['horovod'] = None; sys.modules['horovod.torch'] = None; sys.modules['triton'] = None
import torch, hvdcomp
from hvdcomp import kernels
r = kernels.ef_accumulate_(torch.zeros(3), torch.ones(3))
assert r.tolist() == [1.0, 1.0, 1.0] and not kernels.triton_available()
assert callable(hvdcomp.ddp.compression_hook)
try:
    hvdcomp.DistributedOptimizer(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
except ImportError as err:
    assert "launch/setup.sh" in str(err), err
else:
    raise AssertionError("no ImportError without Horovod")
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
