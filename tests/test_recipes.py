"""The optimizer-family rules (hvdcomp.recipes) and DGC's defaults, through the transports
in one process (hvdcomp.inprocess.World, a one-rank torch.distributed group for the DDP
hook): DGC takes over SGD's momentum and no tensor loses it, Adam/AdamW turn the momentum
correction off, bad combinations raise ValueError before any collective."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hvdcomp
from hvdcomp.compressors.dgc import DEFAULT_WARMUP_STEPS, PAPER_WARMUP_RATIOS, DGCCompressor
from hvdcomp.compressors.momentum import DenseMomentum
from hvdcomp.recipes import apply_recipe, optimizer_family

NRANKS = 2


class Net(nn.Module):
    """[B, 16] -> FC 16x32 (512 weights) -> FC 32x4 (128 weights); biases 32 and 4."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _models():
    torch.manual_seed(0)
    first = Net()
    out = [first]
    for _ in range(NRANKS - 1):
        m = Net()
        m.load_state_dict(first.state_dict())
        out.append(m)
    return out


def _batch(rank, step):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)


def _train(make_opt, compression, steps=30, min_compress_numel=200, **kw):
    """Train NRANKS in-process ranks; returns (rank 0's parameters, rank 0's optimizer)."""
    models = _models()
    world = hvdcomp.inprocess.World(NRANKS)
    opts = [world.DistributedOptimizer(r, make_opt(models[r]), named_parameters=models[r].named_parameters(),
                                       compression=compression, min_compress_numel=min_compress_numel, **kw)
            for r in range(NRANKS)]
    for step in range(steps):
        for r in range(NRANKS):
            opts[r].zero_grad()
            x, y = _batch(r, step)
            F.cross_entropy(models[r](x), y).backward()
        world.step()
    return {n: p.detach().clone() for n, p in models[0].named_parameters()}, opts[0]


def _sgd(m, **kw):
    return lambda model: torch.optim.SGD(model.parameters(), lr=0.1, momentum=m, **kw)


# ---- DGC's defaults --------------------------------------------------------------------------

def test_dgc_warmup_is_on_by_default_and_follows_the_paper():
    comp = hvdcomp.Compression.dgc()
    assert comp.warmup_steps == DEFAULT_WARMUP_STEPS == 1000
    assert comp.momentum is None and comp.ratio == 0.001
    per_stage = DEFAULT_WARMUP_STEPS // len(PAPER_WARMUP_RATIOS)
    # 75 % -> 93.75 % -> 98.4375 % -> 99.6 % -> 99.9 % sparsity, exponentially
    assert [comp.ratio_at(i * per_stage) for i in range(5)] == [0.25, 0.0625, 0.015625, 0.004, 0.001]
    assert comp.ratio_at(per_stage - 1) == 0.25 and comp.ratio_at(DEFAULT_WARMUP_STEPS) == 0.001
    assert comp.k(100_000, 0) == 25_000 and comp.k(100_000, 5000) == 100


def test_dgc_warmup_can_be_switched_off():
    assert DGCCompressor(warmup_steps=0).ratio_at(0) == 0.001


def test_dgc_momentum_none_without_an_optimizer_is_no_correction():
    info = hvdcomp.TensorInfo("w", torch.Size([4000]), torch.float32, torch.device("cpu"))
    g = torch.randn(4000, generator=torch.Generator().manual_seed(0))
    follow, zero = DGCCompressor(warmup_steps=0), DGCCompressor(momentum=0.0, warmup_steps=0)
    states = [follow.init_state(info), zero.init_state(info)]
    for _ in range(3):
        for comp, st in zip((follow, zero), states):
            comp.encode(g, st, info, 0)  # u = m u + g; v += u (no pack: nothing masked)
    assert torch.equal(states[0]["v"], states[1]["v"]) and torch.equal(states[0]["v"], 3 * g)


# ---- families and SGD --------------------------------------------------------------------------

def test_optimizer_family():
    p = [nn.Parameter(torch.zeros(2))]
    assert optimizer_family(torch.optim.SGD(p, lr=0.1)) == "sgd"
    assert optimizer_family(torch.optim.Adam(p)) == optimizer_family(torch.optim.AdamW(p)) == "adaptive"
    assert optimizer_family(torch.optim.RMSprop(p)) == "other"
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        optimizer_family(object())


