"""The rank side of ``bench.step_times``: one launch = one (model, ranks, transport, link).

Every rank runs, in this order:

1. **calibration** (no exchange): forward, backward and the optimizer's update of the
   model, all ranks at once (so the cores are shared as during the training steps), as the
   transport runs them when it exchanges nothing (Horovod: the bare model; DDP: the model
   under DDP with a hook that hands each bucket back as it is); then,
   per method, rank 0 of N in-process ranks through the real chains on this rank's
   gradients (:class:`bench.one_rank.OneRankOfN`): the local time up to each collective
   phase, the decode after the last one, and the bytes this rank hands to every collective
   of every phase (the inputs of :mod:`hvdcomp.costs`);
2. **steps**: per method, the transport built as a user builds it (Horovod:
   ``hvdcomp.DistributedOptimizer``; DDP: ``DistributedDataParallel`` with
   ``hvdcomp.ddp.compression_hook``), ``warmup`` untimed steps, then timed steps back to
   back (forward, backward, exchange, update), each rank timing its own; a step's time is
   the slowest rank's. The bytes the loopback carried during the timed steps are read from
   its counters (everything any rank sent, headers and control traffic included).

Reference rows run the framework's own exchange for comparison: Horovod's
``hvd.DistributedOptimizer`` (none, fp16), DDP without a hook and torch's
``fp16_compress_hook``.
"""
from __future__ import annotations

import dataclasses
import gc
import os
import platform
import resource
import statistics
import time

import torch

from bench import collectives_sweep as sweep
from bench.compress_vs_backward import Timer, summarize
from bench.models import get_model
from bench.one_rank import OneRankOfN, Timing
from hvdcomp.core import requests as rq
from hvdcomp.core.options import DEFAULT_BUCKET_CAP_MB, DEFAULT_MIN_COMPRESS_NUMEL
from hvdcomp.registry import compression_from_name


@dataclasses.dataclass(frozen=True)
class Method:
    """A row: ``label``, the registered compressor ``name`` and its ``params``; ``reference``
    names the framework's own exchange instead (then ``name`` is what it sends). ``modelled``
    False: measured only, no calibration (a selector, whose chains are its candidates')."""

    label: str
    name: str
    params: dict = dataclasses.field(default_factory=dict)
    reference: str | None = None
    modelled: bool = True

    def build(self):
        return compression_from_name(self.name, **self.params)


#: Every compressor at its defaults, top-k / random-k / ScaleCom at 1 %, DGC past its warm-up
#: (warmup_steps=0) and with its default warm-up (its first stage keeps 25 %).
METHODS = [
    Method("none", "none"), Method("fp16", "fp16"), Method("bf16", "bf16"), Method("adacomp", "adacomp"),
    Method("terngrad", "terngrad"), Method("onebit", "onebit"), Method("topk 1%", "topk", {"ratio": 0.01}),
    Method("randomk 1%", "randomk", {"ratio": 0.01}), Method("scalecom 1%", "scalecom", {"ratio": 0.01}),
    Method("dgc no warm-up", "dgc", {"warmup_steps": 0}), Method("dgc", "dgc"),
    # At its defaults: candidates none and bf16, deciding after 3 steps whose median it
    # predicts from (the trainer warms it up until it has decided: see run_methods).
    Method("auto", "auto", modelled=False),
]
REFERENCES = {
    "horovod": [Method("hvd.DistributedOptimizer none", "none", reference="horovod"),
                Method("hvd.DistributedOptimizer fp16", "fp16", reference="horovod")],
    "ddp": [Method("DDP no hook", "none", reference="ddp"),
            Method("torch fp16_compress_hook", "fp16", reference="ddp")],
}


def methods_named(labels: list[str] | None, transport: str) -> list[Method]:
    every = METHODS + REFERENCES[transport]
    if not labels:
        return every
    known = {m.label: m for m in every}
    missing = [x for x in labels if x not in known]
    if missing:
        raise ValueError(f"unknown methods {missing}; known: {', '.join(known)}")
    return [known[x] for x in labels]


