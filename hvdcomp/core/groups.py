"""Horovod's explicit gradient groups (``groups=`` / ``num_groups=`` of
``hvd.DistributedOptimizer``), as pure functions of the parameter list.

Horovod 0.28.1 (horovod/torch/optimizer.py): ``num_groups != 0`` is a deprecated alias of
``groups`` (DeprecationWarning, used only when ``groups`` is None, lines 589-593);
``groups`` is validated at construction (lines 88-100) and the groups are formed when the
hooks are registered (lines 132-165) from ``p_list``: the parameters with
``requires_grad``, in the optimizer's order, re-sorted by rank 0's order of their names
(broadcast, so all ranks agree). An integer ``n`` cuts ``p_list`` into ``n`` contiguous
chunks of near-equal length (``horovod.common.util.split_list``); a list of lists keeps
each inner list (minus parameters not in ``p_list``, in the inner list's order) and adds
every parameter it does not name as a group of its own, in ``p_list`` order. A group's
gradients travel in one grouped allreduce once all of them are ready.
"""
from __future__ import annotations

import warnings
from typing import Sequence, TypeVar

import torch

T = TypeVar("T")


def split_evenly(items: Sequence[T], n: int) -> list[list[T]]:
    """``items`` cut into ``n`` contiguous chunks whose lengths differ by at most one, the
    longer ones first (Horovod's ``split_list``); chunks are empty when ``n > len(items)``."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"the number of groups must be an integer >= 1, got {n!r}")
    d, r = divmod(len(items), n)
    return [list(items[i * d + min(i, r):(i + 1) * d + min(i + 1, r)]) for i in range(n)]


def resolve_groups(groups, num_groups: int = 0):
    """The effective ``groups`` argument: ``num_groups`` (deprecated, with Horovod's
    DeprecationWarning) stands in when ``groups`` is None."""
    if num_groups != 0:
        warnings.warn("Parameter `num_groups` has been replaced by `groups` and will be removed in v0.23.0.",
                      DeprecationWarning, stacklevel=3)
        if groups is None:
            return num_groups
    return groups


def validate_groups(groups) -> None:
    """Horovod's checks: None, an integer >= 1, or a list of lists of tensors in which no
    tensor appears twice; ValueError otherwise."""
    if groups is None:
        return
    if isinstance(groups, list):
        seen: set[int] = set()
        for group in groups:
            for p in group:
                if not isinstance(p, torch.Tensor):
                    raise ValueError(f"groups must consist of torch.Tensor, got {type(p).__name__}")
                if id(p) in seen:
                    raise ValueError("A parameter can only appear once in groups.")
                seen.add(id(p))
        return
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups should be a positive integer or a list of lists of torch.Tensor, got {groups!r}")


def form_groups(params: Sequence[torch.Tensor], groups) -> list[tuple[torch.Tensor, ...]]:
    """The groups Horovod forms from ``params`` (its ``p_list``: parameters with
    ``requires_grad``, in the order all ranks agreed on) and a validated ``groups``.

    Returns tuples of tensors; an integer ``groups`` larger than ``len(params)`` and an inner
    list naming only parameters outside ``params`` give empty tuples, as in Horovod. None:
    every parameter alone (no explicit grouping)."""
    validate_groups(groups)
    if groups is None:
        return [(p,) for p in params]
    if isinstance(groups, int):
        return [tuple(chunk) for chunk in split_evenly(params, groups)]
    known = {id(p) for p in params}
    formed = [tuple(p for p in group if id(p) in known) for group in groups]
    named = {id(p) for group in formed for p in group}
    formed += [(p,) for p in params if id(p) not in named]
    return formed