def test_sgd_momentum_moves_into_dgc_and_small_tensors_keep_it():
    _, opt = _train(_sgd(0.9), hvdcomp.Compression.dgc(ratio=0.05), steps=1)
    assert all(g["momentum"] == 0.0 for g in opt.param_groups)
    slots = opt._table.slots
    assert isinstance(slots["fc1.weight"].compressor, DGCCompressor)
    assert slots["fc1.weight"].compressor.momentum == 0.9
    for bias in ("fc1.bias", "fc2.bias", "fc2.weight"):  # below min_compress_numel=200
        assert isinstance(slots[bias].compressor, DenseMomentum) and slots[bias].compressor.momentum == 0.9


def test_loading_a_state_saved_before_wrapping_keeps_the_momentum_in_dgc():
    """A checkpoint of the plain SGD(momentum=0.9) brings momentum 0.9 back into the param
    groups; the wrapped optimizer sets it to 0 again (DGC applies it), and refuses another m."""
    models = _models()
    plain = torch.optim.SGD(models[0].parameters(), lr=0.1, momentum=0.9)
    saved = plain.state_dict()
    world = hvdcomp.inprocess.World(1)
    opt = world.DistributedOptimizer(0, torch.optim.SGD(models[0].parameters(), lr=0.1, momentum=0.9),
                                     named_parameters=models[0].named_parameters(),
                                     compression=hvdcomp.Compression.dgc())
    opt.load_state_dict(saved)
    assert all(g["momentum"] == 0.0 for g in opt.param_groups)
    other = torch.optim.SGD(models[0].parameters(), lr=0.1, momentum=0.5).state_dict()
    with pytest.raises(ValueError, match="momentum 0.5"):
        opt.load_state_dict(other)


def test_uncompressed_tensors_get_the_optimizers_momentum():
    # Every tensor below min_compress_numel: with DGC's recipe each one travels through
    # DenseMomentum, which must give plain SGD(momentum=0.9)'s trajectory (up to summation order).
    base, _ = _train(_sgd(0.9), hvdcomp.Compression.none(), min_compress_numel=10**6)
    dgc, _ = _train(_sgd(0.9), hvdcomp.Compression.dgc(), min_compress_numel=10**6)
    no_momentum, _ = _train(_sgd(0.0), hvdcomp.Compression.none(), min_compress_numel=10**6)
    for name in base:
        torch.testing.assert_close(dgc[name], base[name], rtol=1e-5, atol=1e-6)
    assert max((no_momentum[n] - base[n]).abs().max().item() for n in base) > 1e-2  # momentum matters here


def test_explicit_dgc_momentum_with_sgd_momentum_is_refused_before_anything():
    models = _models()
    sgd = torch.optim.SGD(models[0].parameters(), lr=0.1, momentum=0.9)
    world = hvdcomp.inprocess.World(NRANKS)
    with pytest.raises(ValueError, match="momentum twice"):
        world.DistributedOptimizer(0, sgd, named_parameters=models[0].named_parameters(),
                                   compression=hvdcomp.Compression.dgc(momentum=0.9))
    assert sgd.param_groups[0]["momentum"] == 0.9 and world.ranks == [None] * NRANKS


def test_explicit_dgc_momentum_with_plain_sgd_gives_small_tensors_momentum():
    _, opt = _train(_sgd(0.0), hvdcomp.Compression.dgc(momentum=0.8), steps=1)
    assert isinstance(opt._table.slots["fc1.bias"].compressor, DenseMomentum)
    assert opt._table.slots["fc1.bias"].compressor.momentum == 0.8
    assert opt._table.slots["fc1.weight"].compressor.momentum == 0.8


@pytest.mark.parametrize("kw,match", [({"nesterov": True}, "nesterov"), ({"dampening": 0.1}, "dampening")])
def test_sgd_variants_outside_the_paper_are_refused(kw, match):
    models = _models()
    sgd = torch.optim.SGD(models[0].parameters(), lr=0.1, momentum=0.9, **kw)
    with pytest.raises(ValueError, match=match):
        apply_recipe(sgd, hvdcomp.Compression.dgc(), hvdcomp.Compression.none())
    assert sgd.param_groups[0]["momentum"] == 0.9


