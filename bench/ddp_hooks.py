"""hvdcomp's DDP comm hooks against torch's own, on one model and device.

    python -m bench.ddp_hooks                                   # 2 Gloo ranks on CPU, small CNN
    python -m bench.ddp_hooks --ranks 4 --steps 50 --device cuda  # NCCL, one GPU per rank
    python -m bench.ddp_hooks --steps 2 --warmup 2 --methods none,fp16,topk,powersgd1   # smoke

Every method trains the same model (``bench.models``, default ``small``: conv + BN + FC)
from the same initial weights on the same per-rank batches under
``DistributedDataParallel`` (default bucketing), with plain SGD, and reports:

* **median step ms**: forward + backward (where DDP's hook communicates) + optimizer step,
  after ``--warmup`` untimed steps (DDP's bucket rebuild, PowerSGD's vanilla start); the
  step's time is the slowest rank's. The methods' steps are interleaved (step s of every
  method, then step s + 1), so a change of load on a shared machine hits all alike;
* **sent B/step/rank**: bytes one rank sends per step. hvdcomp: measured by its telemetry
  (``CompressionState.compression_stats()``, which includes padding to equal all-gather
  sizes, the size exchange and index broadcasts). torch's hooks: computed from the
  parameters' sizes and the wire format, ring all-reduce ``2 (N-1)/N * S`` (no hook: fp32;
  fp16/bf16 hooks: 2 B/element; PowerSGD: P and Q factors in fp32 for the matrices it
  compresses, ``(n + m) r`` elements, the rest fp32, as its ``min_compression_rate`` rule
  decides). DDP's own buffer broadcasts (BatchNorm statistics) are the same for all and left
  out;
* **ratio**: dense fp32 bytes / payload bytes;
* **final loss**: the training loss of the last step, averaged over ranks (random inputs
  and labels: this measures how fast each method fits them; DGC's momentum correction acts
  as momentum 0.9 on top of the plain SGD the others get).

``bf16_compress_hook`` needs NCCL (torch refuses to register it otherwise): "n/a on gloo".
Writes ``results/ddp_hooks.json`` (device, versions, command, rows, table).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time

import torch

#: hvdcomp compressors and their settings in this benchmark (ratios as the papers use them).
HVDCOMP = {
    "none": {}, "fp16": {}, "bf16": {}, "adacomp": {}, "terngrad": {},
    "dgc": {"ratio": 0.01}, "topk": {"ratio": 0.01}, "randomk": {"ratio": 0.01}, "onebit": {},
    "scalecom": {"ratio": 0.01},
}
#: torch's hooks: label -> description
TORCH = {
    "nohook": "no hook (DDP fp32 allreduce)",
    "fp16_hook": "torch fp16_compress_hook",
    "bf16_hook": "torch bf16_compress_hook",
    "powersgd1": "torch powerSGD_hook rank 1",
    "powersgd2": "torch powerSGD_hook rank 2",
}
POWERSGD_START = 2  # the smallest start_powerSGD_iter torch allows with error feedback


def available_methods() -> list[str]:
    """torch's hooks, then every registered hvdcomp compressor."""
    return list(TORCH) + list(HVDCOMP)


# ---- torch's hooks: bytes from sizes and formats -------------------------------------------------

def ring_allreduce_bytes(nbytes: float, nranks: int) -> float:
    return 2.0 * (nranks - 1) / nranks * nbytes if nranks > 1 else 0.0


def powersgd_elements(shapes, rank: int, min_compression_rate: float = 2.0) -> tuple[int, int]:
    """(elements all-reduced per step, dense elements) under torch's PowerSGD rule: a tensor
    viewed as ``shape[0] x rest`` is compressed to ``(n + m) r'`` (``r' = min(n, m, r)``)
    when that is below ``numel / min_compression_rate``; else sent whole."""
    sent = dense = 0
    for shape in shapes:
        numel = 1
        for d in shape:
            numel *= int(d)
        n = int(shape[0]) if len(shape) else 1
        m = numel // n if n else 0
        r = min(n, m, rank)
        dense += numel
        sent += (n + m) * r if (n + m) * r * min_compression_rate < numel else numel
    return sent, dense


