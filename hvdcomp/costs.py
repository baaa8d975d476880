"""The step-time cost model: how long a training step takes with a given compressor, link
and number of ranks, from quantities measured on the machine.

Inputs (all seconds or bytes, all measurable at start-up on the real ranks):

* :class:`Compute`: forward ``F``, backward ``B`` and the optimizer's update ``U`` of one
  step without any exchange, timed on every rank at once (so the cores are shared as in
  training).
* :class:`Link`: per collective ``op`` a latency ``alpha_op`` and a cost per byte
  ``beta_op`` (seconds per byte *one rank* sends, as ``bench.collectives_sweep`` fits
  them), and the seconds of transfer a full token bucket lets through at once
  (``credit_cap_s = burst / rate``; 0 on an unshaped link or a NIC). One collective in
  isolation, starting with ``c`` seconds of credit, takes

      t = alpha_op + max(0, beta_op * b_op(S, N) - c)

  with ``b_op`` the bytes one rank sends (:data:`BYTES_PER_RANK`: ring allreduce
  ``2 (N-1)/N S``, ring allgather ``(N-1) S``, pairwise alltoall and binomial broadcast
  ``(N-1)/N S``; S the bytes a rank passes in). On N ranks sharing one bucket of rate R
  (``launch.link``'s loopback) ``beta = N / R``; on N hosts with full-duplex links of R,
  ``beta = 1 / R`` for the ring collectives (:meth:`Link.shared_bucket`,
  :meth:`Link.full_duplex`). An allreduce also sums: where a sweep timed the sum of another
  dtype apart (:data:`DTYPE_FITS`: fp16, which Gloo sums through fp32 on the CPU), a
  :class:`Collective` of that dtype takes that fit. Per op, a latency under load ``L_op``
  (``Link.loaded_latency_s``): what a small collective takes while every rank's cores
  run one busy thread besides it (``bench.loaded_latency``).
* per chain of collectives (a bucket, or one tensor's exchange), a :class:`Chain`: its
  phases (the collectives each phase issues at once, with the bytes this rank passes in),
  the local work before each phase (``local_s[0]`` is the encode: error feedback,
  selection, packing; ``local_s[k]`` for k > 0 the work between phase k-1's results and
  phase k, e.g. packing after the size exchange), the decode after the last phase, and the
  time into the backward pass at which its gradients are all ready (``ready_s``).
* a :class:`Driver`: how the transport runs the chains (:data:`HOROVOD`, :data:`DDP`).

The step (:func:`predict_step`) is a small event simulation of one rank (the ranks run in
lockstep; every figure is the slowest rank's):

1. forward, then backward; when a chain's gradients are ready its hook does ``local_s[0]``
   on the training thread (the backward pass waits for it) and issues phase 0;
2. the network serves the issued collectives one at a time, in the order they were issued
   (all ranks' bytes cross the same bottleneck, so bytes never overlap one another). A
   collective starting at time s costs ``alpha + max(0, beta b - c(s))``, where the
   bucket's credit ``c`` refills at one second per idle second up to ``credit_cap_s``
   and is spent by every byte term. With ``Driver.fuse`` (Horovod's tensor fusion)
   collectives of the same kind waiting when the network frees up go as one: one alpha,
   their bytes summed. Two or more go through the fusion buffer: each tensor is copied
   in before the collective and out after it, ``2 S_fused`` bytes at the rank's copy
   rate (``Compute.copy_s_per_byte``) on the thread that runs the collective (a single
   tensor is reduced where it lies, as in the calibrating sweep). With under 2 cores per
   rank, a collective that starts at s while the training thread still computes (before
   ``busy_until`` = F + B + the hooks' encodes) cannot finish before ``s + L_op``: every
   message waits for the scheduler to wake a thread on a busy core. If the backward pass
   ends first, it has done ``(busy_until - s) / L_op`` of its work and does the rest at
   its idle pace. The time it loses is a wait before it starts, during which the bucket
   refills (:meth:`_Network.loaded_start`);
3. later phases: the local work ``local_s[k]`` runs where the driver runs it. Horovod
   (``later_on_main``): on the training thread in ``synchronize()``, chain after chain in
   plan order, each to its end (decode included) before the next; DDP: in the previous
   phase's completion callback, on a worker thread, at once;
4. the decode runs on the training thread (Horovod) or in the last callback (DDP); the
   update ``U`` starts when the training thread has everything. With fewer than 2 cores
   per rank (``Compute.cores``) DDP's callbacks run on the same core as the training
   thread, and the core is shared as the kernel's fair scheduler shares it: while n pieces
   of work are runnable (the forward and backward pass with the hooks' encodes, each
   callback's local work, each decode) each runs at 1/n of its calibrated speed
   (:class:`_SharedCore`). A callback's work during the backward pass so takes longer, the
   next phase is issued that much later, and the backward pass slows down for it. Where
   the collectives themselves are CPU work on the ranks' cores (``Link.on_rank_cores``: a
   loopback with no qdisc), every collective's byte term joins the rank's CPU work from
   when its latency ended, with either driver, and the update also waits until one core
   has done all of it, each piece from when it could start (:func:`one_core_finish_s`):
   the copies compete with the backward pass instead of overlapping it, and so do the
   fusion buffer's copies (on a wire they only lengthen their collective, as the byte
   terms do). The latency is waiting (a framework's negotiation, a thread waking up), not
   work.

    step = time the training thread finishes U

What a step would take with the network's byte terms free and every compress and decode
skipped is the *bound* the issue measures against (:func:`bound_s`):

    bound = F + B + U + sum over collectives of beta_op * b_op(S, N)

:func:`fit_alpha_beta` fits alpha, beta and the free burst of one collective from timed
calls (``bench.collectives_sweep``'s fit; what ``Compression.auto`` runs on a short sweep).
Pure functions and frozen dataclasses; no framework is imported. ``hvdcomp.Compression.auto``
measures the inputs at start-up and compares the candidates' predictions per bucket (with
:func:`chain_s` for one chain alone) or for the whole step (:func:`predict_step`).
"""
from __future__ import annotations