def test_groups_with_different_momenta_are_refused():
    m = Net()
    sgd = torch.optim.SGD([{"params": m.fc1.parameters(), "momentum": 0.9},
                           {"params": m.fc2.parameters(), "momentum": 0.5}], lr=0.1)
    with pytest.raises(ValueError, match="parameter groups"):
        apply_recipe(sgd, hvdcomp.Compression.dgc(), hvdcomp.Compression.none())
    assert [g["momentum"] for g in sgd.param_groups] == [0.9, 0.5]


def test_packed_small_compression_cannot_carry_the_momentum():
    sgd = torch.optim.SGD(Net().parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="dense small_compression"):
        apply_recipe(sgd, hvdcomp.Compression.dgc(), hvdcomp.Compression.topk(ratio=0.5))
    assert sgd.param_groups[0]["momentum"] == 0.9


def test_recipe_is_idempotent():
    sgd = torch.optim.SGD(Net().parameters(), lr=0.1, momentum=0.9)
    first = apply_recipe(sgd, hvdcomp.Compression.dgc(), hvdcomp.Compression.none())
    assert first.moved_momentum == 0.9 and "took over" in first.note
    second = apply_recipe(sgd, first.compression, first.small_compression)
    assert second.compression.config() == first.compression.config()
    assert second.small_compression is first.small_compression and second.moved_momentum == 0.0


# ---- Adam / AdamW and others ------------------------------------------------------------------

@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW])
def test_adam_turns_dgc_momentum_correction_off(cls):
    with pytest.warns(hvdcomp.recipes.RecipeNotice, match="became hvdcomp.FrozenAdamW"):
        _, opt = _train(lambda model: cls(model.parameters(), lr=1e-3), hvdcomp.Compression.dgc(ratio=0.05), steps=2)
    # The slot gets DGC when v freezes (hvdcomp.FrozenAdamW); its resolved momentum is 0.
    assert opt._table.compression.momentum == 0.0
    assert not isinstance(opt._table.slots["fc1.bias"].compressor, DenseMomentum)
    assert opt.param_groups[0]["betas"] == (0.9, 0.999)


@pytest.mark.parametrize("make", [lambda p: torch.optim.AdamW(p), lambda p: torch.optim.RMSprop(p, momentum=0.9)])
def test_explicit_dgc_momentum_under_an_optimizer_with_momentum_is_refused(make):
    models = _models()
    world = hvdcomp.inprocess.World(NRANKS)
    with pytest.raises(ValueError, match="momentum twice"):
        world.DistributedOptimizer(0, make(models[0].parameters()), named_parameters=models[0].named_parameters(),
                                   compression=hvdcomp.Compression.dgc(momentum=0.9))


def test_other_compressors_leave_the_optimizer_alone():
    for comp in (hvdcomp.Compression.topk(ratio=0.01), hvdcomp.Compression.scalecom(ratio=0.01),
                 hvdcomp.Compression.onebit(), hvdcomp.Compression.adacomp()):
        sgd = torch.optim.SGD(Net().parameters(), lr=0.1, momentum=0.9)
        recipe = apply_recipe(sgd, comp, hvdcomp.Compression.none())
        assert recipe.compression is comp and sgd.param_groups[0]["momentum"] == 0.9


# ---- the DDP hook's hook point ----------------------------------------------------------------

def test_ddp_state_applies_the_recipe_when_given_the_optimizer():
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = Net()
        sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        state = hvdcomp.ddp.CompressionState(hvdcomp.Compression.dgc(), named_parameters=model.named_parameters(),
                                             min_compress_numel=200, optimizer=sgd)
        assert state.compression.momentum == 0.9 and isinstance(state.small_compression, DenseMomentum)
        assert sgd.param_groups[0]["momentum"] == 0.0
        adam = torch.optim.AdamW(model.parameters())
        with pytest.raises(ValueError, match="momentum twice"):
            hvdcomp.ddp.CompressionState(hvdcomp.Compression.dgc(momentum=0.9), optimizer=adam)
        untouched = hvdcomp.ddp.CompressionState(hvdcomp.Compression.dgc())
        assert untouched.compression.momentum is None  # no optimizer: no momentum correction
    finally:
        dist.destroy_process_group()
