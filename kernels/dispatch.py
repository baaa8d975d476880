"""Which backend runs an operation: the table of operations, ``HVDCOMP_KERNELS`` and
:func:`one_mode`, and Triton's availability.

Every operation of :mod:`hvdcomp.kernels` belongs to a family (``OPERATIONS[name]``); the
family names both of its implementations: the Triton kernel in ``kernels/<family>.py`` and
the CPU backend's function in ``kernels/cpu/<family>.py``. A call runs the Triton kernel when
:func:`use_triton` says so for its first tensor argument, else the CPU backend's function.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import threading

#: Operation name -> family: the module under ``kernels/`` (Triton) and under ``kernels/cpu/``
#: (CPU backend) that implement it, each with the operation's name and signature.
OPERATIONS = {
    "ef_accumulate_": "residual",
    "dgc_momentum_": "residual",
    "adacomp_select_stats": "adacomp",
    "adacomp_pack_": "adacomp",
    "adacomp_decode_sum": "adacomp",
    "terngrad_ternarize": "ternary",
    "ternary_quantize": "ternary",
    "sign_pack": "ternary",
    "sign_decode_sum": "ternary",
    "ternary_decode_sum": "ternary",
    "topk_indices": "topk",
    "sampled_threshold": "topk",
    "count_above": "topk",
    "compact_above": "topk",
    "pack_2bit": "packing",
    "unpack_2bit": "packing",
    "pack_bits": "packing",
    "unpack_bits": "packing",
    "scatter_add_": "decode",
    "cast_bf16": "casts",
    "cast_fp16": "casts",
    "cast_fp32": "casts",
}

_MODES = ("auto", "triton", "reference")


class _Scope(threading.local):
    mode: str | None = None  # the mode one_mode() read, on this thread


_SCOPE = _Scope()


def backend_mode() -> str:
    """The dispatch mode from ``HVDCOMP_KERNELS``: ``auto`` (default), ``triton`` (force the
    Triton kernels) or ``reference`` (force the CPU backend, on any device). Read at every
    call (tests and users may change it at run time) unless inside :func:`one_mode`; its
    parse is cached per raw value."""
    mode = _SCOPE.mode
    if mode is not None:
        return mode
    return _parse_mode(os.environ.get("HVDCOMP_KERNELS", "auto"))


@contextlib.contextmanager
def one_mode():
    """Read ``HVDCOMP_KERNELS`` once for every dispatch inside (on this thread; nested scopes
    keep the outer one's). A training step dispatches once per tensor and kernel, and
    ``os.environ.get`` of an unset variable raises and catches a KeyError inside: as costly
    as the fp16 cast of a small tensor."""
    if _SCOPE.mode is not None:
        yield
        return
    _SCOPE.mode = backend_mode()
    try:
        yield
    finally:
        _SCOPE.mode = None


@functools.lru_cache(maxsize=8)
def _parse_mode(raw: str) -> str:
    # Cached: the dispatch runs once per tensor and kernel, and the parse costs as much as
    # an fp16 cast of a small tensor.
    mode = raw.strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"HVDCOMP_KERNELS must be one of {_MODES}, got {mode!r}")
    return mode


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when Triton imports (it is an optional dependency)."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def use_triton(tensor) -> bool:
    """Whether an operation on ``tensor`` runs its Triton kernel: always under
    ``HVDCOMP_KERNELS=triton`` (with ``TRITON_INTERPRET=1`` the kernels run on CPU tensors,
    which is how the tests prove them without a GPU), never under ``reference``, and under
    ``auto`` for CUDA tensors when Triton imports."""
    mode = backend_mode()
    if mode == "reference":
        return False
    if mode == "triton":
        if not triton_available():
            raise ImportError("HVDCOMP_KERNELS=triton but Triton is not installed: pip install 'hvdcomp[triton]'")
        return True
    return tensor.is_cuda and triton_available()


def triton_impl(name: str):
    """The Triton implementation of operation ``name`` (imports its module on first use)."""
    return getattr(importlib.import_module(f"{__package__}.{OPERATIONS[name]}"), name)


def cpu_impl(name: str):
    """The CPU backend's implementation of operation ``name``."""
    return getattr(importlib.import_module(f"{__package__}.cpu.{OPERATIONS[name]}"), name)
