"""Every fused kernel against its CPU backend's version: time, bytes moved, GB/s, % of peak.

    python -m bench.kernels                          # CUDA: sizes 1M, 16M, 64M fp32 elements
    python -m bench.kernels --sizes 1M,4M --ops topk_indices,terngrad_ternarize
    python -m bench.kernels --device cpu             # no GPU: the CPU backend only, 1M

For each operation in ``hvdcomp.kernels.OPERATIONS`` and each size n (dense fp32
elements; ``1M`` = 2**20), the inputs are built once and the same call is timed through
``hvdcomp.kernels.triton_impl(op)`` and through ``hvdcomp.kernels.cpu_impl(op)`` (the CPU
backend, ``kernels/cpu/``; on CUDA tensors its torch path), recorded as ``reference``:

* **CUDA**: ``triton.testing.do_bench`` (warm-up, then repeated calls for ``--rep-ms``
  with the L2 cache flushed between them): median and the 10th-90th percentile spread.
* **CPU** (no CUDA, or ``--device cpu``): the CPU backend only (the Triton interpreter is a
  correctness tool, not a timing), ``time.perf_counter`` median, min and max of ``--reps``
  calls after one warm-up. The output says so.

GB/s = bytes per call / median time, with the byte model below: the least traffic the
operation needs in fp32, counting each input read once and each output written once (so
a kernel that reads its input several times shows it as a lower fraction of the peak).
Payload sizes follow the compressors' settings: 1 % selections, N = 4 ranks to decode,
AdaComp bins of 500 elements.

| op | bytes per call (n fp32 elements) |
|---|---|
| ef_accumulate_ | read r, read g, write r: 12 n |
| dgc_momentum_ | read u, v, g; write u, v: 20 n |
| adacomp_select_stats | read x, g; write counts: 8 n + 4 nbins |
| adacomp_pack_ | read x, g, offsets; write codes, write x where sent: 8 n + 8 nbins + sel (c + 4) |
| adacomp_decode_sum | read N ranks' codes, counts, scales; write out: 4 n + N (sel c + 4 nbins + 4) |
| terngrad_ternarize | read g, write 2-bit codes: 4.25 n |
| ternary_quantize | read x, write 2-bit codes: 4.25 n |
| sign_pack | read x, write 1-bit codes (+ scale): 4.125 n |
| sign_decode_sum | read N rows of bits, write out: 4 n + N n / 8 |
| ternary_decode_sum | read N rows of 2-bit codes, write out: 4 n + N n / 4 |
| topk_indices | read x, write k int64 indices: 4 n + 8 k (k = n/100; the kernel reads x 5 times) |
| sampled_threshold | read s int64 indices, gather s values: 12 s (s = n/100) |
| count_above | read x: 4 n |
| compact_above | read x, write count (int32 index, fp32 value): 4 n + 8 count (count ~ n/100) |
| pack_2bit / unpack_2bit | 1-byte codes <-> 2-bit codes: 1.25 n |
| pack_bits / unpack_bits | 1-byte flags <-> bits: 1.125 n |
| scatter_add_ | read m indices (int32) and values, read+write out at them: 16 m (m = N n/100) |
| cast_bf16 / cast_fp16 | read fp32, write 16-bit: 6 n |
| cast_fp32 | read bf16, write fp32: 6 n |

(c = code bytes, 1 for AdaComp bins <= 64 else 2; sel = selected elements; nbins = n/500.)

Writes ``--out`` (default ``results/kernels.json``): device, torch/triton versions, the
command line, timestamp, byte models, peak bandwidth and every row. Needs neither a GPU
nor Horovod; on CUDA it needs Triton.
"""
from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
import zlib
from typing import Callable

import torch

from bench._record import emit
from hvdcomp import kernels as K

#: Known peak memory bandwidth in GB/s; first entry whose substrings are all in the
#: device name wins (``--peak-gbs`` overrides).
PEAK_GBS: list[tuple[tuple[str, ...], float]] = [
    (("H200",), 4800.0),
    (("H100", "PCIe"), 2000.0),
    (("H100",), 3350.0),  # SXM (HBM3)
]

NRANKS = 4  # ranks whose payloads the decoders sum
RATIO = 0.01  # selections: top-k, DGC sample and compaction, sparse payloads
ADACOMP_BIN = 500

