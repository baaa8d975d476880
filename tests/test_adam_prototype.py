"""launch.adam_prototype: the frozen-preconditioner AdamW exchange on in-process ranks."""
from __future__ import annotations

import copy

import pytest
import torch

import hvdcomp
from launch.adam_prototype import COMPRESSED, EXACT, ExactSteps, FrozenAdamW, InProcessExchange, with_error_feedback

RANKS, STEPS = 2, 20
HYPER = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01)


def _models(seed: int = 0, ranks: int = RANKS):
    torch.manual_seed(seed)
    base = torch.nn.Sequential(torch.nn.Linear(40, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    return [copy.deepcopy(base) for _ in range(ranks)]


def _batch(step: int, rank: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(8, 40, generator=g)
    return x, torch.randint(0, 4, (8,), generator=g)


def _loss(model, step, rank):
    x, y = _batch(step, rank)
    return torch.nn.functional.cross_entropy(model(x), y)


def _train(schedule: ExactSteps, compression, exact=None, message="momentum", units_power=1.0, min_numel=0,
           models=None, lr_units=False):
    models = models or _models()
    opts = [FrozenAdamW(torch.optim.AdamW(m.parameters(), **HYPER), schedule, STEPS, message, units_power, lr_units)
            for m in models]
    ex = InProcessExchange([list(m.named_parameters()) for m in models], exact or hvdcomp.Compression.none(),
                           compression, min_compress_numel=min_numel)
    for step in range(STEPS):
        for r, (m, o) in enumerate(zip(models, opts)):
            o.adamw.zero_grad()
            _loss(m, step, r).backward()
        avgs = ex.exchange(opts[0].phase(), [o.message() for o in opts])
        for o, a in zip(opts, avgs):
            o.apply(a)
    return models, opts, ex


def _reference(freeze: int | None):
    """AdamW by hand on the exact average, v (and its bias correction) frozen after ``freeze`` steps."""
    model = _models()[0]
    params = list(model.parameters())
    lr, (b1, b2), eps, wd = HYPER["lr"], HYPER["betas"], HYPER["eps"], HYPER["weight_decay"]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    replicas = _models()
    for step in range(STEPS):
        grads = []
        for r, rep in enumerate(replicas):
            with torch.no_grad():
                for src, dst in zip(params, rep.parameters()):
                    dst.copy_(src)
            rep.zero_grad()
            _loss(rep, step, r).backward()
            grads.append([p.grad for p in rep.parameters()])
        s = step + 1
        k = s if freeze is None else min(s, freeze)
        with torch.no_grad():
            for i, p in enumerate(params):
                g = sum(gr[i] for gr in grads) / RANKS
                m[i] = b1 * m[i] + (1 - b1) * g
                if freeze is None or step < freeze:
                    v[i] = b2 * v[i] + (1 - b2) * g * g
                d = (v[i] / (1 - b2 ** k)).sqrt() + eps
                p.mul_(1 - lr * wd)
                p.sub_(lr / (1 - b1 ** s) * m[i] / d)
    return params


def test_exact_schedule_is_torch_adamw_bit_for_bit():
    models, opts, _ = _train(ExactSteps(STEPS), hvdcomp.Compression.topk(ratio=0.1))
    ref = _models()
    world = hvdcomp.inprocess.World(RANKS)
    wrapped = [world.DistributedOptimizer(r, torch.optim.AdamW(m.parameters(), **HYPER),
                                          named_parameters=m.named_parameters()) for r, m in enumerate(ref)]
    for step in range(STEPS):
        for r, (m, o) in enumerate(zip(ref, wrapped)):
            o.zero_grad()
            _loss(m, step, r).backward()
        world.step()
    for a, b in zip(models[0].parameters(), ref[0].parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("message", ["momentum", "gradient", "delta"])
@pytest.mark.parametrize("units_power,lr_units", [(0.0, False), (0.5, False), (1.0, False), (1.0, True), (0.0, True)])
def test_uncompressed_after_the_freeze_is_adamw_with_v_frozen(message, units_power, lr_units):
    models, opts, _ = _train(ExactSteps(8), hvdcomp.Compression.none(), message=message, units_power=units_power,
                             lr_units=lr_units)
    for a, b in zip(models[0].parameters(), _reference(freeze=8)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert opts[0].phase() == COMPRESSED


def test_every_rank_ends_identical_under_a_compressor():
    models, _, ex = _train(ExactSteps(4, refresh_every=3), hvdcomp.Compression.onebit())
    flat = [torch.cat([p.reshape(-1) for p in m.parameters()]) for m in models]
    assert torch.equal(flat[0], flat[1])
    t = ex.traffic()
    assert t[EXACT]["steps"] == ExactSteps(4, refresh_every=3).count(STEPS) and t[COMPRESSED]["steps"] > 0
    assert t["total"]["payload_bytes"] < t["total"]["dense_bytes"] / 2  # 6 of 20 steps exact, fp32


def test_a_coordinate_without_gradient_only_decays():
    """1-bit cannot send an exact zero; input 0's weights never get a gradient and must
    move by weight decay only, before and after the freeze."""
    models = _models()
    for m in models:
        m[0].weight.register_hook(lambda g: g.index_fill(1, torch.tensor([0]), 0.0))
    start = models[0][0].weight[:, :2].detach().clone()
    _, opts, _ = _train(ExactSteps(4), hvdcomp.Compression.onebit(), models=models)
    assert opts[0].phase() == COMPRESSED
    decay = (1 - HYPER["lr"] * HYPER["weight_decay"]) ** STEPS
    torch.testing.assert_close(models[0][0].weight[:, 0], start[:, 0] * decay)
    assert not torch.allclose(models[0][0].weight[:, 1], start[:, 1] * decay)  # the live coordinates did move


def test_refresh_steps_double_their_gap():
    assert ExactSteps(10, refresh_every=2, refresh_doubling=2).refresh_steps(40) == [12, 14, 18, 22, 30, 38]
    assert ExactSteps(10, refresh_every=5, refresh_doubling=0).refresh_steps(26) == [15, 20, 25]
    assert ExactSteps(10).refresh_steps(100) == [] and ExactSteps(10).count(100) == 10
    with pytest.raises(ValueError):
        ExactSteps(-1)


def test_bad_settings_are_refused():
    model = _models()[0]
    with pytest.raises(TypeError):
        FrozenAdamW(torch.optim.SGD(model.parameters(), lr=0.1), ExactSteps(1), 2)
    with pytest.raises(ValueError):
        FrozenAdamW(torch.optim.AdamW(model.parameters(), amsgrad=True), ExactSteps(1), 2)
    with pytest.raises(ValueError):
        FrozenAdamW(torch.optim.AdamW(model.parameters()), ExactSteps(1), 2, message="bogus")


@pytest.mark.parametrize("ranks", [2, 4])  # TernGrad travels by allgather on 2 ranks, compressed allreduce on 4
def test_worker_error_feedback_keeps_what_terngrad_did_not_send(ranks):
    models = _models(ranks=ranks)
    comp = with_error_feedback(hvdcomp.Compression.terngrad())
    ex = InProcessExchange([list(m.named_parameters()) for m in models], hvdcomp.Compression.none(), comp,
                           min_compress_numel=0)
    torch.manual_seed(3)
    for _ in range(3):
        msgs = [[torch.randn_like(p) for p in m.parameters()] for m in models]
        errors_before = [[s.state["worker_error"].clone() for s in _slots(ex, r)] for r in range(ranks)]
        avgs = ex.exchange(COMPRESSED, [[t.clone() for t in ms] for ms in msgs])
        for j in range(len(msgs[0])):
            meant = sum(msgs[r][j].reshape(-1) + errors_before[r][j] for r in range(ranks)) / ranks
            left = sum(_slots(ex, r)[j].state["worker_error"] for r in range(ranks)) / ranks
            torch.testing.assert_close(avgs[0][j].reshape(-1) + left, meant)
            assert left.abs().sum() > 0
    kinds = set(ex.worlds[COMPRESSED].ranks[0].compression_stats()["step"]["transports"])
    assert kinds == {"allgather" if ranks == 2 else "compressed_allreduce"}
    with pytest.raises(ValueError):
        with_error_feedback(hvdcomp.Compression.topk(ratio=0.1))  # keeps a residual already


def _slots(ex: InProcessExchange, rank: int):
    table = ex.worlds[COMPRESSED].ranks[rank]._table
    return [table.slots[n] for n, _ in ex.named[rank]]
