"""Compares and ``nonzero`` for the CPU backend, through zero-copy NumPy views where NumPy is
faster: torch's CPU compares into bool take a scalar path (also for a 0-d tensor bound) where
NumPy's are vectorised, and NumPy's ``flatnonzero`` is faster than torch's CPU ``nonzero`` at
every size and density the compressors produce (sparse selections, dense masks). Every
function returns exactly what the plain torch expression in its docstring returns, on any
device and dtype (the tests check each against that expression); only CPU tensors of a dtype
NumPy computes natively take NumPy.
"""
from __future__ import annotations

import numpy as np
import torch

Tensor = torch.Tensor

#: Dtypes whose compares NumPy runs vectorised (fp16/bf16 it emulates or lacks: torch's then).
_NUMPY_COMPARABLE = (torch.float32, torch.float64, torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def numpy_comparable(x: Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in _NUMPY_COMPARABLE


def _as_scalar(x: Tensor, bound):
    # ``bound`` in x's NumPy dtype, or None where that would change it (a fractional bound
    # against integers, say): torch compares those in a wider type, so take torch's path.
    value = np.array(bound, dtype=x.numpy().dtype)
    return value if value == bound else None


def at_least(x: Tensor, bound) -> Tensor:
    """``x >= bound`` as bool of x's shape, for a host number ``bound``; through NumPy's
    vectorised compare on a CPU (see the module docstring)."""
    if numpy_comparable(x) and (value := _as_scalar(x, bound)) is not None:
        return torch.from_numpy(np.greater_equal(x.numpy(), value))
    return x >= bound


def less(a: Tensor, b) -> Tensor:
    """``a < b`` as bool of a's shape, ``b`` a tensor of a's shape or a host number; through
    NumPy on a CPU when both are of a dtype it compares natively."""
    if numpy_comparable(a):
        if isinstance(b, Tensor):
            other = b.numpy() if numpy_comparable(b) and b.dtype == a.dtype else None
        else:
            other = _as_scalar(a, b)
        if other is not None:
            return torch.from_numpy(np.less(a.numpy(), other))
    return a < b


def magnitude_at_least(x: Tensor, bound: float) -> Tensor:
    """``|x| >= bound`` as bool of x's shape (NaN: False), for a host number ``bound``; on a
    CPU as ``(x >= bound) | (x <= -bound)`` through NumPy, so no ``|x|`` is written."""
    if numpy_comparable(x) and x.is_floating_point():
        v = x.numpy()
        b = np.array(bound, dtype=v.dtype)
        mask = np.greater_equal(v, b)
        mask |= np.less_equal(v, -b)
        return torch.from_numpy(mask)
    return x.abs() >= bound


def nonzero_sparse(mask: Tensor) -> Tensor:
    """``mask.nonzero().squeeze(1)``: the positions of the True entries of a bool [n] mask,
    int64 [count], increasing; on a CPU through NumPy's ``flatnonzero``."""
    m = mask.reshape(-1)
    if m.device.type == "cpu" and m.dtype == torch.bool:
        return torch.from_numpy(np.flatnonzero(m.numpy()))
    return m.nonzero().squeeze(1)
