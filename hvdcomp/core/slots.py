"""Per-parameter slots: each parameter's compressor, state and static description, and
their checkpoint.

A :class:`Slot` holds one parameter's :class:`~hvdcomp.compressor.TensorInfo`, the
compressor that serves it (``compression`` from ``min_compress_numel`` elements on, else
``small_compression``) and its state dict. Keys that ``init_state`` created are the
persistent state (checkpointed); keys added during a step are that step's values and are
dropped by :meth:`Slot.end_step`.

:class:`SlotTable` is one rank's set of slots, keyed by parameter name. Its checkpoint holds
the step counter, the number of ranks and every slot's persistent state; loading it checks
the compressors' settings, ``min_compress_numel``, the number of ranks, and every slot's
keys and shapes, and raises ``ValueError`` on any difference instead of continuing with
mixed-up residuals.
"""
from __future__ import annotations

import dataclasses

import torch

from ..compressor import Compressor, TensorInfo

Tensor = torch.Tensor


@dataclasses.dataclass(eq=False)  # compared by identity
class Slot:
    """One parameter: name, static description, compressor and state."""

    name: str
    info: TensorInfo
    compressor: Compressor
    state: dict
    persistent: frozenset = frozenset()

    def end_step(self) -> None:
        """Drop the values that lived for one step only (shared scales, indices, ...)."""
        for key in [k for k in self.state if k not in self.persistent]:
            del self.state[key]

    def saved_state(self) -> dict:
        """Clones of the persistent state tensors."""
        return {k: v.detach().clone() for k, v in self.state.items() if k in self.persistent}

    def check(self, saved: dict) -> None:
        """ValueError unless ``saved`` has exactly this slot's persistent keys and shapes."""
        if set(saved) != set(self.persistent):
            raise ValueError(f"checkpoint state of {self.name} has keys {sorted(saved)}, "
                             f"{self.compressor.name} keeps {sorted(self.persistent)}")
        for k, v in saved.items():
            if tuple(self.state[k].shape) != tuple(v.shape):
                raise ValueError(f"checkpoint state {self.name}.{k} has shape {tuple(v.shape)}, "
                                 f"expected {tuple(self.state[k].shape)}")

    def load(self, saved: dict) -> None:
        """Copy ``saved`` (from :meth:`saved_state`) in, after :meth:`check`."""
        self.check(saved)
        for k, v in saved.items():
            self.state[k].copy_(v)


class SlotTable:
    """One rank's slots, keyed by parameter name (see the module docstring).

    compression / small_compression: the compressors; min_compress_numel: the size from
    which ``compression`` is used. rank / size: this rank and the number of ranks.
    expected_names: every name a slot may get, when known up front (checkpoints are then
    checked for missing and unknown names); slots may be created lazily (DDP creates them
    when a bucket first arrives), and checkpointed state for a slot not created yet waits
    in :attr:`pending` until it is.
    """

    def __init__(self, compression: Compressor, small_compression: Compressor, min_compress_numel: int,
                 rank: int, size: int, expected_names=None, layout=None):
        self.compression = compression
        self.small_compression = small_compression
        self.min_compress_numel = min_compress_numel
        self.rank, self.size = rank, size
        self.expected_names = None if expected_names is None else frozenset(expected_names)
        self.slots: dict[str, Slot] = {}
        self.pending: dict[str, dict] = {}
        #: What the way slots travel adds to their state (a Router: ``state_info``,
        #: ``exchange_state``, ``describe``; see :mod:`hvdcomp.core.plan`), or None.
        self.layout = layout

    def add(self, name: str, shape, dtype: torch.dtype, device, index: int) -> Slot:
        """Create the slot of parameter ``name`` (``index``: its position in the name-sorted
        list, identical on every rank)."""
        if name in self.slots:
            raise ValueError(f"parameter {name!r} has a slot already")
        info = TensorInfo(name=name, shape=torch.Size(shape), dtype=dtype, device=torch.device(device),
                          index=index, rank=self.rank, size=self.size)
        comp = self.compression if info.numel >= self.min_compress_numel else self.small_compression
        if self.layout is None:
            state = comp.init_state(info)
        else:  # e.g. the state of this rank's shard (hierarchical), sparse allreduce regions
            state_info = self.layout.state_info(info)
            state = comp.init_state(state_info)
            state.update(self.layout.exchange_state(comp, state_info))
        slot = Slot(name, info, comp, state, frozenset(state))
        if name in self.pending:
            slot.load(self.pending.pop(name))
        self.slots[name] = slot
        return slot

    def end_step(self) -> None:
        for slot in self.slots.values():
            slot.end_step()

    def describe(self) -> dict:
        """The settings a checkpoint must match."""
        return {"compression": self.compression.config(), "small_compression": self.small_compression.config(),
                "min_compress_numel": self.min_compress_numel, "nranks": self.size,
                **(self.layout.describe() if self.layout is not None else {})}

    def state_dict(self, step: int, keys: str = "names") -> dict:
        """Step counter, settings and every slot's persistent state (tensors cloned).

        keys: "names" when slots are keyed by parameter name, "positions" when by position
        (DDP without ``named_parameters``): a checkpoint only loads into the same kind.
        """
        states = {name: {k: v.clone() for k, v in saved.items()} for name, saved in self.pending.items()}
        states.update({name: slot.saved_state() for name, slot in self.slots.items()})
        return {"step": int(step), "keys": keys, **self.describe(), "state": states}

    def load_state_dict(self, saved: dict, keys: str = "names") -> int:
        """Restore :meth:`state_dict`; returns the step counter to continue from. Every check
        runs before anything is changed."""
        if not isinstance(saved, dict) or "state" not in saved or "step" not in saved:
            raise ValueError("not an hvdcomp compression checkpoint (no 'step' and 'state')")
        mine = {"keys": keys, **self.describe()}
        for field, value in mine.items():
            theirs = saved.get(field)
            if theirs != value:
                hint = (" (error-feedback state is per rank: resume on the same number of ranks, each rank "
                        "loading its own checkpoint)") if field == "nranks" else ""
                raise ValueError(f"checkpoint has {field} = {theirs!r}, this run {value!r}{hint}")
        states = saved["state"]
        if self.expected_names is not None:
            missing = sorted(self.expected_names - set(states))
            unknown = sorted(set(states) - self.expected_names)
            if missing:
                raise ValueError(f"checkpoint has no compression state for {missing[:5]}")
            if unknown:
                raise ValueError(f"checkpoint has compression state for unknown parameters {unknown[:5]}")
        for name, slot in self.slots.items():
            if name not in states:
                raise ValueError(f"checkpoint has no compression state for {name!r}")
            slot.check(states[name])
        for name, slot in self.slots.items():
            slot.load(states[name])
        self.pending = {name: {k: v.clone() for k, v in st.items()} for name, st in states.items()
                        if name not in self.slots}
        return int(saved["step"])

