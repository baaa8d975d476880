"""Fused compression kernels (installed as ``hvdcomp.kernels``): every operation the
compressors run over gradient-sized tensors, each a function defined in this file.

Each operation has two implementations with its signature, found through
``OPERATIONS[name]`` (the operation's family, see :mod:`hvdcomp.kernels.dispatch`): a Triton
kernel in ``kernels/<family>.py`` and the CPU backend's function in
``kernels/cpu/<family>.py``. A call picks one by the device of its first tensor argument:

* CUDA tensor and Triton importable -> Triton kernel;
* otherwise -> CPU backend (CPU users, and machines without Triton; its torch ops run on
  any device).

``HVDCOMP_KERNELS=triton`` forces the Triton kernels (with ``TRITON_INTERPRET=1`` they run
on CPU tensors: that is how the tests prove them on machines without a GPU);
``HVDCOMP_KERNELS=reference`` forces the CPU backend; ``auto`` (default) dispatches as above.
The variable is read at every call, except inside :func:`one_mode` (a training step's
calls), which reads it once for all the calls it holds.

Conventions of every operation, on both backends:

* Flat 1-D tensors. Callers pass ``t.reshape(-1)``; inputs may be non-contiguous 1-D views
  (in-place updates write through them), outputs are contiguous.
* Accumulators (residual ``r``, DGC momentum ``u`` and velocity ``v``) are fp32 whatever
  the gradient dtype; gradients may be fp32, fp16 or bf16 and are upcast on load.
* Scalars that live on the device (scales, thresholds, sums) are 1-element fp32 tensors, so
  no host synchronisation is needed to pass them from one kernel to the next; the Triton
  kernels never synchronise with the host, the CPU backend reads such scalars where its
  docstring says so (on a CPU there is nothing to wait for).
* Ternary and sign codes are 2-bit values: 0 = zero, 1 = +1, 2 = -1 (3 is unused).

Results are bit-identical between the backends except where a docstring says otherwise: the
order of a floating-point sum across programs, and inputs outside the contract that the CPU
backend rejects (a host read) while a kernel drops them.

The functions after the operations have no Triton kernel; they run on any device.
"""
from __future__ import annotations

import torch

from .adacomp_format import ADACOMP_MAX_BIN_8BIT, ADACOMP_MAX_BIN_16BIT, adacomp_code_dtype, num_bins
from .cpu import adacomp as _cpu_adacomp
from .cpu import casts as _cpu_casts
from .cpu import decode as _cpu_decode
from .cpu import packing as _cpu_packing
from .cpu import random_streams as _cpu_random
from .cpu import residual as _cpu_residual
from .cpu import ternary as _cpu_ternary
from .cpu import topk as _cpu_topk
from .dispatch import OPERATIONS, backend_mode, cpu_impl, one_mode, triton_available, triton_impl, use_triton

Tensor = torch.Tensor

# ---- Error feedback and DGC momentum correction ---------------------------------------------


def ef_accumulate_(residual: Tensor, grad: Tensor, out: Tensor | None = None) -> Tensor:
    """Error-feedback accumulation, ``r <- r + g`` (so ``r`` now holds ``x``; then
    ``r = x - sent``: Seide et al., "1-Bit Stochastic Gradient Descent and its Application to
    Data-Parallel Distributed Training of Speech DNNs", Interspeech 2014), in place or into
    ``out``.

    residual: fp32 [n], updated in place, or only read when ``out`` (fp32 [n]) is given:
    then ``r + g`` is written there, whole. grad: fp32/fp16/bf16 [n], upcast to fp32.
    Returns the tensor written (``residual`` or ``out``).
    """
    if use_triton(residual):
        return triton_impl("ef_accumulate_")(residual, grad, out)
    return _cpu_residual.ef_accumulate_(residual, grad, out)


