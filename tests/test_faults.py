"""The non-finite policy and run-level checks on in-process ranks (every compressor, both
transports): one rank's overflow drops the step on every rank, leaves every piece of
compressor state as it was, and the run goes on exactly as if the step never happened;
resumed ranks at different steps, or on another number of ranks, raise ValueError."""
from __future__ import annotations

import pytest
import torch

import scenarios_faults as sf
import scenarios_identity as si
import hvdcomp
from hvdcomp.inprocess import World
from hvdcomp.registry import COMPRESSORS

NAMES = list(COMPRESSORS)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("transport,bad_rank", [("horovod", 1), ("horovod", 0), ("ddp", 1)])
@pytest.mark.parametrize("name", NAMES)
def test_overflow_on_one_rank_is_a_step_that_never_happened(name, transport, bad_rank):
    # bad rank 0 and 1: ScaleCom's leaders at the bad step are rank 0 (a NaN proposal must
    # still have k indices, or the broadcast's shapes would differ)
    got, stats, scales, around = sf.inprocess_amp(name, 2, skip_bad=False, transport=transport, bad_rank=bad_rank)
    want, want_stats, want_scales, _ = sf.inprocess_amp(name, 2, skip_bad=True, transport=transport)
    # GradScaler saw the overflow on every rank (not only the bad one) and skipped the step.
    assert around["grads_finite"] == [False, False]
    assert scales == want_scales == [2.0**9] * 2
    # State untouched by the bad step, step counter not advanced.
    before, after = around["before"], around["after"]
    assert before["step"] == after["step"]
    for tensor, saved in before["state"].items():
        for k, v in saved.items():
            assert torch.equal(after["state"][tensor][k], v), (tensor, k)
    assert stats["dropped_steps"] == 1 and want_stats["dropped_steps"] == 0
    assert stats["iterations"] == want_stats["iterations"] == len(sf.schedule(True))
    # ... and the run continues bit for bit as one without that step.
    for r in range(2):
        assert _same(got[r], want[r]), (name, r)
        assert all(torch.isfinite(v).all() for v in got[r].values())


def _world(nranks, name="topk"):
    world = World(nranks)
    models = [si.fresh() for _ in range(nranks)]
    opts = [world.DistributedOptimizer(r, torch.optim.SGD(m.parameters(), lr=0.1), named_parameters=m.named_parameters(),
                                       compression=si.make(name), min_compress_numel=si.MIN_NUMEL)
            for r, m in enumerate(models)]
    return world, models, opts


def _train(world, models, opts, steps):
    for step in range(steps):
        for r, (m, opt) in enumerate(zip(models, opts)):
            opt.zero_grad()
            sf.loss_of(m, r, step).backward()
        world.step()


def test_ranks_resumed_at_different_steps_raise():
    world, models, opts = _world(2, "randomk")
    _train(world, models, opts, 3)
    early = opts[1].state_dict()
    _train(world, models, opts, 1)
    opts[1].load_state_dict(early)  # rank 1 resumes one step behind rank 0
    with pytest.raises(ValueError, match="rank 1 is at step 3"):
        _train(world, models, opts, 1)


def test_checkpoint_of_two_ranks_refuses_three():
    world, models, opts = _world(2)
    _train(world, models, opts, 2)
    saved = opts[0].state_dict()
    world3, _, opts3 = _world(3)
    with pytest.raises(ValueError, match="nranks = 2, this run 3"):
        opts3[0].load_state_dict(saved)


