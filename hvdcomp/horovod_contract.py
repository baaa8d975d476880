"""Horovod's ``Compressor`` contract for hvdcomp compressors: what lets
``hvd.DistributedOptimizer(compression=hvdcomp.Compression.X())`` work for the compressors
whose payload an allreduce can sum.

Horovod's optimizer calls ``compression.compress(p.grad) -> (payload, ctx)`` from a backward
hook, allreduces ``payload``, and later ``compression.decompress(summed, ctx)``. Our
compressors are codecs (``encode_dense`` / ``decode_dense`` with a state dict the caller
owns); this module is the caller when Horovod's own optimizer drives them. Each compressor
declares how it serves the contract (:attr:`hvdcomp.compressor.Compressor.horovod_contract`):

``"stateless"``
    ``encode_dense`` with no state (fp16, Horovod's own compressors).
``"per_tensor"``
    state, randomness or a collective per tensor and step (random-k's residual and shared
    mask, TernGrad's shared scale and noise stream, ScaleCom's residual and leader's
    indices). Horovod hands ``compress`` no parameter name, and with
    ``zero_grad(set_to_none=True)`` every step brings new gradient tensors, so the state is
    keyed by the call's position within the step (:class:`CallOrderKeys`: the backward hook
    order, identical on every step and rank for a static graph, checked against shape and
    dtype). The collectives a capability needs run here, blocking the hook's thread, in the
    same gradient order on every rank: TernGrad's (:class:`~hvdcomp.compressor.SharedScale`)
    max-allreduce of the scale, ScaleCom's (:class:`~hvdcomp.compressor.IndexBroadcast`)
    broadcast of the leader's indices.
``None``
    packed payloads that an allreduce cannot sum: ``compress`` raises ``TypeError`` naming
    :func:`hvdcomp.DistributedOptimizer`, which carries them.

:class:`hvdcomp.DistributedOptimizer` never calls this module: it keys state by parameter
name and overlaps those collectives with the backward pass.
"""
from __future__ import annotations

import threading
import weakref
from typing import Any

import torch

from ._horovod import hvd
from .compressor import Compressor, IndexBroadcast, SharedScale, TensorInfo

Tensor = torch.Tensor


class CallOrderKeys:
    """Assigns ``(step, position)`` to successive ``compress`` calls.

    A step begins with the first ``compress`` after a ``decompress`` (Horovod compresses
    every gradient from the hooks, then decompresses all of them in ``synchronize()``).
    """

    def __init__(self) -> None:
        self.step = -1
        self._position = 0
        self._decompressing = True
        self._signature: dict[int, tuple] = {}
        self._lock = threading.Lock()

    def on_compress(self, tensor: Tensor) -> tuple[int, int]:
        """Register a ``compress`` call; returns ``(step, position)`` for it."""
        with self._lock:
            if self._decompressing:
                self.step += 1
                self._position = 0
                self._decompressing = False
            position = self._position
            self._position += 1
            signature = (tuple(tensor.shape), tensor.dtype, tensor.device)
            known = self._signature.setdefault(position, signature)
            if known != signature:
                raise RuntimeError(
                    f"compress() call #{position} of step {self.step} got a tensor {signature}, but earlier "
                    f"steps had {known} at that position: under hvd.DistributedOptimizer the compressor "
                    "state is keyed by gradient order, which must not change (static graph). Use "
                    "hvdcomp.DistributedOptimizer, which keys state by parameter name."
                )
            return self.step, position

    def on_decompress(self) -> None:
        """Register a ``decompress`` call (the step's exchange is being completed)."""
        with self._lock:
            self._decompressing = True


class PositionStates:
    """One compressor's state under Horovod's optimizer: its call order and the state dict
    of each position (created by ``init_state`` on first use)."""

    def __init__(self) -> None:
        self.keys = CallOrderKeys()
        self.states: dict[int, dict] = {}

    def state(self, comp: Compressor, position: int, info: TensorInfo) -> dict:
        return self.states.setdefault(position, comp.init_state(info))


_STATES: "weakref.WeakKeyDictionary[Compressor, PositionStates]" = weakref.WeakKeyDictionary()
_STATES_LOCK = threading.Lock()


def position_states(comp: Compressor) -> PositionStates:
    """``comp``'s :class:`PositionStates` (created on first use; dropped with ``comp``)."""
    with _STATES_LOCK:
        found = _STATES.get(comp)
        if found is None:
            found = _STATES[comp] = PositionStates()
        return found


def _refuse(comp: Compressor) -> TypeError:
    return TypeError(f"hvdcomp.Compression.{comp.name}() sends packed payloads that an allreduce cannot "
                     "sum; use it with hvdcomp.DistributedOptimizer (same arguments as "
                     "hvd.DistributedOptimizer), not with hvd.DistributedOptimizer")


def compress(comp: Compressor, tensor: Tensor) -> tuple[Tensor, Any]:
    """Horovod's ``compress(tensor) -> (payload, ctx)`` for ``comp`` (see the module docstring)."""
    if comp.horovod_contract is None:
        raise _refuse(comp)
    if comp.horovod_contract == "stateless":
        info = TensorInfo(name="", shape=tensor.shape, dtype=tensor.dtype, device=tensor.device)
        payload, ctx = comp.encode_dense(tensor, {}, info, 0)
        return payload, (ctx, info)
    positions = position_states(comp)
    step, position = positions.keys.on_compress(tensor)
    collective = isinstance(comp, (SharedScale, IndexBroadcast))
    h = hvd() if collective else None
    info = TensorInfo(name=f"hvd.{position}", shape=tensor.shape, dtype=tensor.dtype, device=tensor.device,
                      index=position, rank=h.rank() if h else 0, size=h.size() if h else 1)
    state = positions.state(comp, position, info)
    if isinstance(comp, SharedScale):
        scale = comp.local_scale(tensor, info)
        if info.size > 1:
            scale = h.allreduce(scale, op=h.Max, name=f"hvdcomp.{comp.name}.scale.{position}")
        state = {**state, "shared_scale": scale}  # a value of this step only
    if isinstance(comp, IndexBroadcast):
        idx = comp.propose(tensor, state, info, step)
        state["indices"] = h.broadcast(idx, root_rank=comp.leader(info, step), name=f"hvdcomp.{comp.name}.{position}")
    payload, ctx = comp.encode_dense(tensor, state, info, step)
    return payload, (ctx, info)


def decompress(comp: Compressor, tensor: Tensor, ctx: Any) -> Tensor:
    """Horovod's ``decompress(summed, ctx)``: the gradient's shape and dtype."""
    if comp.horovod_contract is None:
        raise _refuse(comp)
    if comp.horovod_contract == "per_tensor":
        position_states(comp).keys.on_decompress()
    inner, info = ctx
    return comp.decode_dense(tensor, inner, {}, info).to(info.dtype)


def state_dict(comp: Compressor) -> dict:
    """Step counter and per-position state tensors of ``comp`` under Horovod's optimizer."""
    positions = position_states(comp)
    return {"step": positions.keys.step,
            "states": {pos: {k: v.clone() for k, v in s.items()} for pos, s in positions.states.items()}}


def load_state_dict(comp: Compressor, saved: dict) -> None:
    """Restore :func:`state_dict`; the next ``compress`` starts the following step."""
    positions = PositionStates()
    positions.keys.step = int(saved["step"])
    positions.states = {int(pos): {k: v.clone() for k, v in s.items()} for pos, s in saved["states"].items()}
    with _STATES_LOCK:
        _STATES[comp] = positions
