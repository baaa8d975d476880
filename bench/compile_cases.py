"""The launches to compile: every kernel operation, called through its real launch code
(``hvdcomp.kernels.<module>.<op>``) with the dtypes, sizes and layouts users hit.

Triton compiles one binary per *specialization* of a launch: the argument dtypes, the
constexprs (a bf16 flag, AdaComp's ``BINS x CHUNK`` tile, the radix pass), integers equal to
1, divisible by 16 or above ``2**31 - 1`` (then 64-bit), and whether each pointer is 16-byte
aligned. The cases below walk those axes for each operation:

* gradient dtypes fp32, fp16 and bf16 (bf16 travels as int16 bits);
* sizes 1 (a specialised constant), 4099 (odd) and 65536 (a multiple of 16), and a large
  one on the ``meta`` device (no memory): ``2**31 + 5`` elements (64-bit sizes), or
  ``2**31 - 1`` for the top-k family (its int32 limit);
* layouts: contiguous, strided (a ``[::2]`` view, as in-place updates of views) and
  offset (``buf[1:]``, a pointer that is not 16-byte aligned, as a tensor's slice of a
  flat bucket or a payload's codes after its header);
* AdaComp bin sizes 2, 50, 64 (8-bit codes, L_T <= 64) and 65, 500, 4096, 16384 (16-bit
  codes; above 4096 a bin is walked in chunks), on 1 and 4 ranks to decode;
* decoders on 1 and 4 ranks, sparse indices int32 and int64.

Inputs are zeros or empty: under the compile-only driver nothing runs, so values do not
matter, only dtypes, shapes, strides and pointers do (:mod:`bench.compile_only`).
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch

from hvdcomp.kernels import adacomp, casts, decode, packing, residual, ternary, topk
from hvdcomp.kernels.adacomp_format import adacomp_code_dtype, num_bins

F32, F16, BF16, U8 = torch.float32, torch.float16, torch.bfloat16, torch.uint8
LARGE = 2**31 + 5
LARGE_TOPK = 2**31 - 1
ADACOMP_BINS = (2, 50, 64, 65, 500, 4096, 16384)
NRANKS = (1, 4)


def vec(n: int, dtype=F32, layout: str = "contiguous") -> torch.Tensor:
    """A 1-D tensor of n elements: on ``meta`` for the large sizes, else CPU zeros."""
    if n >= 2**31 - 1:
        return torch.empty(n, dtype=dtype, device="meta")
    if layout == "strided":
        return torch.zeros(2 * n, dtype=dtype)[::2]
    if layout == "offset":
        return torch.zeros(n + 1, dtype=dtype)[1:]
    return torch.zeros(n, dtype=dtype)


def _name(dtype: torch.dtype) -> str:
    return {F32: "fp32", F16: "fp16", BF16: "bf16"}.get(dtype, str(dtype).replace("torch.", ""))


def grad_variants(large: int = LARGE) -> Iterator[tuple[str, int, torch.dtype, str]]:
    """(label, n, gradient dtype, layout) for the gradient-shaped operand of an operation."""
    for dtype in (F32, F16, BF16):
        yield f"{_name(dtype)} n=4099", 4099, dtype, "contiguous"
    yield "fp32 n=1", 1, F32, "contiguous"
    yield "fp32 n=65536", 65536, F32, "contiguous"
    yield f"fp32 n={large} (meta)", large, F32, "contiguous"
    yield "bf16 n=65536", 65536, BF16, "contiguous"
    yield "fp16 n=4099 strided", 4099, F16, "strided"
    yield "fp32 n=4099 offset", 4099, F32, "offset"
    yield "bf16 n=4099 offset", 4099, BF16, "offset"


def _scalar(value: float = 1.0, device="cpu") -> torch.Tensor:
    return torch.full((1,), value, dtype=F32, device=device)


def _elementwise() -> Iterator[tuple[str, str, Callable[[], object]]]:
    for label, n, dt, lay in grad_variants():
        yield "ef_accumulate_", label, lambda n=n, dt=dt, lay=lay: residual.ef_accumulate_(vec(n, F32, lay),
                                                                                           vec(n, dt, lay))
        yield "dgc_momentum_", label, lambda n=n, dt=dt, lay=lay: residual.dgc_momentum_(
            vec(n, F32, lay), vec(n, F32, lay), vec(n, dt, lay), 0.9)
        yield "cast_bf16", label, lambda n=n, dt=dt, lay=lay: casts.cast_bf16(vec(n, dt, lay))
        yield "cast_fp16", label, lambda n=n, dt=dt, lay=lay: casts.cast_fp16(vec(n, dt, lay))
        yield "cast_fp32", label, lambda n=n, dt=dt, lay=lay: casts.cast_fp32(vec(n, dt, lay))
        yield "terngrad_ternarize", label, lambda n=n, dt=dt, lay=lay: ternary.terngrad_ternarize(
            vec(n, dt, lay), _scalar(), _scalar(float("inf")), 12345)
        yield "ternary_quantize", label, lambda n=n, dt=dt, lay=lay: ternary.ternary_quantize(vec(n, dt, lay),
                                                                                               _scalar(0.5))
        yield "sign_pack", label, lambda n=n, dt=dt, lay=lay: ternary.sign_pack(vec(n, dt, lay))


def _selection() -> Iterator[tuple[str, str, Callable[[], object]]]:
    for label, n, dt, lay in grad_variants(LARGE_TOPK):
        k = max(1, n // 100)
        yield "topk_indices", label, lambda n=n, dt=dt, lay=lay, k=k: topk.topk_indices(vec(n, dt, lay), k)
        yield "count_above", label, lambda n=n, dt=dt, lay=lay: topk.count_above(vec(n, dt, lay), _scalar())
        yield "compact_above", label, lambda n=n, dt=dt, lay=lay, k=k: topk.compact_above(vec(n, dt, lay),
                                                                                           _scalar(), k)
        for idt in (torch.int64, torch.int32):
            s = max(1, min(n, 4099) // 10)
            yield "sampled_threshold", f"{label}, {s} {_name(idt)} samples", (
                lambda n=n, dt=dt, lay=lay, s=s, idt=idt: topk.sampled_threshold(
                    vec(n, dt, lay), 0.01, torch.zeros(s, dtype=idt)))


def _sparse_decode() -> Iterator[tuple[str, str, Callable[[], object]]]:
    for idt in (torch.int32, torch.int64):
        for vdt in (F32, F16, BF16):
            for m in (1, 4099, 65536):
                yield "scatter_add_", f"{m} {_name(idt)} indices, {_name(vdt)} values", (
                    lambda idt=idt, vdt=vdt, m=m: decode.scatter_add_(vec(4 * 65536), torch.zeros(m, dtype=idt),
                                                                     vec(m, vdt)))
    yield "scatter_add_", f"into n={LARGE} (meta), int64 indices", lambda: decode.scatter_add_(
        vec(LARGE), torch.empty(4099, dtype=torch.int64, device="meta"), torch.empty(4099, device="meta"))
    yield "scatter_add_", "strided out, offset int32 indices, bf16 values", lambda: decode.scatter_add_(
        vec(65536, F32, "strided"), vec(4099, torch.int32, "offset"), vec(4099, BF16, "offset"))


def _packing() -> Iterator[tuple[str, str, Callable[[], object]]]:
    for n in (1, 4099, 65536, LARGE):
        for dt in (U8, torch.bool):
            yield "pack_2bit", f"{_name(dt)} n={n}", lambda n=n, dt=dt: packing.pack_2bit(vec(n, dt))
            yield "pack_bits", f"{_name(dt)} n={n}", lambda n=n, dt=dt: packing.pack_bits(vec(n, dt))
        yield "unpack_2bit", f"n={n}", lambda n=n: packing.unpack_2bit(vec((n + 3) // 4, U8), n)
        yield "unpack_bits", f"n={n}", lambda n=n: packing.unpack_bits(vec((n + 7) // 8, U8), n)
    yield "pack_2bit", "uint8 strided", lambda: packing.pack_2bit(vec(4099, U8, "strided"))
    yield "pack_bits", "int64 offset", lambda: packing.pack_bits(vec(4099, torch.int64, "offset"))
    yield "unpack_2bit", "offset", lambda: packing.unpack_2bit(vec(1025, U8, "offset"), 4099)
    yield "unpack_bits", "strided", lambda: packing.unpack_bits(vec(513, U8, "strided"), 4099)


def _dense_decode() -> Iterator[tuple[str, str, Callable[[], object]]]:
    for op, fn, per_byte in (("sign_decode_sum", ternary.sign_decode_sum, 8),
                             ("ternary_decode_sum", ternary.ternary_decode_sum, 4)):
        for nr in NRANKS:
            for n in (1, 4099, 65536, LARGE):
                nbytes = (n + per_byte - 1) // per_byte
                dev = "meta" if n >= 2**31 - 1 else "cpu"
                yield op, f"{nr} ranks, n={n}", (lambda fn=fn, nr=nr, n=n, nbytes=nbytes, dev=dev: fn(
                    torch.zeros(nr, nbytes, dtype=U8, device=dev), torch.zeros(nr, device=dev), n))
        # Rows of a wider buffer (a gathered payload's code section after its scale).
        yield op, "4 ranks, strided rows", lambda fn=fn, per_byte=per_byte: fn(
            torch.zeros(4, 1100, dtype=U8)[:, 3:3 + 4099 // per_byte + 1], torch.zeros(4), 4099)


def _adacomp() -> Iterator[tuple[str, str, Callable[[], object]]]:
    for b in ADACOMP_BINS:
        code = adacomp_code_dtype(b)
        # Every gradient variant on the default bin sizes (conv 50, FC 500), the dtypes at the others.
        variants = [(f"L_T={b}, {label}", n, dt, lay) for label, n, dt, lay in grad_variants()
                    if b in (50, 500) or (n == 4099 and lay == "contiguous")]
        for label, n, dt, lay in variants:
            nb = num_bins(n, b)
            dev = "meta" if n >= 2**31 - 1 else "cpu"
            yield "adacomp_select_stats", label, lambda n=n, dt=dt, lay=lay, b=b: adacomp.adacomp_select_stats(
                vec(n, F32, lay), vec(n, dt, lay), b)
            yield "adacomp_pack_", f"{label}, {_name(code)} codes", (
                lambda n=n, dt=dt, lay=lay, b=b, nb=nb, code=code, dev=dev: adacomp.adacomp_pack_(
                    vec(n, F32, lay), vec(n, dt, lay), b, torch.zeros(nb, dtype=torch.int64, device=dev),
                    _scalar(device=dev), vec(max(1, min(n, 4099) // 3), code, "offset")))
        for nr in NRANKS:
            # 64-bit sizes on the default bin sizes only (rank x bin pairs past 2**31 either way).
            for n in (1, 4099, 65536) + ((LARGE,) if b in (50, 500) else ()):
                nb = num_bins(n, b)
                dev = "meta" if n >= 2**31 - 1 else "cpu"
                m = max(1, min(n, 4099) // 3)
                yield "adacomp_decode_sum", f"L_T={b}, {nr} ranks, n={n}, {_name(code)} codes", (
                    lambda b=b, nr=nr, n=n, nb=nb, dev=dev, m=m, code=code: adacomp.adacomp_decode_sum(
                        torch.zeros(nr * m, dtype=code, device=dev), torch.zeros(nr, nb, dtype=torch.int32, device=dev),
                        torch.zeros(nr, device=dev), b, n))


def cases() -> list[tuple[str, str, Callable[[], object]]]:
    """Every (operation, label, call) to run under the compile-only driver."""
    out = []
    for family in (_elementwise, _selection, _sparse_decode, _packing, _dense_decode, _adacomp):
        out.extend(family())
    return out
