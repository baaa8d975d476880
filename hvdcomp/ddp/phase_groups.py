"""Order of the DDP hook's chained collectives: one process group per phase, a sequencer each.

The hook never waits: later collectives of a chain are launched from ``.then`` callbacks,
which on Gloo run on the process group's worker threads in whatever order the previous
collectives finish, so two ranks could issue collectives in different orders and pair the
wrong messages. So collective number k of every chain goes to its own process group (the
user's group for k = 0, extra groups with the same ranks for the others), and on each group
a :class:`Sequencer` issues them in the order the hooks reserved them, which is the same on
every rank (DDP calls the hook bucket by bucket in index order). A chain's k-th collective
only waits for its own (k-1)-th and for earlier reservations on group k, so the scheme
cannot deadlock.
"""
from __future__ import annotations

import collections
import threading
from typing import Callable

import torch.distributed as dist

from ..compressor import Compressor
from ..core.plan import Router


class Sequencer:
    """Issues the collectives of one process group in reservation order.

    ``reserve()`` is called from the hook (same order on every rank); ``launch(ticket, fn)``
    may come from any thread; ``fn`` (which issues the collectives) runs once every earlier
    ticket has run. The lock is shared by all sequencers and re-entrant, because a
    collective whose future is already complete runs its callback inline, which may launch
    the next ticket.
    """

    def __init__(self, lock: threading.RLock):
        self._lock = lock
        self._queue: collections.deque = collections.deque()

    def reserve(self) -> list:
        with self._lock:
            ticket = [None]
            self._queue.append(ticket)
            return ticket

    def launch(self, ticket: list, fn: Callable[[], None]) -> None:
        with self._lock:
            ticket[0] = fn
            while self._queue and self._queue[0][0] is not None:
                self._queue.popleft()[0]()


class PhaseGroups:
    """The process groups of the phases and their sequencers, for ``process_group``.

    ``groups[k]`` carries phase k of every chain; ``sequencers[k]`` orders it."""

    def __init__(self, process_group, rank: int, backend: str):
        self.process_group, self.rank, self.backend = process_group, rank, backend
        self.group_ranks = list(dist.get_process_group_ranks(process_group))
        self.groups: list = [process_group]
        self.sequencers: list[Sequencer] = []

    @classmethod
    def among(cls, groups: list, members: list[int], rank: int, lock: threading.RLock) -> "PhaseGroups":
        """Phase groups made elsewhere (``groups[k]`` carries phase k; ``members``: their
        global ranks in position order; ``rank``: this rank's position), with sequencers."""
        made = cls.__new__(cls)
        made.process_group, made.rank, made.backend = groups[0], rank, None
        made.group_ranks, made.groups = list(members), list(groups)
        made.sequencers = [Sequencer(lock) for _ in groups]
        return made

    @property
    def size(self) -> int:
        return len(self.group_ranks)

    @staticmethod
    def phases(router: Router, comp: Compressor) -> int:
        """Collectives a chain of ``comp`` issues one after the other (groups it needs)."""
        if comp.transport == "allgather" and comp.name not in router.collectives:
            return 1  # a failed set-up: the error is raised after the settings exchange
        return router.kind(comp).phases([comp])

    def make(self, nphases: int, lock: threading.RLock) -> None:
        """Create the ``nphases - 1`` extra groups (a collective call on the user's group)
        and one sequencer per group."""
        self.groups = [self.process_group] + [self._new_group() for _ in range(nphases - 1)]
        self.sequencers = [Sequencer(lock) for _ in self.groups]

    def _new_group(self):
        kwargs = {"ranks": self.group_ranks, "backend": self.backend}
        if self.process_group is not dist.group.WORLD:
            kwargs["use_local_synchronization"] = True  # only the members build it
        group = dist.new_group(**kwargs)
        if dist.get_rank(group) != self.rank:
            raise RuntimeError("hvdcomp.ddp: the helper process group orders ranks differently from "
                               "process_group; build process_group with sorted ranks")
        return group
