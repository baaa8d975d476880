"""``Compression.auto()`` on in-process ranks: the choice per tensor (with timings made
deterministic where a test asserts a choice), the error-feedback carry across a switch, the
checkpoint, refusals, and the pieces of the model (mirrored answers, link fit, choose)."""
from __future__ import annotations

import pytest
import torch

import hvdcomp
from hvdcomp.core import choice
from hvdcomp.core import requests as rq
from hvdcomp.core.mirror import mirror_results
from hvdcomp.core.trial import Trial
from hvdcomp.inprocess import World, run_collectives
from scenarios_auto import fixed_codecs

NRANKS = 2
SLOW = choice.LinkFit({"allreduce": 1e-3, "allgather": 1e-3, "alltoall": 1e-3},
                      {"allreduce": 3e-7, "allgather": 3e-7, "alltoall": 3e-7})


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))


def _world(compression, nranks=NRANKS, transport="horovod", **kwargs):
    world = World(nranks, transport=transport)
    models = [_model() for _ in range(nranks)]
    opts = [world.DistributedOptimizer(r, torch.optim.SGD(models[r].parameters(), lr=0.1),
                                       named_parameters=models[r].named_parameters(), compression=compression,
                                       min_compress_numel=100, **kwargs) for r in range(nranks)]
    return world, models, opts


def _grads(models, step):
    out = []
    for r, m in enumerate(models):
        g = torch.Generator().manual_seed(100 * step + r)
        out.append({n: torch.randn(p.shape, generator=g) for n, p in m.named_parameters()})
    return out


def _step(world, models, opts, step, observe=None):
    grads = _grads(models, step)
    for m, opt, g in zip(models, opts, grads):
        opt.zero_grad()
        for n, p in m.named_parameters():
            p.grad = g[n].clone()
    world.synchronize(observe)
    applied = {n: p.grad.clone() for n, p in models[0].named_parameters()}
    for opt in opts:
        opt.step()
    return grads, applied


def test_decides_after_warmup_and_every_rank_agrees(monkeypatch):
    # none: no local work, many bytes; topk: some local work, few bytes -> topk on a slow link
    monkeypatch.setattr(choice, "measure_codecs", fixed_codecs({0: (0.0, 1e6), 1: (1e-3, 1e3)}))
    auto = hvdcomp.Compression.auto(candidates=["none", hvdcomp.Compression.topk(ratio=0.1)], warmup_steps=2,
                                    link=SLOW)
    world, models, opts = _world(auto)
    for step in range(5):
        _step(world, models, opts, step)
        stats = opts[0].compression_stats()["auto"]
        assert stats["decided"] == (step >= 2)
    assert stats["assignment"] == {"0.weight": "topk", "2.weight": "topk"}  # the biases keep small_compression
    assert stats["at_step"] == 2 and stats["tensors_per_candidate"][0] == 0
    assert stats["predicted_exchange_s"] < stats["previous_exchange_s"]
    for opt in opts[1:]:
        assert opt.compression_stats()["auto"]["assignment"] == stats["assignment"]
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)
    assert "allgather" in opts[0].compression_stats()["step"]["transports"]


def test_the_timed_codec_run_computes_what_the_warm_up_cached(monkeypatch):
    """The start-up measurement times each candidate on a gradient tensor its warm-up run did
    not see: TernGrad's clipping bound, cached per tensor version, is computed in both runs."""
    from hvdcomp.compressors.terngrad import TernGradCompressor

    calls = []
    real = TernGradCompressor.clip_bound
    monkeypatch.setattr(TernGradCompressor, "clip_bound", lambda self, g: calls.append(g.numel()) or real(self, g))
    world, models, opts = _world(hvdcomp.Compression.auto(candidates=["terngrad"], warmup_steps=0, link=SLOW))
    _step(world, models, opts, 0)
    # On each of the 2 ranks: the decision's warm-up and timed runs, then the step itself.
    assert calls.count(64 * 64) == NRANKS * (1 + choice.CODEC_REPS + 1)


