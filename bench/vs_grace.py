"""Our sender side against GRACE's eager torch compressors, side by side in one process.

    HVDCOMP_GRACE_PATH=/path/to/grace nice -n 10 python -m bench.vs_grace      # ResNet-50, CPU
    python -m bench.vs_grace --model small --reps 1 --warmup 0 --out x.json    # seconds (tests)

GRACE (Xu, Ho, Abdelmoniem, Dutta, Bergou, Karatsenidis, Canini and Kalnis, "GRACE: A
Compressed Communication Framework for Distributed Machine Learning", ICDCS 2021) is the research library most users
try first; its torch compressors run eagerly on whatever device the gradient is on. It is not
a dependency and is never vendored: point ``HVDCOMP_GRACE_PATH`` (or ``--grace``) at a
checkout of https://github.com/sands-lab/grace (the directory holding ``grace_dl``). Without
it the bench prints "peer not found" and still measures ours.

What one step is, for every gradient tensor of the model (all of them, none left
uncompressed, as GRACE does):

* **ours**: the calls :mod:`hvdcomp.core` makes on the sender before the first collective
  (``local_scale`` into ``state["shared_scale"]`` for a :class:`~hvdcomp.compressor.SharedScale`
  method, on one rank that is the shared scale; then ``encode``, the size read and ``pack``
  into a fresh buffer, or ``encode_dense``), error feedback and state updates included;
* **GRACE**: ``Communicator.send_step`` without the send: ``memory.compensate``,
  ``compressor.compress``, ``memory.update`` (ResidualMemory for the error-feedback methods,
  DgcMemory's momentum correction for DGC when ``horovod.torch`` imports, else
  ResidualMemory; NoneMemory for fp16 and TernGrad).

The two steps alternate within each repetition (who goes first alternates too), so load on a
shared machine hits both alike; before each repetition every gradient's version counter is
bumped, as backward's in-place write would (nothing computed from last step's gradient may
be reused);
the ratio is GRACE's median step time over ours. Payload bytes are the sum over tensors of
what each would send (GRACE: every tensor its compressor returns; ours: the packed bytes or
the dense payload). Gradients: the model's own from one backward (``--grads backward``) or
seeded ``randn`` of its shapes (``--grads randn``). Output: a table, and JSON (``--out``,
default ``results/vs_grace_<model>_<device>.json``) with device, versions, command, peer
path and every figure.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.compress_vs_backward import summarize
from bench.models import get_model
from hvdcomp import kernels
from hvdcomp.compressor import SharedScale, TensorInfo
from hvdcomp.registry import compression_from_name

Tensor = torch.Tensor

#: label -> (our registry name and parameters, GRACE compressor (module, class, args), GRACE memory)
METHODS: dict[str, tuple[str, dict, tuple[str, str, tuple], str]] = {
    "fp16": ("fp16", {}, ("fp16", "FP16Compressor", ()), "none"),
    "topk 1%": ("topk", {"ratio": 0.01}, ("topk", "TopKCompressor", (0.01,)), "residual"),
    "topk 0.1%": ("topk", {"ratio": 0.001}, ("topk", "TopKCompressor", (0.001,)), "residual"),
    "dgc 0.1%": ("dgc", {"ratio": 0.001}, ("dgc", "DgcCompressor", (0.001,)), "dgc"),
    "randomk 1%": ("randomk", {"ratio": 0.01}, ("randomk", "RandomKCompressor", (0.01,)), "residual"),
    "terngrad": ("terngrad", {}, ("terngrad", "TernGradCompressor", ()), "none"),
    "onebit": ("onebit", {}, ("onebit", "OneBitCompressor", ()), "residual"),
}


def find_peer(path: str | None) -> tuple[str | None, str]:
    """The directory that holds ``grace_dl`` (from ``path`` or ``HVDCOMP_GRACE_PATH``), put
    on ``sys.path``; ``(None, why)`` when it is not there or does not import."""
    root = path or os.environ.get("HVDCOMP_GRACE_PATH")
    if not root:
        return None, "peer not found: set HVDCOMP_GRACE_PATH (or --grace) to a checkout of sands-lab/grace"
    if not (Path(root) / "grace_dl" / "torch" / "__init__.py").is_file():
        return None, f"peer not found: {root} holds no grace_dl/torch"
    if root not in sys.path:
        sys.path.insert(0, root)
    try:
        importlib.import_module("grace_dl.torch")
    except Exception as err:  # noqa: BLE001 - any import failure means "no peer"
        return None, f"peer not found: grace_dl.torch does not import ({err})"
    return root, "ok"


class OurSender:
    """One sender step of an hvdcomp compressor over every tensor (see the module docstring).
    names/grads: the model's gradients (fp32, any shape)."""

    def __init__(self, comp, names: list[str], grads: list[Tensor]):
        self.comp, self.grads = comp, grads
        self.infos = [TensorInfo(name=n, shape=g.shape, dtype=g.dtype, device=g.device, index=i)
                      for i, (n, g) in enumerate(zip(names, grads))]
        self.states = [comp.init_state(info) for info in self.infos]
        self.persistent = [set(s) for s in self.states]
        self.payload_bytes = 0

    def step(self, t: int) -> None:
        with kernels.one_mode():  # as the transport's chains: one read of HVDCOMP_KERNELS per phase
            self._step(t)

    def _step(self, t: int) -> None:
        total = 0
        comp = self.comp
        # Decided once, as the transport's plan routes a bucket once, not per tensor and step.
        shared, packed = isinstance(comp, SharedScale), comp.transport == "allgather"
        for g, info, state, keep in zip(self.grads, self.infos, self.states, self.persistent):
            if shared:
                state["shared_scale"] = comp.local_scale(g, info)  # max over one rank
            if packed:
                enc = comp.encode(g, state, info, t)
                out = torch.empty(int(enc.nbytes), dtype=torch.uint8, device=g.device)
                enc.pack(out)
                total += out.numel()
            else:
                payload, _ = comp.encode_dense(g, state, info, t)
                total += payload.numel() * payload.element_size()
            if len(state) > len(keep):  # the transport drops per-step entries
                for key in set(state) - keep:
                    del state[key]
        self.payload_bytes = total


