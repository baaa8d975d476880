"""Data-parallel training with hvdcomp under ``horovodrun`` — the script to copy.

    horovodrun -np 2 -H localhost:2 --gloo python -m launch.train --compression fp16
    horovodrun -np 4 -H localhost:4 --gloo python -m launch.train --task digits-cnn --compression adacomp
    horovodrun -np 4 -H localhost:4 --gloo python -m launch.train --task stdlib-lstm --compression dgc --param ratio=0.01

Tasks (all offline): ``digits-mlp`` / ``digits-cnn`` (scikit-learn's handwritten digits),
``teacher-mlp`` (labels from a fixed random teacher network), ``stdlib-lstm`` (character
LSTM language model on Python's own standard library source) and ``stdlib-transformer``
(a small decoder-only transformer on the same text, trained with AdamW). The optimizer is
SGD with momentum except for the transformer; the compressor's rules about it (DGC takes
over SGD's momentum, turns its correction off under AdamW) are applied by
``hvdcomp.DistributedOptimizer`` itself (:mod:`hvdcomp.recipes`). Each rank trains on its own shard
through ``hvdcomp.DistributedOptimizer``; Horovod broadcasts the initial parameters and
optimizer state from rank 0. Rank 0 prints per-epoch loss, test accuracy (or perplexity),
payload bytes per step and the compression ratio, and writes a JSON record (``--json``).

Checkpoints (``--checkpoint PATH``) are written per rank (``PATH.rank<r>``) because each
rank's error-feedback residuals are its own; ``--resume`` continues from them exactly.
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import os
import platform
import sys
import time

import torch

TASKS = ("digits-mlp", "digits-cnn", "teacher-mlp", "stdlib-lstm", "stdlib-transformer")
#: Tasks trained with AdamW (what most language models use today); the others use SGD.
ADAMW_TASKS = frozenset({"stdlib-transformer"})
#: Default learning rates per task (SGD with momentum 0.9, or AdamW).
DEFAULT_LR = {"stdlib-lstm": 0.5, "stdlib-transformer": 3e-3}
#: Parameters used when the command line gives none for a compressor that needs them.
DEFAULT_PARAMS = {"topk": {"ratio": 0.01}, "randomk": {"ratio": 0.01}, "scalecom": {"ratio": 0.01}}


def parse_param(text: str) -> tuple[str, object]:
    """``key=value`` with a Python literal value (``ratio=0.01``, ``clip=None``)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--param expects key=value, got {text!r}")
    key, value = text.split("=", 1)
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value
    return key.strip(), parsed


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=TASKS, default="digits-mlp")
    p.add_argument("--compression", default="none", help="hvdcomp compressor name (see docs/compressors.md)")
    p.add_argument("--param", action="append", type=parse_param, default=[], metavar="KEY=VALUE",
                   help="compressor parameter, repeatable (e.g. --param ratio=0.01)")
    p.add_argument("--collective", default="auto", choices=("auto", "allgather", "compressed_allreduce"))
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32, help="per-rank batch size")
    p.add_argument("--lr", type=float, default=None,
                   help="default: 0.05 (0.5 for stdlib-lstm, 3e-3 with AdamW for stdlib-transformer)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD's momentum (not used with AdamW)")
    p.add_argument("--width", type=int, default=None,
                   help="LSTM hidden size (default 256), transformer width (default 64) or CNN width (default 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps-per-epoch", type=int, default=None, help="cap (default: one pass over the shard)")
    p.add_argument("--min-compress-numel", type=int, default=1024)
    p.add_argument("--checkpoint", default=None, help="save per-rank checkpoints to PATH.rank<r> each epoch")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    p.add_argument("--json", default=None, help="write the run's record here (rank 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: the GPU of this rank's local rank when CUDA is available, else CPU")
    p.add_argument("--mpi4py-groups", type=int, default=0, metavar="G",
                   help="under mpirun: hvd.init(comm=...) with an mpi4py communicator; G=1 uses "
                        "COMM_WORLD, G>1 splits the world into G sub-communicators (rank %% G) that "
                        "train independently")
    return p


def init_horovod(hvd, groups: int) -> str:
    """``hvd.init()``, or with an mpi4py communicator (all ranks, or this rank's group)."""
    if groups <= 0:
        hvd.init()
        return "horovod"
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    comm = world if groups == 1 else world.Split(color=world.Get_rank() % groups, key=world.Get_rank())
    hvd.init(comm=comm)
    if not hvd.mpi_enabled():
        raise SystemExit("--mpi4py-groups needs Horovod built with MPI and launched by mpirun")
    return f"mpi4py group {world.Get_rank() % groups} of {groups} (world rank {world.Get_rank()})"