def test_a_codec_counts_the_median_of_its_timed_runs(monkeypatch):
    """One slow run (the rank preempted while it timed) does not decide the choice."""
    runs = iter([0.0, 0.5, 0.001, 0.002] * 100)  # per candidate: warm-up, then three timed runs
    real = choice.time_chain
    monkeypatch.setattr(choice, "time_chain",
                        lambda *a: choice.CodecTiming(next(runs), real(*a).transfers))
    world, models, opts = _world(hvdcomp.Compression.auto(candidates=["none", "bf16"], warmup_steps=0))
    measured = []
    real_measure = choice.measure_codecs
    monkeypatch.setattr(choice, "measure_codecs", lambda *a, **k: measured.append(real_measure(*a, **k)) or measured[-1])
    _step(world, models, opts, 0)
    assert choice.CODEC_REPS == 3
    assert all(t.seconds == 0.002 for timings in measured[0].values() for t in timings)


def test_free_link_keeps_the_cheapest_codec(monkeypatch):
    monkeypatch.setattr(choice, "measure_codecs", fixed_codecs({0: (0.0, 1e6), 1: (1e-3, 1e3)}))
    world, models, opts = _world(hvdcomp.Compression.auto(candidates=["none", "bf16"], warmup_steps=0))
    _step(world, models, opts, 0)
    assert set(opts[0].compression_stats()["auto"]["assignment"].values()) == {"none"}


def _signature(request) -> tuple:
    """A request as the link sees it: its kind, every tensor's dtype and shape, the rest."""
    return (type(request).__name__,) + tuple(
        (k, (v.dtype, tuple(v.shape)) if torch.is_tensor(v) else v) for k, v in sorted(vars(request).items()))


def _exchange_of(compression, transport: str, steps: int = 5):
    """Every collective the ranks issued, step by step, and rank 0's parameters after."""
    world, models, opts = _world(compression, transport=transport)
    issued = []
    observe = lambda key, phase, per_rank: issued.append(tuple(tuple(map(_signature, reqs)) for reqs in per_rank))
    for step in range(steps):
        _step(world, models, opts, step, observe)
        issued.append(f"end of step {step}")
    return issued, [p.detach().clone() for p in models[0].parameters()], opts[0]


@pytest.mark.parametrize("transport", ["horovod", "ddp"])
def test_auto_that_keeps_none_makes_exactly_nones_exchange(monkeypatch, transport):
    """Where nothing pays, ``auto`` keeps ``none`` for every tensor, and from then on its steps
    issue the very collectives of ``none`` (kind, dtype, shape, in order) and train the
    same parameters bit for bit: its per-step cost over ``none`` is its decision alone."""
    monkeypatch.setattr(choice, "measure_codecs", fixed_codecs({0: (0.0, 1e6), 1: (1e-3, 1e3)}))
    auto = hvdcomp.Compression.auto(candidates=["none", "bf16"], warmup_steps=2)
    by_auto, params_auto, opt = _exchange_of(auto, transport)
    assert opt.compression_stats()["auto"]["decided"]
    assert set(opt.compression_stats()["auto"]["assignment"].values()) == {"none"}
    by_none, params_none, _ = _exchange_of(hvdcomp.Compression.none(), transport)
    assert by_auto == by_none
    assert all(torch.equal(a, b) for a, b in zip(params_auto, params_none))
    # the comparison tells exchanges apart: bf16's differs in dtype and shape
    assert _exchange_of(hvdcomp.Compression.bf16(), transport)[0] != by_none


def test_switching_delivers_the_residual(monkeypatch):
    """top-k for two steps, then none: the applied gradients sum to the ranks' average
    gradients summed (the residual owed by top-k arrives as the carry)."""
    costs = {0: (1e-3, 1e3), 1: (0.0, 1e6)}  # topk cheaper on the slow link
    monkeypatch.setattr(choice, "measure_codecs", fixed_codecs(costs))
    auto = hvdcomp.Compression.auto(candidates=[hvdcomp.Compression.topk(ratio=0.05), "none"], warmup_steps=0,
                                    link=SLOW)
    world, models, opts = _world(auto)
    total_grad = None
    total_applied = None
    for step in range(4):
        if step == 2:
            costs[0], costs[1] = (1e-3, 1e6), (0.0, 1e3)  # now none is cheaper
            for opt in opts:
                opt.redecide_compression()
        grads, applied = _step(world, models, opts, step)
        avg = {n: sum(g[n] for g in grads) / NRANKS for n in grads[0]}
        total_grad = avg if total_grad is None else {n: total_grad[n] + avg[n] for n in avg}
        total_applied = applied if total_applied is None else {n: total_applied[n] + applied[n] for n in applied}
        if step == 1:
            owed = opts[0]._table.slots["0.weight"].state["residual"]
            assert owed.abs().sum() > 0  # top-k kept something back
    assert opts[0].compression_stats()["auto"]["assignment"]["0.weight"] == "none"
    for n in total_grad:
        torch.testing.assert_close(total_applied[n], total_grad[n], rtol=1e-5, atol=1e-5)
    assert all("carry" not in s.state for s in opts[0]._table.slots.values())  # delivered, then dropped