import dataclasses
import heapq
import math
from typing import Mapping, Sequence

#: Bytes one rank sends in a collective when every rank passes in S bytes, N ranks (Gloo's
#: algorithms: ring allreduce, ring allgather, pairwise alltoall, binomial-tree broadcast,
#: whose (N-1) S bytes in all are averaged over the ranks).
BYTES_PER_RANK = {
    "allreduce": ("2*(N-1)/N*S", lambda s, n: 2 * (n - 1) / n * s),
    "allgather": ("(N-1)*S", lambda s, n: (n - 1) * s),
    "alltoall": ("(N-1)/N*S", lambda s, n: (n - 1) / n * s),
    "broadcast": ("(N-1)/N*S", lambda s, n: (n - 1) / n * s),
}
OPS = tuple(BYTES_PER_RANK)
#: Fits kept apart by the dtype a collective sums, by name: (op, dtype). Gloo sums fp16 on
#: the CPU element by element through fp32, several times slower per byte than its fp32
#: sum, which a fast link exposes. A link without such a fit prices every dtype's bytes
#: with the op's fit (float32's).
DTYPE_FITS = {"allreduce_float16": ("allreduce", "float16")}


def fit_key(op: str, dtype: str = "float32") -> str:
    """The name of the fit that prices ``op`` on values of ``dtype`` (torch's dtype name
    without ``torch.``): ``allreduce_float16`` for an fp16 sum, else ``op``."""
    key = f"{op}_{dtype}"
    return key if key in DTYPE_FITS else op


def op_and_dtype(key: str) -> tuple[str, str]:
    """The (op, dtype) a fit named ``key`` prices (:data:`DTYPE_FITS`; float32 otherwise)."""
    return DTYPE_FITS.get(key, (key, "float32"))


def bytes_per_rank(op: str, nbytes: float, nranks: int) -> float:
    """b_op(S, N): the bytes one rank sends in collective ``op`` of ``nbytes`` per rank."""
    if op not in BYTES_PER_RANK:
        raise ValueError(f"unknown collective {op!r}; known: {', '.join(OPS)}")
    return BYTES_PER_RANK[op][1](nbytes, nranks) if nranks > 1 else 0.0


def hop_latencies(hop_s: float, nranks: int) -> dict:
    """Each collective's latency when every message step costs ``hop_s``: a ring allreduce
    has 2 (N-1) steps, a ring allgather and a pairwise alltoall N-1, a binomial broadcast
    ceil(log2 N). For links measured at one rank count and used at another."""
    if nranks <= 1:
        return dict.fromkeys(OPS, 0.0)
    steps = {"allreduce": 2 * (nranks - 1), "allgather": nranks - 1, "alltoall": nranks - 1,
             "broadcast": math.ceil(math.log2(nranks))}
    return {op: hop_s * k for op, k in steps.items()}


