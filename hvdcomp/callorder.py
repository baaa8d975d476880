"""Stable keys for compressor state under ``hvd.DistributedOptimizer``.

Horovod's optimizer calls ``compress(p.grad)`` without the parameter's name, and with
``zero_grad(set_to_none=True)`` every step brings new gradient tensors, so state cannot be
keyed by tensor identity. It is keyed here by the position of the call within the step
(the backward hook order, identical on every step and every rank for a static graph),
checked against the shape and dtype seen the first time: a different order raises instead
of silently mixing two parameters' residuals.

A step begins with the first ``compress`` after a ``decompress`` (Horovod compresses every
gradient from the hooks, then decompresses all of them in ``synchronize()``).
"""
from __future__ import annotations

import threading

import torch


class CallOrderKeys:
    """Assigns ``(step, position)`` to successive ``compress`` calls."""

    def __init__(self) -> None:
        self.step = -1
        self._position = 0
        self._decompressing = True
        self._signature: dict[int, tuple] = {}
        self._lock = threading.Lock()

    def on_compress(self, tensor: torch.Tensor) -> tuple[int, int]:
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


class PositionKeyedState:
    """Mixin for stateful compressors that also serve ``hvd.DistributedOptimizer``: their
    per-tensor state there is keyed by :class:`CallOrderKeys` position, and checkpointed
    with :meth:`state_dict` / :meth:`load_state_dict` (hvdcomp.DistributedOptimizer keeps
    and checkpoints its own, keyed by parameter name)."""

    def _reset_positions(self) -> None:
        self._call_order = CallOrderKeys()
        self._horovod_state: dict[int, dict] = {}

    def _position_state(self, position: int, info) -> dict:
        """The state of the tensor at ``position`` (created by ``init_state`` on first use)."""
        return self._horovod_state.setdefault(position, self.init_state(info))

    def state_dict(self) -> dict:
        """Step counter and per-position state tensors of the Horovod path."""
        return {"step": self._call_order.step,
                "states": {pos: {k: v.clone() for k, v in s.items()} for pos, s in self._horovod_state.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; the next ``compress`` starts the following step."""
        self._reset_positions()
        self._call_order.step = int(state["step"])
        self._horovod_state = {int(pos): {k: v.clone() for k, v in s.items()} for pos, s in state["states"].items()}