@pytest.mark.parametrize("none_bytes, switches", [(1e5, False), (1e6, True)])
def test_a_saving_too_small_for_the_step_keeps_the_current_choice(monkeypatch, caplog, none_bytes, switches):
    """bf16 moves half of none's bytes, so each tensor's choice is bf16 either way; with the
    observed step at 2 s, the whole choice saves 2 x 15 ms (under 3 %: kept) or 2 x 150 ms."""
    from hvdcomp.core.step import StepDriver

    monkeypatch.setattr(StepDriver, "observed_step_seconds", lambda self, since=0: 2.0)
    monkeypatch.setattr(choice, "measure_codecs", fixed_codecs({0: (0.0, none_bytes), 1: (0.0, none_bytes / 2)}))
    world, models, opts = _world(hvdcomp.Compression.auto(candidates=["none", "bf16"], warmup_steps=2, link=SLOW))
    with caplog.at_level("INFO", logger="hvdcomp"):
        for step in range(3):
            _step(world, models, opts, step)
    decisions = [r.getMessage() for r in caplog.records if "hvdcomp auto at step 2" in r.getMessage()]
    assert decisions and all(("kept: a new choice saved under 3%" in line) is not switches for line in decisions)
    for opt in opts:
        stats = opt.compression_stats()["auto"]
        assert stats["kept_current"] is not switches
        assert set(stats["assignment"].values()) == {"bf16" if switches else "none"}
        if switches:
            assert stats["predicted_step_s"] == pytest.approx(2.0 - 0.3, abs=1e-9)
        else:
            assert stats["predicted_exchange_s"] == stats["previous_exchange_s"]
            assert stats["predicted_step_s"] == pytest.approx(2.0)
    assert choice.worth_switching(1.0, 0.9, None)  # no observed step: the per-tensor rule alone
    assert not choice.worth_switching(0.01, 0.005, 0.2) and choice.worth_switching(0.01, 0.0, 0.2)


def _timed_by_choice(baseline_s: float, proposal_s_by_rank: dict, warmup_s: float | None = None):
    """StepDriver.observed_step_seconds stand-in: ``warmup_s`` before the first decision (a
    run's first steps; default ``baseline_s``), then ``baseline_s`` while every slot holds
    the first candidate, ``proposal_s_by_rank[rank]`` once any holds another."""
    def observed(self, since=0):
        if self.chooser.decision is None:
            return baseline_s if warmup_s is None else warmup_s
        on_proposal = any(s.compressor is not self.table.compression.candidates[0]
                          for s in self.table.slots.values() if s.compressor in self.table.compression.candidates)
        return proposal_s_by_rank[self.table.rank] if on_proposal else baseline_s
    return observed