# ---- a link's parameters from timed collectives ---------------------------------------------------

#: Relative error beyond which a point's pull on the fit grows linearly, not quadratically
#: (Huber's loss): one call slowed by other load must not tilt the whole line.
HUBER_RELATIVE = 0.1


def _weighted_line(z: list[float], t: list[float], weights: list[float]) -> tuple[float, float]:
    """alpha, beta >= 0 minimising sum(weights * ((alpha + beta * z - t) / t)^2)."""
    w = [wi / ti**2 for wi, ti in zip(weights, t)]
    sw, sz, szz = sum(w), sum(wi * zi for wi, zi in zip(w, z)), sum(wi * zi * zi for wi, zi in zip(w, z))
    st, szt = sum(wi * ti for wi, ti in zip(w, t)), sum(wi * zi * ti for wi, zi, ti in zip(w, z, t))
    det = sw * szz - sz * sz
    alpha, beta = ((szz * st - sz * szt) / det, (sw * szt - sz * st) / det) if det > 1e-12 * sw * szz else (st / sw, 0.0)
    if alpha < 0:
        alpha, beta = 0.0, szt / szz
    if beta < 0:
        alpha, beta = st / sw, 0.0
    return alpha, beta


def _huber_line(z: list[float], t: list[float]) -> tuple[float, float, list[float], float]:
    """alpha, beta of t = alpha + beta * z under Huber's loss of the relative error
    (iteratively reweighted least squares); with the relative errors and the loss."""
    weights = [1.0] * len(z)
    for _ in range(10):
        alpha, beta = _weighted_line(z, t, weights)
        errors = [(alpha + beta * zi - ti) / ti for zi, ti in zip(z, t)]
        weights = [1.0 if abs(e) <= HUBER_RELATIVE else HUBER_RELATIVE / abs(e) for e in errors]
    loss = sum(e * e / 2 if abs(e) <= HUBER_RELATIVE else HUBER_RELATIVE * (abs(e) - HUBER_RELATIVE / 2)
               for e in errors)
    return alpha, beta, errors, loss


def fit_alpha_beta(x: list[float], t: list[float], hinge: bool = True) -> dict:
    """Fit t = alpha + beta * max(0, x - free), alpha, beta >= 0, on relative errors under
    Huber's loss (errors beyond HUBER_RELATIVE count linearly).

    ``free`` (bytes per rank) is searched on a fine grid when ``hinge``, else 0 (the plain
    line t = alpha + beta * x). A token bucket passes its burst at once, so on a shaped link
    the first ``free`` bytes cost nothing: free * rate_multiple is about the burst.
    Returns alpha_s, beta_s_per_byte, free_bytes_per_rank, points, rel_errors (prediction /
    measured - 1, per point), max_abs_rel_error, and max_abs_rel_error_bandwidth over the
    points whose byte term is at least alpha (sub-millisecond latencies are noisier)."""
    if not x:
        return {"alpha_s": None, "beta_s_per_byte": None, "free_bytes_per_rank": None, "points": 0}
    grid = [0.0]
    if hinge and max(x) > 0:
        low, high = min(x) / 2, max(x)
        grid += [low * (high / low) ** (i / 400) for i in range(401)]
    best = None
    for free in grid:
        z = [max(0.0, xi - free) for xi in x]
        if free and sum(zi > 0 for zi in z) < 2:
            continue
        alpha, beta, errors, loss = _huber_line(z, t)
        if best is None or loss < best[0] - 1e-12:
            best = (loss, alpha, beta, free, z, errors)
    _, alpha, beta, free, z, errors = best
    bandwidth = [abs(e) for e, zi in zip(errors, z) if beta * zi >= alpha]
    return {"alpha_s": alpha, "beta_s_per_byte": beta, "bytes_per_s": 1 / beta if beta > 0 else None,
            "free_bytes_per_rank": free, "points": len(x), "rel_errors": errors,
            "max_abs_rel_error": max(map(abs, errors)), "max_abs_rel_error_bandwidth": max(bandwidth, default=None)}


# ---- the link --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CollectiveFit:
    """One collective on one link and rank count: ``t = alpha_s + beta_s_per_byte * b``."""

    alpha_s: float
    beta_s_per_byte: float