BYTE_MODELS = {
    "ef_accumulate_": "12 n", "dgc_momentum_": "20 n",
    "adacomp_select_stats": "8 n + 4 nbins", "adacomp_pack_": "8 n + 8 nbins + sel (c + 4)",
    "adacomp_decode_sum": "4 n + N (sel c + 4 nbins + 4)",
    "terngrad_ternarize": "4.25 n", "ternary_quantize": "4.25 n", "sign_pack": "4.125 n",
    "sign_decode_sum": "4 n + N n/8", "ternary_decode_sum": "4 n + N n/4",
    "topk_indices": "4 n + 8 k", "sampled_threshold": "12 s", "count_above": "4 n",
    "compact_above": "4 n + 8 count",
    "pack_2bit": "1.25 n", "unpack_2bit": "1.25 n", "pack_bits": "1.125 n", "unpack_bits": "1.125 n",
    "scatter_add_": "16 m", "cast_bf16": "6 n", "cast_fp16": "6 n", "cast_fp32": "6 n",
}


def peak_gbs(device_name: str) -> float | None:
    for keys, value in PEAK_GBS:
        if all(k.lower() in device_name.lower() for k in keys):
            return value
    return None


def parse_size(text: str) -> int:
    """'4096', '64K', '1M', '1.5M' -> elements (K = 2**10, M = 2**20, G = 2**30)."""
    text = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    num = text[:-1] if mult > 1 else text
    value = int(float(num) * mult)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text}")
    return value


# ---- inputs per operation: (args, bytes per call) ---------------------------------------------------


