"""Lazy access to ``horovod.torch`` with a clear error when it is missing.

hvdcomp imports without Horovod (the kernels, compressors and DDP hook do not need it);
only the Horovod transport calls :func:`hvd`.
"""
from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def hvd():
    """The ``horovod.torch`` module; ImportError with the set-up command if unavailable."""
    try:
        import horovod.torch as module
    except ImportError as err:
        raise ImportError(
            "hvdcomp.DistributedOptimizer needs Horovod with PyTorch support "
            "(horovod==0.28.1 built for your torch). Run `bash launch/setup.sh`, which builds "
            f"and caches it, or see README.md. Original error: {err}"
        ) from err
    return module
