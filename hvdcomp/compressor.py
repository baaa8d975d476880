"""The compressor contract shared by every transport (Horovod, torch.distributed, in-process ranks).

A compressor turns one gradient tensor into a payload and a set of N payloads back into a
dense sum. It is one of two kinds, by how its payload travels (``transport``):

``"allreduce"``
    The payload is a dense tensor that a plain sum-allreduce combines correctly (fp16,
    random-k's and ScaleCom's values at shared indices).

``"allgather"``
    The payload is packed bytes whose size can differ between ranks (AdaComp, DGC, top-k,
    1-bit, TernGrad's 2-bit codes, bf16's bits). Every rank receives all N payloads and
    decodes their sum locally, or (a :class:`ChunkCodec`) the payloads travel by compressed
    allreduce. Only the transports of :mod:`hvdcomp.core` carry these.

Every compressor also answers Horovod's ``Compressor`` contract, ``compress(tensor) ->
(tensor, ctx)`` and ``decompress(tensor, ctx) -> tensor``, so that it can be handed to
``hvd.DistributedOptimizer``; :attr:`Compressor.horovod_contract` declares whether and how
(TernGrad's levels travel there as fp16, bf16's values as fp32), and
:mod:`hvdcomp.horovod_contract` implements it: the compressor itself only encodes and decodes.

Per-parameter state (error-feedback residual, DGC momentum) lives in a plain dict of
tensors that the transport owns, keys it by parameter name and checkpoints; the compressor
creates it in :meth:`Compressor.init_state` and updates it in place, or, for the keys it
declares in :attr:`Compressor.staged_state`, writes each step's value whole into the tensor the
transport put there (:func:`staged`). Values that live for one
step only (a shared scale, broadcast indices, an intermediate ``x``) go into the same dict
under keys that ``init_state`` did not create: the transport drops those at the end of every
step and never checkpoints them. A compressor instance therefore keeps nothing per tensor or
per step on ``self`` and may serve several models at once (under Horovod's own
``hvd.DistributedOptimizer``, where no transport owns the state, :mod:`hvdcomp.horovod_contract`
keeps it, keyed by the compressor instance).

Optional steps of the exchange are declared by mixing in a capability class, never probed
with ``getattr``: :class:`SharedScale` (a per-tensor scale max-allreduced before encoding,
TernGrad), :class:`IndexBroadcast` (a leader's indices broadcast before the values are
encoded, ScaleCom), :class:`ChunkCodec` (the compressed allreduce) and
:class:`SparseSelection` (the O(k) sparse allreduce of top-k and DGC).
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable, ClassVar

import torch

Tensor = torch.Tensor
State = dict  # name -> Tensor, owned by the transport


def previous_key(key: str) -> str:
    """The state key under which a transport that staged ``key`` keeps its value from before
    this step (see :func:`staged`); not a key of ``init_state``, so dropped at the step's end."""
    return f"{key}@previous"


def staged(state: State, key: str) -> tuple[Tensor, Tensor]:
    """``(before, after)`` for a key of :attr:`Compressor.staged_state`: read the value from
    ``before``, write this step's value whole into ``after`` (same shape and dtype).

    A transport that keeps the state for a possible dropped step (:mod:`hvdcomp.core.faults`)
    puts a spare tensor under ``key`` and the previous one under :func:`previous_key`: the
    previous tensor then *is* the snapshot, and no copy of it is made. On a plain state dict
    (a compressor called directly) both are the same tensor and the update is in place."""
    after = state[key]
    return state.get(previous_key(key), after), after


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
    finishes the step's state update (e.g. the residual). The transport reads the sizes of a
    whole bucket with one device-to-host copy, allocates, then calls every ``pack``.
    """

    nbytes: Tensor
    pack: Callable[[Tensor], None]


class SharedScale:
    """Capability: the payload needs one scale per tensor that is the same on every rank.

    Before encoding a bucket the transport calls :meth:`local_scale` for each of its tensors,
    max-allreduces those scales in one collective and puts each tensor's result in
    ``state["shared_scale"]`` (fp32 [1]) for :meth:`Compressor.encode` (or ``encode_chunked``)
    to use with the same gradient.
    """

    def local_scale(self, grad: Tensor, info: TensorInfo) -> Tensor:
        """This rank's scale for ``grad`` (fp32 [1]), to be max-allreduced across ranks."""
        raise NotImplementedError