@pytest.mark.parametrize("proposal_s_by_rank, stands", [({0: 0.5, 1: 0.9}, True), ({0: 0.5, 1: 1.5}, False)])
def test_a_proposal_is_tried_before_it_stands(monkeypatch, caplog, proposal_s_by_rank, stands):
    """With the link measured (none given), top-k (cheaper by the model) is tried: two steps
    of none timed, the switch, two of top-k timed, none back for two more timed steps, the
    verdict from the slowest rank (rank 0 alone would keep top-k in both cases). A reverted trial hands top-k's residual back:
    the applied gradients sum to the averaged ones."""
    from hvdcomp.core.step import StepDriver

    monkeypatch.setattr(StepDriver, "observed_step_seconds", _timed_by_choice(1.0, proposal_s_by_rank, warmup_s=3.0))
    monkeypatch.setattr(choice, "measure_codecs", fixed_codecs({0: (0.2, 1e6), 1: (0.0, 1e3)}))
    topk = hvdcomp.Compression.topk(ratio=0.05)
    world, models, opts = _world(hvdcomp.Compression.auto(candidates=["none", topk], warmup_steps=2, trial_steps=2))
    total_grad = total_applied = None
    serving = []
    with caplog.at_level("INFO", logger="hvdcomp"):
        for step in range(13):
            grads, applied = _step(world, models, opts, step)
            serving.append(opts[0]._table.slots["0.weight"].compressor.name)
            avg = {n: sum(g[n] for g in grads) / NRANKS for n in grads[0]}
            total_grad = avg if total_grad is None else {n: total_grad[n] + avg[n] for n in avg}
            total_applied = applied if total_applied is None else {n: total_applied[n] + applied[n] for n in applied}
            assert opts[0].compression_stats()["auto"]["on_trial"] == (2 <= step <= 10)
    final = "topk" if stands else "none"
    # decision at step 2, baseline 3-4, the switch at 5, trial 6-7, none back at 8, the
    # second baseline 9-10, the verdict at 11
    assert serving == ["none"] * 5 + ["topk"] * 3 + ["none"] * 3 + [final] * 2
    for opt in opts:
        stats = opt.compression_stats()["auto"]
        assert stats["trial"] == {"steps": 2, "decided_at": 2, "switched_at": 5, "returned_at": 8, "verdict_at": 11,
                                  "baseline_step_s": 1.0, "trial_step_s": max(proposal_s_by_rank.values()),
                                  "second_baseline_step_s": 1.0, "stands": stands}
        assert set(stats["assignment"].values()) == {final}
        assert stats["tensors_per_candidate"] == ([0, 2] if stands else [2, 0])
        # predicted from the baseline (1 s, not the warm-up's 3 s) less none's 2 x 0.2 s of
        # local work, or the baseline itself
        assert stats["predicted_step_s"] == pytest.approx(0.6 if stands else 1.0)
        assert stats["observed_before_s"] == 3.0
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)
    lines = [r.getMessage() for r in caplog.records]
    assert any("hvdcomp auto at step 2" in line and "on trial: 2 steps" in line for line in lines)
    verdicts = [line for line in lines if "hvdcomp auto trial at step 11" in line]
    assert len(verdicts) == NRANKS and all(("stands" in v) is stands for v in verdicts)
    if not stands:
        for n in total_grad:
            torch.testing.assert_close(total_applied[n], total_grad[n], rtol=1e-5, atol=1e-5)
        assert all("carry" not in s.state for s in opts[0]._table.slots.values())


@pytest.mark.parametrize("first, proposal, second, stands", [
    (1.25, 1.0, 0.95, False),   # the first baseline slow after the calibration: the second decides
    (1.25, 0.9, 1.0, True),
    (1.0, 1.0, 1.1, False),     # a tie stays with the current choice
    (None, 0.9, 1.0, True),     # a baseline window some rank could not time is left out
    (1.0, None, 1.0, False),    # an untimed trial window is not shorter
    (None, 0.9, None, False),
])
def test_the_proposal_must_beat_the_shorter_baseline_window(first, proposal, second, stands):
    trial = Trial(current={"w": 0}, proposal={"w": 1}, steps=2, decided_at=4)
    assert not trial.due(6) and trial.due(7)
    assert trial.close_window([first, 0.5], 7) == {"w": 1}
    assert not trial.due(9) and trial.due(10)
    assert trial.close_window([proposal, 0.5], 10) == {"w": 0}
    assert not trial.finished and trial.due(13)
    assert trial.close_window([second, 0.5], 13) == ({"w": 1} if stands else {"w": 0})
    assert trial.finished and trial.stands is stands and not trial.due(20)
    assert (trial.switched_at, trial.returned_at, trial.verdict_at) == (7, 10, 13)
    timed = [w for w in (first, second) if w is not None]
    assert trial.baseline_step_s == (min(timed) if timed else None)


