"""``launch.train``'s runs on N in-process ranks (:class:`hvdcomp.inprocess.World`), and the
check that they are the runs real Gloo ranks make.

    python -m launch.simulate --task digits-cnn --compression dgc --steps 300 --ranks 4

Every rank gets its own :class:`launch.train.Task` (its data shard, a model initialised from
the same seed, so identical on every rank as after Horovod's broadcast), the task's
optimizer (:func:`launch.train.make_optimizer`: SGD with momentum, AdamW for the
transformer), the same batch order as ``launch.train`` (a fresh ``randperm`` of the shard per
epoch, seeded ``seed * 1000 + epoch``) and the transport's recipe (:mod:`hvdcomp.recipes`).
The in-process transport sums in Gloo's ring order, so the parameters after each step are
bit-identical to N ``horovodrun --gloo`` ranks of :class:`hvdcomp.DistributedOptimizer` with
``HOROVOD_FUSION_THRESHOLD=0``; :func:`spot_check` proves it on real ranks for the first steps
of the runs it is given. With no launcher, no loopback sockets and one process, a step costs
what the N forward/backward passes and the compression cost, which is what makes schedules
long enough for the baseline to converge affordable on a 2-core machine.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time

import torch

from .train import DEFAULT_LR, DEFAULT_PARAMS, Task, make_optimizer, uses_adamw

#: Test windows (64 characters each) of the language-model tasks used for the held-out
#: perplexity: a fixed prefix of the test split (16,384 characters), so evaluation stays a
#: small part of a step budget.
EVAL_WINDOWS = 256


class BatchOrder:
    """``launch.train``'s batch schedule of one rank: step t is step ``t mod steps_per_epoch``
    of epoch ``t // steps_per_epoch``, whose order is ``randperm(n_train)`` seeded with
    ``seed * 1000 + epoch``. Returns int64 [batch_size] indices into the rank's shard."""

    def __init__(self, task: Task, seed: int, steps_per_epoch: int):
        self.task, self.seed, self.steps_per_epoch = task, seed, steps_per_epoch
        self._epoch, self._order = None, None

    def __call__(self, t: int) -> torch.Tensor:
        epoch, s = divmod(t, self.steps_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1000 + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.task.n_train, generator=g)
        b = self.task.batch_size
        return self._order[s * b:(s + 1) * b]


def rank_task(task: str, seed: int, rank: int, ranks: int, batch_size: int, width: int | None, seq: int = 64,
              eval_chars: int = EVAL_WINDOWS * 64) -> Task:
    """Rank ``rank``'s task; the model initialised after ``torch.manual_seed(seed)``. A
    language model trains on windows of ``seq`` characters and is evaluated on the first
    ``eval_chars`` characters of the test split (a whole number of windows)."""
    torch.manual_seed(seed)
    t = Task(task, seed, rank, ranks, batch_size, width, seq=seq)
    if t.lm:
        t.data.test = t.data.test[:eval_chars // t.seq * t.seq + 1]
    return t


def build_compression(name: str, params: dict):
    import hvdcomp

    return hvdcomp.compression_from_name(name, **(params if params else DEFAULT_PARAMS.get(name, {})))


def lr_factor(schedule: str, step: int, steps: int) -> float:
    """The learning rate of step ``step`` (0-based) of ``steps`` as a share of the peak:
    1 for ``"constant"``; ``(1 + cos(pi * step / steps)) / 2`` for ``"cosine"`` (SGDR's
    annealing without restarts: Loshchilov and Hutter, "SGDR: Stochastic Gradient Descent
    with Warm Restarts", ICLR 2017), which lets a short schedule end converged."""
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * step / steps))
    raise ValueError(f"unknown schedule {schedule!r}: 'constant' or 'cosine'")


