"""The settings every rank must share, and their comparison.

Each transport builds one record per rank (:func:`settings_record`), exchanges the records
with one object allgather before any gradient travels, and raises the ``ValueError`` of
:func:`settings_problems` on every rank alike when they differ: a mismatch then fails
loudly everywhere instead of hanging one rank or summing garbage. A rank that found a
problem of its own (a bad argument, a combination its backend cannot carry) puts it in the
record's ``error`` so that the others raise too.
"""
from __future__ import annotations

from typing import Any

from .slots import SlotTable


def settings_record(table: SlotTable, parameters, error: str | None = None, **extra: Any) -> dict:
    """This rank's record. parameters: sorted ``(name, shape, dtype)`` triples, or None when
    the transport has no names (DDP without ``named_parameters``); extra: transport settings
    that must match too (collective, bucket size, op, ...)."""
    record = {"compression": table.compression.config(), "small_compression": table.small_compression.config(),
              "min_compress_numel": table.min_compress_numel, "nranks": table.size, **extra}
    record["parameters"] = parameters
    record["error"] = error
    return record


def describe_parameters(named) -> list[tuple[str, tuple, str]]:
    """Sorted ``(name, shape, dtype)`` of ``(name, tensor)`` pairs."""
    return sorted((n, tuple(p.shape), str(p.dtype)) for n, p in named)


def settings_problems(records: list[dict], rank: int) -> list[str]:
    """Human-readable differences between the ranks' records (empty when they agree)."""
    mine = records[rank]
    problems = sorted({f"rank {r}: {theirs['error']}" for r, theirs in enumerate(records) if theirs["error"]})
    problems += [f"rank {r}: {key} = {theirs.get(key)!r} (rank {rank} has {mine[key]!r})"
                 for r, theirs in enumerate(records) for key in mine
                 if key not in ("error", "parameters") and theirs.get(key) != mine[key]]
    if any(theirs["parameters"] != mine["parameters"] for theirs in records):
        problems.append("the ranks' named parameters (names, shapes or dtypes) differ")
    return problems