@pytest.mark.parametrize("kwargs", [{"trial_steps": 0}, {"link": SLOW}])
def test_no_trial_without_trial_steps_or_with_a_given_link(monkeypatch, kwargs):
    """trial_steps=0, or a simulated link the steps' wall time does not contain: the model's
    choice serves from the decision's step on."""
    monkeypatch.setattr(choice, "measure_codecs", fixed_codecs({0: (0.2, 1e6), 1: (0.0, 1e3)}))
    auto = hvdcomp.Compression.auto(candidates=["none", hvdcomp.Compression.topk(ratio=0.05)], warmup_steps=1, **kwargs)
    world, models, opts = _world(auto)
    for step in range(2):
        _step(world, models, opts, step)
    stats = opts[0].compression_stats()["auto"]
    assert stats["trial"] is None and not stats["on_trial"]
    assert opts[0]._table.slots["0.weight"].compressor.name == "topk"


def test_a_redecision_during_a_trial_starts_afresh(monkeypatch):
    from hvdcomp.core.step import StepDriver

    monkeypatch.setattr(StepDriver, "observed_step_seconds", _timed_by_choice(1.0, {0: 0.5, 1: 0.5}))
    monkeypatch.setattr(choice, "measure_codecs", fixed_codecs({0: (0.2, 1e6), 1: (0.0, 1e3)}))
    auto = hvdcomp.Compression.auto(candidates=["none", hvdcomp.Compression.topk(ratio=0.05)], warmup_steps=1,
                                    trial_steps=1)
    world, models, opts = _world(auto)
    for step in range(9):
        if step == 2:  # in the baseline window of the decision at step 1
            for opt in opts:
                opt.redecide_compression()
        _step(world, models, opts, step)
    trial = opts[0].compression_stats()["auto"]["trial"]
    assert (trial["decided_at"], trial["switched_at"], trial["returned_at"], trial["verdict_at"]) == (2, 4, 6, 8)
    assert trial["stands"]


def test_a_checkpoint_during_a_trial_keeps_what_served(monkeypatch):
    """Saved after the switch (top-k on trial), loaded into a fresh run: top-k stands with its
    residual, the trial is not resumed and nothing is measured again."""
    from hvdcomp.core.step import StepDriver

    monkeypatch.setattr(StepDriver, "observed_step_seconds", _timed_by_choice(1.0, {0: 1.5, 1: 1.5}))
    monkeypatch.setattr(choice, "measure_codecs", fixed_codecs({0: (0.2, 1e6), 1: (0.0, 1e3)}))

    def make():
        return hvdcomp.Compression.auto(candidates=["none", hvdcomp.Compression.topk(ratio=0.05)], warmup_steps=1,
                                        trial_steps=2)

    world, models, opts = _world(make())
    for step in range(5):  # decision at 1, baseline 2-3, the switch at 4
        _step(world, models, opts, step)
    assert opts[0].compression_stats()["auto"]["on_trial"]
    saved = [opt.state_dict() for opt in opts]
    assert saved[0]["hvdcomp"]["assignment"]["0.weight"] == 1
    world2, models2, opts2 = _world(make())
    for opt, state in zip(opts2, saved):
        opt.load_state_dict(state)
    for before, after in zip(opts, opts2):
        assert torch.equal(after._table.slots["0.weight"].state["residual"],
                           before._table.slots["0.weight"].state["residual"])
    monkeypatch.setattr(choice, "measure_codecs", lambda *a, **k: pytest.fail("decided again after a load"))
    for step in range(5, 12):  # past where the verdict would have reverted it
        _step(world2, models2, opts2, step)
    for opt in opts2:
        stats = opt.compression_stats()["auto"]
        assert stats["restored"] and stats["trial"] is None and not stats["on_trial"]
        assert opt._table.slots["0.weight"].compressor.name == "topk"


def test_checkpoint_keeps_the_choice(monkeypatch):
    monkeypatch.setattr(choice, "measure_codecs", fixed_codecs({0: (0.0, 1e6), 1: (1e-3, 1e3)}))

    def make():
        return hvdcomp.Compression.auto(candidates=["none", hvdcomp.Compression.topk(ratio=0.1)], warmup_steps=1,
                                        link=SLOW)

    world, models, opts = _world(make())
    for step in range(3):
        _step(world, models, opts, step)
    saved = opts[0].state_dict()
    assert saved["hvdcomp"]["assignment"]["0.weight"] == 1
    # Horovod's recipe: rank 0 loads, the other rank starts fresh and adopts its choice;
    # nobody measures again (the choice changes only when asked).
    world2, models2, opts2 = _world(make())
    opts2[0].load_state_dict(saved)
    monkeypatch.setattr(choice, "measure_codecs", lambda *a, **k: pytest.fail("decided again after a load"))
    _step(world2, models2, opts2, 3)
    for opt in opts2:
        stats = opt.compression_stats()["auto"]
        assert stats["restored"] and stats["assignment"]["0.weight"] == "topk"
        assert opt.compression_stats()["iterations"] == 4


