"""Compression time against backward time, on one device, for every registered compressor.

    python -m bench.compress_vs_backward --model resnet50 --device cuda      # batch 64, 224x224
    python -m bench.compress_vs_backward --model gpt2-medium --device cuda   # batch 8 x 1024 tokens
    python -m bench.compress_vs_backward --cpu-smoke                          # small CNN, CPU, seconds (CI)

What one run measures, on one device and one process:

1. Forward and backward of a training step of the model (``--amp bf16`` autocast by default
   on CUDA, fp32 on CPU); the gradients of the last step are kept (fp32).
2. For every compressor in ``hvdcomp.registry.COMPRESSORS`` (a compressor whose module does
   not exist yet is skipped with a note; top-k, random-k, DGC and ScaleCom at ratios 1 % and
   0.1 %), with each kernel path (``HVDCOMP_KERNELS=triton`` and ``reference`` on CUDA,
   ``reference`` on CPU), it runs the real step of ``hvdcomp.DistributedOptimizer`` for rank
   0 of ``--nranks`` (default 8) in-process ranks (:class:`bench.one_rank.OneRankOfN`: the
   chains of :mod:`hvdcomp.core` with the in-process transport's collectives; the other
   ranks hold N-1 perturbed copies of the gradients, ``g + noise * rms(g) * randn``, and
   their requests of one recorded step are replayed against rank 0's):

   * **compress**: rank 0's local work up to each chain's last collective (tensors below
     ``min_compress_numel`` (1024) uncompressed, as in the transport; ScaleCom's proposal and
     values; TernGrad's scales; ``encode``, the chain's one size read, ``pack``; the
     compressed allreduce's chunk encode and chunk sums);
   * **decode**: the work after the last collective (``decode_dense`` of the sum, or
     ``decode_sum`` of the N gathered payloads per tensor, also timed with 2 payloads so
     bench/scaling.py can extrapolate in N; the compressed allreduce's decode of all chunks),
     with the averaging. The collectives themselves are not timed.
3. What users run today, on the same tensors: an eager top-k with error feedback written as
   most libraries do (``torch.topk`` + gather + scatter, residual ``x - decompress(C(x))``,
   fp32 values + int64 indices, decode by scattering each rank's payload into a dense
   tensor and summing), and torch's own fp16 / bf16 casts.

Figures per row: compression time (median and 20th/80th percentiles) and its fraction of
the backward time; decode time; payload bytes and compression ratio (dense / payload) in
total and by layer kind (conv: >=3-D weights, fc: 2-D, other); bytes each rank sends and
receives at N; triton speed-up over reference; achieved bandwidth of the compress pass
against the device's peak. **Bytes model**: the least a fused pass must move: read the
gradient, read and write every state tensor once (residual, DGC's momentum and velocity),
write the payload; for error feedback in fp32 that is 12 B per element plus the payload,
DGC 20 B, a cast 6 B. Uncompressed tensors count zero.

Timing: CUDA: CUDA events around each call after ``--warmup`` calls, ``--reps`` samples;
CPU: ``time.perf_counter``. Output: a table on stdout, JSON (``--out``, default
``results/compress_vs_backward_<model>_<device>.json``) with device, versions, command,
timestamp and every figure, and a PNG chart beside it (needs matplotlib). Needs neither
Horovod nor a GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from bench.models import get_model, param_stats
from bench.one_rank import OneRankOfN, Timing, rank_grad
from hvdcomp.compressor import ChunkCodec
from hvdcomp.core.options import DEFAULT_BUCKET_CAP_MB, DEFAULT_MIN_COMPRESS_NUMEL
from hvdcomp.registry import COMPRESSORS, compression_from_name, compressor_class
from hvdcomp.core.traffic import allreduce_traffic, layer_kind

Tensor = torch.Tensor

#: Parameters benchmarked per compressor (others: their defaults, ``{}``).
DEFAULT_PARAMS: dict[str, list[dict]] = {
    "topk": [{"ratio": 0.01}, {"ratio": 0.001}],
    "randomk": [{"ratio": 0.01}, {"ratio": 0.001}],
    "dgc": [{"ratio": 0.01}, {"ratio": 0.001}],
    "scalecom": [{"ratio": 0.01}, {"ratio": 0.001}],
}

#: Peak memory bandwidth in GB/s by device name; first match wins (all substrings present).
PEAK_GBS: list[tuple[tuple[str, ...], float]] = [
    (("H200",), 4800.0),
    (("H100", "PCIe"), 2000.0),
    (("H100", "NVL"), 3900.0),
    (("H100",), 3350.0),  # SXM (HBM3)
    (("A100", "80GB", "PCIe"), 1935.0),
    (("A100", "SXM4-80GB"), 2039.0),
    (("A100",), 1555.0),
]

#: Rank counts for which the re-encoded sum width of compressed allreduce is recorded.
SUM_BITS_NS = [2, 3, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]


def peak_gbs(device_name: str) -> float | None:
    """Known peak memory bandwidth of ``device_name`` in GB/s, or None."""
    for keys, value in PEAK_GBS:
        if all(k.lower() in device_name.lower() for k in keys):
            return value
    return None


# ---- timing ------------------------------------------------------------------------------------


def summarize(samples_ms: list[float]) -> dict:
    """Median, 20th/80th percentile, min, max (ms) of timing samples."""
    s = sorted(samples_ms)

    def pct(q: float) -> float:
        if len(s) == 1:
            return s[0]
        pos = q * (len(s) - 1)
        lo = math.floor(pos)
        return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (pos - lo)

    return {"median": statistics.median(s), "p20": pct(0.2), "p80": pct(0.8), "min": s[0], "max": s[-1],
            "reps": len(s)}


class Timer:
    """Wall time of a callable on ``device``: CUDA events on GPUs, perf_counter on CPUs."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def elapsed_ms(self, a, b) -> float:
        if self.cuda:
            b.synchronize()
            return a.elapsed_time(b)
        return (b - a) * 1e3

    def run(self, fn: Callable[[], Any], reps: int, warmup: int) -> dict:
        for _ in range(warmup):
            fn()
        self.sync()
        samples = []
        for _ in range(reps):
            a = self.mark()
            fn()
            b = self.mark()
            self.sync()
            samples.append(self.elapsed_ms(a, b))
        return summarize(samples)