# ---- the two frameworks ------------------------------------------------------------------------


class HorovodRanks(sweep.HorovodRanks):
    """Horovod (Gloo), ``hvdcomp.DistributedOptimizer``."""

    def close(self) -> None:
        self.hvd.shutdown()

    def gather(self, obj) -> list:
        return self.hvd.allgather_object(obj)

    #: What :class:`LocalStep` times: Horovod adds nothing to a step until the optimizer
    #: exchanges, so the model runs bare.
    local_step_through = "the bare model"

    def without_exchange(self, model):
        return model

    def trainer(self, model, method: Method, lr: float):
        import hvdcomp

        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        if method.reference:
            comp = self.hvd.Compression.fp16 if method.name == "fp16" else self.hvd.Compression.none
            return model, self.hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                                        compression=comp), None
        wrapped = hvdcomp.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                               compression=method.build())
        return model, wrapped, wrapped


class TorchRanks(sweep.TorchRanks):
    """torch.distributed (Gloo), ``DistributedDataParallel`` with ``hvdcomp.ddp.compression_hook``."""

    name = "ddp"  # the in-process transport whose chains the calibration runs

    def close(self) -> None:
        """Every group destroyed before the interpreter exits (a Gloo group torn down at exit
        with its threads running aborts the process)."""
        self.dist.barrier()
        self.dist.destroy_process_group()

    def gather(self, obj) -> list:
        everyone = [None] * self.size
        self.dist.all_gather_object(everyone, obj)
        return everyone

    local_step_through = "DistributedDataParallel with a hook that exchanges nothing"

    def without_exchange(self, model):
        """``model`` under DDP as :meth:`trainer` builds it, with a hook that hands each bucket
        back as it is: the step keeps DDP's own work (gradients copied into the buckets and
        back, the buffers' broadcast in the forward pass), which every method's step pays."""
        from torch.distributed.algorithms.ddp_comm_hooks.debugging_hooks import noop_hook

        ddp = torch.nn.parallel.DistributedDataParallel(model, init_sync=False)
        ddp.register_comm_hook(None, noop_hook)
        return ddp

    def trainer(self, model, method: Method, lr: float):
        import hvdcomp
        import hvdcomp.ddp
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        # Every rank built the same model from the same seed: no start-up broadcast (which
        # would take seconds on a slow link).
        ddp = torch.nn.parallel.DistributedDataParallel(model, init_sync=False)
        opt = torch.optim.SGD(ddp.parameters(), lr=lr, momentum=0.9)
        if method.reference:
            if method.name == "fp16":
                ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
            return ddp, opt, None
        state = hvdcomp.ddp.CompressionState(method.build(), named_parameters=model.named_parameters(), optimizer=opt)
        ddp.register_comm_hook(state, hvdcomp.ddp.compression_hook)
        return ddp, opt, state


def framework_class(name: str) -> type:
    return HorovodRanks if name == "horovod" else TorchRanks


def framework(name: str):
    return framework_class(name)()


# ---- calibration ---------------------------------------------------------------------------------