def test_refusals():
    with pytest.raises(ValueError, match="DGC"):
        hvdcomp.Compression.auto(candidates=["none", "dgc"])
    with pytest.raises(ValueError, match="repeat"):
        hvdcomp.Compression.auto(candidates=["none", "none"])
    with pytest.raises(ValueError, match="non-empty"):
        hvdcomp.Compression.auto(candidates=[])
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match="trial_steps"):
            hvdcomp.Compression.auto(trial_steps=bad)
    with pytest.raises(ValueError, match="small_compression"):
        World(1).DistributedOptimizer(0, torch.optim.SGD(_model().parameters(), lr=0.1),
                                      small_compression=hvdcomp.Compression.auto())
    with pytest.raises(TypeError, match="hvd.DistributedOptimizer"):
        hvdcomp.Compression.auto().compress(torch.zeros(3))
    with pytest.raises(ValueError, match="redecide_compression"):
        _world(hvdcomp.Compression.none())[2][0].redecide_compression()


def test_different_candidates_on_ranks_are_refused():
    world = World(2)
    models = [_model() for _ in range(2)]
    world.DistributedOptimizer(0, torch.optim.SGD(models[0].parameters(), lr=0.1),
                               compression=hvdcomp.Compression.auto(candidates=["none", "bf16"]))
    with pytest.raises(ValueError, match="differ between ranks"):
        world.DistributedOptimizer(1, torch.optim.SGD(models[1].parameters(), lr=0.1),
                                   compression=hvdcomp.Compression.auto(candidates=["none", "fp16"]))


def test_mirror_answers_as_identical_ranks():
    t = torch.arange(12, dtype=torch.float32)
    reqs = [rq.Allreduce(t.clone()), rq.Allgather(t.clone()), rq.AllgatherV(t[:5].clone(), [5, 5, 5]),
            rq.Alltoall(t.clone(), [4, 4, 4], [4, 4, 4]), rq.Broadcast(t.clone(), 0)]
    for rank in range(3):
        real = run_collectives([[type(r)(**{k: (v.clone() if torch.is_tensor(v) else v)
                                            for k, v in vars(r).items()}) for r in reqs] for _ in range(3)])[rank]
        mirrored = mirror_results(reqs, 3, rank)
        for a, b in zip(real, mirrored):
            if isinstance(a, list):
                assert all(torch.equal(x, y) for x, y in zip(a, b))
            else:
                assert torch.equal(a, b)


def test_link_fit_and_choose():
    sizes = [4096, 1 << 20]
    n = 2
    probes = choice.probe_requests(sizes, n)
    alpha, beta = 2e-3, 1e-8
    seconds = [alpha + beta * choice.moved_bytes(p, n) for p in probes]
    link = choice.fit_link(sizes, seconds, n)
    for name in ("allreduce", "allgather", "alltoall"):
        assert link.alpha_s[name] == pytest.approx(alpha)
        assert link.seconds_per_byte[name] == pytest.approx(beta)
    # an alltoall whose larger probe came out no slower takes the largest resolved slope
    # (the larger allgather probe twice as slow makes its slope the largest)
    unresolved = [alpha if isinstance(p, rq.Alltoall) else t for p, t in zip(probes, seconds)]
    unresolved[-2] *= 2
    link2 = choice.fit_link(sizes, unresolved, n)
    assert link2.seconds_per_byte["allgather"] > 2 * beta
    assert link2.seconds_per_byte["alltoall"] == link2.seconds_per_byte["allgather"]
    assert link2.alpha_s["allreduce"] == pytest.approx(alpha) and link2.seconds_per_byte["allreduce"] == pytest.approx(beta)
    codecs = [{"w": [choice.CodecTiming(0.0, (("allreduce", 1e8),)), choice.CodecTiming(0.5, (("allgather", 1e6),))]},
              {"w": [choice.CodecTiming(0.1, (("allreduce", 1e8),)), choice.CodecTiming(0.2, (("allgather", 1e6),))]}]
    assignment, costs = choice.choose(codecs, link)
    # the slowest rank's local time counts: candidate 0 costs 0.1 + 1.0, candidate 1 0.5 + 0.01
    assert assignment == {"w": 1}
    assert costs["w"] == pytest.approx([1.1, 0.51])
    # a near tie keeps the preferred (earlier) candidate: 0.95 is not 10 % below 1.0
    near = [{"w": [choice.CodecTiming(1.0, ()), choice.CodecTiming(0.95, ())]}]
    assert choice.choose(near, link)[0] == {"w": 0}
    clear = [{"w": [choice.CodecTiming(1.0, ()), choice.CodecTiming(0.85, ())]}]
    assert choice.choose(clear, link)[0] == {"w": 1}


