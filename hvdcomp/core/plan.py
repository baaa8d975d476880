"""Which chain carries which slot, and how slots are grouped into buckets."""
from __future__ import annotations

from typing import Sequence

from ..compressor import Compressor, IndexBroadcast, TensorInfo
from .chains import CHAINS, DENSE, INDEX, PACKED, SPARSE_ALLREDUCE, ChainKind
from .options import choose_collective
from .slots import Slot
from .sparse_allreduce import REGIONS, initial_regions


class Router:
    """The chain kind (:class:`~hvdcomp.core.chains.ChainKind`) of every slot: ``dense`` /
    ``index`` for allreduce compressors (index when the compressor is an
    :class:`~hvdcomp.compressor.IndexBroadcast`), and for packed ones the collective
    :func:`~hvdcomp.core.options.choose_collective` picks for ``nranks``."""

    def __init__(self, compressors: Sequence[Compressor], requested: str, nranks: int):
        self.collectives = {c.name: choose_collective(c, requested, nranks) for c in compressors
                            if c.transport == "allgather"}

    def base_kind(self, comp: Compressor) -> ChainKind:
        """The flat kind of ``comp``'s chain (one of :data:`~hvdcomp.core.chains.CHAINS`)."""
        if comp.transport == "allreduce":
            return INDEX if isinstance(comp, IndexBroadcast) else DENSE
        return CHAINS[self.collectives[comp.name]]

    def kind(self, comp: Compressor) -> ChainKind:
        """The kind a transport runs for ``comp`` (a hierarchical router wraps the flat one)."""
        return self.base_kind(comp)

    def chains(self, slots: Sequence[Slot]) -> list[tuple[ChainKind, list[int]]]:
        """``(kind, member positions)`` of ``slots``, kinds in :data:`~hvdcomp.core.chains.CHAINS` order."""
        groups: dict[str, list[int]] = {}
        for j, slot in enumerate(slots):
            groups.setdefault(self.base_kind(slot.compressor).name, []).append(j)
        return [(kind, groups[name]) for name, kind in CHAINS.items() if name in groups]

    # ---- the state a slot needs for the way it travels (SlotTable's layout) -----------------
    def state_info(self, info: TensorInfo) -> TensorInfo:
        """The TensorInfo a slot's compressor state is created for (flat: the tensor's own)."""
        return info

    def exchange_state(self, comp: Compressor, info: TensorInfo) -> dict:
        """Persistent state the chain of ``comp`` keeps per slot, beside the compressor's: the
        sparse allreduce's region boundaries (identical on every rank)."""
        if self.base_kind(comp) is SPARSE_ALLREDUCE:
            return {REGIONS: initial_regions(info.numel, info.size, info.device)}
        return {}

    def describe(self) -> dict:
        """Settings of the layout a checkpoint must match (flat: no nodes; a checkpoint
        without the key, from before hierarchical exchange, reads as flat)."""
        return {"ranks_per_node": None}


def packed_buckets(slots: Sequence[Slot], router: Router, cap_mb: float) -> list[list[Slot]]:
    """Slots of packed compressors grouped into buckets of at most ``cap_mb`` dense fp32
    megabytes (a bigger tensor gets a bucket of its own), in reverse name order: roughly
    the order in which a backward pass produces gradients, so buckets fill and leave early.
    Identical on every rank."""
    cap = cap_mb * 2**20 / 4
    buckets: list[list[Slot]] = []
    current: list[Slot] = []
    filled = 0
    for slot in sorted((s for s in slots if router.base_kind(s.compressor) in PACKED),
                       key=lambda s: s.name, reverse=True):
        if current and filled + slot.info.numel > cap:
            buckets.append(current)
            current, filled = [], 0
        current.append(slot)
        filled += slot.info.numel
    if current:
        buckets.append(current)
    return buckets
