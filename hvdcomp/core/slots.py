"""Per-parameter slots: each parameter's compressor, state and static description, and
their checkpoint.

A :class:`Slot` holds one parameter's :class:`~hvdcomp.compressor.TensorInfo`, the
compressor that serves it (``compression`` from ``min_compress_numel`` elements on, else
``small_compression``; a :class:`~hvdcomp.compressor.Selector` such as ``Compression.auto()``
gives its initial candidate, and the step driver may later :meth:`Slot.assign` another) and
its state dict. Keys that ``init_state`` created are the persistent state (checkpointed);
keys added during a step are that step's values and are dropped by :meth:`Slot.end_step`.

When a slot's compressor is replaced, what the old state still owed the exchange (an
error-feedback residual: :class:`~hvdcomp.compressor.ErrorFeedback`) becomes the slot's
*carry*, ``state["carry"]`` (fp32 [n], persistent, checkpointed): the next step's chain adds
it to the gradient (:func:`take_carry`), so switching never loses gradient mass.

:class:`SlotTable` is one rank's set of slots, keyed by parameter name. Its checkpoint holds
the step counter, the number of ranks and every slot's persistent state; loading it checks
the compressors' settings, ``min_compress_numel``, the number of ranks, and every slot's
keys and shapes, and raises ``ValueError`` on any difference instead of continuing with
mixed-up residuals.
"""
from __future__ import annotations

import dataclasses

import torch

from ..compressor import Compressor, ErrorFeedback, Selector, TensorInfo, WorkerErrorFeedback, staged

Tensor = torch.Tensor
#: The state key of a slot's carry (see the module docstring).
CARRY = "carry"


def take_carry(slots, grads: list) -> list:
    """``grads`` with each slot's carry added (fp32, the gradient's shape); the carry is
    zeroed, not removed, so a dropped step's restore finds it (:mod:`hvdcomp.core.faults`).
    A :class:`~hvdcomp.compressor.WorkerErrorFeedback` slot's residual is added too (its
    codec replaces it when it encodes)."""
    out = list(grads)
    for j, slot in enumerate(slots):
        carry = slot.state.get(CARRY)
        if carry is not None:
            out[j] = (out[j].to(torch.float32).reshape(-1) + carry).view(grads[j].shape)
            carry.zero_()
        # The error buffer from before this step (staged: the snapshot holds the previous one).
        if isinstance(slot.compressor, WorkerErrorFeedback) and "residual" in slot.state:
            residual = staged(slot.state, "residual")[0]
            out[j] = (out[j].to(torch.float32).reshape(-1) + residual).view(grads[j].shape)
    return out


