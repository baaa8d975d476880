"""The transport interface: the collectives a step needs, as plain request objects.

A chain (:mod:`hvdcomp.core.chains`) yields a *phase*: a list of requests that may be issued
together; the transport issues them on its group of ranks, in the same order on every
rank, and sends back a list with one result per request. Every size a request needs is a
host integer known to every rank, so no transport has to exchange sizes of its own.

=====================  ==============================================  =========================
request                what every rank contributes                     result on every rank
=====================  ==============================================  =========================
:class:`Allreduce`     ``tensor`` (same shape and dtype everywhere)    the elementwise sum (or
                                                                       max), same shape/dtype
:class:`Broadcast`     ``tensor`` (the root's is the one sent)         the root's tensor
:class:`Allgather`     ``tensor`` (same numel everywhere)              ``[N * numel]``, rank-major
:class:`AllgatherV`    ``tensor`` of ``lengths[rank]`` elements        list of N tensors, rank order
:class:`Alltoall`      ``tensor``: ``send_splits[r]`` elements for r   ``[sum(recv_splits)]``,
                       in rank order                                   source-rank-major
=====================  ==============================================  =========================

Ranks are positions within the request's group of ranks (``0 .. N-1``), which its ``scope``
names: ``"world"`` (every rank of the transport's group), ``"local"`` (the ranks of this
rank's node) or ``"cross"`` (one rank per node: those with this rank's position in its node).
Only hierarchical exchange (:mod:`hvdcomp.core.hierarchy`) issues the last two; a transport
maps them to its own groups (Horovod's process sets, ``torch.distributed`` groups, the
in-process ranks of a :class:`~hvdcomp.core.hierarchy.Topology`).
"""
from __future__ import annotations

import dataclasses

import torch

Tensor = torch.Tensor
#: The groups of ranks a request may address (see the module docstring).
SCOPES = ("world", "local", "cross")


@dataclasses.dataclass
class Allreduce:
    """Elementwise ``op`` ("sum" or "max") of ``tensor`` over the ranks. Transports may
    reduce in place (torch.distributed and Horovod do): the result can be ``tensor``."""

    tensor: Tensor
    op: str = "sum"
    scope: str = "world"


@dataclasses.dataclass
class Broadcast:
    """``tensor`` of rank ``root`` to every rank (the others' tensors give shape and dtype)."""

    tensor: Tensor
    root: int
    scope: str = "world"


@dataclasses.dataclass
class Allgather:
    """Every rank's ``tensor`` (1-D, equal length on all ranks), concatenated in rank order."""

    tensor: Tensor
    scope: str = "world"


@dataclasses.dataclass
class AllgatherV:
    """Every rank's 1-D ``tensor`` of ``lengths[r]`` elements (lengths known to all ranks)."""

    tensor: Tensor
    lengths: list
    scope: str = "world"


@dataclasses.dataclass
class Alltoall:
    """Rank r receives ``send_splits[r]`` elements of every rank's 1-D ``tensor``; this rank
    receives ``recv_splits[s]`` elements from rank s."""

    tensor: Tensor
    send_splits: list
    recv_splits: list
    scope: str = "world"


REQUESTS = (Allreduce, Broadcast, Allgather, AllgatherV, Alltoall)
