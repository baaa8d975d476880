"""Choosing each tensor's compressor among a selector's candidates (``Compression.auto()``).

The choice is made from three measurements, all taken on the ranks themselves:

* **codec seconds**: for each compressed tensor and candidate, one rank's local work of the
  candidate's real chain (encode, pack, decode of N payloads, error feedback) on a
  synthetic standard-normal gradient of the tensor's shape, timed with the other ranks'
  answers mirrored (:mod:`hvdcomp.core.mirror`); each rank times its own, and the slowest
  rank's time counts (the step waits for it). Data-dependent payloads (AdaComp) are sized
  on that synthetic data.
* **the link**: for each collective the candidates use, a fit ``t = alpha + beta * b`` of
  its time against ``b``, the bytes a rank moves in it by the ring formula (allreduce
  ``2(N-1)/N S``, allgather ``(N-1) S``, alltoall and broadcast ``(N-1)/N S``), from probes
  of two sizes issued through the transport itself (a probe's time is the slowest rank's).
  An allreduce of another dtype than float32 in a candidate's chain (fp16's) is a
  collective of its own: Gloo sums it element by element through float32, and on a fast
  link the sum, not the wire, sets its time, so it gets probes and a fit of its own
  (``"allreduce_float16"``).
  On a link whose ranks share one bottleneck (one shaped loopback) ``beta`` comes out N
  times a single rank's share, which is the point of measuring instead of assuming.
* **the step**: the median wall time of the steps before the decision, made with the
  current compressors.

Per tensor the predicted cost of a candidate is ``codec seconds + sum over its chain's
collectives of beta * bytes moved``; each tensor takes its cheapest candidate (ties to the
earlier one). Latency (``alpha`` per collective) is paid per group of tensors that share a
candidate's collectives (Horovod fuses them, a DDP bucket runs one chain per candidate in
it), not per tensor: a candidate in use adds its chain's latencies once, and a candidate only
a few small tensors would take can cost more in latency than they save. So the choice is
made over the sets of candidates in use: for each subset of the candidates the per-tensor
choice used, every tensor takes its cheapest candidate in the subset, and the subset with
the smallest total (per-tensor costs plus each used candidate's latencies, once) wins; the
whole set stands unless a subset is cheaper. The predicted step time of a
choice is ``observed step - predicted exchange of the current choice + predicted exchange of
the new one``, with exchange = codec seconds + transfer + latency: compute and exchange are
taken as not overlapping (on 2 CPU cores they barely do; with overlap it is an upper bound).

The whole choice replaces the current one only when it is predicted to save at least
:data:`STEP_MARGIN` of the observed step; otherwise every tensor keeps its compressor. Where
the link is measured (no ``link`` given), a choice that would change any tensor's
compressor is a proposal until the steps confirm it (:mod:`hvdcomp.core.trial`).

Every rank computes the same choice from the same gathered numbers.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable, Sequence

import torch

from ..compressor import Compressor
from . import requests as rq
from .chains import Averaging, ChainRun, StepContext
from .mirror import mirror_results
from .plan import Router
from .slots import Slot, SlotTable
from .traffic import log_line
from .trial import Trial

#: The collectives a link fit covers, by request type.
COLLECTIVES = {rq.Allreduce: "allreduce", rq.Allgather: "allgather", rq.AllgatherV: "allgather",
               rq.Alltoall: "alltoall", rq.Broadcast: "broadcast"}


def collective_key(request) -> str:
    """What prices ``request``'s bytes: its collective's name (:data:`COLLECTIVES`), and for
    an allreduce of another dtype than float32 the dtype too (``"allreduce_float16"``)."""
    name = COLLECTIVES[type(request)]
    dtype = request.tensor.dtype
    if name == "allreduce" and dtype != torch.float32:
        return f"{name}_{str(dtype).removeprefix('torch.')}"
    return name


def _probed_dtype(key: str) -> torch.dtype:
    """The dtype of an allreduce key of :func:`collective_key` (``"allreduce_float16"``)."""
    dtype = getattr(torch, key.removeprefix("allreduce_"), None)
    if not key.startswith("allreduce_") or not isinstance(dtype, torch.dtype):
        raise ValueError(f"not an allreduce key of another dtype: {key!r}")
    return dtype


def moved_bytes(request, nranks: int) -> float:
    """Bytes one rank moves in ``request`` by the ring formula (see the module docstring)."""
    if nranks <= 1:
        return 0.0
    t = request.tensor
    size = t.numel() * t.element_size()
    if isinstance(request, rq.Allreduce):
        return 2.0 * (nranks - 1) / nranks * size
    if isinstance(request, rq.AllgatherV):
        return float(sum(request.lengths) - request.lengths[0]) * t.element_size()
    if isinstance(request, rq.Allgather):
        return float((nranks - 1) * size)
    return (nranks - 1) / nranks * size


@dataclasses.dataclass(frozen=True)
class LinkFit:
    """``t = alpha_s + seconds_per_byte * b`` per collective key (b: bytes moved per rank).

    alpha_s / seconds_per_byte: dicts keyed by :func:`collective_key`: "allreduce",
    "allgather", "alltoall", "broadcast", and an allreduce of another dtype
    ("allreduce_float16"), which without a fit of its own takes float32's. A collective
    without a fit costs nothing (e.g. in-process ranks with no link given)."""

    alpha_s: dict
    seconds_per_byte: dict

    def _key(self, collective: str) -> str:
        return collective if collective in self.seconds_per_byte else collective.split("_")[0]

    def transfer_seconds(self, collective: str, nbytes: float) -> float:
        return self.seconds_per_byte.get(self._key(collective), 0.0) * nbytes

    def latency_seconds(self, collective: str) -> float:
        return self.alpha_s.get(self._key(collective), 0.0)


@dataclasses.dataclass(frozen=True)
class CodecTiming:
    """One rank's local work for one tensor and candidate: seconds, and the collectives of
    its chain as ``(collective key, bytes moved per rank)``, which the link fit prices."""

    seconds: float
    transfers: tuple


def time_chain(slot: Slot, grad: torch.Tensor, router: Router, ctx: StepContext) -> CodecTiming:
    """Run ``slot``'s chain once against mirrored answers; time only the local work."""
    kind = router.kind(slot.compressor)
    run = ChainRun(kind.run(ctx, [slot], [grad], slot.name), slot.name)
    seen, elapsed = [], 0.0
    start = time.perf_counter()
    pending = run.advance()
    elapsed += time.perf_counter() - start
    while pending:
        seen.extend((collective_key(r), moved_bytes(r, ctx.size)) for r in run.requests)
        answers = mirror_results(run.requests, ctx.size, ctx.rank)
        start = time.perf_counter()
        pending = run.advance(answers)
        elapsed += time.perf_counter() - start
    return CodecTiming(elapsed, tuple(seen))


