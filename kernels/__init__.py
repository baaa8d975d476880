"""Fused compression kernels (installed as ``hvdcomp.kernels``).

Every operation exists twice with one signature: a Triton kernel in ``kernels/<op>.py``
and a pure-torch version in :mod:`hvdcomp.kernels.reference`. Call the operations through
this module (``from hvdcomp import kernels; kernels.ef_accumulate_(r, g)``): each call picks
the implementation by the device of its first tensor argument:

* CUDA tensor and Triton importable -> Triton kernel;
* otherwise -> reference (CPU users, and machines without Triton).

``HVDCOMP_KERNELS=triton`` forces the Triton kernels (with ``TRITON_INTERPRET=1`` they run
on CPU tensors: that is how the tests prove them on machines without a GPU);
``HVDCOMP_KERNELS=reference`` forces the torch path; ``auto`` (default) dispatches as above.
The variable is read at every call, except inside :func:`one_mode` (the front ends' steps),
which reads it once for all the calls it holds.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import threading

from . import reference

# operation name -> module under kernels/ that holds its Triton implementation
TRITON_MODULES = {
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
    """The dispatch mode from ``HVDCOMP_KERNELS`` (auto, triton or reference), read at every
    call (tests and users may change it at run time) unless inside :func:`one_mode`; its
    parse is cached per raw value."""
    mode = _SCOPE.mode
    if mode is not None:
        return mode
    return _parse_mode(os.environ.get("HVDCOMP_KERNELS", "auto"))


@contextlib.contextmanager
def one_mode():
    """Read ``HVDCOMP_KERNELS`` once for every dispatch inside (on this thread; nested scopes
    keep the outer one's). A front end's step dispatches once per tensor and kernel, and
    ``os.environ.get`` of an unset variable costs ~1.5 us (it raises and catches a KeyError):
    as much as the fp16 cast of a small tensor."""
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
    # Cached: the dispatch runs once per tensor and kernel, and the parse cost as much as
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
    """Whether an operation on ``tensor`` runs the Triton kernel (see module docstring)."""
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
    module = importlib.import_module(f"{__name__}.{TRITON_MODULES[name]}")
    return getattr(module, name)


def _first_tensor(args, kwargs):
    for a in list(args) + list(kwargs.values()):
        if hasattr(a, "is_cuda"):
            return a
    raise TypeError("kernel operations take at least one tensor")


def _make_dispatcher(name: str):
    ref = getattr(reference, name)

    @functools.wraps(ref)
    def dispatch(*args, **kwargs):
        if use_triton(_first_tensor(args, kwargs)):
            return triton_impl(name)(*args, **kwargs)
        return ref(*args, **kwargs)

    return dispatch


for _name in TRITON_MODULES:
    globals()[_name] = _make_dispatcher(_name)

num_bins = reference.num_bins
adacomp_code_dtype = reference.adacomp_code_dtype
philox_uniform = reference.philox_uniform

__all__ = sorted(TRITON_MODULES) + ["backend_mode", "one_mode", "use_triton", "triton_available", "num_bins",
                                    "adacomp_code_dtype", "philox_uniform", "reference"]