@pytest.mark.parametrize("factory,kwargs", [
    (hvdcomp.Compression.topk, {"ratio": "0.1"}), (hvdcomp.Compression.randomk, {"ratio": "0.1"}),
    (hvdcomp.Compression.scalecom, {"ratio": "0.1"}), (hvdcomp.Compression.scalecom, {"ratio": 0.1, "beta": "1"}),
    (hvdcomp.Compression.dgc, {"ratio": "0.1"}), (hvdcomp.Compression.dgc, {"sample_ratio": "0.1"}),
    (hvdcomp.Compression.terngrad, {"clip": "2.5"}), (hvdcomp.Compression.topk, {"ratio": True}),
    (hvdcomp.Compression.topk, {"ratio": float("nan")}),
])
def test_numeric_parameters_refuse_non_numbers(factory, kwargs):
    with pytest.raises(ValueError, match="must be"):
        factory(**kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_the_nonfinite_flag_sees_every_nan_and_inf_wherever_it_is(dtype):
    from hvdcomp.core.faults import nonfinite_flag

    gen = torch.Generator().manual_seed(0)
    sizes = list(range(1, 40)) + [255, 4096, 100_003]
    for n in sizes:
        for pos in sorted({0, n // 3, n - 1}):
            for bad in (float("nan"), float("inf"), -float("inf")):
                grads = [torch.randn(n, generator=gen).to(dtype), torch.randn(3, generator=gen).to(dtype)]
                grads[0][pos] = bad
                assert bool(nonfinite_flag(grads)), (n, pos, bad)
                assert bool(nonfinite_flag(grads[::-1])), (n, pos, bad)
    finite = [torch.full((7,), torch.finfo(dtype).max, dtype=dtype), -torch.full((5,), torch.finfo(dtype).max,
                                                                               dtype=dtype)]
    assert not bool(nonfinite_flag(finite + [torch.empty(0, dtype=dtype)]))
    assert not bool(nonfinite_flag([torch.empty(0, dtype=dtype)]))
    # Gradients of several dtypes in one chain (fp16 parameters beside fp32 ones).
    mixed = [torch.randn(9), torch.randn(9).half()]
    assert not bool(nonfinite_flag(mixed))
    mixed[1][4] = float("inf")
    assert bool(nonfinite_flag(mixed))


def test_staged_state_is_kept_as_the_snapshot_not_copied():
    """DGC declares u and v staged: the snapshot is the previous tensors themselves, with
    spares in their place; a dropped step puts those very tensors back, values untouched,
    and a finished step makes them the next step's spares."""
    from types import SimpleNamespace

    from hvdcomp.compressor import TensorInfo
    from hvdcomp.core import faults
    from hvdcomp.core.slots import Slot

    comp = hvdcomp.Compression.dgc(momentum=0.9, warmup_steps=0, ratio=0.25)
    info = TensorInfo("w", torch.Size([64]), torch.float32, torch.device("cpu"))
    slot = Slot("w", info, comp, comp.init_state(info))
    slot.persistent = frozenset(slot.state)
    g = torch.linspace(-1.0, 1.0, 64)
    u0, v0 = slot.state["u"], slot.state["v"]

    saved = faults.snapshot([slot])
    comp.encode(g, slot.state, info, 0)  # writes this step's u and v
    assert saved[0][1]["u"] is u0 and saved[0][1]["v"] is v0
    assert slot.state["u"] is not u0 and torch.equal(slot.state["u"], g)
    assert torch.equal(u0, torch.zeros(64)) and torch.equal(v0, torch.zeros(64))
    faults.restore([SimpleNamespace(snapshots=saved)])
    slot.end_step()
    assert slot.state.keys() == {"u", "v"} and slot.state["u"] is u0 and slot.state["v"] is v0
    assert torch.equal(u0, torch.zeros(64))

    faults.snapshot([slot])  # a step that is not dropped: the new tensors stay
    comp.encode(g, slot.state, info, 1)
    u1 = slot.state["u"]
    slot.end_step()
    assert u1 is not u0 and torch.equal(u1, g) and slot.state.keys() == {"u", "v"}
    faults.snapshot([slot])
    assert slot.state["u"] is u0  # the spare: last step's previous tensor
    comp.encode(g, slot.state, info, 2)
    assert torch.equal(slot.state["u"], 0.9 * g + g) and torch.equal(u1, g)
