"""PyTorch DDP transport: a communication hook that sends every gradient through an hvdcomp
compressor, with torch's own ``ddp_comm_hooks`` conventions (a state object, a pure hook)::

    state = hvdcomp.ddp.CompressionState(hvdcomp.Compression.adacomp(),
                                         named_parameters=model.named_parameters())
    ddp_model.register_comm_hook(state, hvdcomp.ddp.compression_hook)

This package is the ``torch.distributed`` *transport* of the step protocol in
:mod:`hvdcomp.core`, which :class:`hvdcomp.DistributedOptimizer` (Horovod) and
:mod:`hvdcomp.inprocess` run too: the same chains do the compression work and yield their
collectives; only how those travel differs. Modules: :mod:`~hvdcomp.ddp.state` (the state
object and the hook), :mod:`~hvdcomp.ddp.collectives` (requests issued as async
collectives), :mod:`~hvdcomp.ddp.phase_groups` (their order), :mod:`~hvdcomp.ddp.bucket`
(one hook call), :mod:`~hvdcomp.ddp.layouts` (DDP's buckets mapped to slots),
:mod:`~hvdcomp.ddp.late_errors`, :mod:`~hvdcomp.ddp.backends` (what each backend carries),
:mod:`~hvdcomp.ddp.frozen_adam` (the hook's part in the frozen-v Adam recipe).

How a bucket travels
--------------------
DDP hands the hook a flat bucket (``bucket.buffer()``, dtype of the gradients) and views of
each parameter's gradient in it (``bucket.gradients()``). The hook compresses **per
parameter**, as the Horovod transport does, so AdaComp picks conv/FC bin sizes and ratios
apply per tensor; tensors with fewer than ``min_compress_numel`` elements use
``small_compression`` (default: uncompressed). Inside a bucket the parameters are grouped by
how their payload travels, each group a *chain* of collectives (members in name order,
so the layout of a concatenated payload does not depend on DDP's bucket order):

=========================  ==========================================================
dense (none, fp16,         encode_dense -> payloads of one dtype concatenated, divided by N
random-k)                  (as DDP and torch's hooks do) -> one ``all_reduce``
index broadcast (ScaleCom) propose -> ``broadcast`` of the indices (one per leader rank)
                           -> encode_dense -> ``all_reduce`` of the values
packed, allgather          [``all_reduce(MAX)`` of TernGrad scales] -> encode ->
(AdaComp, DGC, top-k,      ``all_gather`` of the int64 payload sizes -> pack -> ``all_gather``
1-bit, TernGrad, bf16)     of the uint8 buffers padded to the largest rank's -> ``decode_sum``
                           per tensor, / N
compressed allreduce       [scales] -> encode_chunked -> ``all_to_all_single`` of the
(bf16, TernGrad; see       chunks -> local sum + re-encode -> ``all_gather`` (padded) ->
``choose_collective``)     decode, / N
=========================  ==========================================================

Asynchrony and ordering
-----------------------
The hook never waits: it launches the first collective of each chain with
``async_op=True`` and returns a manually completed ``torch.futures.Future`` that is set
when the chains' last callbacks have written the averaged bucket, so DDP keeps overlapping
communication with the backward pass. Later collectives are launched from ``.then``
callbacks, which on Gloo run on the process group's worker threads in whatever order the
previous collectives finish: two ranks could then issue collectives in different orders
and pair the wrong messages. So collective number k of every chain goes to its own
process group (the user's group for k = 0, ``max phases - 1`` groups made once in
:class:`CompressionState` for the others), and on each group a sequencer issues them in
the order the hooks reserved them, which is the same on every rank (DDP calls the hook
bucket by bucket in index order). A chain's k-th collective only waits for its own
(k-1)-th and for earlier reservations on group k, so the scheme cannot deadlock.

**One blocking step per packed bucket**: after the size ``all_gather``, the N x T sizes
are read to the host once (``.tolist()``), because the padded payload length and the
slicing offsets are host integers. With Gloo on CPU it runs in the callback, off the
backward pass; with NCCL the futures complete as soon as the work is enqueued, so the
callbacks run at once on the hook's thread and this read synchronises the device there,
once per packed bucket (dense buckets never wait).

A collective that fails after others were launched leaves the chain's later collectives
unissued, as any failed collective leaves a process group unusable: the bucket's future
carries the error to DDP, and every later hook call raises it again instead of hanging.

State, rebuilds and checkpoints
-------------------------------
Each parameter's compressor state (error-feedback residual, DGC momentum) belongs to the
parameter: the state object maps DDP's ``(bucket index, position)`` to per-parameter slots
and, when DDP rebuilds its buckets after the first iteration, maps the new layout back to
the same slots by parameter identity (``bucket.parameters()``), so residuals never move to
another parameter. ``state_dict()`` keys the states by parameter name when
``named_parameters`` is given, else by the parameter's (bucket, position) in the first
layout DDP used (the same in a new process for the same model and DDP settings).

Supported backends: Gloo (CPU and CUDA tensors), NCCL (CUDA) and MPI, except fp16/bf16
all_reduce payloads on MPI (torch's MPI group maps no half types). bf16 travels as int16 bits via
``all_gather``/``all_to_all``, so it works on Gloo and MPI too (unlike torch's
``bf16_compress_hook``, which needs NCCL). Unsupported combinations raise before any
collective of the offending bucket, on every rank alike.
"""
from .state import CompressionState, compression_hook

__all__ = ["CompressionState", "compression_hook"]
