"""Horovod process sets for hierarchical exchange: one per node ("local") and one per local
rank across nodes ("cross"), for :func:`hvdcomp.DistributedOptimizer(hierarchical=...)`.

Horovod 0.28.1 runs a collective on a process set only if the set was registered, which
happens in one of two ways, and hierarchical exchange accepts both:

* **static** (no setting needed at run time): build the sets before ``hvd.init`` and pass them
  to it::

      hvd.init(process_sets=hvdcomp.node_process_sets())

  :func:`node_process_sets` reads the number of ranks and ranks per node from the
  launcher's environment (``horovodrun``, ``launch.cluster`` and ``mpirun`` set them), or
  takes them as arguments;
* **dynamic**: ``hvd.init(process_sets="dynamic")`` (or ``HOROVOD_DYNAMIC_PROCESS_SETS=1``);
  the optimizer then adds the sets itself, once per process, with ``hvd.add_process_set``
  on every rank in the same order (after the settings agreement, so that no rank adds them
  alone).

Ranks are numbered node by node, as every launcher numbers them: node k holds ranks
``kG .. kG+G-1``. A set of every rank is Horovod's global set (Horovod refuses a duplicate).
"""
from __future__ import annotations

import os

from ._horovod import hvd
from .core.hierarchy import Topology

#: Sets built by node_process_sets(), by (size, ranks per node): found again after hvd.init.
_BUILT: dict[tuple[int, int], list] = {}
#: Sets added dynamically by this process, by (size, ranks per node).
_ADDED: dict[tuple[int, int], dict] = {}


def _env_int(*names: str) -> int | None:
    for name in names:
        if os.environ.get(name, "").strip().isdigit():
            return int(os.environ[name])
    return None


def node_process_sets(ranks_per_node: int | None = None, size: int | None = None) -> list:
    """Every node's set and every local rank's set across nodes, for ``hvd.init(process_sets=...)``.

    size / ranks_per_node: default from the launcher's environment (``HOROVOD_SIZE`` /
    ``HOROVOD_LOCAL_SIZE``, or Open MPI's ``OMPI_COMM_WORLD_SIZE`` /
    ``OMPI_COMM_WORLD_LOCAL_SIZE``); ValueError if neither is known."""
    h = hvd()
    size = size if size is not None else _env_int("HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE")
    per_node = ranks_per_node if ranks_per_node is not None else _env_int("HOROVOD_LOCAL_SIZE",
                                                                           "OMPI_COMM_WORLD_LOCAL_SIZE")
    if size is None or per_node is None:
        raise ValueError("hvdcomp.node_process_sets: the number of ranks and of ranks per node are unknown "
                         "(no HOROVOD_SIZE/HOROVOD_LOCAL_SIZE in the environment); pass ranks_per_node= and size=")
    topology = Topology.of(size, per_node, 0)
    sets = [h.ProcessSet(group) for scope in ("local", "cross") for group in topology.groups(scope)
            if 1 < len(group) < size]
    _BUILT[(size, per_node)] = sets
    return sets


def _registered(group: list[int]):
    """The registered set of exactly ``group`` (built by node_process_sets or added here)."""
    h = hvd()
    if len(group) == h.size():
        return h.global_process_set
    for sets in list(_BUILT.values()) + [list(d.values()) for d in _ADDED.values()]:
        for ps in sets:
            if ps.process_set_id is not None and list(ps.ranks) == group:
                return ps
    return None


def dynamic_enabled() -> bool:
    """Whether Horovod lets this process add sets (``HOROVOD_DYNAMIC_PROCESS_SETS``)."""
    return os.environ.get("HOROVOD_DYNAMIC_PROCESS_SETS", "").strip().lower() not in ("", "0", "false")


def launcher_topology(hierarchical, size: int, rank: int) -> tuple[Topology | None, str | None]:
    """``(topology, problem)``: the nodes ``hierarchical`` asks for (True: Horovod's
    ``local_size``, checked against ``local_rank`` / ``cross_rank``; an int: that many
    consecutive ranks per node), or a problem to report on every rank."""
    h = hvd()
    per_node = h.local_size() if hierarchical is True else hierarchical
    try:
        topology = Topology.of(size, per_node, rank)
    except ValueError as err:
        return None, f"hierarchical exchange: {err}"
    if hierarchical is True and (h.local_rank(), h.cross_rank()) != (topology.local_rank, topology.cross_rank):
        return None, (f"hierarchical exchange needs ranks numbered node by node: rank {rank} is local rank "
                      f"{h.local_rank()} of node {h.cross_rank()}, expected {topology.local_rank} of "
                      f"{topology.cross_rank}")
    if topology.local_size < 2 or topology.cross_size < 2:
        return None, (f"hierarchical exchange over {topology.cross_size} node(s) of {topology.local_size} rank(s) "
                      "is not supported with Horovod (a process set of one rank, or a copy of the global set): "
                      "use at least 2 nodes of 2 ranks, or the flat exchange")
    return topology, None


def sets_mode(topology: Topology) -> tuple[str, str | None]:
    """``(mode, problem)``: "registered" when every node set is registered already, else
    "dynamic" when this process may add them, else a problem (checked before any collective;
    the mode is part of the settings every rank must share)."""
    groups = [group for scope in ("local", "cross") for group in topology.groups(scope)]
    if all(_registered(group) is not None for group in groups):
        return "registered", None
    if dynamic_enabled():
        return "dynamic", None
    return "missing", ("hierarchical exchange needs Horovod process sets for the nodes: call "
                       "hvd.init(process_sets=hvdcomp.node_process_sets()) or hvd.init(process_sets='dynamic')")


def scope_sets(topology: Topology) -> dict:
    """``{"local": set, "cross": set}`` of this rank; adds them (every node's and every
    local rank's, on every rank in the same order) when Horovod's sets are dynamic and they
    are not registered yet. Call it on every rank after the settings agreement."""
    h = hvd()
    key = (topology.size, topology.local_size)
    wanted = [group for scope in ("local", "cross") for group in topology.groups(scope)]
    if any(_registered(g) is None for g in wanted):
        added = _ADDED.setdefault(key, {})
        for group in wanted:
            if _registered(group) is None:
                added[tuple(group)] = h.add_process_set(group)
    return {scope: _registered(topology.group(scope)) for scope in ("local", "cross")}

