"""Multi-rank scenarios for hvdcomp.DistributedOptimizer's behaviour with any compressor."""
from __future__ import annotations

import io

import torch


class Net(torch.nn.Module):
    """Conv + FC layers (so AdaComp picks both bin sizes), and an optional branch."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3)
        self.fc1 = torch.nn.Linear(16 * 6 * 6, 64)
        self.fc2 = torch.nn.Linear(64, 4)
        self.unused_on_odd_ranks = torch.nn.Linear(64, 4)

    def forward(self, x, use_branch=True):
        h = torch.relu(self.conv(x)).flatten(1)
        h = torch.relu(self.fc1(h))
        out = self.fc2(h)
        if use_branch:
            out = out + self.unused_on_odd_ranks(h)
        return out


def batches(rank: int, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed * 100 + rank)
    return [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(steps)]


def make(name: str, params: dict, seed: int, momentum: float, passes: int = 1, dtype=torch.float32):
    import hvdcomp

    torch.manual_seed(seed)
    model = Net().to(dtype)
    opt = hvdcomp.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum),
                                       named_parameters=model.named_parameters(),
                                       compression=hvdcomp.compression_from_name(name, **params),
                                       backward_passes_per_step=passes, min_compress_numel=64)
    return model, opt


def train(model, opt, data, rank, passes=1, dynamic=False, dtype=torch.float32):
    for x, y in data:
        opt.zero_grad()
        for _ in range(passes):
            out = model(x.to(dtype), use_branch=not (dynamic and rank % 2 == 1))
            torch.nn.functional.cross_entropy(out.float(), y).backward()
        opt.step()


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])


def behaviours(configs: list, steps: int, seed: int):
    """For each (name, params, momentum): parameters after plain training, with two backward
    passes per step, with a branch unused on odd ranks, with fp16 and bf16 parameters, and
    resumed from a checkpoint half-way (vs uninterrupted)."""
    import horovod.torch as hvd

    hvd.init()
    rank = hvd.rank()
    data = batches(rank, steps, seed)
    out = {}
    for name, params, momentum in configs:
        res = {}
        model, opt = make(name, params, seed, momentum)
        train(model, opt, data, rank)
        res["plain"] = flat(model)
        res["stats"] = opt.compression_stats()

        model, opt = make(name, params, seed, momentum, passes=2)
        train(model, opt, data, rank, passes=2)
        res["two_passes"] = flat(model)

        model, opt = make(name, params, seed, momentum)
        train(model, opt, data, rank, dynamic=True)
        res["dynamic"] = flat(model)

        for dtype in (torch.float16, torch.bfloat16):
            model, opt = make(name, params, seed, momentum, dtype=dtype)
            train(model, opt, data, rank, dtype=dtype)
            res[str(dtype)] = flat(model)

        # Checkpoint after half the steps, restore into fresh objects, finish: must match.
        half = steps // 2
        model, opt = make(name, params, seed, momentum)
        train(model, opt, data[:half], rank)
        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
        train(model, opt, data[half:], rank)
        res["uninterrupted"] = flat(model)
        buf.seek(0)
        saved = torch.load(buf)
        model, opt = make(name, params, seed + 1, momentum)  # different init: the load must fix it
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        train(model, opt, data[half:], rank)
        res["resumed"] = flat(model)
        out[name] = res
    return out
