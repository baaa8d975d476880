"""Nodes for the DDP hook's hierarchical exchange: the topology, and the intra-node ("local")
and inter-node ("cross") process groups of every phase.

``CompressionState(hierarchical=True)`` takes the ranks per node from torchrun's
``LOCAL_WORLD_SIZE`` (``launch.cluster`` sets it too) and checks ``LOCAL_RANK`` /
``GROUP_RANK`` where present; ``hierarchical=G`` groups G consecutive ranks per node. Ranks
are numbered node by node, as torchrun numbers them. Every group is created by every rank of
the default group in the same order (``dist.new_group`` is collective there), once per
phase, so that each phase of a chain is ordered on its own group as the flat hook's are
(:mod:`hvdcomp.ddp.phase_groups`).
"""
from __future__ import annotations

import os
import threading

import torch.distributed as dist

from ..core.hierarchy import Topology
from .phase_groups import PhaseGroups


def _env(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    return int(value) if value.isdigit() else None


def torch_topology(hierarchical, process_group, rank: int, size: int) -> tuple[Topology | None, str | None]:
    """``(topology, problem)`` of ``hierarchical`` (True: ``LOCAL_WORLD_SIZE`` ranks per node;
    an int: that many); a problem is reported on every rank by the settings agreement."""
    if hierarchical is False:
        return None, None
    if process_group is not dist.group.WORLD:
        return None, "hierarchical exchange runs on the default process group (process_group=None)"
    per_node = _env("LOCAL_WORLD_SIZE") if hierarchical is True else hierarchical
    if per_node is None:
        return None, ("hierarchical=True takes the ranks per node from LOCAL_WORLD_SIZE (torchrun sets it); "
                      "pass hierarchical=<ranks per node> instead")
    try:
        topology = Topology.of(size, per_node, rank)
    except ValueError as err:
        return None, f"hierarchical exchange: {err}"
    local, node = _env("LOCAL_RANK"), _env("GROUP_RANK")
    if hierarchical is True and (local, node) != (None, None) and \
            (local, node) != (topology.local_rank, topology.cross_rank):
        return None, (f"hierarchical exchange needs ranks numbered node by node: rank {rank} is local rank "
                      f"{local} of node {node}, expected {topology.local_rank} of {topology.cross_rank}")
    return topology, None


def scoped_phase_groups(topology: Topology, nphases: int, backend: str, lock: threading.RLock) -> dict:
    """``{"local": PhaseGroups, "cross": PhaseGroups}`` of this rank, ``nphases`` groups each.

    Every rank creates every node's and every cross group's groups (a collective call on the
    default group), in the same order."""
    out = {}
    for scope in ("local", "cross"):
        mine = topology.group(scope)
        groups = []
        for _ in range(nphases):
            for members in topology.groups(scope):
                group = dist.new_group(ranks=members, backend=backend)
                if members == mine:
                    groups.append(group)
        out[scope] = PhaseGroups.among(groups, mine, mine.index(topology.rank), lock)
    return out