@dataclasses.dataclass(frozen=True)
class Link:
    """The network as the step sees it (see the module docstring).

    fits: per op (allreduce, allgather, alltoall, broadcast) its :class:`CollectiveFit`,
    and optionally per :data:`DTYPE_FITS` name one for a dtype summed at another cost.
    nranks: N, the rank count the fits hold for. credit_cap_s: burst / rate of the
    bottleneck's token bucket (0: none). idle_share: the fraction of the bottleneck's rate
    that other traffic takes while no collective runs (Horovod's background thread
    negotiates every cycle over the same link): the bucket refills at ``1 - idle_share``
    seconds of credit per idle second. on_rank_cores: a collective's time is CPU work on
    the ranks' own cores, not waiting for a wire (a loopback with no qdisc: the ranks'
    threads copy every byte through the kernel and reduce it), so with under 2 cores per
    rank it cannot overlap the rank's other work (:func:`predict_step`). loaded_latency_s:
    per op, what a small collective takes while every rank's cores run one busy thread
    besides the collective's (``bench.loaded_latency``; an op without one: nothing
    changes): each message of the collective waits for the scheduler to wake a thread, so
    with under 2 cores per rank a collective during the forward and backward pass takes at
    least this long (:meth:`_Network.loaded_start`)."""

    fits: Mapping[str, CollectiveFit]
    nranks: int
    credit_cap_s: float = 0.0
    idle_share: float = 0.0
    on_rank_cores: bool = False
    loaded_latency_s: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def fit(self, op: str, dtype: str = "float32") -> CollectiveFit:
        """The fit of ``op`` on ``dtype`` values: the dtype's own (:func:`fit_key`) where
        the link has one, else the op's."""
        key = fit_key(op, dtype)
        if key in self.fits:
            return self.fits[key]
        if op not in self.fits:
            raise ValueError(f"the link has no fit for {op!r} (has {', '.join(self.fits)})")
        return self.fits[op]

    def loaded_s(self, op: str) -> float:
        """``op``'s latency under load (:attr:`loaded_latency_s`; 0 where not measured)."""
        return self.loaded_latency_s.get(op, 0.0) if self.nranks > 1 else 0.0

    def transfer_s(self, op: str, nbytes: float, dtype: str = "float32") -> float:
        """The byte term ``beta_op * b_op(S, N)`` of one collective."""
        return self.fit(op, dtype).beta_s_per_byte * bytes_per_rank(op, nbytes, self.nranks)

    def collective_s(self, op: str, nbytes: float, credit_s: float = 0.0, dtype: str = "float32") -> float:
        """One collective alone: ``alpha + max(0, beta b - credit)``."""
        if self.nranks <= 1:
            return 0.0
        return self.fit(op, dtype).alpha_s + max(0.0, self.transfer_s(op, nbytes, dtype) - credit_s)

    @classmethod
    def shared_bucket(cls, rate_bytes_per_s: float, burst_bytes: float, nranks: int,
                      alpha_s: float | Mapping[str, float] = 0.0) -> "Link":
        """N ranks whose every byte crosses one token bucket of rate R (one loopback, one
        switch port): beta = N / R for every collective."""
        alphas = alpha_s if isinstance(alpha_s, Mapping) else dict.fromkeys(OPS, alpha_s)
        return cls({op: CollectiveFit(alphas[op], nranks / rate_bytes_per_s) for op in OPS}, nranks,
                   burst_bytes / rate_bytes_per_s)

    @classmethod
    def full_duplex(cls, rate_bytes_per_s: float, nranks: int, alpha_s: float | Mapping[str, float] = 0.0,
                    burst_bytes: float = 0.0) -> "Link":
        """N hosts, each with its own full-duplex link of rate R: a ring's every hop runs at
        R at once, beta = 1 / R (alltoall too; broadcast's tree, ceil(log2 N) rounds of S
        over (N-1)/N S bytes per rank, is charged its rounds)."""
        alphas = alpha_s if isinstance(alpha_s, Mapping) else dict.fromkeys(OPS, alpha_s)
        fits = {op: CollectiveFit(alphas[op], 1 / rate_bytes_per_s) for op in OPS}
        if nranks > 1:
            rounds = math.ceil(math.log2(nranks))
            fits["broadcast"] = CollectiveFit(alphas["broadcast"], rounds * nranks / (nranks - 1) / rate_bytes_per_s)
        return cls(fits, nranks, burst_bytes / rate_bytes_per_s)

    @classmethod
    def from_fits(cls, fits: Mapping[str, Mapping], nranks: int, credit_cap_s: float | None = None,
                  idle_share: float = 0.0) -> "Link":
        """From ``bench.collectives_sweep``'s ``record["fits"]`` (alpha_s, beta_s_per_byte,
        free_bytes_per_rank per op): ``credit_cap_s`` defaults to the largest
        ``beta * free`` (the burst's seconds)."""
        usable = {op: f for op, f in fits.items() if f.get("alpha_s") is not None}
        cap = max((f["beta_s_per_byte"] * f.get("free_bytes_per_rank", 0.0) for f in usable.values()), default=0.0)
        return cls({op: CollectiveFit(f["alpha_s"], f["beta_s_per_byte"]) for op, f in usable.items()}, nranks,
                   cap if credit_cap_s is None else credit_cap_s, idle_share)


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective request: ``op``, the bytes this rank passes in (an allgather of
    variable sizes: the mean over the ranks, or the largest where the transport pads every
    rank's to it) and the dtype of its values (torch's name
    without ``torch.``; what an allreduce sums)."""

    op: str
    nbytes: float
    dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class Chain:
    """One chain of one step (see the module docstring). phases: per phase the collectives
    it issues at once; local_s: seconds of local work before each phase (as many as
    phases); decode_s: after the last phase; ready_s: when its gradients are all ready,
    seconds into the backward pass; main_order: its place in the driver's finishing order."""

    phases: tuple
    local_s: tuple
    decode_s: float = 0.0
    ready_s: float = 0.0
    main_order: int = 0

    def __post_init__(self):
        if len(self.local_s) != len(self.phases):
            raise ValueError(f"a chain needs one local time per phase: {len(self.phases)} phases, "
                             f"{len(self.local_s)} local times")