class PeerSender:
    """GRACE's ``send_step`` without the send, over every tensor."""

    def __init__(self, compressor: tuple[str, str, tuple], memory: str, names: list[str], grads: list[Tensor]):
        module, cls, args = compressor
        self.comp = getattr(importlib.import_module(f"grace_dl.torch.compressor.{module}"), cls)(*args)
        self.memory_name = memory
        if memory == "dgc":
            try:
                from grace_dl.torch.memory.dgc import DgcMemory  # imports horovod.torch
                self.memory = DgcMemory(momentum=0.9, gradient_clipping=False)
            except ImportError:
                memory = self.memory_name = "residual"
        if memory == "residual":
            from grace_dl.torch.memory.residual import ResidualMemory
            self.memory = ResidualMemory()
        elif memory == "none":
            from grace_dl.torch.memory.none import NoneMemory
            self.memory = NoneMemory()
        self.names, self.grads = names, grads
        self.payload_bytes = 0

    def step(self, t: int) -> None:
        total = 0
        for name, g in zip(self.names, self.grads):
            x = self.memory.compensate(g, name)
            sent, ctx = self.comp.compress(x, name)
            self.memory.update(x, name, self.comp, sent, ctx)
            total += sum(s.numel() * s.element_size() for s in sent)
        self.payload_bytes = total


def gradients(model: str, batch: int, source: str, seed: int = 0) -> tuple[list[str], list[Tensor]]:
    """The model's gradients: one backward of a seeded batch, or seeded randn of its shapes."""
    spec = get_model(model)
    torch.manual_seed(seed)
    if source == "randn":
        with torch.device("meta"):
            shapes = [(n, p.shape) for n, p in spec.build().named_parameters()]
        gen = torch.Generator().manual_seed(seed)
        return [n for n, _ in shapes], [torch.randn(s, generator=gen) * 1e-3 for _, s in shapes]
    net = spec.build()
    spec.loss(net, spec.batch(batch, "cpu")).backward()
    named = [(n, p.grad.detach().clone()) for n, p in net.named_parameters() if p.grad is not None]
    return [n for n, _ in named], [g for _, g in named]