class Task:
    """A model, its data shard, a loss for a batch index list, and a test metric."""

    def __init__(self, name: str, seed: int, rank: int, size: int, batch_size: int, width: int | None = None,
                 seq: int = 64):
        from . import data, models

        self.name, self.batch_size = name, batch_size
        self.lm = name.startswith("stdlib-")
        if self.lm:
            text = data.stdlib()
            self.data = text.shard(rank, size)
            self.seq = seq  # characters per training window (and the transformer's context)
            if name == "stdlib-lstm":
                self.model = models.CharLSTM(len(text.vocab), hidden=width or 256)
            else:
                self.model = models.TinyTransformerLM(len(text.vocab), width=width or 64, context=self.seq)
            self.n_train = (len(self.data.train) - 1) // self.seq
        else:
            if name.startswith("digits"):
                d = data.digits(seed, image=name == "digits-cnn")
            else:
                d = data.teacher(seed)
            self.data = d.shard(rank, size)
            in_dim = int(torch.tensor(d.xtr.shape[1:]).prod())
            self.model = (models.SmallCNN(d.classes, width=width or 32) if name == "digits-cnn"
                          else models.MLP(in_dim, d.classes))
            self.n_train = len(self.data.xtr)

    def to(self, device: torch.device) -> "Task":
        """Move the model and the data to ``device``."""
        self.model.to(device)
        for field in ("train", "test", "xtr", "ytr", "xte", "yte"):
            if hasattr(self.data, field):
                setattr(self.data, field, getattr(self.data, field).to(device))
        return self

    def steps(self) -> int:
        return self.n_train // self.batch_size

    def loss(self, idx: torch.Tensor) -> torch.Tensor:
        if self.lm:
            starts = idx * self.seq
            windows = self.data.train[starts[:, None] + torch.arange(self.seq + 1, device=starts.device)]
            logits = self.model(windows[:, :-1])
            return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
        return torch.nn.functional.cross_entropy(self.model(self.data.xtr[idx]), self.data.ytr[idx])

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.model.eval()
        try:
            if self.lm:
                test = self.data.test[: (len(self.data.test) - 1) // self.seq * self.seq + 1]
                windows = test[:-1].view(-1, self.seq)
                targets = test[1:].view(-1, self.seq)
                logits = self.model(windows)
                nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
                return {"test_perplexity": math.exp(nll.item())}
            acc = (self.model(self.data.xte).argmax(1) == self.data.yte).float().mean().item()
            return {"test_accuracy": acc}
        finally:
            self.model.train()


#: The optimizers a run may ask for instead of its task's own (``optimizer=``):
#: ``"frozen-adamw"`` is :class:`hvdcomp.FrozenAdamW` (AdamW's settings, v frozen after
#: ``warmup_steps``), built by the script itself: with ``compression=none`` the cost of
#: freezing v alone.
OPTIMIZERS = ("sgd", "adamw", "frozen-adamw")


def uses_adamw(task: str, optimizer: str | None = None) -> bool:
    """Whether ``make_optimizer(task, ..., optimizer)`` builds an AdamW (plain or frozen),
    which takes no SGD momentum. Raises ValueError for an optimizer not in :data:`OPTIMIZERS`."""
    if optimizer is not None and optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS} or None, got {optimizer!r}")
    return optimizer in ("adamw", "frozen-adamw") or (optimizer is None and task in ADAMW_TASKS)


def make_optimizer(task: str, params, lr: float, momentum: float, optimizer: str | None = None) -> torch.optim.Optimizer:
    """AdamW (betas 0.9/0.99, weight decay 0.01) for :data:`ADAMW_TASKS`, else SGD with
    ``momentum``; ``optimizer`` (one of :data:`OPTIMIZERS`) overrides the task's choice. The
    transport applies the compressor's rules about it (hvdcomp.recipes)."""
    if not uses_adamw(task, optimizer):
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    if optimizer == "frozen-adamw":
        import hvdcomp

        return hvdcomp.FrozenAdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.01)