def dgc_momentum_(u: Tensor, v: Tensor, grad: Tensor, momentum: float,
                  out: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """DGC momentum correction: ``u <- m*u + g``; ``v <- v + u`` (Lin et al., "Deep Gradient
    Compression", ICLR 2018, Sec. 3.2, eq. (5)-(6)), in place, or into ``out``.

    u, v: fp32 [n], updated in place, or only read when ``out = (u_out, v_out)`` (fp32 [n]
    each) is given: then the new u and v are written there, whole. grad: fp32/fp16/bf16 [n].
    momentum: Python float, used as fp32; ``m*u + g`` rounds twice (no fused multiply-add) on
    both backends. Returns the new ``v``.
    """
    if use_triton(u):
        return triton_impl("dgc_momentum_")(u, v, grad, momentum, out)
    return _cpu_residual.dgc_momentum_(u, v, grad, momentum, out)


# ---- AdaComp: bin-max self-adjusting selection, ternary codes, residual update ---------------


def adacomp_select_stats(x: Tensor, g: Tensor, bin_size: int) -> tuple[Tensor, Tensor]:
    """AdaComp pass 1: per-bin selected counts and the sum of ``|x|`` over selected elements.

    x: fp32 [n], the accumulated residue ``r + g``. g: fp32/fp16/bf16 [n], this step's
    gradient. bin_size: L_T in [2, 16384] (ValueError outside). An element is selected when
    ``|x + g| >= max_{bin}|x|`` (i.e. ``|r + 2g|`` reaches the bin's max residue; Chen et al.,
    "AdaComp", AAAI 2018, Sec. 3) and ``x != 0`` (a zero sends nothing).

    Returns ``(bin_counts int32 [nbins], abs_sum fp64 [1])``; the tensor's ternary scale is
    ``abs_sum / bin_counts.sum()`` rounded to fp32 (the mean magnitude of what is sent, which
    minimises the squared quantization error for a fixed sign pattern). The sum cannot
    overflow for finite fp32 inputs (an fp32 sum of a few values near 1e38 would be inf, and
    so would every value sent), and the mean it gives always fits fp32. The CPU backend sums
    in fp64; the kernel sums ``|x| * 2^-64`` in fp32 with atomics and scales back in fp64, so
    its last bits depend on the order programs finish (and magnitudes below about 2^-62 lose
    precision, as subnormals).
    """
    if use_triton(x):
        return triton_impl("adacomp_select_stats")(x, g, bin_size)
    return _cpu_adacomp.adacomp_select_stats(x, g, bin_size)


def adacomp_pack_(
    x: Tensor, g: Tensor, bin_size: int, bin_offsets: Tensor, scale: Tensor, codes: Tensor
) -> Tensor:
    """AdaComp pass 2: write the packed codes and turn ``x`` into the new residual, in place.

    x: fp32 [n], accumulated residue (in) -> residual ``x - sign(x)*scale`` on the selected
    elements (out). g: [n] as in :func:`adacomp_select_stats` (the selection is recomputed
    identically). bin_offsets: int64 [nbins], exclusive prefix sum of the bin counts (where
    each bin's codes start). scale: fp32 [1]. codes: output, [total selected], dtype from
    :func:`adacomp_code_dtype`: ``(offset_in_bin << 2) | sign_code`` with sign_code 1 for
    positive and 2 for negative; codes of bin b are written at ``bin_offsets[b]`` onward in
    increasing offset order. Returns ``codes``. The CPU backend checks that ``codes`` has
    exactly one slot per selected element (a host read); the kernel never writes past its
    end. x and g must be finite: a NaN makes its bin's maximum undefined (the CPU backend then
    selects nothing in that bin, a kernel may still select its other elements).
    """
    if use_triton(x):
        return triton_impl("adacomp_pack_")(x, g, bin_size, bin_offsets, scale, codes)
    return _cpu_adacomp.adacomp_pack_(x, g, bin_size, bin_offsets, scale, codes)


def adacomp_decode_sum(codes: Tensor, bin_counts: Tensor, scales: Tensor, bin_size: int, numel: int) -> Tensor:
    """Sum of N ranks' AdaComp payloads, densely: ``sum_r scale_r * ternary_r``.

    codes: uint8/int16 [sum of all counts] (int16 read as unsigned 16-bit), the N ranks'
    codes concatenated in rank order. bin_counts: int32 [N, nbins], each rank's counts.
    scales: fp32 [N]. Returns fp32 [numel]. Codes must address elements below ``numel`` (the
    CPU backend raises on one that does not; a kernel drops it). The kernel adds with fp32
    atomics: with three or more ranks hitting one element its rounding may differ from the
    CPU backend's rank order.
    """
    if use_triton(codes):
        return triton_impl("adacomp_decode_sum")(codes, bin_counts, scales, bin_size, numel)
    return _cpu_adacomp.adacomp_decode_sum(codes, bin_counts, scales, bin_size, numel)


# ---- Ternarization (TernGrad) and sign quantization (1-bit SGD) ----------------------------


def terngrad_ternarize(g: Tensor, scale: Tensor, clip: Tensor, seed: int) -> Tensor:
    """TernGrad stochastic ternarization to 2-bit codes (Wen et al., "TernGrad: Ternary
    Gradients to Reduce Communication in Distributed Deep Learning", NeurIPS 2017, eq. (6)-(7)).

    ``gc = clamp(g, -clip, clip)``; ``b ~ Bernoulli(|gc| / scale)``; the code is 1 (+1) or
    2 (-1) by ``sign(gc)`` where ``b = 1``, else 0. Decoded, ``scale*sign(gc)*b`` is an
    unbiased estimate of ``gc`` provided ``scale >= max|gc|``. The draw is ``u_i * scale <
    |gc_i|`` (no division) with ``u_i`` word ``i % 4`` of Philox-4x32-10 counter ``i // 4``
    (``tl.rand4x(seed, i // 4)``), on both backends: the codes are bit-identical.

    g: fp32/fp16/bf16 [n]. scale: fp32 [1], the (rank-shared) scaler ``s``; 0 decodes to all
    zeros. clip: fp32 [1], the clipping bound ``c*sigma`` (``inf`` for none), > 0. seed: int
    in [0, 2**63), derived by the caller from (seed, step, rank, tensor). Returns the codes
    packed four per byte (see :func:`pack_2bit`): uint8 [ceil(n/4)]. (TernGrad's CPU path
    uses :func:`terngrad_ternarize_fast_rng`, another stream of the same law.)
    """
    if use_triton(g):
        return triton_impl("terngrad_ternarize")(g, scale, clip, seed)
    return _cpu_ternary.terngrad_ternarize(g, scale, clip, seed)


def ternary_quantize(x: Tensor, threshold: Tensor) -> Tensor:
    """Deterministic ternary codes: 1 where ``x >= threshold``, 2 where ``x <= -threshold``,
    else 0 (the deterministic counterpart of TernGrad's eq. (6)).

    x: fp32/fp16/bf16 [n]. threshold: fp32 [1] (> 0). Returns the codes packed four per
    byte: uint8 [ceil(n/4)].
    """
    if use_triton(x):
        return triton_impl("ternary_quantize")(x, threshold)
    return _cpu_ternary.ternary_quantize(x, threshold)


def sign_pack(x: Tensor) -> tuple[Tensor, Tensor]:
    """1-bit quantization with scale (1-bit SGD with error feedback, Seide et al. 2014;
    per-tensor scale as in EF-SignSGD, Karimireddy et al., "Error Feedback Fixes SignSGD and
    other Gradient Compression Schemes", ICML 2019): bit i is 1 where ``x_i < 0``; the scale
    is ``mean|x|`` so that ``scale * sign(x)`` keeps the L1 norm.

    x: fp32/fp16/bf16 [n]. Returns ``(bits uint8 [ceil(n/8)], scale fp32 [1])``; bit i sits
    at bit ``i % 8`` of byte ``i // 8`` (little-endian within the byte). The kernel's scale
    is a sum of per-program fp32 partial sums: deterministic, but summed in another order than
    the CPU backend's, so its last bits may differ.
    """
    if use_triton(x):
        return triton_impl("sign_pack")(x)
    return _cpu_ternary.sign_pack(x)


def sign_decode_sum(bits: Tensor, scales: Tensor, numel: int) -> Tensor:
    """Sum of N ranks' 1-bit payloads: ``sum_r scale_r * (1 - 2*bit_r)``, ranks summed in
    order 0..N-1 in fp32.

    bits: uint8 [N, >= ceil(numel/8)]. scales: fp32 [N]. Returns fp32 [numel]. Raises
    ValueError when a row is too short for ``numel`` bits.
    """
    if use_triton(bits):
        return triton_impl("sign_decode_sum")(bits, scales, numel)
    return _cpu_ternary.sign_decode_sum(bits, scales, numel)


def ternary_decode_sum(packed: Tensor, scales: Tensor, numel: int) -> Tensor:
    """Sum of N ranks' 2-bit ternary payloads: ``sum_r scale_r * level_r`` with level +1 for
    code 1, -1 for code 2, 0 otherwise (TernGrad's 2N+1 levels, Wen et al. 2017, "scaler
    sharing"), ranks summed in order 0..N-1 in fp32.

    packed: uint8 [N, >= ceil(numel/4)] (see :func:`pack_2bit`). scales: fp32 [N]. Returns
    fp32 [numel]. Raises ValueError when a row is too short for ``numel`` codes.
    """
    if use_triton(packed):
        return triton_impl("ternary_decode_sum")(packed, scales, numel)
    return _cpu_ternary.ternary_decode_sum(packed, scales, numel)


# ---- Selection by threshold: top-k, DGC's sampled threshold, compaction --------------------


def topk_indices(x: Tensor, k: int) -> Tensor:
    """Exact top-k by magnitude: indices of the k largest ``|x|``, ties to the lower index,
    returned in increasing index order (ScaleCom's leader selection; top-k sparsification).

    x: fp32/fp16/bf16 [n] (n < 2**31 for the kernel); 0 <= k <= n (ValueError otherwise).
    Returns int64 [k], always k of them. Magnitudes are compared as the bit patterns of
    ``|x|`` in fp32 (``bits & 0x7FFFFFFF``), which order non-negative floats like their values
    and put NaN above inf, as ``torch.topk`` does.
    """
    if use_triton(x):
        return triton_impl("topk_indices")(x, k)
    return _cpu_topk.topk_indices(x, k)


def sampled_threshold(x: Tensor, ratio: float, sample_idx: Tensor) -> Tensor:
    """DGC's threshold from a sample (Lin et al. 2018, Sec. 3.1 / Alg. 1): the
    ``ceil(ratio * s)``-th largest ``|x|`` among ``x[sample_idx]``.

    x: fp32/fp16/bf16 [n], n >= 1. ratio: fraction to keep, in (0, 1]. sample_idx:
    int64/int32 [s], s >= 1, indices in [-n, n), negative ones counting from the end (outside
    that range the kernel reads 0, the CPU backend wraps modulo n). Returns fp32 [1].
    """
    if use_triton(x):
        return triton_impl("sampled_threshold")(x, ratio, sample_idx)
    return _cpu_topk.sampled_threshold(x, ratio, sample_idx)


def count_above(x: Tensor, threshold: Tensor) -> Tensor:
    """Number of elements with ``|x| >= threshold`` (DGC, Lin et al. 2018, Alg. 1: the size of
    the sparse message).

    x: fp32/fp16/bf16 [n]. threshold: fp32 [1]. Returns int64 [1] on x's device.
    """
    if use_triton(x):
        return triton_impl("count_above")(x, threshold)
    return _cpu_topk.count_above(x, threshold)


def compact_above(x: Tensor, threshold: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """Stream compaction: indices and values of ``|x| >= threshold`` in index order (DGC's
    sparse message).

    x: fp32/fp16/bf16 [n] (n < 2**31). threshold: fp32 [1]. count: host int, the number
    selected (from :func:`count_above`, read on the host by the caller, once per bucket).
    Returns ``(indices int32 [count], values fp32 [count])``. The CPU backend raises when
    ``count`` is wrong; the kernel never writes past ``count`` and, for a count above the real
    selection, leaves the tail unspecified.
    """
    if use_triton(x):
        return triton_impl("compact_above")(x, threshold, count)
    return _cpu_topk.compact_above(x, threshold, count)


# ---- Packing -------------------------------------------------------------------------------


def pack_2bit(codes: Tensor) -> Tensor:
    """Pack 2-bit codes four per byte: code i at bits ``2*(i%4)`` of byte ``i//4``
    (TernGrad's 2-bit wire format).

    codes: uint8 [n] with values in 0..3. Returns uint8 [ceil(n/4)] (pad codes are 0).
    """
    if use_triton(codes):
        return triton_impl("pack_2bit")(codes)
    return _cpu_packing.pack_2bit(codes)


def unpack_2bit(packed: Tensor, numel: int) -> Tensor:
    """Inverse of :func:`pack_2bit`: uint8 [>= ceil(numel/4)] -> uint8 [numel] in 0..3.
    Raises ValueError when ``packed`` is too short for ``numel`` codes."""
    if use_triton(packed):
        return triton_impl("unpack_2bit")(packed, numel)
    return _cpu_packing.unpack_2bit(packed, numel)


def pack_bits(bits: Tensor) -> Tensor:
    """Pack 0/1 values eight per byte: bit i at bit ``i%8`` of byte ``i//8`` (1-bit SGD's
    wire format).

    bits: uint8/bool [n]. Returns uint8 [ceil(n/8)].
    """
    if use_triton(bits):
        return triton_impl("pack_bits")(bits)
    return _cpu_packing.pack_bits(bits)


def unpack_bits(packed: Tensor, numel: int) -> Tensor:
    """Inverse of :func:`pack_bits`: uint8 [>= ceil(numel/8)] -> uint8 [numel] of 0/1.
    Raises ValueError when ``packed`` is too short for ``numel`` bits."""
    if use_triton(packed):
        return triton_impl("unpack_bits")(packed, numel)
    return _cpu_packing.unpack_bits(packed, numel)


# ---- Decode and accumulate -----------------------------------------------------------------


def scatter_add_(out: Tensor, indices: Tensor, values: Tensor) -> Tensor:
    """Dense accumulation of sparse payloads: ``out[indices[j]] += values[j]`` for all j (the
    decode of DGC, top-k, random-k and ScaleCom payloads).

    out: fp32 [n], in place. indices: int32/int64 [m] (repeats allowed: N ranks' payloads
    concatenated). values: fp32/fp16/bf16 [m], upcast. Returns ``out``. The kernel adds with
    fp32 atomics (with three or more contributions to one element its rounding may differ
    from the CPU backend's index order) and drops an index outside ``[0, n)``, on which the
    CPU backend raises.
    """
    if use_triton(out):
        return triton_impl("scatter_add_")(out, indices, values)
    return _cpu_decode.scatter_add_(out, indices, values)


# ---- Casts ---------------------------------------------------------------------------------


def cast_bf16(x: Tensor) -> Tensor:
    """fp32 -> bf16 with round-to-nearest-even, overflow to ±Inf (Kalamkar et al., "A Study
    of BFLOAT16 for Deep Learning Training", 2019, Sec. 3): bit-exact with torch's
    ``x.to(torch.bfloat16)`` for every non-NaN input. A NaN stays NaN, its payload bits
    unspecified (torch's own CPU and CUDA casts disagree on them).

    x: fp32 [n] (fp16/bf16 accepted, via fp32). Returns bf16 [n].
    """
    if use_triton(x):
        return triton_impl("cast_bf16")(x)
    return _cpu_casts.cast_bf16(x)


def cast_fp16(x: Tensor) -> Tensor:
    """fp32 -> fp16 with round-to-nearest-even, overflow to ±Inf: bit-exact with torch's
    ``x.to(torch.float16)`` for every non-NaN input.

    x: fp32 [n] (fp16/bf16 accepted). Returns fp16 [n].
    """
    if use_triton(x):
        return triton_impl("cast_fp16")(x)
    return _cpu_casts.cast_fp16(x)


def cast_fp32(x: Tensor) -> Tensor:
    """fp16/bf16 -> fp32 (exact). x: fp16/bf16/fp32 [n]. Returns fp32 [n]."""
    if use_triton(x):
        return triton_impl("cast_fp32")(x)
    return _cpu_casts.cast_fp32(x)


# ---- Without a Triton kernel -----------------------------------------------------------------


def philox_uniform(seed: int, offsets: Tensor) -> Tensor:
    """Uniform floats in [0, 1), bit-identical to Triton's ``tl.rand(seed, offsets)`` on any
    device (the first word of Philox-4x32-10, Salmon et al., "Parallel Random Numbers: As Easy
    as 1, 2, 3", SC 2011, with counter ``(offset, 0, 0, 0)`` and key ``(seed_lo, seed_hi)``).

    seed: int in [0, 2**63). offsets: int64 [n] (each < 2**32). Returns fp32 [n].
    """
    return _cpu_random.philox_uniform(seed, offsets)


def philox_uniform4(seed: int, counters: Tensor) -> Tensor:
    """All four uniforms of each Philox counter, as Triton's ``tl.rand4x(seed, counters)``.

    seed: int in [0, 2**63). counters: int64 [m] (each < 2**32). Returns fp32 [m, 4].
    """
    return _cpu_random.philox_uniform4(seed, counters)


def terngrad_ternarize_fast_rng(g: Tensor, scale: Tensor, clip: Tensor, seed: int) -> Tensor:
    """:func:`terngrad_ternarize` (same arguments, same equation, same law of the codes) with a
    random stream that is cheap on a CPU; not bit-identical to the kernel's Philox, whose
    emulation in torch costs about a hundred passes over the tensor.

    g: fp32/fp16/bf16 [n]. scale, clip: fp32 [1]. seed: int in [0, 2**63). Returns uint8
    [ceil(n/4)] (see :func:`pack_2bit`).

    The stream, for CPU tensors of n >= 32768 elements: ``bits = numpy.random.PCG64(seed)``;
    ``V`` is the low 7 bits of the little-endian bytes of ``bits.random_raw(ceil(n / 8))``, one
    byte per element; ``Q = clamp(g * fp32(128 / scale), ±fp32(clip * 128 / scale))``; kept
    where ``V < floor|Q|``, dropped where ``V > floor|Q|`` (``floor|Q|`` capped at 127), and
    where they are equal kept iff the next uniform ``W`` is below ``|Q| - V``, the ``W`` of the
    elements that need one being ``numpy.random.Generator(bits).random(count, float32)`` in
    increasing index order; so P(kept) = ``min(|g|, clip) / scale`` exactly. Smaller CPU
    tensors: ``u = Generator(PCG64(seed)).random(n, float32)``, kept iff ``u * scale <
    min(|g|, clip)``. Reproducible for the same seed and NumPy version. Other devices: torch's
    generator of the device seeded with ``seed``, one fp32 uniform per element. Host reads:
    ``scale`` and ``clip`` (CPU, nothing to wait for). A NaN gradient gets an unspecified
    code (a step with a non-finite gradient is dropped before it is sent).
    """
    return _cpu_ternary.terngrad_ternarize_fast_rng(g, scale, clip, seed)


def population_std(x: Tensor) -> Tensor:
    """Standard deviation with ``correction=0`` of x, TernGrad's sigma in the clipping bound
    ``c * sigma`` (Wen et al. 2017, eq. (7)): exactly 0 for a constant tensor, otherwise to
    about fp32 precision (large CPU tensors take one-pass moments in fp64, see
    :func:`hvdcomp.kernels.cpu.ternary.population_std`).

    x: fp32 [n], n >= 1. Returns fp32 [1].
    """
    return _cpu_ternary.population_std(x)


def sign_residual_(x: Tensor, scale: Tensor) -> Tensor:
    """1-bit error feedback in place: ``x <- x - scale * sign(x)`` with sign = -1 exactly
    where ``x < 0`` (where :func:`sign_pack`'s bit is 1) and +1 elsewhere, zeros included.

    x: fp32 [n], updated in place. scale: fp32 [1]. Returns x.
    """
    return _cpu_ternary.sign_residual_(x, scale)


__all__ = sorted(OPERATIONS) + [
    "OPERATIONS", "backend_mode", "one_mode", "use_triton", "triton_available", "triton_impl", "cpu_impl",
    "philox_uniform", "philox_uniform4", "terngrad_ternarize_fast_rng", "population_std", "sign_residual_",
    "num_bins", "adacomp_code_dtype", "ADACOMP_MAX_BIN_8BIT", "ADACOMP_MAX_BIN_16BIT",
]