@dataclasses.dataclass(frozen=True)
class Compute:
    """One step without exchange: forward, backward, update (seconds), and the cores one
    rank's threads can run on at once (``cores``: the machine's cores over its ranks; inf:
    every thread has a core of its own). Below 2, DDP's completion callbacks share the
    training thread's core (:class:`_SharedCore`). copy_s_per_byte: seconds one rank takes
    to copy a byte of gradient into another buffer with every rank copying at once (what a
    fused collective pays twice per byte; 0: copies cost nothing)."""

    forward_s: float
    backward_s: float
    update_s: float
    cores: float = math.inf
    copy_s_per_byte: float = 0.0

    def __post_init__(self):
        if not self.cores > 0:
            raise ValueError(f"Compute.cores must be > 0, got {self.cores!r}")
        if not self.copy_s_per_byte >= 0:
            raise ValueError(f"Compute.copy_s_per_byte must be >= 0, got {self.copy_s_per_byte!r}")

    @property
    def step_s(self) -> float:
        return self.forward_s + self.backward_s + self.update_s


@dataclasses.dataclass(frozen=True)
class Driver:
    """How a transport runs its chains. later_on_main: phases after the first (their local
    work) and the decode run on the training thread in ``synchronize()``, chain after chain
    (Horovod); otherwise in completion callbacks as soon as the previous phase is done
    (DDP). fuse: collectives of one kind waiting together go as one (Horovod's tensor
    fusion)."""

    name: str
    later_on_main: bool
    fuse: bool


HOROVOD = Driver("horovod", later_on_main=True, fuse=True)
DDP = Driver("ddp", later_on_main=False, fuse=False)


@dataclasses.dataclass(frozen=True)
class StepPrediction:
    """step_s: the predicted step. network_s: seconds the network was busy; local_s: the
    compress and decode seconds of every chain; exposed_s: step_s - Compute.step_s."""

    step_s: float
    network_s: float
    local_s: float
    exposed_s: float


