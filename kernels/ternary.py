"""TernGrad ternarization, deterministic ternary and 1-bit sign quantization, and the dense
decode+sum of N ranks' packed payloads, as single-pass Triton kernels.

Same signatures and semantics as :mod:`hvdcomp.kernels` (its docstrings hold the
full contract; byte layout of :func:`hvdcomp.kernels.pack_2bit` and
:func:`~hvdcomp.kernels.pack_bits`). Inputs may be strided 1-D views; outputs
are contiguous.

Every kernel works on a ``[BYTES, PER_BYTE]`` tile: row b holds the elements that share
packed byte b, so a code is quantized and packed in registers and each byte is written (or
read) exactly once. The decoders loop over the N ranks inside one program: one launch for
all ranks, a fixed summation order (rank 0 first, as the CPU backend's ``sum(dim=0)``), and
no atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import NUM_WARPS, check_1d, float_arg, load_f32

#: Elements per program (large so the interpreter runs few programs).
_ELEMS = 4096


@triton.jit
def _tile(PER_BYTE: tl.constexpr, BYTES: tl.constexpr):
    """(byte index [BYTES], element index [BYTES, PER_BYTE], slot [1, PER_BYTE]) of this program."""
    byte = tl.program_id(0).to(tl.int64) * BYTES + tl.arange(0, BYTES)
    slot = tl.arange(0, PER_BYTE)[None, :]
    return byte, byte[:, None] * PER_BYTE + slot, slot


@triton.jit
def _terngrad_kernel(
    g_ptr, g_stride, scale_ptr, clip_ptr, out_ptr, n, n_bytes, seed,
    G_BF16: tl.constexpr, BYTES: tl.constexpr,
):
    byte, elem, slot = _tile(4, BYTES)
    m = elem < n
    g = load_f32(g_ptr, elem * g_stride, m, G_BF16)
    c = tl.load(clip_ptr)
    s = tl.load(scale_ptr)
    # Clamp by comparisons, not tl.minimum/maximum: a NaN must stay NaN (and so never be
    # kept) as it does in the CPU backend's clamp.
    gc = tl.where(g < -c, -c, tl.where(g > c, c, g))
    # One Philox evaluation per output byte: element 4b + j takes word j of counter b, the
    # stream the CPU backend's element_uniforms(seed, n) reproduces bit for bit.
    r0, r1, r2, r3 = tl.rand4x(seed, byte.to(tl.uint32))
    u = tl.where(slot == 0, r0[:, None], tl.where(slot == 1, r1[:, None], tl.where(slot == 2, r2[:, None], r3[:, None])))
    # Bernoulli(|gc|/s) as u*s < |gc|: the CPU backend's exact comparison (no division).
    keep = m & (u * s < tl.abs(gc))
    code = tl.where(keep, tl.where(gc > 0, 1, 2), 0)
    # The four 2-bit fields do not overlap, so their sum is their OR.
    packed = tl.sum(code << (2 * slot), axis=1)
    tl.store(out_ptr + byte, packed.to(tl.uint8), mask=byte < n_bytes)


@triton.jit
def _ternary_quantize_kernel(
    x_ptr, x_stride, thr_ptr, out_ptr, n, n_bytes, X_BF16: tl.constexpr, BYTES: tl.constexpr
):
    byte, elem, slot = _tile(4, BYTES)
    m = elem < n
    x = load_f32(x_ptr, elem * x_stride, m, X_BF16)
    t = tl.load(thr_ptr)
    code = tl.where(m & (x >= t), 1, tl.where(m & (x <= -t), 2, 0))
    packed = tl.sum(code << (2 * slot), axis=1)
    tl.store(out_ptr + byte, packed.to(tl.uint8), mask=byte < n_bytes)


@triton.jit
def _sign_pack_kernel(
    x_ptr, x_stride, out_ptr, partial_ptr, n, n_bytes, X_BF16: tl.constexpr, BYTES: tl.constexpr
):
    byte, elem, slot = _tile(8, BYTES)
    m = elem < n
    x = load_f32(x_ptr, elem * x_stride, m, X_BF16)
    bit = (x < 0).to(tl.int32)
    packed = tl.sum(bit << slot, axis=1)
    tl.store(out_ptr + byte, packed.to(tl.uint8), mask=byte < n_bytes)
    # One partial sum per program (masked lanes loaded 0), added up by torch afterwards: unlike
    # an atomic, the scale's last bits do not depend on the order programs finish.
    tl.store(partial_ptr + tl.program_id(0), tl.sum(tl.sum(tl.abs(x), axis=1), axis=0))


@triton.jit
def _decode_sum_kernel(
    p_ptr, p_stride_r, p_stride_b, scales_ptr, scales_stride, out_ptr, nranks, numel,
    WIDTH: tl.constexpr, BYTES: tl.constexpr,
):
    PER_BYTE: tl.constexpr = 8 // WIDTH
    byte, elem, slot = _tile(PER_BYTE, BYTES)
    m = elem < numel
    bm = byte < (numel + PER_BYTE - 1) // PER_BYTE
    acc = tl.zeros([BYTES, PER_BYTE], dtype=tl.float32)
    for r in range(nranks):
        s = tl.load(scales_ptr + r * scales_stride)
        b = tl.load(p_ptr + r * p_stride_r + byte * p_stride_b, mask=bm, other=0).to(tl.int32) & 0xFF
        field = (b[:, None] >> (WIDTH * slot)) & ((1 << WIDTH) - 1)
        if WIDTH == 2:
            level = (field == 1).to(tl.float32) - (field == 2).to(tl.float32)
        else:
            level = 1.0 - 2.0 * field.to(tl.float32)
        # level * s, not a select of +-s: 0 * inf is NaN in the CPU backend too.
        acc += level * s
    tl.store(out_ptr + elem, acc, mask=m)


def _scalar_f32(t: torch.Tensor) -> torch.Tensor:
    # A 1-element device tensor; the conversion (if any) is a device op, never a host read.
    return t.reshape(-1).to(torch.float32)


def terngrad_ternarize(g: torch.Tensor, scale: torch.Tensor, clip: torch.Tensor, seed: int) -> torch.Tensor:
    """TernGrad stochastic ternarization fused with clipping and 2-bit packing, one pass.

    ``gc = clamp(g, -clip, clip)`` (Wen et al. 2017, eq. (7), clip = c*sigma);
    ``b_i ~ Bernoulli(|gc_i| / scale)`` drawn as ``u_i * scale < |gc_i|`` with ``u_i`` word ``i % 4`` of ``tl.rand4x(seed, i // 4)``;
    code 1 (+1) / 2 (-1) by ``sign(gc)`` where ``b = 1``, else 0 (eq. (6):
    ``g~ = s * sign(g) o b``, unbiased when ``scale >= max|gc|``).

    g: fp32/fp16/bf16 [n] (any stride). scale: fp32 [1], the shared scaler s (0 gives all
    zero codes). clip: fp32 [1] (``inf`` for none). seed: int in [0, 2**63); element i
    draws Philox counter i, so the bytes equal the CPU backend's for the same seed.
    Returns uint8 [ceil(n/4)], code i at bits ``2*(i%4)`` of byte ``i//4``. Contract:
    :func:`hvdcomp.kernels.terngrad_ternarize`.
    """
    if not 0 <= int(seed) < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    check_1d(g)
    n = g.numel()
    out = torch.empty((n + 3) // 4, dtype=torch.uint8, device=g.device)
    if n == 0:
        return out
    gk, bf16 = float_arg(g)
    _terngrad_kernel[(triton.cdiv(out.numel(), _ELEMS // 4),)](
        gk, gk.stride(0), _scalar_f32(scale), _scalar_f32(clip), out, n, out.numel(), int(seed),
        G_BF16=bf16, BYTES=_ELEMS // 4, num_warps=NUM_WARPS,
    )
    return out


def ternary_quantize(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Deterministic ternary codes packed four per byte: 1 where ``x >= t``, 2 where
    ``x <= -t``, else 0 (the deterministic counterpart of TernGrad's eq. (6)).

    x: fp32/fp16/bf16 [n] (any stride). threshold: fp32 [1]. Returns uint8 [ceil(n/4)].
    Contract: :func:`hvdcomp.kernels.ternary_quantize`.
    """
    check_1d(x)
    n = x.numel()
    out = torch.empty((n + 3) // 4, dtype=torch.uint8, device=x.device)
    if n == 0:
        return out
    xk, bf16 = float_arg(x)
    _ternary_quantize_kernel[(triton.cdiv(out.numel(), _ELEMS // 4),)](
        xk, xk.stride(0), _scalar_f32(threshold), out, n, out.numel(),
        X_BF16=bf16, BYTES=_ELEMS // 4, num_warps=NUM_WARPS,
    )
    return out


def sign_pack(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """1-bit quantization (1-bit SGD, Seide et al. 2014; EF-SignSGD's scale) in one pass:
    bit i = ``x_i < 0`` packed eight per byte (bit ``i%8`` of byte ``i//8``), and
    ``scale = mean|x|``.

    x: fp32/fp16/bf16 [n] (any stride). Returns ``(bits uint8 [ceil(n/8)], scale fp32 [1])``.
    The scale's sum is a per-program fp32 sum, then a torch sum of those partials:
    deterministic, but summed in another order than the CPU backend's, so its last bits may
    differ. Contract:
    :func:`hvdcomp.kernels.sign_pack`.
    """
    check_1d(x)
    n = x.numel()
    bits = torch.empty((n + 7) // 8, dtype=torch.uint8, device=x.device)
    if n == 0:
        return bits, torch.zeros(1, dtype=torch.float32, device=x.device)
    xk, bf16 = float_arg(x)
    grid = triton.cdiv(bits.numel(), _ELEMS // 8)
    partial = torch.empty(grid, dtype=torch.float32, device=x.device)
    _sign_pack_kernel[(grid,)](
        xk, xk.stride(0), bits, partial, n, bits.numel(), X_BF16=bf16, BYTES=_ELEMS // 8, num_warps=NUM_WARPS,
    )
    return bits, (partial.sum() / n).reshape(1)


def _decode_sum(packed: torch.Tensor, scales: torch.Tensor, numel: int, width: int) -> torch.Tensor:
    if packed.dim() != 2:
        raise ValueError(f"payloads must be [N, nbytes], got shape {tuple(packed.shape)}")
    nranks, nbytes = packed.shape
    per_byte = 8 // width
    if scales.numel() != nranks:
        raise ValueError(f"{nranks} payloads but {scales.numel()} scales")
    if nranks and nbytes * per_byte < numel:
        raise ValueError(f"{nbytes} bytes per rank hold {nbytes * per_byte} codes, {numel} asked for")
    out = torch.empty(numel, dtype=torch.float32, device=packed.device)
    if nranks == 0 or numel == 0:
        return out.zero_()
    p = packed.view(torch.uint8) if packed.dtype == torch.bool else packed
    sk = _scalar_f32(scales)
    bytes_per_prog = _ELEMS // per_byte
    _decode_sum_kernel[(triton.cdiv(numel, _ELEMS),)](
        p, p.stride(0), p.stride(1), sk, sk.stride(0), out, nranks, numel,
        WIDTH=width, BYTES=bytes_per_prog, num_warps=NUM_WARPS,
    )
    return out


def sign_decode_sum(bits: torch.Tensor, scales: torch.Tensor, numel: int) -> torch.Tensor:
    """Dense sum of N ranks' 1-bit payloads, ``sum_r scale_r * (1 - 2*bit_r)``, one launch.

    bits: uint8 [N, >= ceil(numel/8)] (any strides). scales: fp32 [N]. Returns fp32
    [numel]. Ranks are summed in order 0..N-1 in fp32. Raises ValueError when a row is too
    short for ``numel`` bits. Contract: :func:`hvdcomp.kernels.sign_decode_sum`.
    """
    return _decode_sum(bits, scales, numel, 1)


def ternary_decode_sum(packed: torch.Tensor, scales: torch.Tensor, numel: int) -> torch.Tensor:
    """Dense sum of N ranks' 2-bit ternary payloads, ``sum_r scale_r * level_r`` with level
    +1 for code 1, -1 for code 2, 0 otherwise (TernGrad's 2N+1 levels, Wen et al. 2017,
    Sec. "scaler sharing"), one launch for all ranks.

    packed: uint8 [N, >= ceil(numel/4)] (any strides). scales: fp32 [N]. Returns fp32
    [numel]. Raises ValueError when a row is too short for ``numel`` codes. Contract:
    :func:`hvdcomp.kernels.ternary_decode_sum`.
    """
    return _decode_sum(packed, scales, numel, 2)