def test_a_candidate_that_saves_less_than_its_latency_is_not_used():
    """A candidate's collectives cost their latency once, however many tensors share them:
    a small tensor whose own cheapest candidate saves it less than that latency follows
    the others, and one that saves more keeps its own."""
    link = choice.LinkFit({"allreduce": 1e-3, "allgather": 1e-3}, {"allreduce": 1e-9, "allgather": 1e-9})
    big = [choice.CodecTiming(0.0, (("allreduce", 1e8),)), choice.CodecTiming(0.01, (("allgather", 1e6),))]

    def small(own_s):
        return [choice.CodecTiming(0.0, (("allreduce", 1e3),)), choice.CodecTiming(own_s, (("allgather", 1e2),))]

    # alone, "b" takes candidate 0 (1 us against 0.5 ms), but candidate 0's allreduce
    # would add 1 ms of latency to the step: 0.011 + 0.0005 + 0.001 < 0.011 + 1e-6 + 0.002
    assignment, costs = choice.choose([{"w": big, "b": small(5e-4)}], link)
    assert assignment == {"w": 1, "b": 1}
    assert costs["b"] == pytest.approx([1e-6, 5e-4 + 1e-7])
    # a saving above the latency keeps the tensor on its own candidate
    assert choice.choose([{"w": big, "b": small(5e-3)}], link)[0] == {"w": 1, "b": 0}
    # with no latency there is nothing to share
    free = choice.LinkFit({}, link.seconds_per_byte)
    assert choice.choose([{"w": big, "b": small(5e-4)}], free)[0] == {"w": 1, "b": 0}
    # every collective of a candidate's chain adds its latency: "b" saves 1.5 ms on the
    # two-collective candidate, less than its 2 ms of latency, more than one collective's
    two = (("allreduce", 8), ("allgather", 1e2))
    codecs = [{"w": [choice.CodecTiming(0.0, (("allreduce", 1e3),)), choice.CodecTiming(0.05, two)],
               "b": [choice.CodecTiming(2e-3, (("allreduce", 1e3),)), choice.CodecTiming(5e-4, two)]}]
    assert choice.candidate_latency_seconds(1, {"w": 0, "b": 1}, codecs, link) == pytest.approx(2e-3)
    assert choice.choose(codecs, link)[0] == {"w": 0, "b": 0}


