"""What each ``torch.distributed`` backend carries, as the DDP hook uses it, and the checks
that refuse what it cannot carry before any collective."""
from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class Backend:
    """Capabilities of a torch.distributed backend as this hook uses it."""

    reduce_dtypes: frozenset  # dtypes of a sum / max all_reduce
    devices: frozenset  # tensor device types
    all_gather: bool = True
    all_to_all: bool = True


_NUMERIC = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64,
                      torch.uint8, torch.int8, torch.int32, torch.int64})
BACKENDS = {
    "gloo": Backend(_NUMERIC, frozenset({"cpu", "cuda"})),
    "nccl": Backend(_NUMERIC, frozenset({"cuda"})),
    # torch's ProcessGroupMPI maps uint8/int8/int16/int32/int64/fp32/fp64 only.
    "mpi": Backend(frozenset({torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                              torch.float32, torch.float64}), frozenset({"cpu", "cuda"})),
}


def backend_for(backend: str, device_type: str) -> tuple[str, Backend | None]:
    """The backend serving ``device_type`` (handles "cpu:gloo,cuda:nccl" strings); None when
    unknown to this table (then it is trusted and torch reports what it lacks)."""
    name = str(backend).lower()
    if ":" in name:
        parts = dict(p.split(":", 1) for p in name.split(",") if ":" in p)
        name = parts.get(device_type, next(iter(parts.values()), name))
    return name, BACKENDS.get(name)


def check_carries(backend: str, device: torch.device | None, reduce_dtype: torch.dtype | None = None,
                  need: str | None = None, what: str = "") -> None:
    """ValueError if ``backend`` cannot carry ``what``: tensors on ``device``, a sum/max
    all_reduce of ``reduce_dtype``, or the collective ``need`` ("all_gather", "all_to_all")."""
    device_type = device.type if device is not None else None
    name, caps = backend_for(backend, device_type or "cpu")
    if caps is None:
        return
    if device_type is not None and device_type not in caps.devices:
        raise ValueError(f"hvdcomp.ddp: the {name} backend does not carry {device_type} tensors "
                         f"(gradients of this DDP model); use {'nccl' if device_type == 'cuda' else 'gloo'}")
    if reduce_dtype is not None and reduce_dtype not in caps.reduce_dtypes:
        hint = (" (Compression.bf16() sends 2 bytes per element as uint8, which it carries)"
                if reduce_dtype in (torch.float16, torch.bfloat16) else "")
        raise ValueError(f"hvdcomp.ddp: {what} need a {reduce_dtype} all_reduce, which the {name} "
                         f"backend does not have{hint}; use another compressor or backend")
    if need is not None and not getattr(caps, need):
        raise ValueError(f"hvdcomp.ddp: {what} need {need}, which the {name} backend does not have")
