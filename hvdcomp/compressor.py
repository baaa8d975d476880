"""The compressor contract shared by both front ends (Horovod and DDP).

A compressor turns one gradient tensor into a payload and a set of N payloads back into a
dense sum. It is one of two kinds, by how its payload travels (``transport``):

``"allreduce"``
    The payload is a dense tensor that a plain sum-allreduce combines correctly (fp16,
    ScaleCom's gathered values, TernGrad levels). These also implement Horovod's
    ``Compressor`` contract, ``compress(tensor) -> (tensor, ctx)`` and
    ``decompress(tensor, ctx) -> tensor``, so they work in ``hvd.DistributedOptimizer``.

``"allgather"``
    The payload is packed bytes whose size can differ between ranks (AdaComp, DGC, top-k,
    1-bit). Every rank receives all N payloads and decodes their sum locally. Only
    :class:`hvdcomp.DistributedOptimizer` and the DDP hook can carry these; Horovod's own
    optimizer would sum the bytes, so ``compress`` raises instead.

Per-parameter state (error-feedback residual, DGC momentum) lives in a plain dict of
tensors that the front end owns, keys it by parameter name and checkpoints; the compressor
creates it in :meth:`Compressor.init_state` and updates it in place. Values that live for one
step only (a shared scale, broadcast indices, an intermediate ``x``) go into the same dict
under keys that ``init_state`` did not create: the front end drops those at the end of every
step and never checkpoints them. A compressor instance therefore keeps nothing per tensor or
per step on ``self`` and may serve several models at once (except under Horovod's own
``hvd.DistributedOptimizer``, where no front end owns the state: see
:mod:`hvdcomp.callorder`).

Optional steps of the exchange are declared by mixing in a capability class, never probed
with ``getattr``: :class:`SharedScale` (a per-tensor scale max-allreduced before encoding,
TernGrad), :class:`IndexBroadcast` (a leader's indices broadcast before the values are
encoded, ScaleCom) and :class:`hvdcomp.collectives.ChunkCodec` (the compressed allreduce).
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable, ClassVar

import torch

Tensor = torch.Tensor
State = dict  # name -> Tensor, owned by the front end


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """What a compressor may know about the parameter whose gradient it compresses.

    name: the parameter's name (from ``named_parameters``). shape/dtype/device: the
    gradient's. index: the parameter's position in the name-sorted list, identical on all
    ranks (used to derive RNG streams and leaders). rank/size: this process and the number of
    ranks taking part.
    """

    name: str
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    index: int = 0
    rank: int = 0
    size: int = 1

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= int(d)
        return n


@dataclasses.dataclass
class Encoded:
    """A payload whose size is known on the device before it is written.

    nbytes: int64 [1] tensor on the gradient's device: the exact payload size in bytes.
    pack: ``pack(out)`` writes the payload into ``out`` (uint8 [nbytes], 8-byte aligned) and
    finishes the step's state update (e.g. the residual). The front end reads the sizes of a
    whole bucket with one device-to-host copy, allocates, then calls every ``pack``.
    """

    nbytes: Tensor
    pack: Callable[[Tensor], None]


class SharedScale:
    """Capability: the payload needs one scale per tensor that is the same on every rank.

    Before encoding a bucket the front end calls :meth:`local_scale` for each of its tensors,
    max-allreduces those scales in one collective and puts each tensor's result in
    ``state["shared_scale"]`` (fp32 [1]) for :meth:`Compressor.encode` (or ``encode_chunked``)
    to use with the same gradient.
    """

    def local_scale(self, grad: Tensor, info: TensorInfo) -> Tensor:
        """This rank's scale for ``grad`` (fp32 [1]), to be max-allreduced across ranks."""
        raise NotImplementedError