def test_an_allreduce_of_another_dtype_is_probed_and_priced_on_its_own():
    """Gloo sums fp16 through float32, value by value: an fp16 candidate's allreduce gets
    probes (of standard-normal values) and a fit of its own, and without them takes
    float32's."""
    assert choice.collective_key(rq.Allreduce(torch.zeros(4))) == "allreduce"
    assert choice.collective_key(rq.Allreduce(torch.zeros(4, dtype=torch.float16))) == "allreduce_float16"
    assert choice.collective_key(rq.Allgather(torch.zeros(4, dtype=torch.float16))) == "allgather"
    sizes, n = [4096, 1 << 20], 2
    keys = ["allreduce_float16"]
    probes = choice.probe_requests(sizes, n, keys)
    assert len(probes) == 8
    fp16 = [p for p in probes if choice.collective_key(p) == "allreduce_float16"]
    assert [p.tensor.numel() for p in fp16] == [2048, 1 << 19]
    assert all(p.tensor.std() > 0.5 for p in fp16)  # values, not constants
    beta = {"allreduce": 1e-8, "allgather": 1e-8, "alltoall": 1e-8, "allreduce_float16": 5e-8}
    seconds = [1e-3 + beta[choice.collective_key(p)] * choice.moved_bytes(p, n) for p in probes]
    link = choice.fit_link(sizes, seconds, n, keys)
    assert link.seconds_per_byte["allreduce_float16"] == pytest.approx(5e-8)
    assert link.seconds_per_byte["allreduce"] == pytest.approx(1e-8)
    assert link.transfer_seconds("allreduce_float16", 1e6) == pytest.approx(5e-2)
    unprobed = choice.fit_link(sizes, seconds[:3] + seconds[4:7], n)  # no fp16 probes
    assert unprobed.transfer_seconds("allreduce_float16", 1e6) == pytest.approx(1e-2)  # float32's
    assert unprobed.latency_seconds("allreduce_float16") == pytest.approx(1e-3)
    # an unresolved float32 allreduce takes the wire's largest slope, not fp16's (its sum's)
    flat = [1e-3 if choice.collective_key(p) == "allreduce" else t for p, t in zip(probes, seconds)]
    assert choice.fit_link(sizes, flat, n, keys).seconds_per_byte["allreduce"] == pytest.approx(1e-8)
    with pytest.raises(ValueError):
        choice.probe_requests(sizes, n, ["allgather_float16"])


def test_the_probed_keys_are_the_candidates_allreduces_of_other_dtypes(monkeypatch):
    measured = []
    real = choice.measure_codecs
    monkeypatch.setattr(choice, "measure_codecs", lambda *a, **k: measured.append(real(*a, **k)) or measured[-1])
    world, models, opts = _world(hvdcomp.Compression.auto(candidates=["none", "fp16"], warmup_steps=0, link=SLOW))
    _step(world, models, opts, 0)
    none, fp16 = measured[0]["0.weight"]  # the candidates' real chains
    assert [k for k, _ in none.transfers] == ["allreduce"] and [k for k, _ in fp16.transfers] == ["allreduce_float16"]
    assert choice.probed_allreduce_keys(measured[0]) == ["allreduce_float16"]
    codecs = {"a": [choice.CodecTiming(0.0, (("allreduce", 8.0),)),
                    choice.CodecTiming(0.0, (("allreduce_float16", 4.0),))],
              "b": [choice.CodecTiming(0.0, (("alltoall", 4.0), ("allgather", 4.0)))] * 2}
    assert choice.probed_allreduce_keys(codecs) == ["allreduce_float16"]
    assert choice.probed_allreduce_keys({"b": codecs["b"]}) == []


def test_a_dropped_step_after_a_switch_keeps_the_carry(monkeypatch):
    costs = {0: (1e-3, 1e3), 1: (0.0, 1e6)}
    monkeypatch.setattr(choice, "measure_codecs", fixed_codecs(costs))
    auto = hvdcomp.Compression.auto(candidates=[hvdcomp.Compression.topk(ratio=0.05), "none"], warmup_steps=0,
                                    link=SLOW)
    world, models, opts = _world(auto)
    _step(world, models, opts, 0)
    owed = opts[0]._table.slots["0.weight"].state["residual"].clone()
    costs[0], costs[1] = (1e-3, 1e6), (0.0, 1e3)
    for opt in opts:
        opt.redecide_compression()
    for m in models:
        for p in m.parameters():
            p.grad = torch.zeros_like(p)
    models[1][0].weight.grad[0, 0] = float("inf")
    world.synchronize()  # the switch happens, then the step is dropped on every rank
    assert opts[0].compression_stats()["dropped_steps"] == 1
    assert torch.isnan(models[0][0].weight.grad).all()
    assert torch.equal(opts[0]._table.slots["0.weight"].state["carry"], owed)  # restored, not lost
    for m in models:
        for p in m.parameters():
            p.grad = torch.zeros_like(p)
    owed_by_rank = [opt._table.slots["0.weight"].state["carry"].clone() for opt in opts]
    world.synchronize()  # zero gradients: what arrives is the ranks' carries alone, averaged
    torch.testing.assert_close(models[0][0].weight.grad.reshape(-1), sum(owed_by_rank) / NRANKS)
    assert "carry" not in opts[0]._table.slots["0.weight"].state
