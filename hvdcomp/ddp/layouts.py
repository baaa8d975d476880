"""DDP's bucket layouts mapped to per-parameter slots, across DDP's bucket rebuild."""
from __future__ import annotations

import torch

from ..core.slots import Slot, SlotTable

Tensor = torch.Tensor


class Layouts:
    """DDP's bucket layouts mapped to per-parameter slots.

    Each parameter's compressor state belongs to the parameter: ``(bucket index, position)``
    is mapped to its slot, and when DDP rebuilds its buckets after the first iteration the
    new layout is mapped back to the same slots by parameter identity
    (``bucket.parameters()``), so residuals never move to another parameter. Slots are keyed
    by name (``names`` given) or by the parameter's position in the first layout DDP used.
    """

    def __init__(self, table: SlotTable, names: dict | None, name_index: dict):
        self._table, self._names, self._name_index = table, names, name_index
        self._slot_of: dict[int, Slot] = {}  # id(parameter) -> slot
        self._param_of: dict[int, Tensor] = {}  # id(slot) -> parameter
        self._layouts: dict[int, list[Slot]] = {}  # bucket index -> slots by position
        #: How many times a bucket index was found holding other parameters than before.
        self.rebuilds = 0

    def slots(self, index: int, params: list, grads: list) -> list[Slot]:
        """Slots of bucket ``index`` by position; maps a rebuilt layout back to the same
        per-parameter slots by parameter identity."""
        known = self._layouts.get(index)
        if known is not None and len(known) == len(params) and \
                all(self._param_of[id(s)] is p for s, p in zip(known, params)):
            return known
        slots = []
        for pos, (p, g) in enumerate(zip(params, grads)):
            slot = self._slot_of.get(id(p))
            if slot is None or self._param_of[id(slot)] is not p:
                slot = self._new_slot(p, g, index, pos)
            elif tuple(slot.info.shape) != tuple(p.shape) or slot.info.dtype != g.dtype:
                raise RuntimeError(f"hvdcomp.ddp: parameter {slot.name} changed shape or dtype "
                                   f"({tuple(slot.info.shape)} {slot.info.dtype} -> {tuple(p.shape)} {g.dtype})")
            slots.append(slot)
        if known is not None or any(any(s in slots for s in other) for other in self._layouts.values()):
            self.rebuilds += 1
        members = {id(s) for s in slots}
        for other in [i for i, layout in self._layouts.items() if any(id(s) in members for s in layout)]:
            del self._layouts[other]  # those positions now live under ``index``
        self._layouts[index] = slots
        return slots

    def _new_slot(self, p: Tensor, grad: Tensor, index: int, pos: int) -> Slot:
        if self._names is not None:
            if p not in self._names:
                raise ValueError(f"a parameter of shape {tuple(p.shape)} in DDP bucket {index} is not in "
                                 "named_parameters; pass model.named_parameters() of the DDP-wrapped model")
            name = self._names[p]
            order = self._name_index[name]
        else:
            # First layout DDP uses: identical on every rank and in a new process.
            name = f"bucket{index}.{pos}"
            order = len(self._slot_of)
        slot = self._table.add(name, p.shape, grad.dtype, grad.device, order)
        self._slot_of[id(p)] = slot
        self._param_of[id(slot)] = p
        return slot

    def names(self) -> dict[int, list[str]]:
        """DDP's current buckets as seen by the hook: bucket index -> parameter keys by position."""
        return {i: [s.name for s in slots] for i, slots in sorted(self._layouts.items())}
