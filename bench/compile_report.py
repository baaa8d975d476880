"""Every Triton kernel through Triton's real GPU compiler, without a GPU: what compiled,
for which targets, and each kernel's registers, spills and shared memory.

    python -m bench.compile_report                        # sm_80 + sm_90, all operations
    python -m bench.compile_report --targets 90 --ops topk_indices,adacomp_pack_
    python -m bench.compile_report --fresh-cache          # empty Triton cache: compile everything now

Each case of :mod:`bench.compile_cases` calls an operation's real launch code with CPU (or
meta) tensors while :func:`bench.compile_only.compile_only` makes Triton believe it drives a
CUDA device of compute capability 8.0 or 9.0; every specialization a GPU run of that case
would launch is compiled to a cubin (TTIR, TTGIR, LLVM IR, PTX, ``ptxas``), and nothing is
launched. Then, for every ``@triton.jit`` function in the kernel modules:

* a **kernel** (launched by the launch code) must have compiled at least one specialization
  on every target;
* a **helper** (called from kernels: ``load_f32``, ``_bin_max``, ...) must be reachable from
  a kernel that compiled.

For ``--usage-target`` (default 90) each compiled specialization's resource usage is read:
registers per thread, stack and local memory and static shared memory (``cuobjdump
-res-usage`` of the cubin Triton built), spill stores/loads (``ptxas -v`` on its PTX with
Triton's options) and Triton's shared-memory allocation (metadata). The table shows the
range over a kernel's specializations; a kernel that spills prints why (:data:`SPILL_NOTES`),
or that nobody has explained it yet.

Writes ``--out`` (default ``results/compile_report.json``): targets, Triton/torch/Python
versions, the command, timestamp, seconds per target, every case (ok or its error), every
kernel's specializations per target with their signature, constexprs and usage. Exit status
1 when a case failed, a kernel or helper never compiled, or a launch warned (the top-k
histogram's fallback warns when ``tl.histogram`` fails to compile). Needs Triton, no GPU,
and must not run under ``TRITON_INTERPRET=1`` (it unsets it when Triton is not yet imported).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from bench._record import emit

#: Why a kernel spills, for each kernel known to (``module.function`` -> note).
SPILL_NOTES: dict[str, str] = {
    "adacomp._pack_kernel": (
        "Triton 3.6: the [BINS, CHUNK] tile is 4096 elements over 8 warps, 16 per thread, and pass 2 keeps "
        "for each x, g, the selection, the in-bin rank from a row-wise cumsum, and the 64-bit element index and "
        "destination (tensors and payloads may pass 2**31 elements) live at once; with 64 bins of 64 columns "
        "(L_T 33-64, the conv default 50 included) that reaches the 255-register cap and ptxas spills 64 B per "
        "thread (136 B before the in-bin ranks became int32). Triton 3.9 fits that tile in 247 registers but "
        "spills 4 B in the 1 x 4096 tile (L_T >= 4096, 16-bit codes) at 128 registers, ptxas's own choice."),
    "casts._cast_bf16_kernel": (
        "Triton 3.6, fp16-input specialization only (a path the compressors do not take: they cast to fp32 "
        "first): ptxas allocates 64 registers, far below the 255 cap, and spills 12 B; its own choice, no "
        "register limit is set."),
    "topk._gather_abs_kernel": (
        "Triton 3.6, int32 sample indices only (DGC samples int64): ptxas allocates 64 registers and spills 4 B; "
        "the kernel reads s = 1 % of n elements, so it costs nothing measurable."),
    "topk._topk_write_kernel": (
        "Triton 3.9, the n = 1 specialization only (a one-element tensor, n folded to the constant 1; the "
        "compressors leave tensors under 1024 elements uncompressed): ptxas allocates 64 registers and spills "
        "24 B. Every other specialization fits without spilling."),
}


def _interpreter_guard() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        if "triton" in sys.modules:
            raise SystemExit("bench.compile_report: Triton was imported under TRITON_INTERPRET=1, so its kernels "
                             "are interpreted and cannot compile; run it in a process without TRITON_INTERPRET")
        del os.environ["TRITON_INTERPRET"]


def _describe(kernel) -> dict:
    src = kernel.src
    consts = getattr(src, "constants", None) or getattr(src, "constexprs", {}) or {}
    return {
        "hash": kernel.hash,
        "signature": {k: str(v) for k, v in src.signature.items()},
        "constexprs": {str(k): repr(v) for k, v in consts.items()},
        "attrs": {str(k): repr(v) for k, v in (getattr(src, "attrs", None) or {}).items()},
        "num_warps": kernel.metadata.num_warps,
        "num_stages": kernel.metadata.num_stages,
    }


def run_target(arch: int, cases: list, log=print) -> tuple[list[dict], float]:
    """Run every case under the compile-only driver for ``arch``; returns (case rows, seconds)."""
    import hvdcomp.kernels

    from bench.compile_only import compile_only

    kernels_dir = Path(hvdcomp.kernels.__file__).resolve().parent  # its warnings fail a case
    rows = []
    t0 = time.perf_counter()
    with compile_only(arch):
        for op, label, call in cases:
            row = {"target": f"sm_{arch}", "op": op, "case": label}
            t = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    call()
                    row["ok"] = True
                except Exception as exc:  # one failing case must not hide the others
                    row["ok"] = False
                    row["error"] = f"{type(exc).__name__}: {exc}"[:4000]
            if caught:
                row["warnings"] = [f"{Path(w.filename).name}: {w.message}"[:1000] for w in caught]
            # A warning from the package's own launch code is a failure (the top-k histogram's
            # fallback when tl.histogram does not compile); Triton's own notices are recorded.
            if any(Path(w.filename).resolve().is_relative_to(kernels_dir) for w in caught):
                row["ok"] = False
            row["seconds"] = round(time.perf_counter() - t, 3)
            if not row["ok"]:
                log(f"  FAILED sm_{arch} {op} [{label}]: {row.get('error') or row['warnings']}")
            rows.append(row)
    return rows, time.perf_counter() - t0


def collect(targets: list[int], usage_target: int | None) -> tuple[dict, dict]:
    """Per JITFunction and target: the compiled specializations (and usage on ``usage_target``).
    Returns (kernels, missing) where missing maps ``sm_<arch>`` to the names never compiled."""
    from bench.compile_only import callees, compiled_kernels, jit_functions, ptxas_usage

    fns = jit_functions()
    report: dict = {}
    missing: dict = {}
    for arch in targets:
        roots = {name for name, fn in fns.items() if compiled_kernels(fn, arch)}
        reached = {id(g) for name in roots for g in callees(fns[name])}
        missing[f"sm_{arch}"] = sorted(n for n, fn in fns.items() if n not in roots and id(fn) not in reached)
        for name, fn in fns.items():
            role = "kernel" if name in roots else "helper" if id(fn) in reached else "uncompiled"
            entry = report.setdefault(name, {"role": role, "targets": {}})
            if role == "kernel" or entry["role"] == "uncompiled":
                entry["role"] = role
            specs = []
            for k in compiled_kernels(fn, arch):
                spec = _describe(k)
                if arch == usage_target:
                    spec["usage"] = ptxas_usage(k, arch)
                specs.append(spec)
            entry["targets"][f"sm_{arch}"] = {"specializations": len(specs), "compiled": specs,
                                              "reached_from_kernel": id(fn) in reached}
    return report, missing


def _usage_summary(entry: dict, usage_target: int) -> dict | None:
    specs = [s["usage"] for s in entry["targets"].get(f"sm_{usage_target}", {}).get("compiled", []) if "usage" in s]
    if not specs:
        return None
    return {
        "regs": (min(u["regs"] for u in specs), max(u["regs"] for u in specs)),
        "spill_stores": max(u["spill_stores"] for u in specs),
        "spill_loads": max(u["spill_loads"] for u in specs),
        "local": max(u["local"] for u in specs),
        "stack": max(u["stack"] for u in specs),
        "shared": max(u["shared"] for u in specs),
        "static_smem": max(u["static_smem"] for u in specs),
    }


def format_table(record: dict) -> str:
    targets = record["targets"]
    ut = record["usage_target"]
    lines = [f"Triton {record['versions']['triton']} compile-only (no GPU), targets "
             + ", ".join(targets) + f"; usage on sm_{ut}" if ut else "",
             f"{'kernel':<38}" + "".join(f"{'specs ' + t:>13}" for t in targets)
             + f"{'regs':>10}{'spill st/ld B':>15}{'local B':>9}{'shared B':>10}{'warps':>7}"]
    notes = []
    for name, entry in sorted(record["kernels"].items()):
        if entry["role"] != "kernel":
            continue
        counts = "".join(f"{entry['targets'][t]['specializations']:>13}" for t in targets)
        s = entry.get("usage_summary")
        if s:
            warps = sorted({c["num_warps"] for c in entry["targets"][f"sm_{ut}"]["compiled"]})
            regs = f"{s['regs'][0]}-{s['regs'][1]}" if s["regs"][0] != s["regs"][1] else str(s["regs"][0])
            lines.append(f"{name:<38}{counts}{regs:>10}{str(s['spill_stores']) + '/' + str(s['spill_loads']):>15}"
                         f"{s['local']:>9}{s['shared']:>10}{','.join(map(str, warps)):>7}")
            if s["spill_stores"] or s["spill_loads"]:
                notes.append(f"  {name} spills: {SPILL_NOTES.get(name, 'no explanation recorded yet (SPILL_NOTES)')}")
        else:
            lines.append(f"{name:<38}{counts}")
    helpers = sorted(n for n, e in record["kernels"].items() if e["role"] == "helper")
    lines.append(f"helpers compiled inside the kernels above: {', '.join(helpers)}")
    lines.extend(["spills:"] + notes if notes else ["spills: none on sm_%s" % ut if ut else ""])
    ok = sum(c["ok"] for c in record["cases"])
    lines.append(f"cases: {ok}/{len(record['cases'])} ok; "
                 + "; ".join(f"{t}: {record['seconds'][t]:.1f} s" for t in targets)
                 + f"; usage {record['seconds'].get('usage', 0.0):.1f} s")
    for t, names in record["missing"].items():
        if names:
            lines.append(f"NEVER COMPILED on {t}: {', '.join(names)}")
    for c in record["cases"]:
        if not c["ok"]:
            lines.append(f"FAILED {c['target']} {c['op']} [{c['case']}]: {c.get('error') or c.get('warnings')}"[:400])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="compile every Triton kernel for sm_80/sm_90 without a GPU",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--targets", default="80,90", help="compute capabilities, comma list (80, 90)")
    p.add_argument("--ops", default=None, help="comma list of operations (default: every case)")
    p.add_argument("--usage-target", type=int, default=90, help="capability whose registers/spills are read "
                   "(0: none)")
    p.add_argument("--fresh-cache", action="store_true", help="compile into an empty Triton cache")
    p.add_argument("--out", default="results/compile_report.json", help="JSON output path")
    args = p.parse_args(argv)
    _interpreter_guard()
    if args.fresh_cache:
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="hvdcomp-triton-cache-")
    import triton

    from bench.compile_cases import cases

    targets = [int(t) for t in args.targets.split(",") if t.strip()]
    usage_target = args.usage_target if args.usage_target in targets else None
    todo = cases()
    if args.ops:
        want = {o.strip() for o in args.ops.split(",")}
        todo = [c for c in todo if c[0] in want]
        if not todo:
            p.error(f"no case for operations {sorted(want)}")
    rows, seconds = [], {}
    for arch in targets:
        r, s = run_target(arch, todo)
        rows += r
        seconds[f"sm_{arch}"] = s
    t = time.perf_counter()
    kernels, missing = collect(targets, usage_target)
    seconds["usage"] = time.perf_counter() - t
    if args.ops:  # a subset of the cases cannot be expected to reach every kernel
        missing = {k: [] for k in missing}
    for entry in kernels.values():
        if usage_target:
            entry["usage_summary"] = _usage_summary(entry, usage_target)
    record = {
        "device": "none: compile-only driver (bench.compile_only), CUDA targets "
                  + ", ".join(f"sm_{a}" for a in targets),
        "targets": [f"sm_{a}" for a in targets],
        "usage_target": usage_target,
        "versions": {"triton": triton.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "command": " ".join(["python -m bench.compile_report"] + (list(argv) if argv is not None else sys.argv[1:])),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "triton_cache": os.environ.get("TRITON_CACHE_DIR", "default (~/.triton/cache)"),
        "seconds": seconds,
        "cases": rows,
        "kernels": kernels,
        "missing": missing,
        "spill_notes": SPILL_NOTES,
    }
    emit(record, format_table(record), args.out)
    failed = any(not c["ok"] for c in rows) or any(missing.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
