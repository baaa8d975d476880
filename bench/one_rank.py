"""Rank 0 of N, through the real step protocol, for the compression benchmarks.

:class:`OneRankOfN` builds N in-process ranks (:mod:`hvdcomp.inprocess`; by default the
"horovod" transport, the chains of ``hvdcomp.DistributedOptimizer``, or "ddp" with DDP's
buckets), gives rank 0 the model's real gradients and the other ranks seeded perturbations of them, and runs one full step of all N
(:meth:`record`), keeping the other ranks' requests of every phase. :meth:`replay` then runs
rank 0's chains alone against those recorded requests and times its local work: everything
up to its last collective is *compress*, the work after it *decode* (by the kind of chain:
``allreduce`` for dense and index chains, ``allgather``, ``compressed_allreduce``; with
"ddp", the decode includes writing the outputs into the bucket's output tensor, as the
hook does). The collectives themselves are computed in between and not timed.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from hvdcomp import wire
from hvdcomp.compressor import Compressor
from hvdcomp.core import requests as rq
from hvdcomp.core.chains import CHAINS, ChainRun, decode_packed
from hvdcomp.core.wrapped_optimizer import chain_label
from hvdcomp.ddp.bucket import write_output
from hvdcomp.inprocess import World, run_collectives
from hvdcomp.core.traffic import layer_kind

Tensor = torch.Tensor
DECODE_PART = {"dense": "allreduce", "index": "allreduce", "allgather": "allgather",
               "compressed_allreduce": "compressed_allreduce"}


def rank_grad(grad: Tensor, rank: int, index: int, noise: float) -> Tensor:
    """Rank ``rank``'s gradient: the real one for rank 0, a seeded perturbation otherwise."""
    if rank == 0 or noise == 0:
        return grad
    gen = torch.Generator(device=grad.device).manual_seed(7919 * rank + index)
    rms = grad.float().pow(2).mean().sqrt().to(grad.dtype)
    return grad + noise * rms * torch.randn(grad.shape, generator=gen, device=grad.device, dtype=grad.dtype)


@dataclasses.dataclass
class Timing:
    """One replayed step: compress and per-part decode time of rank 0 (ms); per chain key,
    ``(local ms before each phase, decode ms)``."""

    compress_ms: float
    decode_ms: dict
    chains: dict = dataclasses.field(default_factory=dict)