class LocalStep:
    """Forward, backward and update (SGD with momentum) of the model without any exchange,
    and when each parameter's gradient is ready, seconds into the backward pass; samples
    added by every :meth:`measure`. ``wrap``: what the transport puts around the model
    without exchanging (``ranks.without_exchange``; DDP's reducer copies every gradient
    into its bucket and back).

    After each step (untimed by ``step``) it also times ``copy``: every gradient copied
    once into one flat float buffer kept across steps, as Horovod copies fused tensors
    into its fusion buffer (``gradient_bytes`` of them; ``hvdcomp.costs.Compute``'s
    ``copy_s_per_byte`` is the one over the other)."""

    def __init__(self, spec, batch, lr: float, wrap=None):
        self.spec, self.batch = spec, batch
        torch.manual_seed(0)
        self.model = spec.build()
        self.module = self.model if wrap is None else wrap(self.model)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=0.9)
        self.flat = torch.empty(sum(p.numel() for p in self.model.parameters()))
        self.parts: dict[str, list] = {"forward": [], "backward": [], "update": [], "step": [], "copy": []}
        self.ready: dict[str, list] = {}
        self._mark = 0.0
        self._timing = False
        for name, p in self.model.named_parameters():
            p.register_post_accumulate_grad_hook(lambda _, name=name: self._ready(name))

    def _ready(self, name: str) -> None:
        if self._timing:
            self.ready.setdefault(name, []).append(time.perf_counter() - self._mark)

    def measure(self, reps: int, ranks=None, warmup: int = 1) -> None:
        """``reps`` timed steps after ``warmup``. With ``ranks``, every rank steps at once
        (a barrier before each) and each step counts as its slowest rank's: in training the
        exchange waits for the slowest, so the step sees the maximum of the ranks' noisy
        compute, not the maximum of their medians."""
        new = {key: [] for key in self.parts}
        for i in range(warmup + reps):
            self._timing = i >= warmup
            if ranks is not None:
                ranks.barrier()
            a = time.perf_counter()
            self.opt.zero_grad()
            loss = self.spec.loss(self.module, self.batch)
            b = self._mark = time.perf_counter()
            loss.backward()
            c = time.perf_counter()
            self.opt.step()
            d = time.perf_counter()
            self._copy_gradients()
            e = time.perf_counter()
            if self._timing:
                for key, t in (("forward", b - a), ("backward", c - b), ("update", d - c), ("step", d - a),
                               ("copy", e - d)):
                    new[key].append(t)
        self._timing = False
        for key, ts in new.items():
            self.parts[key] += ranks.maximum(ts) if ranks is not None else ts

    def _copy_gradients(self) -> None:
        at = 0
        for p in self.model.parameters():
            self.flat[at:at + p.numel()].copy_(p.grad.reshape(-1))
            at += p.numel()

    def gradients(self) -> tuple[list[str], list]:
        named = [(n, p.grad.detach().clone()) for n, p in self.model.named_parameters()]
        return [n for n, _ in named], [g for _, g in named]

    def summary(self) -> dict:
        out = {key: summarize(ts) for key, ts in self.parts.items()}
        out["ready_s"] = {name: statistics.median(ts) for name, ts in self.ready.items()}
        out["gradient_bytes"] = self.flat.numel() * self.flat.element_size()
        return out


def request_bytes(req) -> dict:
    """One collective request as the cost model reads it: op and the bytes this rank passes
    in; an allreduce also the dtype it sums (torch's name without ``torch.``)."""
    nbytes = req.tensor.numel() * req.tensor.element_size()
    if isinstance(req, rq.Allreduce):
        return {"op": "allreduce", "bytes": nbytes, "dtype": str(req.tensor.dtype).removeprefix("torch.")}
    if isinstance(req, rq.Broadcast):
        return {"op": "broadcast", "bytes": nbytes, "root": req.root}
    if isinstance(req, rq.AllgatherV):
        item = req.tensor.element_size()
        return {"op": "allgather", "bytes": nbytes, "bytes_by_rank": [n * item for n in req.lengths]}
    if isinstance(req, rq.Allgather):
        return {"op": "allgather", "bytes": nbytes}
    if isinstance(req, rq.Alltoall):
        return {"op": "alltoall", "bytes": nbytes}
    raise TypeError(type(req).__name__)


#: A replay that faults in at most this many new pages (1 MiB) has a settled heap.
SETTLED_PAGES = 256
#: At most this many untimed replays wait for the heap to settle (each measure()).
MAX_SETTLING_REPLAYS = 4


