"""Defaults and argument checks shared by every transport (one rule, one message).

:func:`check_exchange` checks every argument that shapes an exchange at once, before any
collective, and returns them as one :class:`ExchangeOptions`; the transports translate their
own conventions first (Horovod's ``op`` constants and compressor objects, DDP's fixed
averaging) and never check an argument themselves.
"""
from __future__ import annotations

import dataclasses
import math
from numbers import Real

from ..compressor import ChunkCodec, Compressor, Selector, SparseSelection
from .groups import validate_groups

#: Default size below which a gradient is not compressed (elements). Biases and norm
#: weights of common models are below it; every conv/FC weight worth compressing is above.
DEFAULT_MIN_COMPRESS_NUMEL = 1024
#: Default bucket capacity for packed payloads, in dense fp32 megabytes (as DDP's).
DEFAULT_BUCKET_CAP_MB = 25.0
#: How packed payloads of summable formats may travel (see :func:`choose_collective`).
COLLECTIVES = ("auto", "allgather", "compressed_allreduce", "sparse_allreduce")


def check_compressor(label: str, comp) -> Compressor:
    """``comp`` if it is an hvdcomp compressor, else TypeError naming ``label``."""
    if not isinstance(comp, Compressor):
        raise TypeError(f"{label} must be an hvdcomp compressor (e.g. hvdcomp.Compression.fp16()), "
                        f"got {type(comp).__name__}")
    return comp


def check_min_compress_numel(value) -> int:
    """An integer >= 0 (bools and floats are refused: they are always a mistake here)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"min_compress_numel must be an integer >= 0, got {value!r}")
    return value


def check_bucket_cap_mb(value) -> float:
    """A finite number > 0 (megabytes of dense fp32 gradient per packed bucket)."""
    if isinstance(value, bool) or not isinstance(value, Real) or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"bucket_cap_mb must be a finite number > 0, got {value!r}")
    return float(value)


def check_backward_passes(value) -> int:
    """``backward_passes_per_step``: an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"backward_passes_per_step must be an integer >= 1, got {value!r}")
    return value


def check_predivide(value, average: bool) -> float:
    """``gradient_predivide_factor``: a number > 0, and 1 unless the op averages."""
    if isinstance(value, bool) or not isinstance(value, Real) or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"gradient_predivide_factor must be a finite number > 0, got {value!r}")
    if value != 1.0 and not average:
        raise ValueError("gradient_predivide_factor not supported with op != Average")
    return float(value)


def check_collective(value, *compressors: Compressor) -> str:
    """One of :data:`COLLECTIVES`; "compressed_allreduce" only for chunk codecs,
    "sparse_allreduce" only for sparse selections."""
    if value not in COLLECTIVES:
        raise ValueError("collective must be 'auto', 'allgather', 'compressed_allreduce' or 'sparse_allreduce', "
                         f"got {value!r}")
    for comp in compressors:
        if comp.transport == "allgather":
            choose_collective(comp, value, 2)  # raises if unsupported
    return value


def _sparse_allreduce(comp: Compressor, requested: str) -> str | None:
    """"sparse_allreduce" where ``requested`` asks for it (ValueError if ``comp`` cannot), else None."""
    if requested != "sparse_allreduce":
        return None
    if not isinstance(comp, SparseSelection):
        raise ValueError(f"{comp.name} cannot travel by sparse allreduce (only a selection of entries can: "
                         "topk, dgc); use collective='allgather' or 'auto'")
    refusal = comp.sparse_allreduce_refusal()
    if refusal is not None:
        raise ValueError(refusal)
    return requested


def choose_collective(comp: Compressor, requested: str, nranks: int) -> str:
    """The collective that carries ``comp``'s packed payloads.

    ``requested``: "allgather", "compressed_allreduce" (only for compressors implementing
    :class:`hvdcomp.compressor.ChunkCodec`), "sparse_allreduce" (only for
    :class:`hvdcomp.compressor.SparseSelection`) or "auto": compressed allreduce where its
    bytes received per rank, ``(N-1)/N (b + b_sum)``, are fewer than allgather's,
    ``(N-1) b`` (b, b_sum: bits per element of a payload and of a re-encoded sum). "auto"
    never picks the sparse allreduce: it applies k entries of the sum where the allgather
    applies the union of every rank's selection, another algorithm, which is asked for by name.
    """
    sparse = _sparse_allreduce(comp, requested)
    if sparse is not None:
        return sparse
    if requested == "allgather" or not isinstance(comp, ChunkCodec):
        if requested == "compressed_allreduce":
            raise ValueError(f"{comp.name} cannot travel by compressed allreduce (no chunk codec); "
                             "use collective='allgather' or 'auto'")
        return "allgather"
    if requested == "compressed_allreduce":
        return requested
    bits, sum_bits = comp.bits_per_element(), comp.sum_bits(nranks)
    return "compressed_allreduce" if (nranks - 1) / nranks * (bits + sum_bits) < (nranks - 1) * bits else "allgather"


