"""Run a benchmark function on N local Gloo ranks with ``horovod.run``."""
from __future__ import annotations

import importlib
import sys


def run_on_ranks(fn, num_proc: int, args: tuple) -> list:
    """``fn(*args)`` on ``num_proc`` Gloo ranks of this machine; returns every rank's result.

    ``fn`` is pickled by value together with its module, so the ranks need not import
    ``bench``; under ``python -m bench.x`` it is re-imported under its package name so the
    pickle names a real module.
    """
    try:
        import cloudpickle
        import horovod
        import horovod.torch  # noqa: F401  (fails if Horovod was built without PyTorch)
    except ImportError as err:
        raise SystemExit(f"this benchmark needs Horovod with PyTorch (bash launch/setup.sh): {err}")
    if fn.__module__ == "__main__":
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        if spec is None:
            raise RuntimeError("run the benchmark as a module: python -m bench.<name>")
        fn = getattr(importlib.import_module(spec.name), fn.__name__)
    cloudpickle.register_pickle_by_value(importlib.import_module(fn.__module__))
    return horovod.run(fn, args=args, num_proc=num_proc, use_gloo=True, verbose=0)
