"""The ``Compression`` namespace and lookup by name.

``hvdcomp.Compression.adacomp(bin_size=50)`` mirrors Horovod's ``hvd.Compression.fp16``;
``hvdcomp.compression_from_name("adacomp", bin_size=50)`` serves command lines and configs.
Unknown names raise ``ValueError`` listing the valid ones.
"""
from __future__ import annotations

import importlib
from typing import Any

from .compressor import Compressor

#: name -> "module:Class" under hvdcomp.compressors (imported on first use)
COMPRESSORS: dict[str, str] = {
    "none": "casts:NoneCompressor",
    "fp16": "casts:FP16Compressor",
    "bf16": "casts:BF16Compressor",
    "adacomp": "adacomp:AdaCompCompressor",
    "terngrad": "terngrad:TernGradCompressor",
    "dgc": "dgc:DGCCompressor",
    "topk": "topk:TopKCompressor",
    "randomk": "randomk:RandomKCompressor",
    "onebit": "onebit:OneBitCompressor",
    "scalecom": "scalecom:ScaleComCompressor",
}
#: name -> "module:Class" of the selectors, which choose among compressors per tensor
#: (:class:`~hvdcomp.compressor.Selector`); looked up by name like the compressors.
SELECTORS: dict[str, str] = {
    "auto": "auto:AutoCompression",
}


def compressor_class(name: str) -> type[Compressor]:
    """The class registered under ``name`` (ValueError listing valid names if unknown)."""
    key = name.strip().lower().replace("-", "_")
    known = {**COMPRESSORS, **SELECTORS}
    if key not in known:
        raise ValueError(f"unknown compression {name!r}; valid names: {', '.join(sorted(known))}")
    module_name, cls_name = known[key].split(":")
    module = importlib.import_module(f"{__package__}.compressors.{module_name}")
    return getattr(module, cls_name)


def compression_from_name(name: str, **params: Any) -> Compressor:
    """Build the compressor registered under ``name`` with ``params`` (validated at once)."""
    return compressor_class(name)(**params)


def _factory(name: str):
    def make(**params: Any) -> Compressor:
        return compression_from_name(name, **params)

    make.__name__ = name
    make.__qualname__ = f"Compression.{name}"
    make.__doc__ = f"Build the ``{name}`` compressor (see hvdcomp.compressors and the README)."
    return staticmethod(make)


class Compression:
    """Namespace of compressor factories, in the style of ``hvd.Compression``.

    Each attribute is a function: ``Compression.fp16()``, ``Compression.topk(ratio=0.01)``.
    """

    none = _factory("none")
    fp16 = _factory("fp16")
    bf16 = _factory("bf16")
    adacomp = _factory("adacomp")
    terngrad = _factory("terngrad")
    dgc = _factory("dgc")
    topk = _factory("topk")
    randomk = _factory("randomk")
    onebit = _factory("onebit")
    scalecom = _factory("scalecom")
    auto = _factory("auto")


def with_defaults(compression, small_compression) -> tuple:
    """``(compression, small_compression)`` with None standing for ``Compression.none()``
    (uncompressed), as every transport's arguments default."""
    return (Compression.none() if compression is None else compression,
            Compression.none() if small_compression is None else small_compression)