class _Network:
    """The bottleneck: serves collectives one at a time in issue order (see the module
    docstring, step 2)."""

    def __init__(self, link: Link, fuse: bool, idle_since: float, copy_s_per_byte: float = 0.0,
                 busy_until: float = 0.0):
        self.link, self.fuse, self.copy_s_per_byte = link, fuse, copy_s_per_byte
        self.busy_until = busy_until  # when the training thread stops computing (0: it never shares a core)
        self.free_at, self.idle_since, self.credit = 0.0, idle_since, 0.0
        self.queue: list = []  # (issue time, sequence, chain id, phase, collective index, Collective)
        self.done: dict = {}  # (chain id, phase) -> time its last collective finished
        self.pending: dict = {}  # (chain id, phase) -> collectives not finished
        self.busy_s = 0.0
        self.byte_terms: list = []  # (start, seconds) of every served collective's byte term
        self.copies: list = []  # (start, seconds) of every fusion buffer copy
        self._seq = 0

    def submit(self, t: float, chain: int, phase: int, collectives: Sequence[Collective]) -> None:
        if not collectives or self.link.nranks <= 1:
            self.done[(chain, phase)] = t
            return
        self.pending[(chain, phase)] = len(collectives)
        for c in collectives:
            heapq.heappush(self.queue, (t, self._seq, chain, phase, c))
            self._seq += 1

    def _credit_at(self, start: float) -> float:
        """The bucket's credit at ``start``: refilled since the link went idle, capped."""
        refill = (1.0 - self.link.idle_share) * max(0.0, start - self.idle_since)
        return min(self.link.credit_cap_s, self.credit + refill)

    def loaded_start(self, start: float, alone_s: float, op: str = "allreduce") -> float:
        """When a collective that could start at ``start`` and take ``alone_s`` on idle ranks
        starts to move, where the ranks' cores are busy until ``busy_until``.

        Under load a collective takes ``max(L, alone_s)`` (``L = link.loaded_s(op)``):
        its messages wait for the scheduler, its bytes flow meanwhile. One that the
        training thread's end (``busy_until``) catches midway has done the fraction
        ``(busy_until - start) / L`` of it and does the rest at its idle pace. The time it
        takes beyond ``alone_s`` is a wait before it: the wire idles and the bucket refills."""
        loaded = self.link.loaded_s(op)
        if loaded <= alone_s or start >= self.busy_until:
            return start
        if start + loaded <= self.busy_until:
            return start + loaded - alone_s
        done = (self.busy_until - start) / loaded
        return self.busy_until - alone_s * done

    def _serve_one(self) -> None:
        t, _, chain, phase, c = heapq.heappop(self.queue)
        start = max(t, self.free_at)
        batch = [(chain, phase, c)]
        if self.fuse:  # everything of the same op and dtype already waiting goes with it
            keep = []
            while self.queue and self.queue[0][0] <= start:
                item = heapq.heappop(self.queue)
                same = (item[4].op, item[4].dtype) == (c.op, c.dtype)
                (batch.append((item[2], item[3], item[4])) if same else keep.append(item))
            for item in keep:
                heapq.heappush(self.queue, item)
        transfer = sum(self.link.transfer_s(x.op, x.nbytes, x.dtype) for _, _, x in batch)
        alpha = self.link.fit(c.op, c.dtype).alpha_s
        # Horovod copies two or more fused tensors into its fusion buffer after the
        # negotiation (alpha) and out of it after the collective, on its one thread.
        copy = self.copy_s_per_byte * sum(x.nbytes for _, _, x in batch) if len(batch) > 1 else 0.0
        start = self.loaded_start(start, alpha + 2 * copy + transfer - min(self._credit_at(start), transfer), c.op)
        self.credit = self._credit_at(start)
        spent = min(self.credit, transfer)
        self.credit -= spent
        end = start + alpha + 2 * copy + transfer - spent
        self.busy_s += end - start
        self.byte_terms.append((start + alpha + copy, transfer - spent))
        if copy:
            self.copies += [(start + alpha, copy), (end - copy, copy)]
        self.free_at = self.idle_since = end
        for chain_id, ph, _ in batch:
            self.pending[(chain_id, ph)] -= 1
            if self.pending[(chain_id, ph)] == 0:
                self.done[(chain_id, ph)] = end

    def next_finish(self) -> float:
        """When the next collective in the queue will finish (inf: none waits). Without
        fusion the head of the queue is served next whatever is issued later."""
        if not self.queue:
            return math.inf
        t, _, _, _, c = self.queue[0]
        start = max(t, self.free_at)
        alpha, transfer = self.link.fit(c.op, c.dtype).alpha_s, self.link.transfer_s(c.op, c.nbytes, c.dtype)
        start = self.loaded_start(start, alpha + transfer - min(self._credit_at(start), transfer), c.op)
        return start + alpha + transfer - min(self._credit_at(start), transfer)

    def finish_time(self, chain: int, phase: int) -> float:
        """When phase ``phase`` of ``chain`` is done (serving the queue as far as needed)."""
        while (chain, phase) not in self.done:
            self._serve_one()
        return self.done[(chain, phase)]

    def serve_next(self) -> list:
        """Serve the next collective (with what fuses with it); the (chain, phase) pairs
        that finished with it."""
        before = set(self.done)
        self._serve_one()
        return sorted(set(self.done) - before)


