"""Which chain carries which slot, and how slots are grouped into buckets."""
from __future__ import annotations

from typing import Sequence

from ..compressor import Compressor, IndexBroadcast, SharedScale
from .chains import CHAINS
from .options import choose_collective
from .slots import Slot

#: Chains of one group of slots, in the order every rank starts them.
KINDS = ("dense", "index", "allgather", "compressed_allreduce")


class Router:
    """The chain kind of every slot: ``dense`` / ``index`` for allreduce compressors (index
    when the compressor is an :class:`~hvdcomp.compressor.IndexBroadcast`), and for packed
    ones the collective :func:`~hvdcomp.core.options.choose_collective` picks for ``nranks``."""

    def __init__(self, compressors: Sequence[Compressor], requested: str, nranks: int):
        self.collectives = {c.name: choose_collective(c, requested, nranks) for c in compressors
                            if c.transport == "allgather"}

    def kind(self, comp: Compressor) -> str:
        if comp.transport == "allreduce":
            return "index" if isinstance(comp, IndexBroadcast) else "dense"
        return self.collectives[comp.name]

    def chains(self, slots: Sequence[Slot]) -> list[tuple[str, list[int]]]:
        """``(kind, member positions)`` of ``slots``, kinds in :data:`KINDS` order."""
        groups: dict[str, list[int]] = {}
        for j, slot in enumerate(slots):
            groups.setdefault(self.kind(slot.compressor), []).append(j)
        return [(k, groups[k]) for k in KINDS if k in groups]


def phase_count(kind: str, compressors: Sequence[Compressor]) -> int:
    """How many phases (yields) a chain ``kind`` whose members use ``compressors`` has."""
    if kind == "dense":
        return 1
    if kind in ("index", "sparse"):
        return 2
    return 2 + any(isinstance(c, SharedScale) for c in compressors)


def chain_function(kind: str):
    return CHAINS[kind]


def packed_buckets(slots: Sequence[Slot], router: Router, cap_mb: float) -> list[list[Slot]]:
    """Slots of packed compressors grouped into buckets of at most ``cap_mb`` dense fp32
    megabytes (a bigger tensor gets a bucket of its own), in reverse name order: roughly
    the order in which a backward pass produces gradients, so buckets fill and leave early.
    Identical on every rank."""
    cap = cap_mb * 2**20 / 4
    buckets: list[list[Slot]] = []
    current: list[Slot] = []
    filled = 0
    for slot in sorted((s for s in slots if router.kind(s.compressor) in ("allgather", "compressed_allreduce")),
                       key=lambda s: s.name, reverse=True):
        if current and filled + slot.info.numel > cap:
            buckets.append(current)
            current, filled = [], 0
        current.append(slot)
        filled += slot.info.numel
    if current:
        buckets.append(current)
    return buckets