@dataclasses.dataclass(eq=False)  # compared by identity
class Slot:
    """One parameter: name, static description, compressor and state."""

    name: str
    info: TensorInfo
    compressor: Compressor
    state: dict
    persistent: frozenset = frozenset()
    #: The table's layout (per-shard state, a chain's own state: :mod:`hvdcomp.core.plan`), or None.
    layout: object = None

    def fresh_state(self, compressor: Compressor) -> dict:
        """``compressor``'s initial state for this slot, with what the way it travels adds
        (the state of this rank's shard under hierarchical exchange, sparse allreduce regions)."""
        if self.layout is None:
            return compressor.init_state(self.info)
        info = self.layout.state_info(self.info)
        state = compressor.init_state(info)
        state.update(self.layout.exchange_state(compressor, info))
        return state

    def end_step(self) -> None:
        """Drop the values that lived for one step only (shared scales, indices, ...), and a
        carry the step delivered (one host read, only in the step after a switch)."""
        for key in [k for k in self.state if k not in self.persistent]:
            del self.state[key]
        carry = self.state.get(CARRY)
        if carry is not None and not bool(carry.any()):
            del self.state[CARRY]
            self.persistent = self.persistent - {CARRY}

    def assign(self, compressor: Compressor) -> None:
        """Serve this slot with ``compressor`` from the next step on: fresh state, and what
        the old state owed the exchange (plus any carry not delivered yet) as the carry."""
        if compressor is self.compressor:
            return
        owed = self.compressor.owed(self.state) if isinstance(self.compressor, ErrorFeedback) else None  # may be None
        carry = self.state.get(CARRY)
        if owed is not None:
            carry = owed.detach().to(torch.float32).clone() if carry is None else carry + owed
        state = self.fresh_state(compressor)
        if carry is not None and bool(carry.any()):
            state[CARRY] = carry
        self.compressor, self.state, self.persistent = compressor, state, frozenset(state)

    def saved_state(self) -> dict:
        """Clones of the persistent state tensors."""
        return {k: v.detach().clone() for k, v in self.state.items() if k in self.persistent}

    def check(self, saved: dict, compressor: Compressor | None = None) -> None:
        """ValueError unless ``saved`` has exactly the persistent keys and shapes of this slot
        served by ``compressor`` (default: its own), a carry allowed."""
        if compressor is None or compressor is self.compressor:
            expected = {k: v for k, v in self.state.items() if k in self.persistent and k != CARRY}
            name = self.compressor.name
        else:
            expected, name = self.fresh_state(compressor), compressor.name
        if set(saved) - {CARRY} != set(expected):
            raise ValueError(f"checkpoint state of {self.name} has keys {sorted(saved)}, "
                             f"{name} keeps {sorted(expected)}")
        for k, v in saved.items():
            want = (self.info.numel,) if k == CARRY else tuple(expected[k].shape)
            if tuple(v.shape) != want:
                raise ValueError(f"checkpoint state {self.name}.{k} has shape {tuple(v.shape)}, expected {want}")

    def load(self, saved: dict, compressor: Compressor | None = None) -> None:
        """Copy ``saved`` (from :meth:`saved_state`) in, after :meth:`check`, serving the slot
        with ``compressor`` (default: its own) from now on."""
        self.check(saved, compressor)
        if compressor is not None and compressor is not self.compressor:
            self.compressor, self.state = compressor, self.fresh_state(compressor)
        self.state.pop(CARRY, None)
        for k, v in saved.items():
            if k == CARRY:
                self.state[CARRY] = v.detach().to(torch.float32).clone()
            else:
                self.state[k].copy_(v)
        self.persistent = frozenset(self.state)


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
        self.pending_assignment: dict[str, int] = {}  # a selector's saved choice for those
        self.pending_compressors: dict[str, Compressor] = {}  # or the compressor that serves them
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
        if isinstance(comp, Selector):
            comp = comp.initial
        slot = Slot(name, info, comp, {}, layout=self.layout)
        slot.state = slot.fresh_state(comp)
        slot.persistent = frozenset(slot.state)
        if name in self.pending:
            index = self.pending_assignment.pop(name, None)
            chosen = self.pending_compressors.pop(name, None)
            slot.load(self.pending.pop(name), chosen if index is None else self.compression.candidates[index])
        self.slots[name] = slot
        return slot

    def end_step(self) -> None:
        for slot in self.slots.values():
            slot.end_step()

    def compressors(self) -> list[Compressor]:
        """Every compressor that may serve a slot: ``small_compression``, and
        ``compression`` or, for a selector, each of its candidates."""
        chosen = list(self.compression.candidates) if isinstance(self.compression, Selector) else [self.compression]
        return chosen + [self.small_compression]

    def assignment(self) -> dict[str, int] | None:
        """Each slot's candidate index under a selector (None without one)."""
        if not isinstance(self.compression, Selector):
            return None
        candidates = list(self.compression.candidates)
        return {name: next(i for i, c in enumerate(candidates) if c is slot.compressor)
                for name, slot in self.slots.items() if any(c is slot.compressor for c in candidates)}

    def assign(self, assignment: dict[str, int]) -> None:
        """Serve each named slot with the selector's candidate of that index (:meth:`Slot.assign`)."""
        candidates = list(self.compression.candidates)
        for name, index in assignment.items():
            self.slots[name].assign(candidates[index])

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
        saved = {"step": int(step), "keys": keys, **self.describe(), "state": states}
        assignment = self.assignment()
        if assignment is not None:
            saved["assignment"] = {**self.pending_assignment, **assignment}
        return saved

    def load_state_dict(self, saved: dict, keys: str = "names", compressors: dict | None = None) -> int:
        """Restore :meth:`state_dict`; returns the step counter to continue from. Every check
        runs before anything is changed. compressors: ``{slot name: compressor}`` serving
        those slots from now on, whose state the checkpoint holds (the frozen-Adam recipe's
        phase at the checkpoint), instead of their current compressors."""
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
        # Under a selector the saved choice decides which compressor, and so which state
        # keys, each slot has.
        targets = {name: slot.compressor for name, slot in self.slots.items()}
        if isinstance(self.compression, Selector):
            candidates = list(self.compression.candidates)
            targets.update({n: candidates[i] for n, i in saved.get("assignment", {}).items() if n in targets})
        targets.update({n: c for n, c in (compressors or {}).items() if n in targets})
        for name, slot in self.slots.items():
            if name not in states:
                raise ValueError(f"checkpoint has no compression state for {name!r}")
            slot.check(states[name], targets[name])
        for name, slot in self.slots.items():
            slot.load(states[name], targets[name])
        self.pending = {name: {k: v.clone() for k, v in st.items()} for name, st in states.items()
                        if name not in self.slots}
        self.pending_assignment = {n: i for n, i in saved.get("assignment", {}).items() if n in self.pending}
        self.pending_compressors = {n: c for n, c in (compressors or {}).items() if n in self.pending}
        return int(saved["step"])