class IndexBroadcast:
    """Capability: a leader rank chooses the indices that every rank sends (ScaleCom).

    The transport calls :meth:`propose` on every rank (only the leader's result matters; the
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


class ErrorFeedback:
    """Capability: the state keeps an error-feedback residual ``state["residual"]`` (fp32 [n]):
    what was accumulated but not sent yet, which a later step will send. When a tensor's
    compressor is replaced (``Compression.auto()`` re-deciding), that residual is owed to the
    exchange and is carried into the next gradient (:meth:`owed`)."""

    def owed(self, state: State) -> Tensor:
        """fp32 [n]: what this tensor's state still owes the exchange (the residual)."""
        return state["residual"]


class WorkerErrorFeedback(ErrorFeedback):
    """Capability: error feedback kept outside the codec (1-bit Adam's worker error buffer,
    for codecs that keep none of their own, such as TernGrad's). When ``state`` holds a
    ``"residual"`` e (fp32 [n]), the chain adds it to the gradient before the codec reads it
    (its scale included), and the codec sets ``e <- x - C(x)`` from its own payload when it
    encodes x."""

    def owed(self, state: State) -> Tensor | None:
        """The residual, or None when this codec runs without one."""
        return state.get("residual")


class Selector:
    """Capability: not a codec but a choice among codecs, per tensor (``Compression.auto()``).

    The slot table gives every tensor :attr:`initial` first; the transports' step driver
    later replaces it with the candidate the selector picks (:mod:`hvdcomp.core.choice`)."""

    #: The candidates, in order of preference (ties go to the earlier one).
    candidates: tuple = ()

    @property
    def initial(self) -> Compressor:
        """The compressor every tensor starts with, before the first decision."""
        return self.candidates[0]


class ChunkCodec:
    """Capability: the payload can travel by compressed allreduce (alltoall of chunks, a
    local sum re-encoded, allgather: :mod:`hvdcomp.core.compressed_allreduce`).

    ``encode_chunked`` encodes the whole tensor with a fixed ``bits_per_element`` so any
    element range starting at a multiple of :data:`CHUNK_GRANULE` is a contiguous byte
    range; the other three methods sum the N ranks' encodings of one chunk, re-encode the
    sum and decode it.
    """

    def bits_per_element(self) -> int:
        raise NotImplementedError

    def encode_chunked(self, grad: Tensor, state: dict, info, step: int) -> Tensor:
        """uint8 [ceil(numel * bits_per_element / 8)], also updating state as a send does."""
        raise NotImplementedError

    def chunk_sum(self, payloads: Tensor, numel: int, state: dict, info) -> Tensor:
        """payloads: uint8 [N, nbytes] (N ranks' encodings of one chunk of ``numel``) -> fp32 sum."""
        raise NotImplementedError

    def sum_bits(self, nranks: int) -> int:
        """Bits per element of a re-encoded sum of ``nranks`` payloads."""
        raise NotImplementedError

    def encode_sum(self, total: Tensor, nranks: int, state: dict, info) -> Tensor:
        """fp32 [m] -> uint8 [ceil(m * sum_bits / 8)]."""
        raise NotImplementedError

    def decode_sum_chunk(self, payload: Tensor, numel: int, nranks: int, state: dict, info) -> Tensor:
        """Inverse of :meth:`encode_sum`: uint8 -> fp32 [numel]."""
        raise NotImplementedError


