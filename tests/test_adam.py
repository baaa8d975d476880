"""The frozen-v Adam recipe (hvdcomp.FrozenAdamW, hvdcomp.recipes) on in-process ranks: exact
AdamW during the warm-up whatever the compressor, AdamW with v frozen afterwards, bit-identical
checkpoints, dropped non-finite steps, coordinates with an always-zero gradient kept still,
clear errors for bad input, and what the recipe does to each optimizer."""
from __future__ import annotations

import warnings

import pytest
import torch

import hvdcomp
import scenarios_adam as sa
from hvdcomp.compressor import TensorInfo
from hvdcomp.compressors.terngrad import TernGradCompressor
from hvdcomp.recipes import RecipeNotice

NRANKS = 2
LOSSY = ["onebit", "terngrad", "topk", "randomk", "dgc", "adacomp", "scalecom"]


def _equal(got: dict, want: dict, label: str) -> None:
    for k, v in want.items():
        assert torch.equal(got[k], v), (label, k, (got[k] - v).abs().max().item())


@pytest.fixture(autouse=True)
def _quiet_notice_one_thread():
    """No RecipeNotice; one intra-op thread, as sa.inprocess and the references run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RecipeNotice)
        yield
    torch.set_num_threads(threads)


# ---- exactness ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,warmup", [("none", "plain"), ("none", None), ("none", 20),
                                         ("onebit", 25), ("terngrad", 25), ("topk", 25)])
def test_without_a_freeze_every_parameter_is_adamw_bit_for_bit(name, warmup):
    """20 steps: plain AdamW under none is left as it is; FrozenAdamW before its freeze is
    exact AdamW on the exact average, whatever the compressor (the warm-up exchange is exact)."""
    want = sa.reference_adamw(NRANKS, 20)
    for r, got in enumerate(sa.inprocess(name, NRANKS, 20, warmup)):
        _equal(got, want, f"{name} warmup={warmup} rank {r}")


def test_with_a_freeze_none_equals_adamw_with_v_frozen_by_hand():
    want = sa.reference_adamw(NRANKS, 20, frozen_from=6)
    got = sa.inprocess("none", NRANKS, 20, warmup_steps=6)
    plain = sa.reference_adamw(NRANKS, 20)
    for k, v in want.items():
        torch.testing.assert_close(got[0][k], v, rtol=1e-5, atol=1e-6)
        assert torch.equal(got[0][k], got[1][k])
    # The freeze changed the run (else the comparison above proves nothing).
    assert any((plain[k] - want[k]).abs().max() > 1e-4 for k in want)


@pytest.mark.parametrize("name", LOSSY)
def test_every_lossy_compressor_switches_at_the_freeze_and_ranks_agree(name):
    models, opts, world = sa.inprocess_world(name, NRANKS, warmup_steps=4)
    slot = opts[0]._table.slots["fc1.weight"]
    sa.train(models, opts, world, range(4))
    assert slot.compressor.name == "none"
    sa.train(models, opts, world, range(4, 10))
    assert slot.compressor.name == name and opts[0]._table.slots["fc1.bias"].compressor.name == "none"
    assert opts[0].state[models[0].fc1.weight]["variance_steps"] == 4
    _equal(sa.params(models[1]), sa.params(models[0]), name)
    assert opts[0].compression_stats()["step"]["ratio"] > 1.5


# ---- checkpoints and faults ------------------------------------------------------------------------

@pytest.mark.parametrize("name,stop,nranks,nodes", [("onebit", 7, NRANKS, None), ("onebit", 3, NRANKS, None),
                                                    ("terngrad", 7, NRANKS, None), ("topk", 7, NRANKS, None),
                                                    ("onebit", 7, 4, 2)])  # the last: hierarchical
def test_checkpoint_and_resume_is_bit_identical(name, stop, nranks, nodes):
    """Saved after the freeze (error buffers, frozen v) or before it (the resumed run then
    switches at the freeze itself): the resumed run equals the uninterrupted one."""
    steps, warmup = 12, 5
    want = sa.inprocess(name, nranks, steps, warmup, nodes=nodes)
    models, opts, world = sa.inprocess_world(name, nranks, warmup, nodes=nodes)
    sa.train(models, opts, world, range(stop))
    saved = [(sa.params(m), o.state_dict()) for m, o in zip(models, opts)]
    if stop > warmup:
        assert "residual" in saved[0][1]["hvdcomp"]["state"]["fc1.weight"]
    models, opts, world = sa.inprocess_world(name, nranks, warmup, nodes=nodes)
    for m, o, (p, sd) in zip(models, opts, saved):
        with torch.no_grad():
            for n, q in m.named_parameters():
                q.copy_(p[n])
        o.load_state_dict(sd)
    sa.train(models, opts, world, range(stop, steps))
    for r in range(nranks):
        _equal(sa.params(models[r]), want[r], f"{name} resumed at {stop}, rank {r}")


def _buffers(model, opt) -> dict:
    out = {f"param {k}": v for k, v in sa.params(model).items()}
    for n, p in model.named_parameters():
        out.update({f"{n}.{k}": torch.as_tensor(v).clone() for k, v in opt.state[p].items()})
        out.update({f"{n}.slot.{k}": v.clone() for k, v in opt._table.slots[n].state.items()})
    return out


@pytest.mark.parametrize("bad_step", [2, 7])  # in the warm-up, after the freeze
@pytest.mark.parametrize("name", ["onebit", "terngrad", "none"])
def test_a_non_finite_step_is_skipped_leaving_every_buffer_as_it_was(name, bad_step):
    models, opts, world = sa.inprocess_world(name, NRANKS, warmup_steps=4)
    sa.train(models, opts, world, range(bad_step))
    before = [_buffers(m, o) for m, o in zip(models, opts)]
    sa.train(models, opts, world, [bad_step], poisoned={(1, bad_step)})
    for r in range(NRANKS):
        after = _buffers(models[r], opts[r])
        assert set(after) == set(before[r])
        for k, v in before[r].items():
            assert torch.equal(after[k], v), (name, bad_step, r, k)
    stats = opts[0].compression_stats()
    assert stats["dropped_steps"] == 1 and stats["iterations"] == bad_step
    # The run goes on, as if the bad step never happened.
    sa.train(models, opts, world, range(bad_step + 1, 10))
    want = sa.inprocess_world(name, NRANKS, warmup_steps=4)
    sa.train(*want, [s for s in range(10) if s != bad_step])
    _equal(sa.params(models[0]), sa.params(want[0][0]), f"{name} after a bad step {bad_step}")


def test_an_always_zero_coordinate_does_not_drift_under_onebit():
    models, opts, world = sa.inprocess_world("onebit", NRANKS, warmup_steps=3, weight_decay=0.0)
    unused = slice(sa.USED_TOKENS, sa.VOCAB)
    start = models[0].emb.weight.detach()[unused].clone()
    sa.train(models, opts, world, range(15))
    assert opts[0]._table.slots["emb.weight"].compressor.name == "onebit"
    assert torch.equal(models[0].emb.weight.detach()[unused], start)
    assert not torch.equal(models[0].emb.weight.detach()[:sa.USED_TOKENS], fresh_rows())  # the others move


def fresh_rows():
    return sa.fresh().emb.weight.detach()[:sa.USED_TOKENS]


def test_onebit_would_move_that_coordinate_without_the_mask():
    """What the mask prevents: the 1-bit average of all-zero messages is not zero."""
    comp = hvdcomp.Compression.onebit()
    info = TensorInfo("t", torch.Size([8]), torch.float32, torch.device("cpu"), index=0, rank=0, size=1)
    state = comp.init_state(info)
    x = torch.tensor([0.0, 0.0, 1.0, -2.0, 3.0, 0.5, -1.0, 2.0])
    encoded = comp.encode(x, state, info, 0)
    out = torch.empty(int(encoded.nbytes), dtype=torch.uint8)
    encoded.pack(out)
    assert comp.decode_sum([out], state, info)[:2].abs().min() > 0


# ---- loss scaling (torch.amp.GradScaler) -------------------------------------------------------------

def _scalers(opts, give: bool = True):
    """One GradScaler per rank whose scale stays 2^10 (``give``: told to the optimizers)."""
    scalers = [sa.grad_scaler() for _ in opts]
    if give:
        for opt, scaler in zip(opts, scalers):
            opt.use_grad_scaler(scaler)
    return scalers


def _scaled_steps(models, opts, world, scalers, steps, unscale_first: bool, poisoned=frozenset()):
    """Horovod's AMP recipe (``unscale_first``: synchronize, unscale_, step) or DDP's
    (``scaler.step`` alone, which leaves the unscaling to the optimizer)."""
    for step in steps:
        for r, (model, opt, scaler) in enumerate(zip(models, opts, scalers)):
            opt.zero_grad()
            scaler.scale(sa.loss_of(model, r, step, (r, step) in poisoned)).backward()
        world.synchronize()
        for opt, scaler in zip(opts, scalers):
            if unscale_first:
                scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()


@pytest.mark.parametrize("transport,unscale_first", [("horovod", True), ("horovod", False), ("ddp", False)])
@pytest.mark.parametrize("name", ["onebit", "topk", "none"])
def test_under_a_grad_scaler_the_run_is_the_unscaled_one_bit_for_bit(name, transport, unscale_first):
    """The messages carry the loss scale, GradScaler (or the step) takes it off again: with a
    power-of-two scale every product is exact, so the run equals the one without a scaler."""
    want = sa.inprocess(name, NRANKS, 10, warmup_steps=4, transport=transport)
    models, opts, world = sa.inprocess_world(name, NRANKS, 4, transport=transport)
    _scaled_steps(models, opts, world, _scalers(opts), range(10), unscale_first)
    assert opts[0]._table.slots["fc1.weight"].compressor.name == name
    for r in range(NRANKS):
        _equal(sa.params(models[r]), want[r], f"{name} {transport} rank {r}")


def test_without_the_scale_the_messages_would_be_wrong():
    """What use_grad_scaler prevents: the same run with the scale left out of the messages."""
    want = sa.inprocess("onebit", NRANKS, 10, warmup_steps=4)
    models, opts, world = sa.inprocess_world("onebit", NRANKS, 4)
    scalers = _scalers(opts)
    for opt in opts:
        opt._loss_scale = lambda: 1.0
    _scaled_steps(models, opts, world, scalers, range(10), True)
    assert (sa.params(models[0])["fc1.weight"] - want[0]["fc1.weight"]).abs().max() > 1e-3


def test_a_grad_scaler_not_given_raises_on_every_rank_at_the_first_step():
    models, opts, world = sa.inprocess_world("onebit", NRANKS, 4)
    scalers = _scalers(opts, give=False)
    for r, (model, opt, scaler) in enumerate(zip(models, opts, scalers)):
        opt.zero_grad()
        scaler.scale(sa.loss_of(model, r, 0)).backward()
    world.synchronize()
    before = sa.params(models[0])
    for opt, scaler in zip(opts, scalers):
        with pytest.raises(RuntimeError, match="use_grad_scaler"):
            scaler.step(opt)
    _equal(sa.params(models[0]), before, "nothing stepped")
    with pytest.raises(TypeError, match="GradScaler"):
        opts[0].use_grad_scaler(object())


def test_a_non_finite_step_under_the_scaler_is_skipped_leaving_every_buffer_as_it_was():
    models, opts, world = sa.inprocess_world("onebit", NRANKS, warmup_steps=3)
    scalers = _scalers(opts)
    _scaled_steps(models, opts, world, scalers, range(6), True)
    before = [_buffers(m, o) for m, o in zip(models, opts)]
    _scaled_steps(models, opts, world, scalers, [6], True, poisoned={(1, 6)})
    for r in range(NRANKS):
        after = _buffers(models[r], opts[r])
        for k, v in before[r].items():
            assert torch.equal(after[k], v), (r, k)
        assert scalers[r].get_scale() == 2.0 ** 9  # GradScaler saw the inf and backed off
    _scaled_steps(models, opts, world, scalers, range(7, 10), True)
    _equal(sa.params(models[1]), sa.params(models[0]), "after the bad step")
    assert all(torch.isfinite(v).all() for v in sa.params(models[0]).values())


# ---- TernGrad's worker error buffer ---------------------------------------------------------------

def test_terngrad_error_feedback_keeps_what_its_own_payload_missed():
    comp = TernGradCompressor(error_feedback=True)
    info = TensorInfo("t", torch.Size([64]), torch.float32, torch.device("cpu"), index=0, rank=0, size=1)
    state = comp.init_state(info)
    x = torch.randn(64, generator=torch.Generator().manual_seed(3))
    encoded = comp.encode(x, state, info, 0)
    out = torch.empty(int(encoded.nbytes), dtype=torch.uint8)
    encoded.pack(out)
    assert torch.equal(state["residual"], x - comp.decode_sum([out], state, info))
    assert state["residual"].abs().max() > 0
    with pytest.raises(ValueError, match="error_feedback"):
        TernGradCompressor(error_feedback=1)


@pytest.mark.parametrize("collective", ["allgather", "compressed_allreduce"])
def test_terngrad_under_the_recipe_gets_a_worker_error_buffer(collective):
    models, opts, world = sa.inprocess_world("terngrad", NRANKS, warmup_steps=2, collective=collective)
    sa.train(models, opts, world, range(6))
    assert opts[0]._table.compression.config()["error_feedback"] is True
    assert opts[0]._table.slots["fc1.weight"].state["residual"].abs().max() > 0
    _equal(sa.params(models[1]), sa.params(models[0]), collective)


# ---- what the recipe does, and bad input ------------------------------------------------------------

def _wrap(opt, model, comp):
    world = hvdcomp.inprocess.World(1)
    return world.DistributedOptimizer(0, opt, named_parameters=model.named_parameters(), compression=comp)


def test_the_recipe_by_optimizer_and_compressor():
    model = sa.fresh()
    default = hvdcomp.core.frozen_adam.DEFAULT_WARMUP_STEPS
    with pytest.warns(RecipeNotice, match=f"FrozenAdamW: exact AdamW for {default} steps"):
        opt = _wrap(sa.adamw(model), model, hvdcomp.Compression.onebit())
    assert isinstance(opt, hvdcomp.FrozenAdamW) and isinstance(opt, torch.optim.AdamW)
    assert [g["warmup_steps"] for g in opt.param_groups] == [default]
    coupled = _wrap(torch.optim.Adam(model.parameters(), weight_decay=0.1), model, hvdcomp.Compression.topk(ratio=0.01))
    assert isinstance(coupled, hvdcomp.FrozenAdamW) and coupled.param_groups[0]["decoupled_weight_decay"] is False
    mine = _wrap(sa.adamw(model, warmup_steps=7), model, hvdcomp.Compression.onebit())
    assert mine.param_groups[0]["warmup_steps"] == 7
    for opt, comp in [(sa.adamw(model), hvdcomp.Compression.none()), (sa.adamw(model), hvdcomp.Compression.bf16()),
                      (sa.adamw(model, amsgrad=True), hvdcomp.Compression.onebit()),
                      (sa.adamw(model), hvdcomp.Compression.auto()),
                      (torch.optim.RMSprop(model.parameters()), hvdcomp.Compression.onebit()),
                      (torch.optim.SGD(model.parameters(), lr=0.1), hvdcomp.Compression.onebit())]:
        wrapped = _wrap(opt, model, comp)
        assert not isinstance(wrapped, hvdcomp.FrozenAdamW), (type(opt).__name__, comp.name)


@pytest.mark.parametrize("warmup", [-1, 0, 1.5, True, "40"])
def test_bad_warmup_raises_before_any_collective(warmup):
    model = sa.fresh()
    with pytest.raises(ValueError, match="warmup_steps must be an integer >= 1"):
        sa.adamw(model, warmup_steps=warmup)
    plain = sa.adamw(model)
    plain.param_groups[0]["warmup_steps"] = warmup
    world = hvdcomp.inprocess.World(2)
    with pytest.raises(ValueError, match="warmup_steps must be an integer >= 1"):
        world.DistributedOptimizer(0, plain, named_parameters=model.named_parameters(),
                                   compression=hvdcomp.Compression.onebit())
    with pytest.raises(ValueError, match="amsgrad"):
        hvdcomp.FrozenAdamW(model.parameters(), amsgrad=True)


def test_ranks_with_different_warmups_raise_on_every_rank():
    models = [sa.fresh(), sa.fresh()]
    world = hvdcomp.inprocess.World(2)
    world.DistributedOptimizer(0, sa.adamw(models[0], 5), named_parameters=models[0].named_parameters(),
                               compression=hvdcomp.Compression.onebit())
    with pytest.raises(ValueError, match="warmup_steps"):
        world.DistributedOptimizer(1, sa.adamw(models[1], 6), named_parameters=models[1].named_parameters(),
                                   compression=hvdcomp.Compression.onebit())


def test_frozen_adamw_alone_is_the_same_recursion_on_one_rank():
    """Without a transport the frozen step forms the momentum from the local gradient: on one
    rank it equals the one-rank exchange."""
    model = sa.fresh()
    opt = sa.adamw(model, warmup_steps=3)
    for step in range(8):
        opt.zero_grad()
        sa.loss_of(model, 0, step).backward()
        opt.step()
    want = sa.inprocess("none", 1, 8, warmup_steps=3)[0]
    _equal(sa.params(model), want, "alone")


# ---- with the hierarchical exchange -----------------------------------------------------------------

def test_hierarchical_none_equals_adamw_with_v_frozen_by_hand():
    """4 ranks on 2 nodes: the momentum messages are summed inside each node, the node sums'
    shards exchanged across nodes; the average is the flat one up to the order of the sum."""
    want = sa.reference_adamw(4, 12, frozen_from=4)
    got = sa.inprocess("none", 4, 12, warmup_steps=4, nodes=2)
    for k, v in want.items():
        torch.testing.assert_close(got[0][k], v, rtol=1e-5, atol=1e-6)
        for r in range(1, 4):
            assert torch.equal(got[r][k], got[0][k]), (k, r)


@pytest.mark.parametrize("name", ["onebit", "terngrad", "topk"])
def test_hierarchical_lossy_state_lives_on_each_rank_shard(name):
    models, opts, world = sa.inprocess_world(name, 4, warmup_steps=3, nodes=2)
    sa.train(models, opts, world, range(8))
    slot = opts[0]._table.slots["fc1.weight"]
    assert slot.compressor.name == name and slot.state["residual"].numel() == models[0].fc1.weight.numel() // 2
    stats = opts[0].compression_stats()
    assert "hierarchical" in stats["tensors"]["fc1.weight"]["transport"]
    for r in range(1, 4):
        _equal(sa.params(models[r]), sa.params(models[0]), f"{name} rank {r}")


def test_hierarchical_plain_adamw_gets_the_recipe():
    model = sa.fresh()
    world = hvdcomp.inprocess.World(4, nodes=2)
    with pytest.warns(RecipeNotice, match="FrozenAdamW"):
        opt = world.DistributedOptimizer(0, sa.adamw(model), named_parameters=model.named_parameters(),
                                         compression=hvdcomp.Compression.onebit(), hierarchical=True)
    assert isinstance(opt, hvdcomp.FrozenAdamW)