def _flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def train_inprocess(task: str, name: str, params: dict, seed: int, ranks: int, steps: int, eval_every: int,
                    width: int | None = None, lr: float | None = None, momentum: float = 0.9,
                    batch_size: int = 32, min_compress_numel: int = 1024, observe=None, seq: int = 64,
                    eval_chars: int = EVAL_WINDOWS * 64, schedule: str = "constant",
                    warmup_steps: int | None = None, optimizer: str | None = None) -> dict:
    """One run of ``steps`` steps on ``ranks`` in-process ranks; the held-out metric every
    ``eval_every`` steps and at the end. Returns a record with the keys of
    ``launch.train``'s (what :mod:`launch.summarize` reads), ``history`` rows per evaluation
    (``step``, ``loss`` averaged over ranks and the steps since the last row, the test
    metric, the last step's bytes, the cumulative ratio). ``observe(step, tasks)`` is called
    after every step when given (the spot check reads parameters with it). ``schedule``:
    ``"constant"`` learning rate, or ``"cosine"`` (:func:`lr_factor`), the same for every
    method. ``warmup_steps``: under AdamW, the frozen-v recipe's warm-up (default: the
    recipe's, :mod:`hvdcomp.recipes`). ``optimizer``: one of ``launch.train.OPTIMIZERS``
    instead of the task's own (``launch.train.make_optimizer``)."""
    import hvdcomp
    from hvdcomp.core.traffic import ratio_by_kind

    torch.set_num_threads(1)
    lr = lr if lr is not None else DEFAULT_LR.get(task, 0.05)
    tasks = [rank_task(task, seed, r, ranks, batch_size, width, seq, eval_chars) for r in range(ranks)]
    momentum = 0.0 if uses_adamw(task, optimizer) else momentum
    world = hvdcomp.inprocess.World(ranks)
    optimizers = [make_optimizer(task, t.model.parameters(), lr, momentum, optimizer) for t in tasks]
    for group in (g for o in optimizers for g in o.param_groups if warmup_steps is not None):
        group["warmup_steps"] = warmup_steps  # the recipe keeps a group's own warm-up
    opts = [world.DistributedOptimizer(r, optimizers[r], named_parameters=t.model.named_parameters(),
                                       compression=build_compression(name, params),
                                       min_compress_numel=min_compress_numel)
            for r, t in enumerate(tasks)]
    per_epoch = min(t.steps() for t in tasks)
    orders = [BatchOrder(t, seed, per_epoch) for t in tasks]
    history, total, count = [], 0.0, 0
    start = time.perf_counter()
    for step in range(steps):
        for opt in opts:
            for group in opt.param_groups:
                group["lr"] = lr * lr_factor(schedule, step, steps)
        for t, opt, order in zip(tasks, opts, orders):
            opt.zero_grad()
            loss = t.loss(order(step))
            loss.backward()
            total += loss.item()
        count += 1
        world.step()
        if observe is not None:
            observe(step, tasks)
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            stats = opts[0].compression_stats()
            history.append({"step": step + 1, "epoch": (step + 1) / per_epoch, "loss": total / (count * ranks),
                            **tasks[0].evaluate(),
                            "payload_bytes_per_step": stats["step"]["payload_bytes"],
                            "dense_bytes_per_step": stats["step"]["dense_bytes"],
                            "sent_bytes_per_step": stats["step"]["sent_bytes"],
                            "received_bytes_per_step": stats["step"]["received_bytes"],
                            "ratio": stats["cumulative"]["ratio"], "seconds": time.perf_counter() - start})
            total, count = 0.0, 0
    first = _flat_params(tasks[0].model)
    identical = all(torch.equal(first, _flat_params(t.model)) for t in tasks[1:])
    stats = opts[0].compression_stats()
    final = history[-1]
    return {
        "task": task, "world": "inprocess", "compression": stats["compression"], "ranks": ranks,
        "optimizer": type(opts[0]).__name__, "optimizer_momentum": opts[0].param_groups[0].get("momentum"),
        "args": {"seed": seed, "param": params, "steps": steps, "eval_every": eval_every, "width": width, "lr": lr,
                 "momentum": momentum, "batch_size": batch_size, "min_compress_numel": min_compress_numel,
                 "seq": seq, "eval_chars": eval_chars, "schedule": schedule, "optimizer": optimizer},
        "final": {k: v for k, v in final.items() if k.startswith("test_")},
        "final_test_accuracy": final.get("test_accuracy"), "final_test_perplexity": final.get("test_perplexity"),
        "ratio": stats["cumulative"]["ratio"], "ratio_by_kind": ratio_by_kind(stats["tensors"]),
        "transports": stats["step"].get("transports"), "history": history,
        "parameters_identical_on_all_ranks": identical, "seconds": time.perf_counter() - start,
        "steps_per_epoch": per_epoch, "torch": torch.__version__, "python": platform.python_version(),
    }


