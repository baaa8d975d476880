"""hvdcomp: gradient compression for Horovod and PyTorch DDP, with fused Triton kernels.

    import hvdcomp
    opt = hvdcomp.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                       compression=hvdcomp.Compression.adacomp())

The compressors whose payload an allreduce can sum (``none``, ``fp16``, ``bf16``, ``randomk``,
``scalecom``, ``terngrad``) also plug into ``hvd.DistributedOptimizer(compression=...)``
(:mod:`hvdcomp.horovod_contract`). The step protocol is written
once (:mod:`hvdcomp.core`) and carried by three transports: Horovod
(:func:`DistributedOptimizer`), ``torch.distributed`` (:mod:`hvdcomp.ddp`) and N ranks in
one process (:mod:`hvdcomp.inprocess`). Importing hvdcomp needs neither Horovod nor Triton;
the features that use them say so when they are missing.
"""
from . import ddp, inprocess
from .compressor import Compressor, Encoded, TensorInfo
from .core.frozen_adam import FrozenAdamW
from .horovod_nodes import node_process_sets
from .optimizer import DistributedOptimizer
from .registry import COMPRESSORS, Compression, compression_from_name

__version__ = "0.1.0"

__all__ = ["Compression", "ddp", "inprocess", "Compressor", "COMPRESSORS", "DistributedOptimizer", "Encoded", "FrozenAdamW",
           "TensorInfo", "compression_from_name", "node_process_sets", "__version__"]
