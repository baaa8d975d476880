"""The DDP hook's part in the frozen-v Adam recipe (:mod:`hvdcomp.core.frozen_adam`): a hook
cannot own the optimizer's state, so the script builds an :class:`hvdcomp.FrozenAdamW` and
hands it to :class:`hvdcomp.ddp.CompressionState`, which asks this link, per bucket, which
compressor serves each slot and what each parameter sends."""
from __future__ import annotations

from ..core.frozen_adam import FrozenAdamW, phase_compressors
from ..core.slots import SlotTable
from ..recipes import ddp_adam_notice


class FrozenAdamLink:
    """One hook state's view of its :class:`FrozenAdamW`.

    optimizer: the FrozenAdamW that steps the DDP model. table: the hook's slots. names:
    ``{parameter: name}`` (None when the hook keys its state by position).
    """

    def __init__(self, optimizer: FrozenAdamW, table: SlotTable, names: dict | None):
        self.optimizer, self.table, self.names = optimizer, table, names

    @classmethod
    def of(cls, optimizer, table: SlotTable, names: dict | None) -> "FrozenAdamLink | None":
        """The link of a FrozenAdamW, else None (a plain Adam/AdamW under a lossy
        compressor gets a ``RecipeNotice``: a hook cannot replace it)."""
        if isinstance(optimizer, FrozenAdamW):
            return cls(optimizer, table, names)
        ddp_adam_notice(optimizer, table.compression)
        return None

    def messages(self, slots: list, params: list, grads: list) -> list:
        """Serve each slot of a bucket as its parameter's phase asks (the exact codec during
        the warm-up, the compressor once frozen: :func:`phase_compressors`) and return what
        each parameter sends: its gradient, or its local momentum once frozen."""
        wanted = phase_compressors(self.optimizer, self.table, {s.name: p for s, p in zip(slots, params)})
        for slot in slots:
            slot.assign(wanted.get(slot.name, slot.compressor))
        return [self.optimizer.exchange_message(p, g) for p, g in zip(params, grads)]

    def checkpoint_compressors(self) -> dict | None:
        """Each named slot's compressor by the optimizer's phase (its state loaded first),
        which the hook's checkpointed state belongs to; None without names."""
        if self.names is None:
            return None
        return phase_compressors(self.optimizer, self.table, {n: p for p, n in self.names.items()})
