"""Worker functions for tests/test_distributed_ddp.py: real Gloo ranks (torch.multiprocessing, spawn), a
small conv + linear model under DistributedDataParallel with hvdcomp's comm hook. (That the
hook computes exactly what the step protocol prescribes is proven against the in-process
transport in tests/test_inprocess_identity.py.)

Each launch costs a few seconds, so the workers run many configurations per launch.
"""
from __future__ import annotations

import datetime
import os
import socket
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from scenarios_identity import Net  # the model both files train

#: Settings per compressor for the small model (ratios large enough to train in a few steps).
SETTINGS = {
    "none": {},
    "fp16": {},
    "bf16": {},
    "adacomp": {},
    "terngrad": {},
    "dgc": {"ratio": 0.05},
    "topk": {"ratio": 0.05},
    "randomk": {"ratio": 0.05},
    "onebit": {},
    "scalecom": {"ratio": 0.05},
}
MIN_NUMEL = 200  # conv weight (216) and both FC weights compressed, biases dense
BUCKET_CAP_MB = 0.01  # several buckets after DDP's rebuild (one in the first iteration)
LR = 0.1


def available(names=None) -> list[str]:
    """The registered compressors (or ``names``)."""
    from hvdcomp.registry import COMPRESSORS

    return list(names or COMPRESSORS)


def make(name: str, **overrides):
    import hvdcomp

    return hvdcomp.compression_from_name(name, **{**SETTINGS.get(name, {}), **overrides})


# ---- model and data ------------------------------------------------------------------------------

def batch(rank: int, step: int, n: int = 16):
    """Rank ``rank``'s batch (the same every step, so that the loss must go down)."""
    g = torch.Generator().manual_seed(1000 * rank)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def fresh_model() -> Net:
    torch.manual_seed(0)
    return Net()


# ---- launcher ------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, nranks, port, fn, args, outdir, backend):
    os.environ.setdefault("HVDCOMP_KERNELS", "reference")
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=nranks,
                            timeout=datetime.timedelta(seconds=60))
    try:
        payload = {"result": fn(rank, nranks, *args)}
    except BaseException:  # noqa: BLE001 - reported to the test
        payload = {"error": traceback.format_exc()}
    torch.save(payload, os.path.join(outdir, f"result{rank}.pt"))
    dist.destroy_process_group()


def launch(fn, nranks: int, *args, outdir, timeout: float = 120.0, backend: str = "gloo") -> list:
    """Run ``fn(rank, nranks, *args)`` on ``nranks`` Gloo ranks; every rank's result, in
    rank order. Raises if a rank failed or the launch outlived ``timeout`` (a hang)."""
    os.makedirs(outdir, exist_ok=True)
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, nranks, port, fn, args, str(outdir), backend)) for r in range(nranks)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in hung:
        procs[r].kill()
        procs[r].join()
    if hung:
        raise TimeoutError(f"ranks {hung} still running after {timeout} s (hang)")
    results = []
    for r in range(nranks):
        path = os.path.join(outdir, f"result{r}.pt")
        if not os.path.exists(path):
            raise RuntimeError(f"rank {r} exited with code {procs[r].exitcode} and no result")
        payload = torch.load(path, weights_only=False)
        if "error" in payload:
            raise RuntimeError(f"rank {r} failed:\n{payload['error']}")
        results.append(payload["result"])
    return results


# ---- training under DDP ----------------------------------------------------------------------------

def _ddp(model, **kwargs):
    return nn.parallel.DistributedDataParallel(model, bucket_cap_mb=kwargs.pop("bucket_cap_mb", BUCKET_CAP_MB),
                                               **kwargs)


def _state(comp, model, names=True, **kwargs):
    from hvdcomp.ddp import CompressionState

    return CompressionState(comp, min_compress_numel=kwargs.pop("min_compress_numel", MIN_NUMEL),
                            named_parameters=model.named_parameters() if names else None, **kwargs)


