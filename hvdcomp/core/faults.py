"""The non-finite policy: one rank's inf or NaN drops the step on every rank.

Mixed-precision training produces non-finite gradients by design (``torch.amp.GradScaler``
then skips the step and lowers the scale), and one bad batch can do it in any run. A
compressor must then neither crash nor hang nor keep the poison in its state. The rule, the
same for every compressor and transport:

* every chain computes a flag from its members' gradients (``isfinite``, on the device,
  no host synchronisation) and carries it in a collective it issues anyway: as a NaN in
  element 0 of the dense payload (dense and index chains), as an extra int64 in the payload
  sizes (allgather chains: read on the host with the sizes, once per bucket), or as an extra
  byte per destination in the alltoall (compressed allreduce);
* so every rank learns that *some* rank was non-finite, and that chain's averaged gradients
  become NaN on every rank (GradScaler and ``torch.isfinite`` checks see it and skip);
  an allgather chain then sends empty payloads instead of packing (a selection over NaN has
  no meaning, and a payload of another size than announced would fail);
* the transport reads the step's flags once at the end of the step; when one is set it
  restores every slot's state from the snapshot taken before encoding (residuals, momentum,
  velocity: all that ``init_state`` created) and does not advance the step counter, so the
  next finite step continues as if the bad one never happened.

The snapshot costs one copy of each stateful slot's state per step, into buffers kept from
step to step (a fresh clone each step would also pay the first touch of every page, which
on a CPU costs several times the copy), except for the keys a compressor declares staged
(:attr:`~hvdcomp.compressor.Compressor.staged_state`: every built-in compressor's): the
compressor writes their new value whole into a spare tensor, so the previous tensor is kept
as the snapshot and becomes the next step's spare. For DGC that was two copies of the
parameter's size per step, as much memory traffic as its momentum correction.
"""
from __future__ import annotations

import weakref
from typing import Sequence

import torch

from ..compressor import previous_key
from .slots import Slot

Tensor = torch.Tensor


def nonfinite_flag(grads: Sequence[Tensor]) -> Tensor:
    """bool [] on the gradients' device: True when any gradient has an inf or a NaN.

    One read of each gradient: its minimum and maximum (``torch.aminmax``), which are NaN
    when any element is (torch's min and max propagate NaN), -inf or +inf when an element
    is. ``torch.isfinite(g).all()`` writes a mask of every element first, which made the
    flag cost more than a cast of the gradient to fp16 on a CPU. The extremes are compared
    in fp64, which holds every finite value of every floating dtype."""
    ends = [v.to(torch.float64) for g in grads if g.numel() for v in torch.aminmax(g.reshape(-1))]
    if not ends:
        return torch.zeros((), dtype=torch.bool, device=grads[0].device if grads else None)
    return ~torch.isfinite(torch.stack(ends)).all()


def snapshot(slots: Sequence[Slot]) -> list[tuple[Slot, dict]]:
    """The persistent state of every stateful slot as it was before this step, to restore on
    a dropped step (valid until the slot's next snapshot: :func:`restore` runs at the end of
    the same step): copies, and for staged keys the previous tensors themselves, with a
    spare tensor put in their place (see the module docstring)."""
    return [(s, _save(s)) for s in slots if s.persistent]


#: Each stateful slot's snapshot buffers and spare tensors, by state key; they go with the slot.
_BUFFERS: "weakref.WeakKeyDictionary[Slot, dict]" = weakref.WeakKeyDictionary()


def reuse_like(buf: Tensor | None, value: Tensor) -> Tensor:
    """``buf`` when it has ``value``'s shape, dtype and device, else a new ``empty_like(value)``:
    a buffer kept from step to step is made again when those change (a loaded checkpoint, a
    model moved to another device), and its first-touch page faults are paid once."""
    if buf is None or buf.shape != value.shape or buf.dtype != value.dtype or buf.device != value.device:
        return torch.empty_like(value)
    return buf


def _save(slot: Slot) -> dict:
    buffers = _BUFFERS.setdefault(slot, {})
    staged = slot.compressor.staged_state
    saved = {}
    for key, value in list(slot.state.items()):
        if key not in slot.persistent:
            continue
        if key in staged:
            spare = reuse_like(buffers.get(key), value)
            slot.state[previous_key(key)], slot.state[key] = value, spare
            buffers[key] = saved[key] = value  # the next step's spare, unless restored
        else:
            value = value.detach()
            buf = buffers[key] = reuse_like(buffers.get(key), value)
            saved[key] = buf.copy_(value)
    return saved


def mark_in_payload(flat: Tensor, flag: Tensor) -> None:
    """Put the flag into a floating payload that is about to be summed: element 0 becomes
    NaN when ``flag`` is set (NaN survives any sum), and is left as it is otherwise."""
    if flat.numel():
        flat[:1] = torch.where(flag, torch.full_like(flat[:1], float("nan")), flat[:1])


def found_in_sum(summed: Tensor) -> Tensor:
    """bool []: whether a summed payload marked by :func:`mark_in_payload` came from a
    non-finite rank (element 0 non-finite)."""
    if not summed.numel():
        return torch.zeros((), dtype=torch.bool, device=summed.device)
    return ~torch.isfinite(summed.reshape(-1)[0])


def step_dropped(results) -> bool:
    """The step's one host read of the chains' flags: True when any rank was non-finite."""
    flags = [r.nonfinite.reshape(()) for r in results]
    return bool(torch.stack(flags).any()) if flags else False


def restore(results) -> None:
    """Put back every slot's state as it was before a dropped step (staged keys: the previous
    tensor back in place, this step's tensor the spare again)."""
    for r in results:
        for slot, saved in r.snapshots:
            staged = slot.compressor.staged_state
            for k, v in saved.items():
                if k in staged:
                    _BUFFERS.setdefault(slot, {})[k] = slot.state[k]
                    slot.state[k] = v
                else:
                    slot.state[k].copy_(v)


def poison(results) -> None:
    """Make every averaged gradient of a dropped step NaN (all of it, not only element 0)."""
    for r in results:
        for _, avg in r.outputs:
            (avg._values() if avg.is_sparse else avg).fill_(float("nan"))


def check_same_step(everyone: Sequence[tuple[int, int, bool]], rank: int) -> int:
    """The step every rank continues from, given each rank's ``(step, nranks, fresh)``.

    ``fresh``: the rank has neither loaded a checkpoint nor stepped. Fresh ranks adopt the
    step of the others, which is Horovod's resume recipe (rank 0 loads the checkpoint,
    the others start empty and receive the parameters and optimizer state by broadcast;
    their compressor state starts from zero). Every other rank must be at the same step of
    a run on as many ranks: ValueError on every rank otherwise (their RNG streams, leaders
    and warm-up schedules would silently differ)."""
    steps = [s for s, _, fresh in everyone if not fresh]
    agreed = steps[0] if steps else 0
    problems = [f"rank {r} is at step {s} (rank {rank} at {everyone[rank][0]})"
                for r, (s, _, fresh) in enumerate(everyone) if not fresh and s != agreed]
    mine = everyone[rank][1]
    problems += [f"rank {r} runs with {n} ranks (rank {rank} with {mine})" for r, (_, n, _) in enumerate(everyone)
                 if n != mine]
    if problems:
        raise ValueError("hvdcomp: the ranks' compression state is not from the same step of the same run "
                         "(each rank loads its own checkpoint of that step, or only rank 0 loads one and "
                         "the others start fresh):\n  " + "\n  ".join(problems))
    return agreed