# ---- the real-rank spot check -------------------------------------------------------------------

def _real_ranks(runs: list, min_compress_numel: int) -> list:
    """On every Horovod rank: for each run ``(task, name, params, seed, steps, width, seq,
    batch_size)``, the flat parameters after each of its ``steps`` steps through
    hvdcomp.DistributedOptimizer."""
    import horovod.torch as hvd

    import hvdcomp

    hvd.init()
    torch.set_num_threads(1)
    out = []
    for task, name, params, seed, steps, width, seq, batch_size in runs:
        t = rank_task(task, seed, hvd.rank(), hvd.size(), batch_size, width, seq)
        lr = DEFAULT_LR.get(task, 0.05)
        opt = hvdcomp.DistributedOptimizer(
            make_optimizer(task, t.model.parameters(), lr, 0.0 if uses_adamw(task) else 0.9),
            named_parameters=t.model.named_parameters(), compression=build_compression(name, params),
            min_compress_numel=min_compress_numel)
        per_epoch = int(hvd.allreduce(torch.tensor(t.steps()), op=hvd.Min, name=f"spe.{task}.{name}").item())
        order, trace = BatchOrder(t, seed, per_epoch), []
        for step in range(steps):
            opt.zero_grad()
            t.loss(order(step)).backward()
            opt.step()
            trace.append(_flat_params(t.model).clone())
        out.append(trace)
    return out


def spot_check(runs: list, ranks: int, min_compress_numel: int = 1024) -> list[dict]:
    """Run ``runs`` (tuples ``(task, name, params, seed, steps, width, seq, batch_size)``) on ``ranks`` real
    Horovod Gloo ranks (one ``horovod.run`` launch, tensor fusion off) and in process;
    returns per run the number of steps whose parameters match bit for bit on every rank
    (``identical_steps``; equal to ``steps`` when all do) and the largest difference."""
    from bench._ranks import run_on_ranks

    os.environ["HOROVOD_FUSION_THRESHOLD"] = "0"  # fusion changes which elements the ring sums together
    real = run_on_ranks(_real_ranks, ranks, (runs, min_compress_numel))
    report = []
    for j, (task, name, params, seed, steps, width, seq, batch_size) in enumerate(runs):
        traces: list = []
        train_inprocess(task, name, params, seed, ranks, steps, steps, width, batch_size=batch_size,
                        min_compress_numel=min_compress_numel, seq=seq,
                        observe=lambda step, tasks: traces.append([_flat_params(t.model).clone() for t in tasks]))
        same, worst = 0, 0.0
        for step in range(steps):
            diffs = [(traces[step][r] - real[r][j][step]).abs().max().item() for r in range(ranks)]
            worst = max(worst, *diffs)
            same += all(d == 0 for d in diffs) and all(torch.equal(traces[step][r], real[r][j][step])
                                                        for r in range(ranks))
        report.append({"task": task, "compression": name, "param": params, "seed": seed, "steps": steps,
                       "width": width, "seq": seq, "batch_size": batch_size, "ranks": ranks, "identical_steps": same, "max_abs_difference": worst})
    return report


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="digits-cnn")
    p.add_argument("--compression", default="none")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--seq", type=int, default=64, help="language models: characters per window")
    p.add_argument("--schedule", choices=("constant", "cosine"), default="constant")
    p.add_argument("--eval-chars", type=int, default=EVAL_WINDOWS * 64, help="language models: test characters")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from .train import parse_param

    params = dict(parse_param(x) for x in args.param)
    record = train_inprocess(args.task, args.compression, params, args.seed, args.ranks, args.steps,
                             args.eval_every, args.width, args.lr, batch_size=args.batch_size, seq=args.seq,
                             eval_chars=args.eval_chars, schedule=args.schedule)
    for row in record["history"]:
        metric = {k: round(v, 4) for k, v in row.items() if k.startswith("test_")}
        print(f"step {row['step']:5d}  loss {row['loss']:.4f}  {metric}  ratio {row['ratio']:.1f}x  "
              f"{row['seconds']:.1f} s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2, default=str)
    return record


if __name__ == "__main__":
    main()