def reserve_heap(nbytes: int) -> int:
    """Grow the heap by ``nbytes`` of touched pages and free them again; the pages this rank
    faulted in doing it.

    With the steady heap (``bench.step_times.STEADY_HEAP_ENV``: no mmap'd chunks, no trim)
    a request that fits no free hole is cut from the top of the heap, and the heap grows by
    pages the process has never touched: every 4 KiB of them costs a minor fault in the
    step that first writes it. The methods' trainers take turns in one process, each
    leaving holes shaped by its own buffers, so such a step comes in any round, 16 MiB
    (a gradient of the ``mlp``) at a time, and takes up to twice as long. A block of
    ``nbytes`` bytes (uint8) written once and freed joins the top of the heap with its pages
    resident, and later growth takes them from there. It only holds with the steady heap:
    glibc's own settings give the block back to the kernel when it is freed."""
    before = minor_faults()
    if nbytes > 0:
        block = torch.empty(nbytes, dtype=torch.uint8)
        block.fill_(1)
        del block
    return minor_faults() - before


def minor_faults() -> int:
    """Minor page faults of this process so far: pages it touched for the first time."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def steal_s(stat: str = "/proc/stat") -> float | None:
    """Seconds the hypervisor has run something else while this machine's CPUs had work
    (``steal``, the 8th figure of ``stat``'s ``cpu`` line, summed over the CPUs), or None
    where it is not reported."""
    try:
        with open(stat) as f:
            fields = f.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


class MethodCalibration:
    """Rank 0 of N in-process ranks through the real chains, on the model's gradients: per
    :meth:`measure`, a fresh :class:`bench.one_rank.OneRankOfN` (one at a time: N copies of
    the model's state) recorded and replayed. Gives the compress (local work up to the last
    collective) and decode (after it) seconds, and per chain its tensors, the local seconds
    before each phase, the decode seconds and the requests of every phase (rank 0's), and
    the payload bytes rank 0 handed in the recorded step (as a training step's
    ``compression_stats()`` counts them).
    transport, buckets: whose chains (DDP's: per DDP bucket, as lists of parameter names)."""

    def __init__(self, method: Method, names, grads, nranks: int, step: int, transport: str = "horovod",
                 buckets: list | None = None):
        self.method, self.names, self.grads, self.nranks, self.step = method, names, grads, nranks, step
        self.transport, self.buckets = transport, buckets
        self.timings: list = []
        self.settling_replays: list[int] = []  # per measure(): untimed replays after the warm-up
        self.payload_bytes: list[int] = []  # per measure(): the payload rank 0 handed in the recorded step
        self.chains: list | None = None

    def measure(self, reps: int, ranks=None, warmup: int = 1) -> None:
        """``reps`` replays after ``warmup`` and up to :data:`MAX_SETTLING_REPLAYS` more
        while the heap grows (see below); with ``ranks``, every rank replays at once
        (a barrier before each), rank r at step + r, and each figure of a replay is its
        slowest rank's (see :meth:`LocalStep.measure`)."""
        sim, step = self._recorded_world(ranks)
        self.payload_bytes.append(sim.stats["step"]["payload_bytes"])
        if self.chains is None:
            self.chains = [(key, kind, [s.name for s in slots], sum(s.info.numel for s in slots),
                            [[request_bytes(req) for req in everyone[0]] for everyone in sim.recorded[key]])
                           for key, kind, slots in sim.plan]
        timer = Timer(torch.device("cpu"))
        # A fresh in-process world grows the heap over its first replays, and a page touched
        # for the first time costs a page fault, which a training step in steady state does
        # not pay (docs/performance.md, "Page faults"). Untimed replays go on while any
        # rank's last one faulted in more than SETTLED_PAGES pages.
        new_pages = 0
        for _ in range(warmup):
            new_pages = self._pages_of_replay(sim, step, timer, ranks)
        settling = 0
        while settling < MAX_SETTLING_REPLAYS and (
                ranks.maximum([new_pages])[0] if ranks is not None else new_pages) > SETTLED_PAGES:
            new_pages = self._pages_of_replay(sim, step, timer, ranks)
            settling += 1
        self.settling_replays.append(settling)
        for _ in range(reps):
            timing = self._replay(sim, step, timer, ranks)
            self.timings.append(timing if ranks is None else self._slowest(ranks, timing))
        # The in-process ranks hold N copies of the model's state in reference cycles, which
        # the collector, counting objects rather than bytes, would free late: every method's
        # calibrations of a launch piled up (5 GB per rank for the mlp with 2 ranks).
        del sim
        gc.collect()

    def rehearse(self, ranks=None) -> None:
        """One untimed record and replay of the in-process world, freed at once (see
        :func:`run_methods`)."""
        sim, step = self._recorded_world(ranks)
        self._replay(sim, step, Timer(torch.device("cpu")), ranks)
        del sim
        gc.collect()

    def _recorded_world(self, ranks) -> tuple[OneRankOfN, int]:
        """A fresh in-process world with this rank's step recorded, and that step.

        Each rank records and replays a step later than the one before it: in a step the
        ranks play different roles (ScaleCom's leader of a tensor, ``(step + index) mod N``,
        runs its top-k; the others do not), the simulated rank 0 takes rank r's roles at
        step + r, and the slowest rank's figures are then those of the rank each phase
        waits for. (Replayed at the step recorded: a DDP bucket's chain groups its tensors'
        indices by leader.)"""
        step = self.step + (ranks.rank if ranks is not None else 0)
        sim = OneRankOfN(self.method.build, self.names, self.grads, self.nranks, DEFAULT_MIN_COMPRESS_NUMEL,
                         DEFAULT_BUCKET_CAP_MB, transport=self.transport, buckets=self.buckets)
        sim.record(step)
        return sim, step

    @staticmethod
    def _replay(sim: OneRankOfN, step: int, timer, ranks) -> Timing:
        if ranks is not None:
            ranks.barrier()
        return sim.replay(step, timer)

    def _pages_of_replay(self, sim: OneRankOfN, step: int, timer, ranks) -> int:
        """One untimed replay; the pages this rank faulted in during it."""
        before = minor_faults()
        self._replay(sim, step, timer, ranks)
        return minor_faults() - before

    def _slowest(self, ranks, timing: Timing) -> Timing:
        """Every figure of one replay as the slowest rank's."""
        keys = [key for key, *_ in self.chains]
        flat = [timing.compress_ms, sum(timing.decode_ms.values())]
        for key in keys:
            flat += list(timing.chains[key][0]) + [timing.chains[key][1]]
        worst = ranks.maximum(flat)
        chains, pos = {}, 2
        for key in keys:
            n = len(timing.chains[key][0])
            chains[key] = (worst[pos:pos + n], worst[pos + n])
            pos += n + 1
        return Timing(worst[0], {"all": worst[1]}, chains)

    def summary(self) -> dict:
        timings = self.timings
        chains = []
        for key, kind, tensors, numel, phases in self.chains:
            local = [statistics.median(t.chains[key][0][k] for t in timings) / 1e3 for k in range(len(phases))]
            chains.append({"key": list(map(str, key)), "kind": kind, "tensors": tensors, "numel": numel,
                           "phases": phases, "local_s": local,
                           "decode_s": statistics.median(t.chains[key][1] for t in timings) / 1e3})
        return {"compress_s": statistics.median(t.compress_ms for t in timings) / 1e3,
                "decode_s": statistics.median(sum(t.decode_ms.values()) for t in timings) / 1e3,
                "samples": len(timings), "settling_replays": self.settling_replays,
                "payload_bytes": statistics.median(self.payload_bytes), "chains": chains}


# ---- steps ------------------------------------------------------------------------------------------


def sent_bytes(iface: str = "lo") -> int | None:
    """Bytes sent so far on ``iface`` of this network namespace (on launch.link's loopback:
    every rank's, headers included): ``/proc/net/dev`` shows the reader's namespace."""
    try:
        with open("/proc/net/dev") as f:
            for line in f:
                name, _, fields = line.partition(":")
                if name.strip() == iface:
                    return int(fields.split()[8])
    except OSError:
        pass
    return None


class Trainer:
    """One method on this rank: its model, transport and optimizer, and its steps' times."""

    def __init__(self, ranks, spec, method: Method, batch, lr: float, iface: str = "lo"):
        self.method, self.spec, self.batch, self.iface = method, spec, batch, iface
        torch.manual_seed(0)
        self.module, self.opt, self.ours = ranks.trainer(spec.build(), method, lr)
        self.warm: list[float] = []
        self.times: list[float] = []
        self.loopback: list[int] = []
        self.page_faults: list[int] = []  # per timed step: pages this rank touched for the first time
        self.steal: list[float] = []  # per timed step: the machine's steal seconds (where reported)
        self.payload: list[int] = []  # per timed step: bytes of payload this rank handed (ours only)

    def step(self) -> float:
        a = time.perf_counter()
        self.opt.zero_grad()
        self.spec.loss(self.module, self.batch).backward()
        self.opt.step()
        return time.perf_counter() - a

    def awaiting_decision(self) -> bool:
        """A selector (``Compression.auto()``) that has not chosen its compressors yet, or
        whose proposal is still on trial."""
        auto = self.ours.compression_stats().get("auto") if self.ours is not None else None
        return auto is not None and (not auto["decided"] or auto["on_trial"])

    def timed_steps(self, count: int) -> None:
        for _ in range(count):
            before, faults, stolen = sent_bytes(self.iface), minor_faults(), steal_s()
            self.times.append(self.step())
            self.page_faults.append(minor_faults() - faults)
            after_steal = steal_s()
            if stolen is not None and after_steal is not None:
                self.steal.append(after_steal - stolen)
            after = sent_bytes(self.iface)
            if before is not None and after is not None:
                self.loopback.append(after - before)
            if self.ours is not None:
                self.payload.append(self.ours.compression_stats()["step"]["payload_bytes"])

    def row(self, ranks) -> dict:
        per_step = ranks.maximum(self.times)
        m = self.method
        row = {"label": m.label, "compressor": m.name, "params": m.params, "reference": m.reference,
               "modelled": m.modelled,
               "warmup_s": ranks.maximum(self.warm), "steps_s": per_step, "median_s": statistics.median(per_step),
               "page_faults_per_step": [int(n) for n in ranks.maximum(self.page_faults)],
               "steal_s_per_step": self._steal_per_step(ranks),
               "wire_bytes_per_step": statistics.median(self.loopback) if self.loopback else None}
        if self.ours is not None:
            stats = self.ours.compression_stats()
            step = stats["step"]
            row["handed"] = {k: step[k] for k in ("payload_bytes", "sent_bytes", "received_bytes") if k in step}
            row["transports"] = step.get("transports")
            # A method whose payload follows the data (AdaComp's follows its residual) hands
            # other bytes in each step than its calibration replays.
            most = ranks.maximum(self.payload + [-x for x in self.payload])
            row["payload_bytes_per_step"] = {"min": [int(-x) for x in most[len(self.payload):]],
                                             "max": [int(x) for x in most[:len(self.payload)]]}
            row["ddp_buckets"] = self.ddp_buckets()
            if "auto" in stats:  # the selector's decision and its prediction
                row["auto"] = stats["auto"]
        return row

    def _steal_per_step(self, ranks) -> list | None:
        """Per timed step, the steal seconds of the rank's machine (the most any rank
        read), or None where no rank could read them (a rank that cannot sends -1)."""
        mine = self.steal if len(self.steal) == len(self.times) else [-1.0] * len(self.times)
        everyone = ranks.maximum(mine)
        return None if any(x < 0 for x in everyone) else everyone

    def ddp_buckets(self) -> list | None:
        """DDP's buckets as lists of parameter names (None for Horovod)."""
        if not hasattr(self.ours, "bucket_layout"):
            return None
        return [names for _, names in sorted(self.ours.bucket_layout().items())]


def idle_traffic(ranks, iface: str, seconds: float = 1.0) -> float | None:
    """Bytes per second sent on ``iface`` while no rank exchanges anything (Horovod's
    background thread negotiates every cycle, over the same link)."""
    ranks.barrier()
    before, start = sent_bytes(iface), time.perf_counter()
    time.sleep(seconds)
    after, took = sent_bytes(iface), time.perf_counter() - start
    return None if before is None or after is None else (after - before) / took


#: A method whose steps take longer needs no untimed step at its turn: what the previous
#: method left (a renegotiation, a draining queue) costs it well under 1 %.
SETTLED_S = 1.0
#: Untimed steps a method with shorter steps takes at its turn in a round. What the previous
#: method and the calibrations leave (freed buffers, a queue on the link) fades over a few
#: steps, not one: with one, a method timed right after another's calibration started each
#: round slower than the same exchange elsewhere (docs/performance.md, auto's section).
SETTLE_STEPS = 3


def round_share(count: int, rounds: int, r: int) -> int:
    """How many of a method's ``count`` timed steps run in round ``r`` of ``rounds``: an
    even share, one more in each of the first ``count % rounds`` rounds."""
    return count // rounds + (1 if r < count % rounds else 0)


def round_order(count: int, rounds: int, r: int) -> list[int]:
    """The methods' order (indices into the given order) in round ``r`` of ``rounds``: the
    given order turned round by ``r * count // rounds`` places. A method's steps can run
    slower right after some methods' than after others' (docs/performance.md,
    `Compression.auto()` against its candidates), so no method keeps one place or one
    predecessor in every round."""
    shift = r * count // rounds
    return [(shift + i) % count for i in range(count)]


def run_methods(ranks, spec, methods: list[Method], batch, warmup: int, budget_s: float, max_steps: int,
                min_steps: int, rounds: int, calib_reps: int, lr: float, log,
                iface: str = "lo", settle_steps: int = SETTLE_STEPS,
                heap_reserve_bytes: int = 0) -> tuple[list[dict], dict, dict]:
    """Every method's warm-up (a single step where a step lasts longer than
    :data:`SETTLED_S`), then ``rounds`` rounds. In a round the step without exchange
    is timed (:class:`LocalStep`), then every method takes its share of its timed steps,
    back to back, after ``settle_steps`` untimed steps (Horovod renegotiates the names another
    method used, the link's queue drains) unless its steps are longer than
    :data:`SETTLED_S`; then every method is calibrated (:class:`MethodCalibration`, every
    rank at once after a barrier): a change in the machine's load hits the steps and the
    calibration of every method alike. The methods' order turns from round to round
    (:func:`round_order`). Before the first round every calibration rehearses
    once (untimed), then every rank reserves ``heap_reserve_bytes`` of touched heap
    (:func:`reserve_heap`), and the cyclic collector runs before every method's turn. The timed
    steps per method, agreed by every rank, are as many as fit in ``budget_s`` by the
    warm-up's last step. Returns the rows, the local step's summary and every method's
    calibration summary."""
    local = LocalStep(spec, batch, lr, ranks.without_exchange)
    local.measure(1, ranks)
    names, grads = local.gradients()
    trainers = []
    for m in methods:
        ranks.barrier()
        t = Trainer(ranks, spec, m, batch, lr, iface)
        t.warm = [t.step()]
        # One warm-up step is enough where a step lasts seconds: the link, not a cold
        # cache or a first allocation, sets its time (every rank agrees).
        (first,) = ranks.maximum([t.warm[0]])
        t.warm += [t.step() for _ in range(warmup - 1 if first < SETTLED_S else 0)]
        if not m.modelled:
            # A selector's decision step runs its start-up calibration, and a proposal's trial
            # follows: they and one step with the compressors that stand (whose time sets the
            # timed steps' count) stay out of the timed steps (every rank decides at once).
            while t.awaiting_decision():
                t.warm.append(t.step())
            t.warm.append(t.step())
        trainers.append(t)
    idle = idle_traffic(ranks, iface)
    # Every decision below is taken on values every rank agrees on (a rank taking one step
    # more than another would leave both waiting for collectives that never come).
    slowest = ranks.maximum([t.warm[-1] for t in trainers])
    counts = [max(min_steps, min(max_steps, int(budget_s / max(s, 1e-6)))) for s in slowest]
    calibrations = {t.method.label: MethodCalibration(t.method, names, grads, ranks.size, warmup, ranks.name,
                                                      t.ddp_buckets()) for t in trainers
                    if t.ours is not None and t.method.modelled}
    # Every calibration once, untimed, before the first round, the heap's reserve, and the
    # cyclic collector before every method's turn: without them, through DDP on the mlp,
    # steps took 16 MiB at a time of fresh pages from the kernel and ran up to twice as long
    # (docs/performance.md, "The campaign again" and "The heap's reserve").
    for t in trainers:
        if t.method.label in calibrations:
            calibrations[t.method.label].rehearse(ranks)
    reserve_heap(heap_reserve_bytes)
    for r in range(rounds):
        local.measure(calib_reps, ranks)
        for i in round_order(len(trainers), rounds, r):
            t, count, step_s = trainers[i], counts[i], slowest[i]
            share = round_share(count, rounds, r)
            if share:
                gc.collect()  # what the method before left in reference cycles, not in these steps
                ranks.barrier()
                if step_s < SETTLED_S:
                    for _ in range(settle_steps):
                        t.step()
                t.timed_steps(share)
        # The calibrations run after every method's steps of the round: a calibration's
        # replays (N in-process ranks' copies of the model's state) leave the caches and
        # the heap to whatever runs next, and a method timed right after one runs slower
        # than the same exchange timed after another method's steps (docs/performance.md,
        # `Compression.auto()` against its candidates).
        for t in trainers:
            if t.method.label in calibrations:
                calibrations[t.method.label].measure(max(1, calib_reps // rounds), ranks)
        if ranks.rank == 0:
            log(f"  round {r + 1} of {rounds} done")
    rows = [t.row(ranks) for t in trainers]
    if ranks.rank == 0:
        for row in rows:
            log(f"  {row['label']:<32} {row['median_s'] * 1e3:10.1f} ms/step over {len(row['steps_s'])} steps")
    return rows, {**local.summary(), "through": ranks.local_step_through, "idle_wire_bytes_per_s": idle,
                  "iface": iface}, {
        label: c.summary() for label, c in calibrations.items()}


def launch(framework_name: str, model_name: str, batch_size: int, labels: list[str] | None, warmup: int,
           budget_s: float, max_steps: int, min_steps: int, rounds: int, calib_reps: int, lr: float,
           log, iface: str = "lo", settle_steps: int = SETTLE_STEPS,
           heap_reserve_bytes: int = 0) -> dict | None:
    """Everything one launch measures; rank 0 returns the record, the others None."""
    torch.set_num_threads(1)
    ranks = framework(framework_name)
    methods = methods_named(labels, framework_name)
    spec = get_model(model_name)
    batch = spec.batch(batch_size, "cpu")
    load_start = os.getloadavg()[0]
    rows, local, calibration = run_methods(ranks, spec, methods, batch, warmup, budget_s, max_steps, min_steps,
                                           rounds, calib_reps, lr, log, iface, settle_steps, heap_reserve_bytes)
    # Every rank's calibration (in a step every rank waits for the slowest; the model takes
    # the slowest rank's figures).
    everyone = ranks.gather({"local_step": local, "calibration": calibration})
    rank = ranks.rank
    ranks.close()
    if rank != 0:
        return None
    import hvdcomp

    with torch.device("meta"):
        model = spec.build()
    return {"framework": framework_name, "world_size": ranks.size, "model": model_name,
            "parameters": sum(p.numel() for p in model.parameters()), "tensors": len(list(model.parameters())),
            "batch_per_rank": batch_size, "threads_per_rank": torch.get_num_threads(),
            "machine": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
            "versions": {"torch": torch.__version__, "python": platform.python_version(),
                         "hvdcomp": hvdcomp.__version__, **ranks.versions},
            "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]}, **ranks.settings,
            "settle_steps": settle_steps, "calibrated_after_round_steps": True,
            "round_orders": [[methods[i].label for i in round_order(len(methods), rounds, r)] for r in range(rounds)],
            "heap_reserve_bytes": heap_reserve_bytes,
            "calibration_by_rank": everyone, "rows": rows}