class OneRankOfN:
    """See the module docstring. make: builds the compressor (one instance serves every rank);
    names/grads: the model's gradients; the other arguments as ``hvdcomp.DistributedOptimizer``'s."""

    def __init__(self, make: Callable[[], Compressor], names: list[str], grads: list[Tensor], nranks: int,
                 min_numel: int, bucket_cap_mb: float, collective: str = "auto", noise: float = 0.2,
                 transport: str = "horovod", buckets: list[list[str]] | None = None):
        self.nranks, self.noise = nranks, noise
        self.world = World(nranks, transport, buckets)
        self.transport = transport
        self.bucket_outputs: dict[tuple, Tensor] = {}  # "ddp": per chain, where its outputs go
        comp = make()
        self.opts = []
        self.grads = grads
        for r in range(nranks):
            params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
            for i, (p, g) in enumerate(zip(params, grads)):
                p.grad = rank_grad(g, r, i, noise).clone()
            if r == 0:
                self.rank0_params = params
            self.opts.append(self.world.DistributedOptimizer(
                r, torch.optim.SGD(params, lr=0.0), named_parameters=list(zip(names, params)), compression=comp,
                min_compress_numel=min_numel, bucket_cap_mb=bucket_cap_mb, collective=collective))
        self.rank0 = self.opts[0]
        self.recorded: dict[tuple, list] = {}
        self.gathered: dict[tuple, list] = {}  # allgather chains: every rank's payload buffer
        self.sizes: dict[tuple, list] = {}  # allgather chains: every rank's payload sizes
        # (key, kind name, slots): the kinds by name, as the timing tables label them.
        self.plan = [(key, kind.name, slots) for key, kind, slots in self.rank0._world_plan()]
        self.kinds = {key: kind for key, kind, _ in self.plan}

    # ---- one full step of every rank ---------------------------------------------------------------
    def record(self, step: int) -> None:
        """Run step ``step`` on every rank, keeping the other ranks' requests per phase."""
        for opt in self.opts:
            opt._driver.step = step

        def observe(key, phase, requests):
            self.recorded.setdefault(key, []).append([list(reqs) for reqs in requests])
            if self.kinds[key] == "allgather" and isinstance(requests[0][0], rq.Allgather):
                self.sizes[key] = [reqs[0].tensor.tolist() for reqs in requests]
            if self.kinds[key] == "allgather" and isinstance(requests[0][0], rq.AllgatherV):
                self.gathered[key] = [reqs[0].tensor for reqs in requests]

        self.world.synchronize(observe=observe)
        self.stats = self.rank0.compression_stats()
        self.step_requests = self.recorded

    # ---- rank 0 alone ------------------------------------------------------------------------------
    def replay(self, step: int, timer) -> Timing:
        """Rank 0's step ``step`` against the recorded requests of the others (timed)."""
        opt = self.rank0
        opt._driver.step = step
        # Each replay compresses a freshly written gradient, as each training step does: a
        # value cached for a tensor's version (TernGrad's clipping bound) is computed again
        # instead of found, and rank 0's own gradient replaces the average record() wrote.
        with torch.no_grad():
            for p, g in zip(self.rank0_params, self.grads):
                p.grad.copy_(g)
        compress, decode, chains = 0.0, {}, {}
        for key, kind, slots in self.plan:
            grads = [opt._gradient(s.name) for s in slots]
            run = ChainRun(CHAINS[kind].run(opt._context(), slots, grads, chain_label(key)), key)
            others = self.recorded[key]
            a = timer.mark()
            pending = run.advance()
            b = timer.mark()
            compress += timer.elapsed_ms(a, b)
            local = [timer.elapsed_ms(a, b)]
            while pending:
                everyone = others[run.phase]
                theirs = [[dataclasses.replace(req) for req in reqs] for reqs in everyone[1:]]
                for reqs in theirs:
                    for j, (mine, req) in enumerate(zip(run.requests, reqs)):
                        if isinstance(req, rq.AllgatherV):
                            req.lengths = list(mine.lengths)  # rank 0's new size is part of everyone's lengths
                        elif isinstance(req, rq.Broadcast):
                            # The leader rotates every step: the recorded leader's real indices,
                            # sent from this step's leader.
                            req.tensor, req.root = everyone[req.root][j].tensor, mine.root
                results = run_collectives([run.requests] + theirs)[0]
                last = run.phase == len(others) - 1
                a = timer.mark()
                pending = run.advance(results)
                if last and self.transport == "ddp":
                    self._write_bucket(key, run.result)
                b = timer.mark()
                if last:
                    part = DECODE_PART[kind]
                    decode[part] = decode.get(part, 0.0) + timer.elapsed_ms(a, b)
                    chains[key] = (local, timer.elapsed_ms(a, b))
                else:
                    compress += timer.elapsed_ms(a, b)
                    local.append(timer.elapsed_ms(a, b))
        opt._table.end_step()
        return Timing(compress, decode, chains)

    def _write_bucket(self, key, result) -> None:
        """What DDP's hook does once a chain is done: each output into its place in the
        bucket's output tensor (kept from one step to the next, as the hook keeps it)."""
        numel = sum(avg.numel() for _, avg in result.outputs)
        out = self.bucket_outputs.get(key)
        if out is None or out.numel() != numel:
            slot = result.outputs[0][0]  # a DDP bucket holds one dtype
            out = self.bucket_outputs[key] = torch.empty(numel, dtype=slot.info.dtype, device=slot.info.device)
        offset = 0
        for _, avg in result.outputs:
            write_output(out[offset:offset + avg.numel()], avg, result.nonfinite)
            offset += avg.numel()

    def decode_two(self, timer) -> float:
        """Decode time (ms) of the allgather chains with only two ranks' payloads (for
        bench/scaling.py's extrapolation in N)."""
        total = 0.0
        for key, kind, slots in self.plan:
            if kind != "allgather" or key not in self.gathered:
                continue
            per_rank = [[part[o:o + n] for o, n in zip(wire.concat_offsets(row)[0], row)]
                        for part, row in zip(self.gathered[key][:2], self.sizes[key][:2])]
            a = timer.mark()
            decode_packed([s.compressor for s in slots], per_rank, [s.state for s in slots], [s.info for s in slots])
            b = timer.mark()
            total += timer.elapsed_ms(a, b)
        return total

    # ---- bytes -------------------------------------------------------------------------------------
    def compressed_slots(self) -> list:
        comp = self.rank0._table.compression
        return [s for s in self.rank0._table.slots.values() if s.compressor is comp and comp.name != "none"]

    def touched_bytes(self) -> int:
        """Bytes model of the compress pass: read the gradient, read and write each state
        tensor, write the payload; uncompressed tensors count 0."""
        tensors = self.stats["tensors"]
        total = 0
        for s in self.compressed_slots():
            state = sum(t.numel() * t.element_size() for k, t in s.state.items() if k in s.persistent)
            total += s.info.numel * s.info.dtype.itemsize + 2 * state + tensors[s.name]["payload_bytes"]
        return total

    def by_kind(self) -> dict:
        acc: dict[str, list[int]] = {}
        for name, t in self.stats["tensors"].items():
            if name.startswith("["):
                continue
            a = acc.setdefault(layer_kind(t["shape"]), [0, 0, 0])
            a[0] += t["dense_bytes"]
            a[1] += t["payload_bytes"]
            a[2] += 1
        return {k: {"dense_bytes": d, "payload_bytes": p, "tensors": n, "ratio": d / p if p else float("inf")}
                for k, (d, p, n) in sorted(acc.items())}

    def wire(self, sum_bits_ns: list[int]) -> dict:
        """Bytes and collectives per rank per step, as bench/scaling.py needs them."""
        out = {"allreduce_bytes": 0, "allreduce_tensors": 0, "broadcast_bytes": 0, "broadcasts": 0,
               "allgather_bytes": 0.0, "allgather_buckets": 0, "car_numel": 0, "car_bits": None,
               "car_payload_bytes": 0, "car_buckets": 0, "car_sum_bits": None, "scale_allreduces": 0}
        comp = self.rank0._table.compression
        for key, kind, slots in self.plan:
            phases = self.recorded[key]
            if kind in ("dense", "index"):
                out["allreduce_tensors"] += len(slots)
                out["allreduce_bytes"] += sum(self.stats["tensors"][s.name]["payload_bytes"] for s in slots)
                if kind == "index":
                    out["broadcasts"] += len(slots)
                    bcast = sum(4 * s.compressor.k(s.info.numel) for s in slots)
                    out["broadcast_bytes"] += bcast
                    out["allreduce_bytes"] -= bcast
                continue
            if len(phases) == 3:
                out["scale_allreduces"] += 1
            if kind == "allgather":
                out["allgather_buckets"] += 1
                out["allgather_bytes"] += sum(sum(row) for row in self.sizes[key]) / self.nranks  # mean over ranks
            else:
                out["car_buckets"] += 1
                out["car_numel"] += sum(s.info.numel for s in slots)
                out["car_bits"] = comp.bits_per_element()
                out["car_payload_bytes"] += sum(self.stats["tensors"][s.name]["payload_bytes"] for s in slots)
                out["car_sum_bits"] = {str(k): comp.sum_bits(k) for k in sorted(set(sum_bits_ns + [self.nranks]))}
        step = self.stats["step"]
        out["sent_bytes"], out["received_bytes"] = step["sent_bytes"], step["received_bytes"]
        return out

    def description(self) -> str:
        kinds = {kind for _, kind, slots in self.plan if any(s in self.compressed_slots() for s in slots)}
        for kind, label in (("index", "allreduce+broadcast"), ("compressed_allreduce", "compressed_allreduce"),
                            ("allgather", "allgather")):
            if kind in kinds:
                return label
        return "allreduce"