def _train_steps(ddp, opt, rank, steps, state=None, layouts=None, device="cpu"):
    losses = []
    for step in steps:
        opt.zero_grad()
        x, y = (t.to(device) for t in batch(rank, step))
        loss = F.cross_entropy(ddp(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if layouts is not None and state is not None:
            layouts.append(state.bucket_layout())
    return losses


def _params(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def train(rank, name, steps, names=True, checkpoint_at=None, ckpt=None, **state_kwargs):
    """Train the small model ``steps`` steps with compressor ``name``; optionally save a
    checkpoint (model, optimizer, compression state) after ``checkpoint_at`` steps."""
    from hvdcomp.ddp import compression_hook

    model = fresh_model()
    ddp = _ddp(model)
    state = _state(make(name), model, names=names, **state_kwargs)
    ddp.register_comm_hook(state, compression_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    layouts, losses = [], []
    for step in range(steps):
        losses += _train_steps(ddp, opt, rank, [step], state, layouts)
        if checkpoint_at == step + 1:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "comp": state.state_dict()},
                       f"{ckpt}.rank{rank}")
    stats = state.compression_stats()
    return {"params": _params(model), "losses": losses, "layouts": layouts, "rebuilds": stats["rebuilds"],
            "transports": sorted({t["transport"] for t in stats["tensors"].values()}),
            "step": stats["step"], "cumulative": stats["cumulative"], "iterations": stats["iterations"],
            "state_keys": sorted(state.state_dict()["state"])}


def resume(rank, name, steps, checkpoint_at, ckpt, names=True, **state_kwargs):
    """A fresh model/DDP/state restored from :func:`train`'s checkpoint, run to ``steps``."""
    from hvdcomp.ddp import compression_hook

    model = fresh_model()
    saved = torch.load(f"{ckpt}.rank{rank}", weights_only=False)
    model.load_state_dict(saved["model"])
    ddp = _ddp(model)
    state = _state(make(name), model, names=names, **state_kwargs)
    state.load_state_dict(saved["comp"])
    ddp.register_comm_hook(state, compression_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    opt.load_state_dict(saved["opt"])
    _train_steps(ddp, opt, rank, range(checkpoint_at, steps))
    return {"params": _params(model), "iterations": state.step}


def train_with_torch_hook(rank, hook_name, steps):
    """The same training with one of torch's own hooks (or none: hook_name=None)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    model = fresh_model()
    ddp = _ddp(model)
    if hook_name is not None:
        ddp.register_comm_hook(None, getattr(default_hooks, hook_name))
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    _train_steps(ddp, opt, rank, range(steps))
    return _params(model)


class _Linear(nn.Module):
    """loss = <w, c>: the gradient is ``c``, the same every step."""

    def __init__(self, n):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(n))

    def forward(self, c):
        return (self.w * c).sum()


EF_NUMEL = 2048


def constant_gradient(rank, name, overrides, steps):
    """Mean over ``steps`` of the averaged gradient DDP applies when every rank's gradient is
    a constant ``c_rank`` (no parameter update, so the gradient stays constant)."""
    from hvdcomp.ddp import compression_hook

    module = _Linear(EF_NUMEL)
    ddp = _ddp(module, bucket_cap_mb=25)
    state = _state(make(name, **overrides), module, min_compress_numel=1024)
    ddp.register_comm_hook(state, compression_hook)
    c = ef_gradient(rank)
    acc = torch.zeros(EF_NUMEL, dtype=torch.float64)
    for _ in range(steps):
        module.w.grad = None
        ddp(c).backward()
        acc += module.w.grad.double()
    return acc / steps


def ef_gradient(rank: int) -> torch.Tensor:
    return torch.randn(EF_NUMEL, generator=torch.Generator().manual_seed(7 + rank))


# ---- scenarios (one per launch) ----------------------------------------------------------------------

def scenario_train(rank, nranks, names, steps, ckpt_dir, ckpt_names, ef_cases, ef_steps):
    """Launch A (2 ranks): every compressor trains; torch hook comparisons; checkpoints;
    constant-gradient error feedback."""
    out = {"train": {}, "torch": {}, "ckpt": {}, "ef": {}}
    os.makedirs(ckpt_dir, exist_ok=True)
    for name in names:
        out["train"][name] = train(rank, name, steps)
    out["train"]["topk/positions"] = train(rank, "topk", steps, names=False) if "topk" in names else None
    out["train"]["fp16/all"] = train(rank, "fp16", steps, min_compress_numel=0)
    out["train"]["none/all"] = train(rank, "none", steps, min_compress_numel=0)
    out["torch"]["fp16_compress_hook"] = train_with_torch_hook(rank, "fp16_compress_hook", steps)
    out["torch"]["no hook"] = train_with_torch_hook(rank, None, steps)
    for label, (name, names_mode) in ckpt_names.items():
        path = os.path.join(ckpt_dir, label.replace("/", "_"))
        out["ckpt"][label] = train(rank, name, 2 * steps, names=names_mode, checkpoint_at=steps, ckpt=path)
    for name, overrides in ef_cases.items():
        out["ef"][name] = constant_gradient(rank, name, overrides, ef_steps)
    return out


def scenario_resume(rank, nranks, steps, ckpt_dir, ckpt_names):
    """Launch B (2 ranks, new processes): restore launch A's checkpoints and run on."""
    out = {}
    for label, (name, names_mode) in ckpt_names.items():
        path = os.path.join(ckpt_dir, label.replace("/", "_"))
        out[label] = resume(rank, name, 2 * steps, steps, path, names=names_mode)
    return out


def _error_of(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the test reads the message
        return f"{type(exc).__name__}: {exc}"
    return None


def unsupported(rank):
    """Unsupported combinations: each must raise on every rank, and none may hang."""
    from hvdcomp.ddp import compression_hook

    errors = {}
    model = fresh_model()
    # 1. top-k has no chunk codec: no compressed allreduce (every rank raises before any collective).
    errors["compressed_allreduce"] = _error_of(lambda: _state(make("topk"), model, collective="compressed_allreduce"))
    # 2. ranks disagree about the compressor: found by the settings exchange, raised everywhere.
    mixed = make("topk") if rank == 0 else make("fp16")
    errors["mismatch"] = _error_of(lambda: _state(mixed, model))
    # 3. a payload dtype the backend cannot sum, found in the hook before its first collective.
    #    No such pair exists on Gloo, so the state is told its group is MPI (torch's MPI group
    #    has no fp16): the check, not the transport, is what is exercised here.
    ddp = _ddp(model)
    state = _state(make("fp16"), model)
    state.backend = "mpi"
    ddp.register_comm_hook(state, compression_hook)
    x, y = batch(rank, 0)

    def backward():
        F.cross_entropy(ddp(x), y).backward()

    errors["fp16 on mpi"] = _error_of(backward)
    # 4. a failure inside a callback (after collectives ran) reaches backward() with its own
    #    type and message (not as DDP's "Unable to cast ... to Tensor"), and later hook calls
    #    refuse to run instead of hanging.
    ddp = _ddp(model)
    ddp.register_comm_hook(_state(_BrokenBF16(), model, collective="allgather"), compression_hook)
    errors["callback failure"] = _error_of(backward)
    errors["after failure"] = _error_of(backward)
    # 5. the group still works afterwards: nothing was left half-sent.
    t = torch.ones(3) * (rank + 1)
    dist.all_reduce(t)
    errors["allreduce after"] = t.tolist()
    return errors


def _broken_bf16_class():
    from hvdcomp.compressors.casts import BF16Compressor

    class BrokenBF16(BF16Compressor):
        def decode_sum(self, payloads, state, info):
            raise ArithmeticError("decode exploded")

    return BrokenBF16


def _BrokenBF16():
    return _broken_bf16_class()()


def scenario_three(rank, nranks, names, steps):
    """Launch C (3 ranks): compressed allreduce (bf16, TernGrad chosen by 'auto' from 3 ranks
    on), allgather and ScaleCom with three leaders; unsupported combinations."""
    return {"train": {name: train(rank, name, steps) for name in names}, "errors": unsupported(rank)}


def scenario_bf16_nccl(rank, nranks, steps):
    """NCCL + GPUs only: our bf16 (every tensor) against torch's bf16_compress_hook."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from hvdcomp.ddp import compression_hook

    device = torch.device("cuda", rank)
    out = {}
    for label in ("hvdcomp", "torch"):
        model = fresh_model().to(device)
        ddp = _ddp(model, device_ids=[rank])
        if label == "hvdcomp":
            ddp.register_comm_hook(_state(make("bf16"), model, min_compress_numel=0), compression_hook)
        else:
            ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
        opt = torch.optim.SGD(ddp.parameters(), lr=LR)
        _train_steps(ddp, opt, rank, range(steps), device=device)
        out[label] = {n: p.cpu() for n, p in _params(model).items()}
    return out