def predict_step(compute: Compute, chains: Sequence[Chain], link: Link, driver: Driver = HOROVOD) -> StepPrediction:
    """The predicted step time (see the module docstring for the model)."""
    if driver.later_on_main or compute.cores >= 2:
        net, main = _threads_apart(compute, chains, link, driver)
    else:
        net, main = _callbacks_on_shared_core(compute, chains, link)
    if compute.cores < 2 and link.on_rank_cores:
        hooks_s = sum(c.local_s[0] for c in chains)
        main = max(main, one_core_finish_s(_cpu_work(compute, chains, net, hooks_s) + net.byte_terms + net.copies))
    step = main + compute.update_s
    local = sum(sum(c.local_s) + c.decode_s for c in chains)
    return StepPrediction(step, net.busy_s, local, step - compute.step_s)


def busy_until(compute: Compute, chains: Sequence[Chain]) -> float:
    """Until when a collective shares the ranks' cores with a busy training thread: the end
    of the forward and backward pass with the hooks' encodes where a rank has under 2 cores
    (:attr:`Compute.cores`), else 0 (its threads have cores of their own)."""
    if compute.cores >= 2:
        return 0.0
    return compute.forward_s + compute.backward_s + sum(c.local_s[0] for c in chains)


def _threads_apart(compute: Compute, chains: Sequence[Chain], link: Link, driver: Driver) -> tuple[_Network, float]:
    """The network served and when the training thread has every result, where no other
    thread slows it down: Horovod (later phases on the training thread), or DDP with a
    core for its callbacks (steps 1 to 4 of the module docstring)."""
    # The bucket refilled since the previous step's exchange ended: at least during the
    # update and the forward pass.
    net = _Network(link, driver.fuse, idle_since=-compute.update_s, copy_s_per_byte=compute.copy_s_per_byte,
                   busy_until=busy_until(compute, chains))
    hooks_s = 0.0
    for i in sorted(range(len(chains)), key=lambda i: chains[i].ready_s):
        c = chains[i]
        at = compute.forward_s + c.ready_s + hooks_s + c.local_s[0]
        hooks_s += c.local_s[0]
        net.submit(at, i, 0, c.phases[0])
    main = compute.forward_s + compute.backward_s + hooks_s
    if driver.later_on_main:
        for i in sorted(range(len(chains)), key=lambda i: chains[i].main_order):
            c = chains[i]
            for k in range(1, len(c.phases)):
                main = max(main, net.finish_time(i, k - 1)) + c.local_s[k]
                net.submit(main, i, k, c.phases[k])
            main = max(main, net.finish_time(i, len(c.phases) - 1)) + c.decode_s
        return net, main
    ends = {i: net.done[(i, 0)] + c.decode_s for i, c in enumerate(chains)
            if len(c.phases) == 1 and (i, 0) in net.done}
    while net.queue:
        for i, k in net.serve_next():
            c = chains[i]
            if k + 1 < len(c.phases):
                net.submit(net.done[(i, k)] + c.local_s[k + 1], i, k + 1, c.phases[k + 1])
                if (i, k + 1) in net.done:  # a phase without collectives
                    ends[i] = net.done[(i, k + 1)] + c.decode_s
            else:
                ends[i] = net.done[(i, k)] + c.decode_s
    return net, max([main, *ends.values()])


class _SharedCore:
    """A rank's cores shared by its runnable threads as the kernel's fair scheduler shares
    them: with n pieces of work runnable on ``capacity`` cores, each progresses at
    ``min(1, capacity / n)`` seconds of work per second. Work is in seconds as calibrated
    (every rank busy at once), so a rank with under one core of its own has ``capacity`` 1."""

    def __init__(self, capacity: float):
        self.capacity, self.now = capacity, 0.0
        self.running: list = []  # [seconds of work left, what to do when it is done]

    def start(self, seconds: float, then) -> None:
        self.running.append([max(0.0, seconds), then])

    def _rate(self) -> float:
        return min(1.0, self.capacity / len(self.running))

    def next_finish(self) -> float:
        """When the next running piece finishes if nothing else starts (inf: none runs)."""
        if not self.running:
            return math.inf
        return self.now + min(left for left, _ in self.running) / self._rate()

    def advance(self, t: float) -> list:
        """Run every piece until ``t``; the ``then`` of the pieces done by then."""
        if self.running:
            done_s = (t - self.now) * self._rate()
            for piece in self.running:
                piece[0] -= done_s
        self.now = t
        finished = [then for left, then in self.running if left <= 1e-12]
        self.running = [p for p in self.running if p[0] > 1e-12]
        return finished