def torch_hook_bytes(method: str, shapes, nranks: int) -> tuple[float, float]:
    """(sent bytes per rank per step, payload bytes) of one of torch's hooks."""
    numel = sum(int(torch.Size(s).numel()) for s in shapes)
    if method == "nohook":
        payload = 4.0 * numel
    elif method in ("fp16_hook", "bf16_hook"):
        payload = 2.0 * numel
    else:
        payload = 4.0 * powersgd_elements(shapes, int(method[-1]))[0]
    return ring_allreduce_bytes(payload, nranks), payload


# ---- one rank -------------------------------------------------------------------------------------

def _register(method: str, ddp, model, group_backend: str):
    """Register ``method``'s hook on ``ddp``; returns its state (or None), or raises
    NotImplementedError with the reason it cannot run here."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    if method == "nohook":
        return None
    if method == "fp16_hook":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
        return None
    if method == "bf16_hook":
        if group_backend != "nccl":
            raise NotImplementedError(f"n/a on {group_backend}")
        ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
        return None
    if method.startswith("powersgd"):
        state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=int(method[-1]),
                                            start_powerSGD_iter=POWERSGD_START, random_seed=0)
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
        return state
    import hvdcomp
    import hvdcomp.ddp

    state = hvdcomp.ddp.CompressionState(hvdcomp.compression_from_name(method, **HVDCOMP[method]),
                                         named_parameters=model.named_parameters())
    ddp.register_comm_hook(state, hvdcomp.ddp.compression_hook)
    return state


class _Run:
    """One method on this rank: its model, DDP wrapper, hook state, optimizer and timings."""

    def __init__(self, method, spec, rank, nranks, device, backend, args):
        from torch import nn

        self.method, self.spec, self.nranks, self.device, self.args = method, spec, nranks, device, args
        torch.manual_seed(args.seed)
        self.model = spec.build().to(device)
        self.ddp = nn.parallel.DistributedDataParallel(
            self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.state = _register(method, self.ddp, self.model, backend)  # NotImplementedError: skipped
        self.opt = torch.optim.SGD(self.ddp.parameters(), lr=args.lr)
        x, y = spec.batch(args.batch * nranks, device)
        self.batch = (x[rank * args.batch:(rank + 1) * args.batch], y[rank * args.batch:(rank + 1) * args.batch])
        self.times, self.loss = [], None

    def step(self, timed: bool) -> None:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        self.opt.zero_grad()
        loss = self.spec.loss(self.ddp, self.batch)
        loss.backward()
        self.opt.step()
        if cuda:
            torch.cuda.synchronize()
        if timed:
            self.times.append(time.perf_counter() - t0)
        self.loss = loss.detach()

    def finish(self) -> dict:
        import torch.distributed as dist

        import hvdcomp.ddp

        # Outside the timed region: the slowest rank per step, the mean final loss.
        t = torch.tensor(self.times, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        final = self.loss.reshape(1).double()
        dist.all_reduce(final)
        row = {"method": self.method, "median_ms": 1e3 * statistics.median(t.tolist()),
               "final_loss": final.item() / self.nranks}
        shapes = [tuple(p.shape) for p in self.model.parameters()]
        if isinstance(self.state, hvdcomp.ddp.CompressionState):
            step = self.state.compression_stats()["step"]
            row.update(sent_bytes=step["sent_bytes"], received_bytes=step["received_bytes"],
                       payload_bytes=step["payload_bytes"], ratio=step["ratio"],
                       collectives=[t for t in step["transports"] if not t.startswith("allgather padding")
                                    and t not in ("payload sizes", "scale max-allreduce")],
                       bytes_source="telemetry")
        else:
            sent, payload = torch_hook_bytes(self.method, shapes, self.nranks)
            dense = 4.0 * sum(int(torch.Size(s).numel()) for s in shapes)
            row.update(sent_bytes=sent, received_bytes=sent, payload_bytes=payload, ratio=dense / payload,
                       collectives=["allreduce"], bytes_source="computed")
        return row


def _run_all(methods, spec, rank, nranks, device, backend, args) -> list:
    """Every method, steps interleaved (step s of every method, then s + 1): a change in the
    machine's load during the run hits all methods alike."""
    runs, rows = {}, {}
    for m in methods:
        try:
            runs[m] = _Run(m, spec, rank, nranks, device, backend, args)
        except NotImplementedError as why:
            rows[m] = {"method": m, "skipped": str(why)}
    for step in range(args.warmup + args.steps):
        for run in runs.values():
            run.step(timed=step >= args.warmup)
    for m, run in runs.items():
        rows[m] = run.finish()
    return [rows[m] for m in methods]