def time_forward_backward(spec, model, batch, timer: Timer, reps: int, warmup: int, amp: torch.dtype | None,
                          device: torch.device) -> tuple[dict, dict]:
    """(forward, backward) timing summaries; leaves the last step's gradients in ``p.grad``."""
    fwd, bwd = [], []
    for i in range(warmup + reps):
        model.zero_grad(set_to_none=True)
        timer.sync()
        a = timer.mark()
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = spec.loss(model, batch)
        b = timer.mark()
        loss.backward()
        c = timer.mark()
        timer.sync()
        if i >= warmup:
            fwd.append(timer.elapsed_ms(a, b))
            bwd.append(timer.elapsed_ms(b, c))
        del loss
    return summarize(fwd), summarize(bwd)


# ---- what users run today ------------------------------------------------------------------------


class _Eager:
    """A baseline written as most libraries write it, with :class:`bench.one_rank.OneRankOfN`'s
    interface. Tensors below ``min_numel`` go uncompressed (fp32 allreduce), as ours."""

    def __init__(self, names, grads, nranks, min_numel=DEFAULT_MIN_COMPRESS_NUMEL, noise=0.2):
        self.nranks, self.noise = nranks, noise
        self.names, self.grads = names, grads
        self.main = [i for i, g in enumerate(grads) if g.numel() >= min_numel]
        self.small = [i for i, g in enumerate(grads) if g.numel() < min_numel]
        self.payload = {i: grads[i].numel() * grads[i].element_size() for i in self.small}

    def grad(self, rank: int, i: int) -> Tensor:
        return rank_grad(self.grads[i], rank, i, self.noise)

    def record(self, step: int) -> None:
        self.summed = {i: sum(self.grad(r, i) for r in range(self.nranks)) for i in self.small}

    def decode_small(self) -> None:
        for i in self.small:
            self.summed[i].to(torch.float32)

    def decode_two(self, timer) -> float:
        return 0.0

    def by_kind(self) -> dict:
        acc: dict[str, list[int]] = {}
        for i, g in enumerate(self.grads):
            a = acc.setdefault(layer_kind(tuple(g.shape)), [0, 0, 0])
            a[0] += g.numel() * g.element_size()
            a[1] += self.payload[i]
            a[2] += 1
        return {k: {"dense_bytes": d, "payload_bytes": p, "tensors": n, "ratio": d / p if p else float("inf")}
                for k, (d, p, n) in sorted(acc.items())}

    def wire(self, sum_bits_ns) -> dict:
        n = self.nranks
        dense = sum(self.payload[i] for i in self.small)
        out = {"allreduce_bytes": dense, "allreduce_tensors": len(self.small), "broadcast_bytes": 0, "broadcasts": 0,
               "allgather_bytes": 0.0, "allgather_buckets": 0, "car_numel": 0, "car_bits": None,
               "car_payload_bytes": 0, "car_buckets": 0, "car_sum_bits": None, "scale_allreduces": 0}
        moved = allreduce_traffic(dense, n)[0]
        out["sent_bytes"], out["received_bytes"] = moved, moved
        return out