def _callbacks_on_shared_core(compute: Compute, chains: Sequence[Chain], link: Link) -> tuple[_Network, float]:
    """DDP where a rank has under 2 cores: its completion callbacks (later phases' local
    work, the decodes) and the training thread (forward, backward, the hooks' encodes)
    share the core (:class:`_SharedCore`), so a callback's work during the backward pass
    takes longer than calibrated, the next phase is issued that much later, and the
    backward pass slows down for it. Returns the network served and when the training
    thread has every result."""
    net = _Network(link, False, idle_since=-compute.update_s, busy_until=busy_until(compute, chains))
    core = _SharedCore(max(1.0, compute.cores))
    ends: dict = {}
    main_end = []

    def callback(i: int, k: int) -> None:  # phase k of chain i is done: its callback starts
        c = chains[i]
        if k + 1 < len(c.phases):
            core.start(c.local_s[k + 1], lambda: issue(i, k + 1))
        else:
            core.start(c.decode_s, lambda: decoded(i))

    def decoded(i: int) -> None:
        ends[i] = core.now

    def issue(i: int, k: int) -> None:
        net.submit(core.now, i, k, chains[i].phases[k])
        if (i, k) in net.done:  # a phase without collectives
            callback(i, k)

    # The training thread: forward and backward up to each chain's gradients, its hook's
    # encode, then phase 0 issued; the rest of the backward pass.
    pieces, at = [], 0.0
    for i in sorted(range(len(chains)), key=lambda i: chains[i].ready_s):
        ready = min(chains[i].ready_s, compute.backward_s)
        pieces += [(ready - at, None), (chains[i].local_s[0], i)]
        at = ready
    pieces.append((compute.backward_s - at, None))
    pieces[0] = (compute.forward_s + pieces[0][0], pieces[0][1])

    def training(j: int) -> None:
        if j > 0 and pieces[j - 1][1] is not None:
            issue(pieces[j - 1][1], 0)
        if j < len(pieces):
            core.start(pieces[j][0], lambda: training(j + 1))
        else:
            main_end.append(core.now)

    training(0)
    while True:
        t_net = net.next_finish()
        t_core = core.next_finish()
        if t_net == math.inf and t_core == math.inf:
            break
        # A piece of work ending at the very time a collective does still runs its ``then``.
        finished = core.advance(min(t_net, t_core))
        if t_net <= t_core:
            for i, k in net.serve_next():
                callback(i, k)
        for then in finished:
            then()
    return net, max([*main_end, *ends.values()])


def _cpu_work(compute: Compute, chains: Sequence[Chain], net: _Network, hooks_s: float) -> list:
    """(arrival, seconds) of every piece of one rank's CPU work but the collectives: the
    forward and backward passes with the hooks' encodes from 0, each later phase's local
    work when the phase before it is done, each decode when the chain's last phase is."""
    work = [(0.0, compute.forward_s + compute.backward_s + hooks_s)]
    for i, c in enumerate(chains):
        for k in range(1, len(c.phases)):
            work.append((net.done[(i, k - 1)], c.local_s[k]))
        work.append((net.done[(i, len(c.phases) - 1)], c.decode_s))
    return work


def one_core_finish_s(work: Sequence[tuple[float, float]]) -> float:
    """When one core that never idles while work is waiting finishes every piece of
    ``work`` (``(arrival, seconds)`` pairs): ``max over j of a_j + sum of w_i over a_i >= a_j``
    (the last busy period starts at some arrival and runs everything that arrived since)."""
    finish, tail = 0.0, 0.0
    for arrival, seconds in sorted(work, reverse=True):
        tail += seconds
        finish = max(finish, arrival + tail)
    return finish


def bound_s(compute: Compute, chains: Sequence[Chain], link: Link) -> float:
    """The step with no exchange plus every byte term at the link's rate: no latency, no
    compress or decode, no free burst (the bound issue 24 holds a method to)."""
    return compute.step_s + sum(link.transfer_s(c.op, c.nbytes, c.dtype) for ch in chains for ph in ch.phases
                                for c in ph)


def chain_s(chain: Chain, link: Link) -> float:
    """One chain alone, from its first local work to its decode, on an idle link with no
    credit: ``sum(local_s) + decode_s + sum over phases of max over its collectives``.
    What a per-bucket choice compares (the candidates' other costs are alike)."""
    phases = sum(max((link.collective_s(c.op, c.nbytes, dtype=c.dtype) for c in ph), default=0.0)
                 for ph in chain.phases)
    return sum(chain.local_s) + chain.decode_s + phases