def _worker(rank, nranks, port, methods, args, outdir):
    import torch.distributed as dist

    os.environ.setdefault("HVDCOMP_KERNELS", "auto")
    from bench.models import get_model

    device = torch.device(args.device if args.device == "cpu" else f"cuda:{rank}")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // nranks))
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=nranks,
                            timeout=datetime.timedelta(seconds=300))
    spec = get_model(args.model)
    rows = _run_all(methods, spec, rank, nranks, device, backend, args)
    if rank == 0:
        with open(os.path.join(outdir, "rows.json"), "w") as f:
            json.dump({"rows": rows, "backend": backend}, f)
    dist.destroy_process_group()
    # With the work done and written, leave without the interpreter's teardown: there
    # torch's Gloo process group can abort the process ("terminate called without an active
    # exception", 13 of 52 two-rank runs of the test's methods with torch 2.13, torch's own
    # hooks alone included), which mp.spawn would report as a failed run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ---- driver ---------------------------------------------------------------------------------------

def _label(method: str) -> str:
    if method in TORCH:
        return TORCH[method]
    params = ", ".join(f"{k}={v}" for k, v in HVDCOMP[method].items())
    return f"hvdcomp {method}({params})"


def format_table(rows: list) -> str:
    header = (f"{'method':<38}{'collectives':<34}{'ratio':>8}{'sent B/step/rank':>18}"
              f"{'median step ms':>16}{'final loss':>12}")
    lines = [header, "-" * len(header)]
    for r in rows:
        if "skipped" in r:
            lines.append(f"{_label(r['method']):<38}{r['skipped']}")
            continue
        lines.append(f"{_label(r['method']):<38}{', '.join(r['collectives']):<34}{r['ratio']:>8.1f}"
                     f"{r['sent_bytes']:>18,.0f}{r['median_ms']:>16.1f}{r['final_loss']:>12.4f}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description="hvdcomp DDP hooks vs torch's hooks")
    p.add_argument("--model", default="small")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--device", default="auto", help="cpu (Gloo), cuda (NCCL, one GPU per rank) or auto")
    p.add_argument("--steps", type=int, default=30, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (>= 2 for PowerSGD)")
    p.add_argument("--batch", type=int, default=32, help="per rank")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default="all", help="comma-separated: " + ", ".join(list(TORCH) + list(HVDCOMP)))
    p.add_argument("--out", default="results/ddp_hooks.json")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.device_count() >= args.ranks else "cpu"
    if args.device == "cuda" and torch.cuda.device_count() < args.ranks:
        p.error(f"--device cuda needs one GPU per rank ({args.ranks}), found {torch.cuda.device_count()}")
    known = available_methods()
    methods = known if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in known]
    if unknown:
        p.error(f"unknown or unavailable methods {unknown}; available: {', '.join(known)}")

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(args.ranks, port, methods, args, tmp), nprocs=args.ranks, join=True)
        with open(os.path.join(tmp, "rows.json")) as f:
            got = json.load(f)
    rows, backend = got["rows"], got["backend"]
    table = format_table(rows)
    device = (torch.cuda.get_device_name(0) if args.device == "cuda"
              else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    from bench.models import get_model, param_stats

    spec = get_model(args.model)
    with torch.device("meta"):
        nparams, ntensors = param_stats(spec.build())
    print(f"{args.model} ({nparams:,} parameters in {ntensors} tensors), {args.ranks} ranks, {backend} on {device}, "
          f"batch {args.batch}/rank, {args.steps} timed steps after {args.warmup}")
    print(table)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    import hvdcomp

    record = {
        "command": " ".join(["python -m bench.ddp_hooks"] + (list(argv) if argv is not None else sys.argv[1:])),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": device, "backend": backend,
        "nranks": args.ranks, "model": args.model, "parameters": nparams, "tensors": ntensors,
        "batch_per_rank": args.batch, "steps": args.steps, "warmup": args.warmup, "lr": args.lr,
        "versions": {"torch": torch.__version__, "python": platform.python_version(), "hvdcomp": hvdcomp.__version__,
                     "triton": triton_version, "kernels": os.environ.get("HVDCOMP_KERNELS", "auto")},
        "rows": rows, "table": table,
    }
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(record, f, indent=2)
    return record


if __name__ == "__main__":
    main()