def _inputs(op: str, n: int, dev: torch.device, gen: torch.Generator) -> tuple[tuple, float]:
    def randn(m):
        return torch.randn(m, generator=gen).to(dev)

    def randint(high, m, dtype=torch.uint8):
        return torch.randint(0, high, (m,), generator=gen, dtype=dtype).to(dev)

    f32 = torch.float32
    if op == "ef_accumulate_":
        return (randn(n), randn(n)), 12 * n
    if op == "dgc_momentum_":
        return (randn(n), randn(n), randn(n), 0.9), 20 * n
    if op.startswith("adacomp_"):
        x, g = randn(n), randn(n)
        counts, _ = K.cpu_impl("adacomp_select_stats")(x, g, ADACOMP_BIN)
        nb, sel = counts.numel(), int(counts.sum())
        cdt = K.adacomp_code_dtype(ADACOMP_BIN)
        c = torch.empty((), dtype=cdt).element_size()
        if op == "adacomp_select_stats":
            return (x, g, ADACOMP_BIN), 8 * n + 4 * nb
        offsets = torch.cumsum(counts.to(torch.int64), 0) - counts
        codes = torch.empty(sel, dtype=cdt, device=dev)
        # scale 0: the residual update writes x back unchanged, so every repetition selects
        # the same elements (the CPU backend raises if the count changes) at the same cost.
        zero = torch.zeros(1, dtype=f32, device=dev)
        if op == "adacomp_pack_":
            return (x, g, ADACOMP_BIN, offsets, zero, codes), 8 * n + 8 * nb + sel * (c + 4)
        K.cpu_impl("adacomp_pack_")(x, g, ADACOMP_BIN, offsets, torch.ones(1, device=dev), codes)
        all_codes = codes.repeat(NRANKS)
        all_counts = counts.view(1, -1).repeat(NRANKS, 1)
        scales = torch.rand(NRANKS, generator=gen).to(dev)
        return (all_codes, all_counts, scales, ADACOMP_BIN, n), 4 * n + NRANKS * (sel * c + 4 * nb + 4)
    if op == "terngrad_ternarize":
        g = randn(n)
        return (g, g.abs().max().reshape(1), torch.full((1,), 2.5, device=dev), 1234), 4.25 * n
    if op == "ternary_quantize":
        return (randn(n), torch.full((1,), 0.7, device=dev)), 4.25 * n
    if op == "sign_pack":
        return (randn(n),), 4.125 * n
    if op == "sign_decode_sum":
        return (randint(256, NRANKS * ((n + 7) // 8)).view(NRANKS, -1), torch.rand(NRANKS, generator=gen).to(dev),
                n), 4 * n + NRANKS * n / 8
    if op == "ternary_decode_sum":
        return (randint(256, NRANKS * ((n + 3) // 4)).view(NRANKS, -1), torch.rand(NRANKS, generator=gen).to(dev),
                n), 4 * n + NRANKS * n / 4
    if op == "topk_indices":
        k = max(1, int(n * RATIO))
        return (randn(n), k), 4 * n + 8 * k
    if op == "sampled_threshold":
        s = max(1, int(n * RATIO))
        return (randn(n), RATIO, randint(n, s, torch.int64)), 12 * s
    if op in ("count_above", "compact_above"):
        x = randn(n)
        thr = torch.full((1,), 2.576, device=dev)  # |N(0,1)| above it: 1 %
        if op == "count_above":
            return (x, thr), 4 * n
        count = int(K.cpu_impl("count_above")(x, thr))
        return (x, thr, count), 4 * n + 8 * count
    if op == "pack_2bit":
        return (randint(4, n),), 1.25 * n
    if op == "unpack_2bit":
        return (randint(256, (n + 3) // 4), n), 1.25 * n
    if op == "pack_bits":
        return (randint(2, n),), 1.125 * n
    if op == "unpack_bits":
        return (randint(256, (n + 7) // 8), n), 1.125 * n
    if op == "scatter_add_":
        m = NRANKS * max(1, int(n * RATIO))
        return (torch.zeros(n, dtype=f32, device=dev), randint(n, m, torch.int32), randn(m)), 16 * m
    if op in ("cast_bf16", "cast_fp16"):
        return (randn(n),), 6 * n
    if op == "cast_fp32":
        return (randn(n).to(torch.bfloat16),), 6 * n
    raise KeyError(f"bench.kernels has no inputs for operation {op!r}: add them to _inputs")


# ---- timing -----------------------------------------------------------------------------------------


def _time_cuda(fn: Callable[[], object], warmup_ms: int, rep_ms: int) -> dict:
    import triton.testing

    med, p10, p90 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.1, 0.9])
    return {"median_ms": med, "p10_ms": p10, "p90_ms": p90}


def _time_cpu(fn: Callable[[], object], reps: int) -> dict:
    fn()  # warm-up (allocator, first-touch pages)
    times = []
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "reps": len(times)}


def _gbs(nbytes: float, ms: float | None) -> float | None:
    return nbytes / (ms * 1e-3) / 1e9 if ms else None


def run(ops: list[str], sizes: list[int], dev: torch.device, with_triton: bool,
        timer: Callable[[Callable[[], object]], dict], peak: float | None,
        log: Callable[[str], None] = print) -> list[dict]:
    """One row per (size, op): the reference timed on ``dev``, and the Triton kernel too
    when ``with_triton`` (CUDA; or CPU tensors under ``TRITON_INTERPRET=1`` in tests)."""
    rows = []
    for n in sizes:
        for op in ops:
            gen = torch.Generator().manual_seed(zlib.crc32(op.encode()) + n)  # same inputs every run
            row = {"op": op, "module": K.OPERATIONS[op], "n": n, "byte_model": BYTE_MODELS.get(op)}
            try:
                args, nbytes = _inputs(op, n, dev, gen)
            except (RuntimeError, KeyError) as exc:  # e.g. out of memory at 64M on a small GPU
                row["error"] = f"inputs: {exc!r}"
                rows.append(row)
                log(f"  {op} n={n}: {row['error']}")
                continue
            row["bytes"] = nbytes
            ref = K.cpu_impl(op)
            try:
                row["reference"] = timer(lambda: ref(*args))
                row["reference"]["gbs"] = _gbs(nbytes, row["reference"]["median_ms"])
            except RuntimeError as exc:  # out of memory: the reference's temporaries are larger
                row["reference_error"] = repr(exc)
                log(f"  {op} n={n}: reference failed: {exc!r}")
            if with_triton:
                try:
                    impl = K.triton_impl(op)
                    row["triton"] = timer(lambda: impl(*args))
                    row["triton"]["gbs"] = _gbs(nbytes, row["triton"]["median_ms"])
                    row["triton"]["peak_fraction"] = row["triton"]["gbs"] / peak if peak else None
                    if "reference" in row:
                        row["speedup"] = row["reference"]["median_ms"] / row["triton"]["median_ms"]
                except Exception as exc:  # one broken kernel must not hide the others' figures
                    row["triton_error"] = repr(exc)
                    log(f"  {op} n={n}: triton failed: {exc!r}")
            rows.append(row)
            args = None  # free this row's tensors before the next row allocates
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def _fmt(v, spec=".3f", missing="-"):
    return missing if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _spread(t: dict) -> str:
    lo, hi = ("p10_ms", "p90_ms") if "p10_ms" in t else ("min_ms", "max_ms")
    return f"{_fmt(t.get(lo))}-{_fmt(t.get(hi))}"


def _size_label(n: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def format_table(record: dict) -> str:
    cuda = record["with_triton"]
    what = "Triton vs reference" if cuda else "CPU: reference only, no Triton timing"
    lines = [f"device: {record['device']} ({what})"]
    if cuda:
        lines.append(f"{'op':<22}{'n':>6}{'MB/call':>9}{'ref ms':>10}{'ref GB/s':>10}{'triton ms':>11}"
                     f"{'p10-p90':>19}{'GB/s':>8}{'%peak':>7}{'speedup':>8}")
    else:
        lines.append(f"{'op':<22}{'n':>6}{'MB/call':>9}{'ref ms':>10}{'min-max':>19}{'GB/s':>8}")
    for r in record["rows"]:
        head = f"{r['op']:<22}{_size_label(r['n']):>6}"
        if "error" in r:
            lines.append(f"{head}  {r['error']}")
            continue
        ref, mb = r.get("reference") or {"median_ms": math.nan, "gbs": None, "min_ms": math.nan,
                                          "max_ms": math.nan}, r["bytes"] / 1e6
        if cuda:
            tri = r.get("triton") or {}
            spread = _spread(tri) if tri else r.get("triton_error", "-")[:14]
            frac = tri.get("peak_fraction")
            lines.append(f"{head}{mb:>9.2f}{ref['median_ms']:>10.3f}{_fmt(ref['gbs'], '.1f'):>10}"
                         f"{_fmt(tri.get('median_ms')):>11}{spread:>19}{_fmt(tri.get('gbs'), '.1f'):>8}"
                         f"{_fmt(frac and frac * 100, '.1f'):>7}{_fmt(r.get('speedup'), '.2f'):>8}")
        else:
            spread = _spread(ref)
            lines.append(f"{head}{mb:>9.2f}{ref['median_ms']:>10.3f}{spread:>19}{_fmt(ref['gbs'], '.2f'):>8}")
    if cuda:
        lines.append(f"times: {record['timer']} median (p10-p90); peak {_fmt(record['peak_gbs'], '.0f', 'unknown')}"
                     " GB/s; GB/s from the byte model in the module docstring")
    else:
        lines.append(f"times: time.perf_counter median (min-max) of {record['reps']} calls after 1 warm-up, inputs "
                     "warm in cache; no CUDA, so Triton kernels are not timed (run on a GPU for the comparison)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="Triton kernels vs torch reference: time, GB/s, % of peak",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="auto: CUDA when available (Triton vs reference), else CPU (reference only)")
    p.add_argument("--sizes", default=None, help="comma list of element counts, e.g. 1M,16M,64M "
                   "(default 1M,16M,64M on CUDA, 1M on CPU)")
    p.add_argument("--ops", default=None, help="comma list of operations (default: all of OPERATIONS)")
    p.add_argument("--reps", type=int, default=5, help="CPU: timed calls per row")
    p.add_argument("--warmup-ms", type=int, default=25, help="CUDA: do_bench warm-up")
    p.add_argument("--rep-ms", type=int, default=100, help="CUDA: do_bench timed window")
    p.add_argument("--peak-gbs", type=float, default=None, help="peak memory bandwidth (default: known devices)")
    p.add_argument("--out", default="results/kernels.json", help="JSON output path")
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    sizes = [parse_size(s) for s in (args.sizes or ("1M,16M,64M" if cuda else "1M")).split(",") if s.strip()]
    ops = list(K.OPERATIONS) if not args.ops else [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in ops if o not in K.OPERATIONS]
    if unknown:
        p.error(f"unknown operations {unknown}; known: {sorted(K.OPERATIONS)}")

    device_name = torch.cuda.get_device_name() if cuda else (platform.processor() or platform.machine() or "cpu")
    peak = args.peak_gbs if args.peak_gbs is not None else (peak_gbs(device_name) if cuda else None)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
        if cuda:
            p.error("CUDA mode times the Triton kernels: pip install triton")

    if cuda:
        dev, timer_name = torch.device("cuda"), "triton.testing.do_bench"
        timer = lambda f: _time_cuda(f, args.warmup_ms, args.rep_ms)  # noqa: E731
    else:
        dev, timer_name = torch.device("cpu"), "time.perf_counter"
        timer = lambda f: _time_cpu(f, args.reps)  # noqa: E731
    rows = run(ops, sizes, dev, cuda, timer, peak)
    record = {
        "device": device_name,
        "mode": "cuda" if cuda else "cpu-reference-only",
        "with_triton": cuda,
        "timer": timer_name,
        "versions": {"torch": torch.__version__, "triton": triton_version, "python": platform.python_version(),
                     "cuda": torch.version.cuda},
        "command": " ".join(["python -m bench.kernels"] + (list(argv) if argv is not None else sys.argv[1:])),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "peak_gbs": peak,
        "sizes": sizes,
        "reps": args.reps,
        "nranks": NRANKS,
        "ratio": RATIO,
        "byte_models": BYTE_MODELS,
        "rows": rows,
    }
    emit(record, format_table(record), args.out)
    return record


if __name__ == "__main__":
    main()
