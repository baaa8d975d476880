"""Launch a function on N local Gloo ranks with ``horovod.run`` and return every rank's result.

Scenario modules are pickled by value so the worker processes need not import ``tests``.
Each launch costs a few seconds, so tests group many checks into one launch.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

import pytest

try:
    import cloudpickle
    import horovod
    import horovod.torch  # noqa: F401  (fails if Horovod was built without PyTorch)

    HAS_HOROVOD = True
except ImportError:  # pragma: no cover - depends on the environment
    HAS_HOROVOD = False

requires_horovod = pytest.mark.skipif(
    not HAS_HOROVOD and os.environ.get("HVDCOMP_REQUIRE_HOROVOD") != "1",
    reason="Horovod is not installed (bash launch/setup.sh builds it)",
)


def run_ranks(fn, np: int, *args, env: dict | None = None):
    """Run ``fn(*args)`` on ``np`` Gloo ranks; returns the list of results, rank order."""
    cloudpickle.register_pickle_by_value(importlib.import_module(fn.__module__))
    # Scenario modules may import each other: every module of this folder travels by value.
    here = os.path.dirname(os.path.abspath(__file__))
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None) or ""
        if os.path.dirname(os.path.abspath(path)) == here and module.__name__ not in ("conftest", "distributed"):
            cloudpickle.register_pickle_by_value(module)
    # The ranks inherit this process's environment (horovod.run takes no env argument).
    changes = {"HVDCOMP_KERNELS": os.environ.get("HVDCOMP_KERNELS", "reference"), **(env or {})}
    saved = {k: os.environ.get(k) for k in changes}
    os.environ.update(changes)
    try:
        return horovod.run(fn, args=args, num_proc=np, use_gloo=True, verbose=0)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def rank_results(outdir: Path) -> list[dict]:
    """The ``result<rank>.json`` each rank of a launched program wrote into ``outdir``, in rank
    order (a file per rank: launchers merge the ranks' stdout, where lines can interleave)."""
    found = [json.loads(path.read_text()) for path in Path(outdir).glob("result*.json")]
    return sorted(found, key=lambda r: r["rank"])