#: ``--clock``: wall time, or this process's CPU time (robust to other jobs on the machine,
#: meaningful with one thread: with two it also counts the threads' spin-waits).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def measure(label: str, names, grads, reps: int, warmup: int, peer: bool, clock: str = "wall") -> dict:
    """Median step times of ours and (when ``peer``) GRACE's for method ``label``, by
    ``CLOCKS[clock]``."""
    now = CLOCKS[clock]
    ours_name, params, peer_comp, peer_mem = METHODS[label]
    senders = {"ours": OurSender(compression_from_name(ours_name, **params), names, grads)}
    if peer:
        senders["grace"] = PeerSender(peer_comp, peer_mem, names, grads)
    samples: dict[str, list[float]] = {k: [] for k in senders}
    for t in range(warmup + reps):
        for g in grads:  # a new step's gradients, as backward's in-place write would mark them
            torch.autograd.graph.increment_version(g)
        # Alternate who goes first, so that neither always runs on a warmer cache or machine.
        for key, sender in (senders.items() if t % 2 == 0 else reversed(senders.items())):
            a = now()
            sender.step(1000 + t)
            b = now()
            if t >= warmup:
                samples[key].append((b - a) * 1e3)
    dense = sum(g.numel() * g.element_size() for g in grads)
    row = {"method": label, "ours": {"compressor": ours_name, "params": params}, "dense_bytes": dense}
    for key, sender in senders.items():
        row[f"{key}_ms"] = summarize(samples[key])
        row[f"{key}_payload_bytes"] = sender.payload_bytes
        row[f"{key}_wire_ratio"] = dense / sender.payload_bytes if sender.payload_bytes else math.inf
    if peer:
        row["grace_memory"] = senders["grace"].memory_name
        row["speedup"] = row["grace_ms"]["median"] / row["ours_ms"]["median"]
    return row


def format_table(record: dict) -> str:
    head = f"{'method':<12}{'ours ms':>10}{'GRACE ms':>10}{'speed-up':>10}{'ours wire':>11}{'GRACE wire':>12}"
    lines = [f"{record['model']}: {record['tensors']} tensors, {record['numel']:,} elements ({record['grads']}); "
             f"{record['device_name']}, {record['cpu_threads']} threads; median of {record['reps']} steps",
             record["peer_status"] if not record["peer"] else f"GRACE from {record['peer']}", head, "-" * len(head)]
    for r in record["rows"]:
        g = r.get("grace_ms")
        lines.append(f"{r['method']:<12}{r['ours_ms']['median']:>10.1f}{g['median'] if g else math.nan:>10.1f}"
                     f"{r.get('speedup', math.nan):>9.2f}x{r['ours_wire_ratio']:>10.1f}x"
                     f"{r.get('grace_wire_ratio', math.nan):>11.1f}x")
    if record.get("geomean_speedup"):
        lines.append(f"geometric mean speed-up: {record['geomean_speedup']:.2f}x")
    return "\n".join(lines)


def _peer_commit(root: str | None) -> str | None:
    if not root:
        return None
    try:
        return subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("HVDCOMP_GRACE_COMMIT")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="hvdcomp's sender side against GRACE's, per method",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="resnet50", help="resnet50, gpt2-medium or small")
    p.add_argument("--grads", choices=["backward", "randn"], default="backward")
    p.add_argument("--batch", type=int, default=2, help="batch of the one backward (--grads backward)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--clock", choices=list(CLOCKS), default="wall",
                   help="wall time, or CPU time of this process (use with --threads 1 on a shared machine)")
    p.add_argument("--grace", default=None, help="GRACE checkout (default: $HVDCOMP_GRACE_PATH)")
    p.add_argument("--out", default=None, help="JSON path (default results/vs_grace_<model>_cpu.json)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    root, status = find_peer(args.grace)
    print(status if root is None else f"GRACE: {root}")
    names, grads = gradients(args.model, args.batch, args.grads)
    rows = []
    for label in args.methods:
        rows.append(measure(label, names, grads, args.reps, args.warmup, root is not None, args.clock))
        r = rows[-1]
        print(f"  {label}: ours {r['ours_ms']['median']:.1f} ms"
              + (f", GRACE {r['grace_ms']['median']:.1f} ms" if root else ""), flush=True)
    speedups = [r["speedup"] for r in rows if "speedup" in r]
    record = {
        "model": args.model, "grads": args.grads, "batch": args.batch, "tensors": len(grads),
        "numel": sum(g.numel() for g in grads), "device": "cpu",
        "device_name": platform.processor() or platform.machine(), "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(), "reps": args.reps,
        "warmup": args.warmup, "peer": root, "peer_status": status, "peer_commit": _peer_commit(root),
        "timing": f"{CLOCKS[args.clock].__name__} ({args.clock}), ours and GRACE alternating within each repetition",
        "clock": args.clock,
        "rows": rows,
        "geomean_speedup": math.exp(sum(map(math.log, speedups)) / len(speedups)) if speedups else None,
        "command": " ".join(["python -m bench.vs_grace"] + (list(argv) if argv is not None else sys.argv[1:])),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    table = format_table(record)
    print(table)
    record["table"] = table
    out = Path(args.out or f"results/vs_grace_{args.model}_cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1, default=str))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