class IndexBroadcast:
    """Capability: a leader rank chooses the indices that every rank sends (ScaleCom).

    The front end calls :meth:`propose` on every rank (only the leader's result matters; the
    others return a placeholder of the same shape and dtype), broadcasts the leader's int32
    [k] indices from rank :meth:`leader` and puts them in ``state["indices"]`` before
    :meth:`Compressor.encode_dense`, whose payload is then summed by a plain allreduce.
    """

    def leader(self, info: TensorInfo, step: int) -> int:
        """Rank (within the group) whose indices every rank uses for ``info`` at ``step``."""
        raise NotImplementedError

    def propose(self, grad: Tensor, state: State, info: TensorInfo, step: int) -> Tensor:
        """int32 [k]: this rank's proposal (meaningful on the leader only)."""
        raise NotImplementedError


class Compressor(abc.ABC):
    """Base class of every hvdcomp compressor (see the module docstring for the two kinds).

    Subclasses set ``name`` and ``transport`` and implement either the dense pair
    (:meth:`encode_dense`, :meth:`decode_dense`) or the packed trio (:meth:`encode`,
    :meth:`decode_sum`), plus :meth:`init_state` when they keep state.
    """

    name: ClassVar[str] = "base"
    transport: ClassVar[str] = "allreduce"
    #: Whether decoded payloads sum linearly, so Horovod's ``op=Average`` (scale after sum)
    #: is correct. Non-linear payloads must be averaged by the front end after decoding.
    linear: ClassVar[bool] = True

    # ---- configuration -------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The settings that must match on every rank (checked before the first exchange)."""
        return {"name": self.name}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({args})"

    # ---- state ----------------------------------------------------------------------
    def init_state(self, info: TensorInfo) -> State:
        """Fresh per-parameter state (tensors on ``info.device``); stateless: empty dict."""
        return {}

    def selected_count(self, payload_bytes: int, info: TensorInfo) -> int | None:
        """Elements a payload of ``payload_bytes`` carries (sparse methods), else None."""
        return None

    # ---- dense (allreduce) path -------------------------------------------------------
    def encode_dense(self, grad: Tensor, state: State, info: TensorInfo, step: int) -> tuple[Tensor, Any]:
        """Payload to be sum-allreduced, and a context for :meth:`decode_dense`."""
        raise NotImplementedError(f"{self.name} has no dense payload")

    def decode_dense(self, summed: Tensor, ctx: Any, state: State, info: TensorInfo) -> Tensor:
        """The sum over ranks, as fp32 of ``info.shape``, from the allreduced payload."""
        raise NotImplementedError(f"{self.name} has no dense payload")

    # ---- packed (allgather) path ------------------------------------------------------
    def encode(self, grad: Tensor, state: State, info: TensorInfo, step: int) -> Encoded:
        """Start compressing ``grad``; the returned :class:`Encoded` writes the payload."""
        raise NotImplementedError(f"{self.name} has no packed payload")

    def decode_sum(self, payloads: list[Tensor], state: State, info: TensorInfo) -> Tensor:
        """Dense fp32 sum of the N ranks' payloads (uint8 [nbytes_r] each), of ``info.shape``."""
        raise NotImplementedError(f"{self.name} has no packed payload")

    # ---- Horovod's Compressor contract -------------------------------------------------
    def compress(self, tensor: Tensor) -> tuple[Tensor, Any]:
        """Horovod ``Compressor.compress``: only for stateless allreduce compressors here;
        stateful ones override it (they must key their state without a parameter name)."""
        if self.transport != "allreduce":
            raise TypeError(
                f"hvdcomp.Compression.{self.name}() sends packed payloads that an allreduce cannot "
                "sum; use it with hvdcomp.DistributedOptimizer (same arguments as "
                "hvd.DistributedOptimizer), not with hvd.DistributedOptimizer"
            )
        info = TensorInfo(name="", shape=tensor.shape, dtype=tensor.dtype, device=tensor.device)
        payload, ctx = self.encode_dense(tensor, {}, info, 0)
        return payload, (ctx, info)

    def decompress(self, tensor: Tensor, ctx: Any) -> Tensor:
        """Horovod ``Compressor.decompress``: back to the gradient's shape and dtype."""
        inner, info = ctx
        return self.decode_dense(tensor, inner, {}, info).to(info.dtype)