class EagerTopK(_Eager):
    """Top-k with error feedback as most libraries write it (GRACE-style, eager torch):
    ``x = r + g``; ``torch.topk(|x|)``; gather; ``r = x - zeros.scatter(idx, vals)``; payload
    fp32 values + int64 indices through allgather; decode: scatter each rank's payload into a
    dense tensor and sum."""

    def __init__(self, ratio: float, names, grads, nranks, min_numel=DEFAULT_MIN_COMPRESS_NUMEL, noise=0.2):
        super().__init__(names, grads, nranks, min_numel, noise)
        self.ratio = ratio
        self.residual = {i: torch.zeros(grads[i].numel(), dtype=torch.float32, device=grads[i].device)
                         for i in self.main}

    def _compress(self, g: Tensor, residual: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = residual + g.reshape(-1)
        k = max(1, int(x.numel() * self.ratio))
        _, idx = torch.topk(x.abs(), k, sorted=False)
        values = torch.gather(x, 0, idx)
        dense = torch.zeros_like(x).scatter_(0, idx, values)
        return values, idx, x - dense

    def record(self, step: int) -> None:
        super().record(step)
        self.payloads = {i: [self._compress(self.grad(r, i), self.residual[i] if r == 0 else
                                            torch.zeros_like(self.residual[i]))[:2] for r in range(self.nranks)]
                         for i in self.main}
        for i in self.main:
            values, idx = self.payloads[i][0]
            self.payload[i] = values.numel() * values.element_size() + idx.numel() * idx.element_size()

    def _decode(self, nranks: int) -> None:
        for i in self.main:
            n = self.grads[i].numel()
            sum(torch.zeros(n, dtype=torch.float32, device=self.grads[i].device).scatter_(0, idx, values)
                for values, idx in self.payloads[i][:nranks])

    def replay(self, step: int, timer) -> Timing:
        a = timer.mark()
        for i in self.main:
            _, _, self.residual[i] = self._compress(self.grads[i], self.residual[i])
        b = timer.mark()
        self.decode_small()
        c = timer.mark()
        self._decode(self.nranks)
        d = timer.mark()
        return Timing(timer.elapsed_ms(a, b), {"allreduce": timer.elapsed_ms(b, c), "allgather": timer.elapsed_ms(c, d)})

    def decode_two(self, timer) -> float:
        a = timer.mark()
        self._decode(2)
        b = timer.mark()
        return timer.elapsed_ms(a, b)

    def touched_bytes(self) -> int:
        return sum(self.grads[i].numel() * self.grads[i].element_size() + 8 * self.grads[i].numel() + self.payload[i]
                   for i in self.main)

    def wire(self, sum_bits_ns) -> dict:
        n = self.nranks
        out = super().wire(sum_bits_ns)
        ag = sum(self.payload[i] for i in self.main)
        out.update({"allgather_bytes": float(ag), "allgather_buckets": 1})
        out["sent_bytes"] += (n - 1) * ag
        out["received_bytes"] += (n - 1) * ag
        return out

    def description(self) -> str:
        return "allgather"


class EagerCast(_Eager):
    """torch's own cast, ``g.to(dtype)`` per tensor, summed by allreduce, cast back to fp32."""

    def __init__(self, dtype: torch.dtype, names, grads, nranks, min_numel=DEFAULT_MIN_COMPRESS_NUMEL, noise=0.2):
        super().__init__(names, grads, nranks, min_numel, noise)
        self.dtype = dtype

    def record(self, step: int) -> None:
        super().record(step)
        for i in self.main:
            self.summed[i] = sum(self.grad(r, i).to(self.dtype) for r in range(self.nranks))
            self.payload[i] = self.grads[i].numel() * torch.empty((), dtype=self.dtype).element_size()

    def replay(self, step: int, timer) -> Timing:
        a = timer.mark()
        for i in self.main:
            self.grads[i].to(self.dtype)
        b = timer.mark()
        for i in self.main + self.small:
            self.summed[i].to(torch.float32)
        c = timer.mark()
        return Timing(timer.elapsed_ms(a, b), {"allreduce": timer.elapsed_ms(b, c)})

    def touched_bytes(self) -> int:
        return sum(self.grads[i].numel() * self.grads[i].element_size() + self.payload[i] for i in self.main)

    def wire(self, sum_bits_ns) -> dict:
        out = super().wire(sum_bits_ns)
        cast = sum(self.payload[i] for i in self.main)
        out["allreduce_bytes"] += cast
        out["allreduce_tensors"] += len(self.main)
        moved = allreduce_traffic(cast, self.nranks)[0]
        out["sent_bytes"] += moved
        out["received_bytes"] += moved
        return out

    def description(self) -> str:
        return "allreduce"


BASELINES: list[tuple[str, Callable]] = [
    ("eager topk+EF 1%", lambda *a, **k: EagerTopK(0.01, *a, **k)),
    ("eager topk+EF 0.1%", lambda *a, **k: EagerTopK(0.001, *a, **k)),
    ("torch fp16 cast", lambda *a, **k: EagerCast(torch.float16, *a, **k)),
    ("torch bf16 cast", lambda *a, **k: EagerCast(torch.bfloat16, *a, **k)),
]


# ---- configurations ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Config:
    label: str
    name: str
    params: dict
    collective: str = "auto"


def _label(name: str, params: dict) -> str:
    if "ratio" in params:
        return f"{name} {params['ratio'] * 100:g}%"
    return name + "".join(f" {k}={v}" for k, v in params.items())


def discover(names: list[str] | None = None) -> tuple[list[Config], list[dict], list[dict]]:
    """(configs, skipped, errors) for the registered compressors (or ``names``): a compressor
    whose module does not exist yet is skipped; one that fails to import is an error."""
    configs, skipped, errors = [], [], []
    for name in names or list(COMPRESSORS):
        try:
            cls = compressor_class(name)
        except ModuleNotFoundError as err:
            module = f"hvdcomp.compressors.{COMPRESSORS.get(name, ':').split(':')[0]}"
            if err.name == module:
                skipped.append({"label": name, "reason": f"module {module} does not exist yet"})
                continue
            errors.append({"label": name, "backend": None, "error": repr(err)})
            continue
        except Exception as err:  # noqa: BLE001 - a broken module is reported, not fatal
            errors.append({"label": name, "backend": None, "error": repr(err)})
            continue
        for params in DEFAULT_PARAMS.get(name, [{}]):
            label = _label(name, params)
            if issubclass(cls, ChunkCodec) and cls.transport == "allgather":
                configs.append(Config(label, name, params, "allgather"))
                configs.append(Config(label, name, params, "compressed_allreduce"))
            else:
                configs.append(Config(label, name, params))
    return configs, skipped, errors


@contextlib.contextmanager
def kernel_backend(backend: str):
    """Set ``HVDCOMP_KERNELS`` for the duration (read by hvdcomp.kernels on every call)."""
    old = os.environ.get("HVDCOMP_KERNELS")
    os.environ["HVDCOMP_KERNELS"] = backend
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HVDCOMP_KERNELS", None)
        else:
            os.environ["HVDCOMP_KERNELS"] = old


def measure_method(sim, timer: Timer, reps: int, warmup: int, step: int) -> dict:
    """Record the other ranks, then time rank 0's compress and each decode part."""
    sim.record(step)
    steps = itertools.count(step + 1)
    for _ in range(warmup):
        sim.replay(next(steps), timer)
    timings = [sim.replay(next(steps), timer) for _ in range(reps)]
    parts = sorted({p for t in timings for p in t.decode_ms})
    decode = {p: summarize([t.decode_ms.get(p, 0.0) for t in timings]) for p in parts}
    if "allgather" in parts:
        decode["allgather@2"] = summarize([sim.decode_two(timer) for _ in range(reps)])
    kinds = sim.by_kind()
    dense = sum(k["dense_bytes"] for k in kinds.values())
    payload = sum(k["payload_bytes"] for k in kinds.values())
    return {
        "transport": sim.description(),
        "compress_ms": summarize([t.compress_ms for t in timings]),
        "decode_ms": decode,
        "decode_total_ms": sum(v["median"] for k, v in decode.items() if "@" not in k),
        "dense_bytes": dense,
        "payload_bytes": payload,
        "ratio": dense / payload if payload else float("inf"),
        "by_kind": kinds,
        "wire": sim.wire(SUM_BITS_NS),
        "touched_bytes": sim.touched_bytes(),
    }


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _short_error(err: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(err), err)).strip()