def _progress(enabled: bool, epoch: int, step: int, steps: int, loss: float) -> None:
    if not enabled:
        return
    width = 30
    done = int(width * (step + 1) / steps)
    sys.stderr.write(f"\repoch {epoch + 1} [{'#' * done}{'.' * (width - done)}] {step + 1}/{steps} loss {loss:.4f}")
    if step + 1 == steps:
        sys.stderr.write("\n")
    sys.stderr.flush()


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    import horovod.torch as hvd

    import hvdcomp
    from hvdcomp.core.traffic import ratio_by_kind

    where = init_horovod(hvd, args.mpi4py_groups)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    params = dict(args.param) or DEFAULT_PARAMS.get(args.compression, {})
    compression = hvdcomp.compression_from_name(args.compression, **params)
    momentum = 0.0 if uses_adamw(args.task) else args.momentum
    lr = args.lr if args.lr is not None else DEFAULT_LR.get(args.task, 0.05)
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(hvd.local_rank())
    device = torch.device("cuda", hvd.local_rank()) if use_cuda else torch.device("cpu")
    task = Task(args.task, args.seed, hvd.rank(), hvd.size(), args.batch_size, args.width).to(device)
    model = task.model
    opt = hvdcomp.DistributedOptimizer(
        make_optimizer(args.task, model.parameters(), lr, momentum),
        named_parameters=model.named_parameters(), compression=compression,
        min_compress_numel=args.min_compress_numel, collective=args.collective)
    start_epoch, history = 0, []
    if args.resume:
        if not args.checkpoint:
            raise SystemExit("--resume needs --checkpoint")
        saved = torch.load(f"{args.checkpoint}.rank{hvd.rank()}", weights_only=False, map_location=device)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        start_epoch, history = saved["epoch"], saved["history"]
    else:
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        hvd.broadcast_optimizer_state(opt, root_rank=0)

    # Same number of steps on every rank, or the exchange would wait for a missing rank.
    steps = task.steps() if args.steps_per_epoch is None else min(task.steps(), args.steps_per_epoch)
    steps = int(hvd.allreduce(torch.tensor(steps), op=hvd.Min, name="steps").item())
    show = hvd.rank() == 0 and not args.quiet and sys.stderr.isatty()
    start = time.perf_counter()
    # Seconds spent in training steps only (evaluation excluded), summed over the epochs, so a
    # run's metric can be plotted against the time it took to reach it (bench.time_to_accuracy).
    train_seconds = history[-1].get("train_seconds", 0.0) if history else 0.0
    for epoch in range(start_epoch, args.epochs):
        order = torch.randperm(task.n_train, generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        order = order.to(device)
        total_loss = 0.0
        epoch_start = time.perf_counter()
        for s in range(steps):
            idx = order[s * args.batch_size:(s + 1) * args.batch_size]
            opt.zero_grad()
            loss = task.loss(idx)
            loss.backward()
            opt.step()
            total_loss += loss.item()
            _progress(show, epoch, s, steps, loss.item())
        train_seconds += time.perf_counter() - epoch_start
        metrics = task.evaluate()
        loss_avg = hvd.allreduce(torch.tensor(total_loss / steps), name=f"loss{epoch}").item()
        stats = opt.compression_stats()
        row = {"epoch": epoch + 1, "loss": loss_avg, **metrics, "train_seconds": train_seconds,
               "payload_bytes_per_step": stats["step"]["payload_bytes"],
               "dense_bytes_per_step": stats["step"]["dense_bytes"],
               "sent_bytes_per_step": stats["step"]["sent_bytes"],
               "received_bytes_per_step": stats["step"]["received_bytes"],
               "ratio": stats["cumulative"]["ratio"], "ratio_by_kind": ratio_by_kind(stats["tensors"])}
        history.append(row)
        if hvd.rank() == 0:
            metric = " ".join(f"{k.replace('test_', 'test ')} {v:.4f}" for k, v in metrics.items())
            print(f"[{args.compression}] epoch {epoch + 1:3d}  loss {loss_avg:.4f}  {metric}  "
                  f"payload {row['payload_bytes_per_step']:,} B/step (dense {row['dense_bytes_per_step']:,})  "
                  f"sent {row['sent_bytes_per_step']:,.0f} B  ratio {row['ratio']:.1f}x", flush=True)
        if args.checkpoint:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1,
                        "history": history}, f"{args.checkpoint}.rank{hvd.rank()}")
    params_flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).cpu()
    everyone = hvd.allgather(params_flat.reshape(1, -1), name="final_params")
    identical = bool(all(torch.equal(everyone[0], d) for d in everyone))
    final = history[-1] if history else {}
    stats = opt.compression_stats()
    record = {
        "task": args.task, "compression": compression.config(), "ranks": hvd.size(), "communicator": where,
        "args": vars(args) | {"param": params, "momentum": momentum, "lr": lr},
        "final": {k: v for k, v in final.items() if k.startswith("test_")},
        "final_test_accuracy": final.get("test_accuracy"), "final_test_perplexity": final.get("test_perplexity"),
        "ratio": stats["cumulative"]["ratio"], "ratio_by_kind": ratio_by_kind(stats["tensors"]),
        "transports": stats["step"].get("transports"), "history": history,
        "parameters_identical_on_all_ranks": identical, "seconds": time.perf_counter() - start,
        "torch": torch.__version__, "python": platform.python_version(),
        "command": " ".join([os.path.basename(sys.executable), "-m", "launch.train"] + (argv or sys.argv[1:])),
    }
    if hvd.rank() == 0:
        metric = ", ".join(f"final {k.replace('_', ' ')} {v:.4f}" for k, v in record["final"].items())
        print(f"[{args.compression}] {metric}, compression ratio {record['ratio']:.1f}x "
              f"({', '.join(f'{k} {v:.1f}x' for k, v in record['ratio_by_kind'].items())}), "
              f"parameters identical on all {hvd.size()} ranks: {identical}", flush=True)
        if args.json:
            # independent mpi4py groups each write their own record
            path = args.json if args.mpi4py_groups <= 1 else f"{args.json}.{where.split(' of ')[0].replace(' ', '')}"
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as f:
                json.dump(record, f, indent=2, default=str)
    if not identical:
        raise SystemExit("ranks ended with different parameters")
    return record


if __name__ == "__main__":
    main()
