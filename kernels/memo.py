"""A cache of values computed from a tensor, valid for that very tensor object at its current
``_version`` (bumped by every in-place write), so an entry is never stale; it disappears
with its tensor. The CPU paths use it where two calls of one step compute the same thing
from the same tensor (TernGrad's clipping bound, DGC's selection mask)."""
from __future__ import annotations

import weakref

import torch


class PerTensorVersion:
    """``cache(x, key, make)``: ``make()`` for tensor ``x`` and hashable ``key``, computed once
    per version of ``x``; ``cache.take(x, key, make)`` the same, and the entry is dropped (a
    value used once more, not kept for the tensor's lifetime). Inference tensors (no version
    counter) are never cached."""

    def __init__(self):
        self.entries: dict = {}

    def __call__(self, x: torch.Tensor, key, make):
        try:
            version = x._version
        except RuntimeError:  # an inference tensor: no version counter
            return make()
        ident = id(x)
        hit = self.entries.get(ident)
        if hit is not None and hit[0]() is x and hit[1] == version and hit[2] == key:
            return hit[3]
        value = make()
        entries = self.entries

        def drop(ref, ident=ident):  # the tensor died: forget its entry (unless replaced)
            if entries.get(ident, (None,))[0] is ref:
                del entries[ident]

        entries[ident] = (weakref.ref(x, drop), version, key, value)
        return value

    def take(self, x: torch.Tensor, key, make):
        hit = self.entries.get(id(x))
        if hit is not None and hit[0]() is x and hit[2] == key:
            del self.entries[id(x)]
            try:
                if hit[1] == x._version:
                    return hit[3]
            except RuntimeError:  # an inference tensor: never cached
                pass
        return make()