class SparseSelection:
    """Capability: the payload is a selection of entries of an error-feedback accumulator,
    so it can travel by sparse allreduce (:mod:`hvdcomp.core.sparse_allreduce`), where only
    the entries that survive a global selection are applied and the others return to the
    accumulator (top-k, DGC).

    Per tensor and step the transport calls :meth:`select` once, exchanges the selections,
    and calls :meth:`commit` with the indices that were applied: afterwards
    ``sum(applied) + accumulator == accumulator before + gradient`` exactly, on every rank.
    """

    def select(self, grad: Tensor, state: dict, info: TensorInfo, step: int) -> tuple[Tensor, Tensor]:
        """Accumulate ``grad`` into the state and return this rank's selection of it:
        ``(indices int64 [m] in increasing order, values fp32 [m])``. Nothing is removed
        from the accumulator yet."""
        raise NotImplementedError

    def commit(self, state: dict, info: TensorInfo, applied: Tensor) -> None:
        """Remove the entries at ``applied`` (int64, a subset of the selected indices) from
        the accumulator: they were applied, the other selected entries stay."""
        raise NotImplementedError

    def target_count(self, info: TensorInfo, step: int) -> int:
        """k: how many entries of the summed selections the sparse allreduce keeps."""
        raise NotImplementedError

    def sparse_allreduce_refusal(self) -> str | None:
        """Why these settings cannot travel by sparse allreduce, or None."""
        return None


class Compressor(abc.ABC):
    """Base class of every hvdcomp compressor (see the module docstring for the two kinds).

    Subclasses set ``name`` and ``transport`` and implement either the dense pair
    (:meth:`encode_dense`, :meth:`decode_dense`) or the packed trio (:meth:`encode`,
    :meth:`decode_sum`), plus :meth:`init_state` when they keep state.
    """

    name: ClassVar[str] = "base"
    transport: ClassVar[str] = "allreduce"
    #: Whether decoded payloads sum linearly, so Horovod's ``op=Average`` (scale after sum)
    #: is correct. Non-linear payloads must be averaged by the transport after decoding.
    linear: ClassVar[bool] = True
    #: How the compressor serves ``hvd.DistributedOptimizer`` (:mod:`hvdcomp.horovod_contract`):
    #: None (it cannot: packed payloads), "stateless" (``encode_dense`` with no state) or
    #: "per_tensor" (state, randomness or a collective per tensor and step).
    horovod_contract: ClassVar[str | None] = None
    #: Keys of :meth:`init_state` whose value each step computes whole from the previous one,
    #: through :func:`staged`, before anything else of that step writes them (later writes
    #: of the step, in pack or :meth:`SparseSelection.commit`, go to the new tensor). The
    #: transports keep the previous tensor of these keys for a dropped step instead of
    #: copying it.
    staged_state: ClassVar[tuple[str, ...]] = ()

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
        """Dense fp32 sum of the N ranks' payloads (uint8 [nbytes_r] each), of ``info.shape``:
        a new tensor, which the chain averages in place (never a view of a payload or state)."""
        raise NotImplementedError(f"{self.name} has no packed payload")

    # ---- Horovod's Compressor contract (implemented by hvdcomp.horovod_contract) ---------
    def compress(self, tensor: Tensor) -> tuple[Tensor, Any]:
        """Horovod ``Compressor.compress``: the payload ``hvd.DistributedOptimizer``
        allreduces, and a context; ``TypeError`` for packed payloads."""
        from . import horovod_contract

        return horovod_contract.compress(self, tensor)

    def decompress(self, tensor: Tensor, ctx: Any) -> Tensor:
        """Horovod ``Compressor.decompress``: back to the gradient's shape and dtype."""
        from . import horovod_contract

        return horovod_contract.decompress(self, tensor, ctx)

    def state_dict(self) -> dict:
        """The state kept for this compressor under ``hvd.DistributedOptimizer`` (step
        counter, per-position state tensors), to checkpoint there; hvdcomp's own transports
        checkpoint theirs with the optimizer or DDP state."""
        from . import horovod_contract

        return horovod_contract.state_dict(self)

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; the next ``compress`` starts the following step."""
        from . import horovod_contract

        horovod_contract.load_state_dict(self, state)
