"""The compression step, written once, for every transport.

A step of data-parallel training with compression is the same protocol whatever carries the
bytes: per parameter a *slot* (name, :class:`~hvdcomp.compressor.TensorInfo`, compressor,
state); slots grouped into *chains* by how their payloads travel (dense allreduce, index
broadcast + allreduce, packed allgather, compressed allreduce); each chain a generator that
does the local work (encode, size read, pack, decode, averaging, traffic accounting) and
*yields* the collectives it needs as plain request objects (:mod:`~hvdcomp.core.requests`).
A transport only issues those requests and sends the results back in:

* :mod:`hvdcomp.optimizer` — Horovod (``hvd.*_async`` handles, polled from backward hooks);
* :mod:`hvdcomp.ddp` — ``torch.distributed`` (futures chained from a DDP communication hook);
* :mod:`hvdcomp.inprocess` — N simulated ranks in one process, with Gloo's exact summation
  order, bit-identical to real ranks.

Modules: :mod:`~hvdcomp.core.options` (defaults and argument checks),
:mod:`~hvdcomp.core.slots` (per-parameter state and its checkpoint),
:mod:`~hvdcomp.core.settings` (the cross-rank settings record), :mod:`~hvdcomp.core.requests`
(the transport interface), :mod:`~hvdcomp.core.chains` (the step protocol),
:mod:`~hvdcomp.core.plan` (which chain carries which slot),
:mod:`~hvdcomp.core.compressed_allreduce` (that chain's local steps),
:mod:`~hvdcomp.core.faults` (the non-finite policy), :mod:`~hvdcomp.core.step` (a step's life
outside the chains: agreements, end of step, telemetry, checkpoint),
:mod:`~hvdcomp.core.traffic` (bytes per tensor and step), :mod:`~hvdcomp.core.groups`
(Horovod's explicit groups), :mod:`~hvdcomp.core.wrapped_optimizer` (what the two optimizer
transports share), :mod:`~hvdcomp.core.frozen_adam` (``FrozenAdamW``, the optimizer side of
the Adam recipe). Nothing here imports from above ``core`` (compressors, recipes,
transports); it depends only on the compressor contract (:mod:`hvdcomp.compressor`), the wire
format and the kernels.
"""