#: Timed runs of each candidate's chain per tensor; the median counts. One run is one sample
#: of a machine the rank shares with its transport's threads: on 2 DDP ranks of the small
#: CNN at 50 Mbit/s a single run of bf16's chain for a 18,432-element weight came out above
#: 7 ms where it takes about 0.2, kept that weight uncompressed in a bucket of bf16 ones,
#: and the steps ran 24 % slower than bf16's (docs/performance.md, "auto" with the reserve).
CODEC_REPS = 3


def measure_codecs(table: SlotTable, candidates: Sequence[Compressor], router: Router, step: int,
                   seed: int = 0, reps: int = CODEC_REPS) -> dict[str, list[CodecTiming]]:
    """For every slot the selector serves, each candidate's :class:`CodecTiming` (fresh
    state, synthetic gradient, one warm-up run, then the median seconds of ``reps`` timed
    runs, each from fresh state)."""
    out = {}
    ctx = StepContext(table.rank, table.size, step, Averaging(table.size))
    gen = torch.Generator().manual_seed(seed)
    for name, slot in sorted(table.slots.items()):
        if slot.info.numel < table.min_compress_numel:
            continue
        grad = torch.randn(tuple(slot.info.shape), generator=gen).to(slot.info.dtype).to(slot.info.device)
        timings = []
        for cand in candidates:
            trial = Slot(name, slot.info, cand, slot.fresh_state(cand), layout=slot.layout)
            time_chain(trial, grad, router, ctx)  # warm-up: first-call costs, caches
            runs = []
            for _ in range(reps):
                trial = Slot(name, slot.info, cand, slot.fresh_state(cand), layout=slot.layout)
                # A new tensor, as every step's gradient is: the compressor's values cached for
                # an earlier run's tensor (TernGrad's clipping bound) must not shorten the timing.
                runs.append(time_chain(trial, grad.clone(), router, ctx))
            timings.append(CodecTiming(statistics.median(r.seconds for r in runs), runs[0].transfers))
        out[name] = timings
    return out