def run_benchmark(model: str = "small", device: str = "cpu", batch: int | None = None, nranks: int = 8,
                  backends: list[str] | None = None, compressors: list[str] | None = None, reps: int = 10,
                  warmup: int = 3, fb_reps: int | None = None, amp: str | None = None, step: int = 10000,
                  noise: float = 0.2, min_numel: int = DEFAULT_MIN_COMPRESS_NUMEL,
                  bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB, baselines: bool = True,
                  peak: float | None = None, log: Callable[[str], None] = print,
                  configs: list[Config] | None = None) -> dict:
    """Run the benchmark and return its record (see the module docstring); writes nothing.
    ``configs`` replaces the discovered compressor list (``compressors`` filters it by name)."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")
    spec = get_model(model)
    batch = batch or spec.default_batch
    amp = amp or ("bf16" if dev.type == "cuda" else "none")
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    backends = backends or (["triton", "reference"] if dev.type == "cuda" else ["reference"])
    timer = Timer(dev)

    torch.manual_seed(0)
    net = spec.build().to(dev)
    data = spec.batch(batch, dev)
    fwd, bwd = time_forward_backward(spec, net, data, timer, fb_reps or max(reps, 5), max(warmup, 1), amp_dtype,
                                     dev)
    del data
    named = [(n, p.grad.detach()) for n, p in net.named_parameters() if p.grad is not None]
    names, grads = [n for n, _ in named], [g for _, g in named]
    nparams, ntensors = param_stats(net)
    log(f"{spec.name}: {nparams:,} parameters in {ntensors} tensors, {spec.describe(batch)}; "
        f"forward {fwd['median']:.2f} ms, backward {bwd['median']:.2f} ms (median of {bwd['reps']})")

    if configs is None:
        configs, skipped, errors = discover(compressors)
    else:
        skipped, errors = [], []
    for s in skipped:
        log(f"  skipped {s['label']}: {s['reason']}")
    rows: list[dict] = []
    jobs: list[tuple[str, str, str, Callable[[], Any], dict]] = []
    for cfg in configs:
        for backend in backends:
            def make_sim(cfg=cfg):
                return OneRankOfN(lambda: compression_from_name(cfg.name, **cfg.params), names, grads, nranks,
                                  min_numel, bucket_cap_mb, cfg.collective, noise)
            jobs.append((cfg.label, cfg.name, backend, make_sim, {"params": cfg.params, "collective": cfg.collective}))
    if baselines:
        for label, make in BASELINES:
            jobs.append((label, "baseline", "torch", lambda make=make: make(names, grads, nranks, min_numel,
                                                                             noise=noise), {"params": {}}))
    for label, name, backend, make_sim, extra in jobs:
        t0 = time.perf_counter()
        try:
            with kernel_backend(backend if backend in ("triton", "reference") else "reference"):
                sim = make_sim()
                result = measure_method(sim, timer, reps, warmup, step)
        except ModuleNotFoundError as err:
            if err.name and err.name.startswith("hvdcomp.kernels."):
                skipped.append({"label": label, "backend": backend, "reason": f"kernel module {err.name} does not exist yet"})
                log(f"  skipped {label} [{backend}]: kernel module {err.name} does not exist yet")
            else:
                errors.append({"label": label, "backend": backend, "error": _short_error(err),
                               "traceback": traceback.format_exc()})
                log(f"  ERROR {label} [{backend}]: {_short_error(err)}")
            continue
        except Exception as err:  # noqa: BLE001 - one broken compressor must not stop the others
            errors.append({"label": label, "backend": backend, "error": _short_error(err),
                           "traceback": traceback.format_exc()})
            log(f"  ERROR {label} [{backend}]: {_short_error(err)}")
            continue
        finally:
            sim = None
            _release(dev)
        row = {"label": label, "compressor": name, "backend": backend, **extra, **result,
               "wall_s": time.perf_counter() - t0}
        rows.append(row)

    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine())
    peak = peak if peak is not None else (peak_gbs(device_name) if dev.type == "cuda" else None)
    for row in rows:
        c = row["compress_ms"]["median"]
        row["compress_over_backward"] = c / bwd["median"]
        row["gbs"] = row["touched_bytes"] / (c * 1e-3) / 1e9 if row["touched_bytes"] and c > 0 else None
        row["peak_fraction"] = row["gbs"] / peak if row["gbs"] and peak else None
        ref = next((r for r in rows if r["backend"] == "reference" and r["label"] == row["label"]
                    and r.get("collective") == row.get("collective")), None)
        row["speedup_vs_reference"] = (ref["compress_ms"]["median"] / c if row["backend"] == "triton" and ref and c > 0
                                       else None)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "model": spec.name, "batch": batch, "input": spec.describe(batch), "params": nparams, "tensors": ntensors,
        "device": dev.type, "device_name": device_name, "torch": torch.__version__, "triton": triton_version,
        "python": platform.python_version(), "cpu_threads": torch.get_num_threads(), "amp": amp,
        "nranks": nranks, "reps": reps, "warmup": warmup, "step": step, "noise": noise,
        "min_compress_numel": min_numel, "bucket_cap_mb": bucket_cap_mb, "peak_gbs": peak,
        "forward_ms": fwd, "backward_ms": bwd,
        "bytes_model": "read gradient + read and write each state tensor + write payload (uncompressed tensors: 0)",
        "timing": "CUDA events" if dev.type == "cuda" else "time.perf_counter",
        "rows": rows, "skipped": skipped, "errors": errors,
    }


# ---- output ----------------------------------------------------------------------------------------


def _fmt(x, spec: str, empty: str = "-") -> str:
    return empty if x is None else format(x, spec)


def format_table(record: dict) -> str:
    n = record["nranks"]
    head = (f"{'method':<20}{'kernels':<10}{'collective':<21}{'compress ms':>12}{'[p20, p80]':>20}{'/bwd':>8}"
            f"{f'decode N={n}':>12}{'payload MB':>12}{'ratio':>8}{'conv':>8}{'fc':>8}{'other':>7}"
            f"{'GB/s':>8}{'%peak':>7}{'vs ref':>8}")
    lines = [
        f"{record['model']} ({record['input']}), {record['params']:,} params in {record['tensors']} tensors, "
        f"{record['device_name']} [{record['device']}], amp {record['amp']}",
        f"forward {record['forward_ms']['median']:.2f} ms, backward {record['backward_ms']['median']:.2f} ms; "
        f"{n} simulated ranks; tensors < {record['min_compress_numel']} elements uncompressed; "
        f"dense {record['rows'][0]['dense_bytes'] / 1e6:.1f} MB" if record["rows"] else "",
        head, "-" * len(head)]
    for r in record["rows"]:
        c = r["compress_ms"]
        kinds = r["by_kind"]
        lines.append(
            f"{r['label']:<20}{r['backend']:<10}{r['transport']:<21}{c['median']:>12.3f}"
            f"{'[%.3f, %.3f]' % (c['p20'], c['p80']):>20}{r['compress_over_backward'] * 100:>7.1f}%"
            f"{r['decode_total_ms']:>12.3f}{r['payload_bytes'] / 1e6:>12.3f}{r['ratio']:>8.1f}"
            + "".join(f"{kinds[k]['ratio']:>{w}.1f}" if k in kinds else f"{'-':>{w}}"
                      for k, w in (("conv", 8), ("fc", 8), ("other", 7)))
            + f"{_fmt(r['gbs'], '.1f'):>8}{_fmt(r['peak_fraction'] and r['peak_fraction'] * 100, '.1f'):>7}"
            f"{_fmt(r['speedup_vs_reference'], '.1f'):>8}")
    for s in record["skipped"]:
        lines.append(f"skipped: {s['label']}{' [' + s['backend'] + ']' if s.get('backend') else ''}: {s['reason']}")
    for e in record["errors"]:
        lines.append(f"ERROR: {e['label']}{' [' + e['backend'] + ']' if e.get('backend') else ''}: {e['error']}")
    lines.append(f"GB/s: {record['bytes_model']}; peak {_fmt(record['peak_gbs'], '.0f', 'unknown')} GB/s; "
                 f"vs ref: reference / triton compress time")
    return "\n".join(lines)


def plot(record: dict, path: Path) -> str | None:
    """Bar chart of compress and decode time per method against the backward time; returns
    a note instead when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no chart (pip install -r launch/requirements.txt)"
    rows = record["rows"]
    if not rows:
        return "no rows: no chart"
    labels = [f"{r['label']} [{r['backend']}{', ' + r['transport'] if r['transport'] != 'allreduce' else ''}]"
              for r in rows]
    y = range(len(rows))
    fig, ax = plt.subplots(figsize=(10, 0.32 * len(rows) + 1.8))
    floor = 1e-3
    ax.barh([i - 0.2 for i in y], [max(r["compress_ms"]["median"], floor) for r in rows], height=0.4,
            label="compress (one rank, one step)")
    ax.barh([i + 0.2 for i in y], [max(r["decode_total_ms"], floor) for r in rows], height=0.4,
            label=f"decode of N={record['nranks']} payloads")
    bwd = record["backward_ms"]["median"]
    ax.axvline(bwd, color="k", linestyle="--", label=f"backward {bwd:.1f} ms")
    ax.set_xscale("log")
    ax.set_yticks(list(y), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ms (log scale)")
    ax.set_title(f"{record['model']}, batch {record['batch']}, {record['device_name']}", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="compression time vs backward time, per compressor",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="resnet50", help="resnet50, gpt2-medium (transformer) or small")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None, help="default: the model's (64, 8, 32)")
    p.add_argument("--nranks", type=int, default=8, help="simulated ranks whose payloads are decoded")
    p.add_argument("--backends", nargs="+", default=None, choices=["triton", "reference"],
                   help="default: triton and reference on CUDA, reference on CPU")
    p.add_argument("--compressors", nargs="+", default=None, help="default: every registered compressor")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 10 CUDA, 3 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 3 CUDA, 1 CPU)")
    p.add_argument("--amp", choices=["bf16", "fp16", "none"], default=None,
                   help="autocast of forward (default bf16 on CUDA, none on CPU)")
    p.add_argument("--step", type=int, default=10000, help="training step passed to the compressors (past warm-ups)")
    p.add_argument("--noise", type=float, default=0.2, help="perturbation of the other ranks' gradients (x rms)")
    p.add_argument("--min-compress-numel", type=int, default=DEFAULT_MIN_COMPRESS_NUMEL)
    p.add_argument("--bucket-cap-mb", type=float, default=DEFAULT_BUCKET_CAP_MB)
    p.add_argument("--peak-gbs", type=float, default=None, help="device peak memory bandwidth (default: table)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-baselines", action="store_true", help="skip the eager top-k and torch cast rows")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--out", default=None, help="JSON path (default results/compress_vs_backward_<model>_<device>.json)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="small model on CPU, 2 reps: a crash check for CI, not a timing")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.model, args.device = "small", "cpu"
        args.reps = args.reps or 2
        args.warmup = 1 if args.warmup is None else args.warmup
        args.batch = args.batch or 8
    cuda = args.device.startswith("cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    if not cuda and args.backends and "triton" in args.backends:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels on CPU tensors (slow)
    reps = args.reps or (10 if cuda else 3)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    record = run_benchmark(args.model, args.device, args.batch, args.nranks, args.backends, args.compressors, reps,
                           warmup, None, args.amp, args.step, args.noise, args.min_compress_numel,
                           args.bucket_cap_mb, not args.no_baselines, args.peak_gbs)
    record["command"] = " ".join(["python -m bench.compress_vs_backward"]
                                 + (list(argv) if argv is not None else sys.argv[1:]))
    record["timestamp"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    table = format_table(record)
    print(table)
    record["table"] = table
    out = Path(args.out or f"results/compress_vs_backward_{record['model']}_{record['device']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    if not args.no_plot:
        note = plot(record, out.with_suffix(".png"))
        record["chart"] = None if note else str(out.with_suffix(".png"))
        print(note or f"chart: {out.with_suffix('.png')}")
    out.write_text(json.dumps(record, indent=1, default=str))
    print(f"results: {out}")
    return 1 if record["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
