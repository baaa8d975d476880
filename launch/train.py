"""Data-parallel training with hvdcomp under ``horovodrun`` — the script to copy.

    horovodrun -np 2 -H localhost:2 --gloo python -m launch.train --compression fp16
    horovodrun -np 4 -H localhost:4 --gloo python -m launch.train --compression adacomp --param bin_size=50

Trains an MLP on scikit-learn's handwritten digits (1,797 8x8 images that ship with the
package: no download), each rank on its own shard, through
``hvdcomp.DistributedOptimizer``. Rank 0 prints per-epoch loss, test accuracy, payload
bytes per step and the compression ratio, and writes a JSON record (``--json``).
"""
from __future__ import annotations

import argparse
import ast
import json
import platform
import sys
import time

import torch


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


#: Parameters used when the command line gives none for a compressor that needs them.
DEFAULT_PARAMS = {"topk": {"ratio": 0.01}, "randomk": {"ratio": 0.01}, "scalecom": {"ratio": 0.01}}
#: Compressors that apply momentum themselves (DGC's momentum correction): the wrapped
#: optimizer then runs without momentum, as the paper prescribes.
OWN_MOMENTUM = {"dgc"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--compression", default="none", help="hvdcomp compressor name (see README)")
    p.add_argument("--param", action="append", type=parse_param, default=[], metavar="KEY=VALUE",
                   help="compressor parameter, repeatable (e.g. --param ratio=0.01)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32, help="per-rank batch size")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-compress-numel", type=int, default=1024)
    p.add_argument("--json", default=None, help="write the run's record here (rank 0)")
    return p


def load_digits_split(seed: int):
    """Standardized digits, 80/20 train/test split fixed by ``seed``: (xtr, ytr, xte, yte)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_train = int(0.8 * len(x))
    mean, std = x[:n_train].mean(0), x[:n_train].std(0).clamp_min(1e-3)
    x = (x - mean) / std
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def make_model(hidden: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    import horovod.torch as hvd

    import hvdcomp

    hvd.init()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    params = dict(args.param) or DEFAULT_PARAMS.get(args.compression, {})
    compression = hvdcomp.compression_from_name(args.compression, **params)
    momentum = 0.0 if args.compression in OWN_MOMENTUM else args.momentum
    xtr, ytr, xte, yte = load_digits_split(args.seed)
    xtr, ytr = xtr[hvd.rank()::hvd.size()], ytr[hvd.rank()::hvd.size()]
    model = make_model(args.hidden)
    opt = hvdcomp.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=args.lr, momentum=momentum),
        named_parameters=model.named_parameters(), compression=compression,
        min_compress_numel=args.min_compress_numel)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)

    # Same number of steps on every rank, or the exchange would wait for a missing rank.
    steps = len(xtr) // args.batch_size
    steps = int(hvd.allreduce(torch.tensor(steps), op=hvd.Min, name="steps").item())
    history = []
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        total_loss = 0.0
        for s in range(steps):
            idx = order[s * args.batch_size:(s + 1) * args.batch_size]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            loss.backward()
            opt.step()
            total_loss += loss.item()
        model.eval()
        with torch.no_grad():
            accuracy = (model(xte).argmax(1) == yte).float().mean().item()
        loss_avg = hvd.allreduce(torch.tensor(total_loss / steps), name=f"loss{epoch}").item()
        stats = opt.compression_stats()
        row = {"epoch": epoch + 1, "loss": loss_avg, "test_accuracy": accuracy,
               "payload_bytes_per_step": stats["step"]["payload_bytes"],
               "dense_bytes_per_step": stats["step"]["dense_bytes"],
               "sent_bytes_per_step": stats["step"]["sent_bytes"],
               "received_bytes_per_step": stats["step"]["received_bytes"],
               "ratio": stats["cumulative"]["ratio"]}
        history.append(row)
        if hvd.rank() == 0:
            print(f"[{args.compression}] epoch {epoch + 1:3d}  loss {loss_avg:.4f}  test acc {accuracy:.4f}  "
                  f"payload {row['payload_bytes_per_step']:,} B/step (dense {row['dense_bytes_per_step']:,})  "
                  f"sent {row['sent_bytes_per_step']:,.0f} B  ratio {row['ratio']:.1f}x", flush=True)
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    digests = hvd.allgather(params.reshape(1, -1), name="final_params")
    identical = bool(all(torch.equal(digests[0], d) for d in digests))
    record = {
        "compression": compression.config(), "ranks": hvd.size(), "args": vars(args) | {"param": params, "momentum": momentum},
        "final_test_accuracy": history[-1]["test_accuracy"] if history else None,
        "ratio": opt.compression_stats()["cumulative"]["ratio"], "history": history,
        "parameters_identical_on_all_ranks": identical, "seconds": time.perf_counter() - start,
        "torch": torch.__version__, "python": platform.python_version(), "command": " ".join(sys.argv),
    }
    if hvd.rank() == 0:
        print(f"[{args.compression}] final test accuracy {record['final_test_accuracy']:.4f}, "
              f"compression ratio {record['ratio']:.1f}x, parameters identical on all {hvd.size()} ranks: "
              f"{identical}", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(record, f, indent=2, default=str)
    if not identical:
        raise SystemExit("ranks ended with different parameters")
    return record


if __name__ == "__main__":
    main()