def probe_requests(sizes_bytes: Sequence[int], nranks: int, allreduce_keys: Sequence[str] = ()) -> list:
    """The link probes: for each size one allreduce (fp32), one allgather and one alltoall
    (uint8) of that many bytes per rank, then one allreduce per key of ``allreduce_keys``
    (:func:`probed_allreduce_keys`: other dtypes the candidates' chains sum) of standard-normal
    values: a sum that converts each value may cost more on some values than on others."""
    probes = []
    gen = torch.Generator().manual_seed(0)
    for size in sizes_bytes:
        probes.append(rq.Allreduce(torch.zeros(max(1, size // 4), dtype=torch.float32)))
        probes.append(rq.Allgather(torch.zeros(size, dtype=torch.uint8)))
        chunk = max(1, size // nranks)
        probes.append(rq.Alltoall(torch.zeros(chunk * nranks, dtype=torch.uint8), [chunk] * nranks, [chunk] * nranks))
        for key in allreduce_keys:
            dtype = _probed_dtype(key)
            numel = max(1, size // torch.empty((), dtype=dtype).element_size())
            probes.append(rq.Allreduce(torch.randn(numel, generator=gen).to(dtype)))
    return probes


def probed_allreduce_keys(codecs: dict[str, list[CodecTiming]]) -> list[str]:
    """The allreduce keys of other dtypes than float32 in any of :func:`measure_codecs`'
    chains, sorted: the same on every rank (a chain's dtypes follow from its compressor and
    its tensor's, which every rank shares)."""
    return sorted({key for timings in codecs.values() for t in timings for key, _ in t.transfers
                   if key.startswith("allreduce_")})


def measure_link(run_blocking: Callable[[list], list], sizes_bytes: Sequence[int], nranks: int,
                 reps: int = 3, allreduce_keys: Sequence[str] = ()) -> list[float]:
    """This rank's median seconds of each probe (:func:`probe_requests` order), each issued
    alone through ``run_blocking`` (the transport's blocking issue of one phase) after a
    1-element allreduce that lines the ranks up."""
    seconds = []
    for probe in probe_requests(sizes_bytes, nranks, allreduce_keys):
        times = []
        for _ in range(reps):
            run_blocking([rq.Allreduce(torch.zeros(1))])
            start = time.perf_counter()
            run_blocking([probe])
            times.append(time.perf_counter() - start)
        seconds.append(statistics.median(times))
    return seconds


def fit_link(sizes_bytes: Sequence[int], seconds: Sequence[float], nranks: int,
             allreduce_keys: Sequence[str] = ()) -> LinkFit:
    """Two-point fit per collective from :func:`measure_link`'s times (slowest rank's).

    A collective whose larger probe did not take longer than its smaller one (its slope is
    lost in the noise of a busy machine) takes the largest slope the other collectives
    resolved: their bytes cross the same link, and a slope of 0 would price every byte of
    that collective at nothing (a chain built on it, e.g. bf16's alltoall, would look free).
    ``allreduce_keys``: as given to :func:`measure_link`."""
    probes = probe_requests(sizes_bytes, nranks, allreduce_keys)
    by_name: dict[str, list] = {}
    for probe, t in zip(probes, seconds):
        by_name.setdefault(collective_key(probe), []).append((moved_bytes(probe, nranks), t))
    slopes = {}
    for name, points in by_name.items():
        (b0, t0), (b1, t1) = min(points), max(points)
        slopes[name] = (t1 - t0) / (b1 - b0) if b1 > b0 else 0.0
    # An allreduce of another dtype has its sum in its slope, not only the wire's bytes.
    resolved = max([0.0, *(slope for name, slope in slopes.items() if name in COLLECTIVES.values())])
    alpha, beta = {}, {}
    for name, points in by_name.items():
        b0, t0 = min(points)
        slope = slopes[name] if slopes[name] > 0 else resolved
        alpha[name], beta[name] = max(0.0, t0 - slope * b0), slope
    return LinkFit(alpha, beta)


@dataclasses.dataclass
class Decision:
    """What a decision chose and predicted (all ranks alike).

    assignment: slot name -> candidate index. exchange_s: predicted exchange seconds per
    step of the new choice and of the one it replaced. predicted_step_s: the step time the
    model predicts for the choice (None before any step was observed). calibration_s: what
    the measurements cost. at_step: the step it took effect. restored: loaded from a
    checkpoint (only the assignment is known)."""

    assignment: dict
    exchange_s: float
    previous_exchange_s: float
    predicted_step_s: float | None
    observed_before_s: float | None
    calibration_s: float
    at_step: int
    link: LinkFit
    per_tensor: dict  # name -> [predicted seconds per candidate]
    restored: bool = False
    #: The per-tensor choice differed, but was predicted to save less than STEP_MARGIN of
    #: the observed step, so the current one was kept.
    kept_current: bool = False
    #: The proposal's trial (None where there was none: nothing changed, the link was given,
    #: or ``trial_steps=0``). While it runs, ``assignment`` is the proposal.
    trial: Trial | None = None

    def on_trial(self) -> bool:
        return self.trial is not None and not self.trial.finished

    def settled_at(self) -> int:
        """The step from which the choice stood as it is (after a trial: its verdict)."""
        return self.at_step if self.trial is None or self.trial.verdict_at is None else self.trial.verdict_at

    @classmethod
    def from_checkpoint(cls, assignment: dict, step: int) -> "Decision":
        return cls(assignment=dict(assignment), exchange_s=0.0, previous_exchange_s=0.0, predicted_step_s=None,
                   observed_before_s=None, calibration_s=0.0, at_step=step, link=LinkFit({}, {}), per_tensor={},
                   restored=True)


def report(decision: Decision, names: Sequence[str]) -> str:
    """One line saying what a decision chose and predicted; logged on the ``hvdcomp`` logger
    and printed when ``HVDCOMP_LOG`` is set, as the per-step traffic lines are."""
    counts = {}
    for index in decision.assignment.values():
        counts[names[index]] = counts.get(names[index], 0) + 1
    chosen = ", ".join(f"{n} x{c}" for n, c in sorted(counts.items())) or "nothing to choose"
    step = "unknown" if decision.predicted_step_s is None else f"{decision.predicted_step_s:.4g} s"
    note = ""
    if decision.kept_current:
        note = f", kept: a new choice saved under {STEP_MARGIN:.0%} of the step"
    elif decision.trial is not None:  # its verdict has a line of its own
        note = f", on trial: {decision.trial.steps} steps of each choice decide"
    line = (f"hvdcomp auto at step {decision.at_step}: {chosen} (tensors){note}; predicted step {step}, exchange "
            f"{decision.exchange_s:.4g} s (was {decision.previous_exchange_s:.4g} s); calibration "
            f"{decision.calibration_s:.3g} s")
    log_line(line)
    return line


def _cost(timing: CodecTiming, link: LinkFit) -> float:
    return timing.seconds + sum(link.transfer_seconds(name, nbytes) for name, nbytes in timing.transfers)


#: A candidate replaces an earlier (preferred) one only when predicted at least this share
#: cheaper: the start-up measurements are a few repetitions on a shared machine, and a near
#: tie decided by their noise would trade the preferred candidate for no predicted gain.
SWITCH_MARGIN = 0.1


def _preferred(per_candidate: Sequence[float], allowed: Sequence[int]) -> int:
    """The candidate a tensor takes among ``allowed`` (in order of preference): a later one
    wins only when its cost is below ``(1 - SWITCH_MARGIN)`` times the best so far."""
    best = allowed[0]
    for i in allowed[1:]:
        if per_candidate[i] < (1 - SWITCH_MARGIN) * per_candidate[best]:
            best = i
    return best


def candidate_latency_seconds(index: int, assignment: dict, codecs: Sequence[dict], link: LinkFit) -> float:
    """The latencies candidate ``index`` adds to a step when any tensor of ``assignment``
    takes it: one per collective of its chain (the chain of the first tensor that takes it;
    a candidate's chain has the same collectives for every tensor)."""
    name = next(n for n, i in sorted(assignment.items()) if i == index)
    return sum(link.latency_seconds(collective) for collective, _ in codecs[0][name][index].transfers)


def choose(codecs: Sequence[dict], link: LinkFit) -> tuple[dict, dict]:
    """Each tensor's candidate, from every rank's :func:`measure_codecs` (the slowest rank's
    seconds count); returns (assignment, per-tensor costs).

    Per tensor, candidates are in order of preference: a later one wins only when its cost
    is below ``(1 - SWITCH_MARGIN)`` times the best so far (:func:`_preferred`). Over the
    candidates in use, every subset is tried, each tensor restricted to it, and the subset
    whose per-tensor costs plus its candidates' latencies (:func:`candidate_latency_seconds`,
    once each) total least replaces the unrestricted choice when strictly cheaper: a
    candidate that saves a few tensors less than its collectives' latency is dropped."""
    names = sorted(codecs[0])
    if not names:
        return {}, {}
    costs = {}
    for name in names:
        per_candidate = []
        for i in range(len(codecs[0][name])):
            slowest = max((rank_codecs[name][i] for rank_codecs in codecs), key=lambda t: t.seconds)
            per_candidate.append(_cost(slowest, link))
        costs[name] = per_candidate

    def restricted(allowed: Sequence[int]) -> tuple[float, dict]:
        chosen = {name: _preferred(costs[name], allowed) for name in names}
        total = sum(costs[name][i] for name, i in chosen.items())
        total += sum(candidate_latency_seconds(i, chosen, codecs, link) for i in set(chosen.values()))
        return total, chosen

    best_total, assignment = restricted(range(len(codecs[0][names[0]])))
    used = sorted(set(assignment.values()))
    for mask in range(1, (1 << len(used)) - 1):
        total, chosen = restricted([i for bit, i in enumerate(used) if mask >> bit & 1])
        if total < best_total:
            best_total, assignment = total, chosen
    return assignment, costs


#: A new choice replaces the current one only when predicted to save at least this share of
#: the observed step. The step-time model is judged within 15 % per point, so it cannot
#: resolve a smaller saving, and a switch brings costs it does not count (another dtype
#: splits Horovod's fusion; on a CPU the casts share the cores with the backward pass);
#: keeping the current choice forgoes at most this much.
STEP_MARGIN = 0.03


def worth_switching(previous_s: float, new_s: float, observed_step_s: float | None) -> bool:
    """Whether a choice predicted to take ``new_s`` exchange seconds per step should replace
    one predicted at ``previous_s``, given the observed step (None: not observed, so only
    the per-tensor rule of :func:`choose` applies)."""
    return observed_step_s is None or previous_s - new_s >= STEP_MARGIN * observed_step_s


def predicted_step_seconds(observed_step_s: float, previous_s: float, new_s: float) -> float:
    """The step a choice is predicted to take: ``observed_step_s`` (a step made with the
    choice predicted at ``previous_s`` exchange seconds) less that exchange, plus the new
    choice's ``new_s`` (compute and exchange taken as not overlapping)."""
    return max(0.0, observed_step_s - previous_s) + new_s


def exchange_seconds(assignment: dict, costs: dict, codecs: Sequence[dict], link: LinkFit) -> float:
    """Predicted exchange seconds per step of ``assignment``: per-tensor costs plus one
    latency per collective of the slowest rank's chains (an upper bound where buckets share
    collectives)."""
    total = 0.0
    for name, index in assignment.items():
        slowest = max((rank_codecs[name][index] for rank_codecs in codecs), key=lambda t: t.seconds)
        total += costs[name][index] + sum(link.latency_seconds(collective) for collective, _ in slowest.transfers)
    return total


class Chooser:
    """A selector's decisions for one rank (held by :class:`~hvdcomp.core.step.StepDriver`):
    when one is due, this rank's measurements, the choice from every rank's, its telemetry."""

    def __init__(self, table: SlotTable, router: Router):
        self.table, self.router = table, router
        self.selector = table.compression
        self.decision: Decision | None = None
        #: Set by ``redecide_compression()``: the next step starts with a decision.
        self.redecide_requested = False

    def due(self, step: int) -> bool:
        """The selector's first decision (after its warm-up steps), one the user asked for, or
        the close of a trial's window (:class:`~hvdcomp.core.trial.Trial`)."""
        return (self.redecide_requested or (self.decision is None and step >= self.selector.warmup_steps)
                or self._window_due(step))

    def _window_due(self, step: int) -> bool:
        return self.decision is not None and self.decision.on_trial() and self.decision.trial.due(step)

    def probe_sizes(self) -> list[int]:
        """The link probes' bytes per rank: 4 KiB and the selector's ``probe_bytes``, or the
        largest compressed tensor's fp32 bytes if smaller (the same on every rank)."""
        largest = max((4 * s.info.numel for s in self.table.slots.values()
                       if s.info.numel >= self.table.min_compress_numel), default=4096)
        return [4096, max(8192, min(self.selector.probe_bytes, largest))]

    def measure(self, run_blocking: Callable[[list], list] | None, step: int,
                observed_step_seconds: Callable[[int], float | None]) -> dict:
        """This rank's measurements (picklable). For a decision: each candidate's local chain
        time and collectives per tensor, the link probes' times (when the link is measured:
        ``run_blocking`` given, no ``link`` on the selector, several ranks), the observed step
        (``observed_step_seconds(0)``: the median of the recent steps). At a trial's window:
        the window's median step."""
        if not self.redecide_requested and self._window_due(step):
            return {"window": self.decision.trial.window_seconds(observed_step_seconds)}
        codecs = measure_codecs(self.table, self.selector.candidates, self.router, step)
        probes, keys = None, probed_allreduce_keys(codecs)
        if run_blocking is not None and self.selector.link is None and self.table.size > 1:
            probes = measure_link(run_blocking, self.probe_sizes(), self.table.size, allreduce_keys=keys)
        return {"codecs": codecs, "probes": probes, "probed_allreduce_keys": keys,
                "observed": observed_step_seconds(0)}

    def decide(self, everyone: Sequence[dict], started: float, step: int) -> Decision:
        """Choose from every rank's :meth:`measure` (rank order) and assign, or close a trial's
        window; ``started``: when this rank began measuring (the calibration's cost is
        reported)."""
        if "window" in everyone[0]:
            return self._close_window([rank["window"] for rank in everyone], step)
        if self.selector.link is not None:
            link = self.selector.link
        elif everyone[0]["probes"] is not None:
            slowest = [max(rank["probes"][i] for rank in everyone) for i in range(len(everyone[0]["probes"]))]
            link = fit_link(self.probe_sizes(), slowest, self.table.size, everyone[0]["probed_allreduce_keys"])
        else:
            link = LinkFit({}, {})
        codecs = [rank["codecs"] for rank in everyone]
        assignment, costs = choose(codecs, link)
        current = {name: index for name, index in (self.table.assignment() or {}).items() if name in assignment}
        observed = [rank["observed"] for rank in everyone if rank["observed"] is not None]
        before = max(observed) if len(observed) == len(everyone) else None
        new = exchange_seconds(assignment, costs, codecs, link)
        previous = exchange_seconds(current, costs, codecs, link)
        kept = (set(current) == set(assignment) and current != assignment
                and not worth_switching(previous, new, before))
        if kept:
            assignment, new = dict(current), previous
        trial = None
        if self.tries_proposals() and set(current) == set(assignment) and current != assignment:
            trial = Trial(current=dict(current), proposal=dict(assignment), steps=self.selector.trial_steps,
                          decided_at=step)
        else:
            self.table.assign(assignment)
        self.decision = Decision(
            assignment=assignment, exchange_s=new, previous_exchange_s=previous,
            predicted_step_s=None if before is None else predicted_step_seconds(before, previous, new),
            observed_before_s=before,
            calibration_s=time.perf_counter() - started, at_step=step, link=link, per_tensor=costs, kept_current=kept,
            trial=trial)
        self.redecide_requested = False
        report(self.decision, self._names())
        return self.decision

    def tries_proposals(self) -> bool:
        """Whether a changing choice is tried before it stands: the selector's ``trial_steps``
        > 0 and the link measured, not given (a given link is a simulation the steps'
        wall time does not contain, so they could not judge it)."""
        return self.selector.trial_steps > 0 and self.selector.link is None

    def _close_window(self, windows: Sequence[float | None], step: int) -> Decision:
        """Close a trial's window. The baseline (the shorter of the windows timed with the
        current choice after the calibration) replaces the warm-up steps (a run's first,
        slower ones) as the step the prediction starts from; after a revert the prediction is
        the baseline itself."""
        d = self.decision
        serve = d.trial.close_window(windows, step)
        self.table.assign(serve)
        baseline = d.trial.baseline_step_s
        if baseline is not None and (not d.trial.finished or d.trial.stands):
            d.predicted_step_s = predicted_step_seconds(baseline, d.previous_exchange_s, d.exchange_s)
        if d.trial.finished:
            if not d.trial.stands:
                d.assignment, d.exchange_s = serve, d.previous_exchange_s
                d.predicted_step_s = d.observed_before_s if baseline is None else baseline
            log_line(d.trial.report(self._names()))
        return d

    def _names(self) -> list[str]:
        return [c.config()["name"] for c in self.selector.candidates]

    def adopt(self, chosen: Sequence[dict | None], step: int, who: str) -> None:
        """At the step agreement: a rank that neither loaded nor decided takes the choice the
        others loaded (ValueError on every rank when theirs differ)."""
        chosen = [c for c in chosen if c is not None]
        if chosen and any(c != chosen[0] for c in chosen):
            raise ValueError(f"{who}: the ranks resumed with different choices of compressors "
                             "(Compression.auto()): load every rank's checkpoint of the same run")
        if chosen and self.decision is None:
            self.table.assign(chosen[0])
            self.decision = Decision.from_checkpoint(chosen[0], step)

    def stats(self, step: int, observed_step_seconds: Callable[[int], float | None]) -> dict:
        """The last decision for telemetry: the candidates, how many tensors took each, the
        predicted and the observed step time since it stood (``observed_step_seconds(k)``: the
        median of the last k steps; the first step after a decision or a verdict carries its
        calibration or switch), and its trial."""
        names = [c.config() for c in self.selector.candidates]
        if self.decision is None:
            return {"candidates": names, "decided": False, "on_trial": False, "trial": None,
                    "warmup_steps": self.selector.warmup_steps}
        d = self.decision
        since = step - d.settled_at()
        return {"candidates": names, "decided": True, "restored": d.restored, "kept_current": d.kept_current,
                "at_step": d.at_step, "on_trial": d.on_trial(),
                "trial": None if d.trial is None else d.trial.summary(),
                "tensors_per_candidate": [sum(1 for i in d.assignment.values() if i == k) for k in range(len(names))],
                "assignment": {name: names[i]["name"] for name, i in d.assignment.items()},
                "predicted_step_s": d.predicted_step_s,
                "observed_step_s": observed_step_seconds(since - 1) if since >= 3 and not d.on_trial() else None,
                "observed_before_s": d.observed_before_s, "predicted_exchange_s": d.exchange_s,
                "previous_exchange_s": d.previous_exchange_s, "calibration_s": d.calibration_s,
                "link": {"alpha_s": d.link.alpha_s, "seconds_per_byte": d.link.seconds_per_byte}}