def check_hierarchical(value, predivide: float = 1.0):
    """``hierarchical``: False (flat), True (the launcher's nodes) or an integer >= 1, the
    ranks per node (nodes of that many consecutive ranks). Horovod's
    ``gradient_predivide_factor`` is refused with it: the node's sum is taken before any
    division (see :mod:`hvdcomp.core.hierarchy`)."""
    if not isinstance(value, (bool, int)) or (not isinstance(value, bool) and value < 1):
        raise ValueError(f"hierarchical must be True, False or the number of ranks per node (an integer >= 1), "
                         f"got {value!r}")
    if value is not False and predivide != 1.0:
        raise ValueError("gradient_predivide_factor is not supported with hierarchical exchange (the node's "
                         "gradients are summed before any division); leave it at 1")
    return value


def check_named_parameters(named_parameters) -> list[tuple[str, object]]:
    """``named_parameters`` as a list of (name, parameter) pairs with unique names."""
    named = list(named_parameters)
    if any(not isinstance(item, tuple) or len(item) != 2 or not isinstance(item[0], str) for item in named):
        raise ValueError("named_parameters must be an iterable of (name, parameter) tuples, "
                         "e.g. model.named_parameters()")
    names = [n for n, _ in named]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"named_parameters has duplicate names: {dupes[:5]}")
    return named


@dataclasses.dataclass(frozen=True)
class ExchangeOptions:
    """Every checked argument of an exchange (see :func:`check_exchange`)."""

    compression: Compressor
    small_compression: Compressor
    min_compress_numel: int
    collective: str
    bucket_cap_mb: float
    average: bool
    predivide: float
    backward_passes_per_step: int
    groups: object
    sparse_as_dense: bool
    hierarchical: bool | int = False


def check_exchange(compression, small_compression, *, min_compress_numel=DEFAULT_MIN_COMPRESS_NUMEL,
                   collective="auto", bucket_cap_mb=DEFAULT_BUCKET_CAP_MB, average: bool = True,
                   predivide=1.0, backward_passes_per_step=1, groups=None, sparse_as_dense=False,
                   hierarchical=False) -> ExchangeOptions:
    """Check every argument (TypeError / ValueError with one message per rule, before any
    collective) and return them. The transport resolves its defaults first (None compressors:
    :func:`hvdcomp.registry.with_defaults`; Horovod's ``num_groups`` into ``groups``:
    :func:`hvdcomp.core.groups.resolve_groups`)."""
    compression = check_compressor("compression", compression)
    small_compression = check_compressor("small_compression", small_compression)
    if isinstance(small_compression, Selector):
        raise ValueError("small_compression cannot be Compression.auto(): the small tensors keep one compressor")
    if isinstance(compression, Selector) and hierarchical is not False:
        raise ValueError("Compression.auto() is not supported with hierarchical exchange: its measurements and "
                         "choices are those of a flat exchange; pick one compressor")
    if isinstance(compression, Selector) and collective == "sparse_allreduce":
        raise ValueError("Compression.auto() is not supported with collective='sparse_allreduce': its "
                         "measurements replay each chain against one rank's own answers, which a sparse "
                         "allreduce's regions do not have; pick one compressor")
    codecs = list(compression.candidates) if isinstance(compression, Selector) else [compression]
    backward_passes_per_step = check_backward_passes(backward_passes_per_step)
    predivide = check_predivide(predivide, average)
    validate_groups(groups)
    if not isinstance(sparse_as_dense, bool):
        raise ValueError(f"sparse_as_dense must be True or False, got {sparse_as_dense!r}")
    return ExchangeOptions(compression=compression, small_compression=small_compression,
                           min_compress_numel=check_min_compress_numel(min_compress_numel),
                           collective=check_collective(collective, *codecs, small_compression),
                           bucket_cap_mb=check_bucket_cap_mb(bucket_cap_mb), average=bool(average),
                           predivide=predivide, backward_passes_per_step=backward_passes_per_step,
                           groups=groups, sparse_as_dense=sparse_as_dense,
                           hierarchical=check_hierarchical(hierarchical, predivide))
