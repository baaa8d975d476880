"""AdamW with a frozen preconditioner and a compressed exchange (research prototype).

Error-compensated compression of the gradient fails under Adam: Adam's update
``m / (sqrt(v) + eps)`` is not linear in the gradient, and the delayed, bursty releases of
error feedback inflate ``v`` (Tang et al., "1-bit Adam: Communication Efficient Large-Scale
Training with Adam's Convergence Speed", ICML 2021). Their cure, which this module applies
to any hvdcomp compressor: run exact AdamW while ``v`` settles, then freeze the
preconditioner, so that the update becomes linear in what is exchanged and error feedback
is sound again. Lu et al. ("Maximizing Communication Efficiency for Large-scale Training via
0/1 Adam", ICLR 2023) refresh ``v`` on sparse exact steps instead of freezing it for good;
both are schedules of *exact steps* here (:class:`ExactSteps`).

Notation (per parameter tensor, element-wise; N ranks, rank i, AdamW's step counter s):

* exact step (the warm-up and every refresh step): the local gradients are averaged by a
  full-precision exchange (fp32, or bf16/fp16 to halve the warm-up's traffic),
  ``g = (1/N) sum_i g_i``, and AdamW runs as ``torch.optim.AdamW`` does: ::

      theta <- theta * (1 - lr * wd)
      m <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2 ;  k <- k + 1
      theta <- theta - lr / (1 - b1^s) * m / (sqrt(v / (1 - b2^k)) + eps)

  (``k`` counts the updates of ``v``; during the warm-up ``k = s``, exactly AdamW).
* after each exact step the preconditioner is frozen: ``d = sqrt(v / (1 - b2^k)) + eps``,
  and the live mask ``kappa = [v > 0]`` (a coordinate whose gradient has been exactly zero
  so far, e.g. the embedding of a token never seen: ``d = eps``, and a quantizer that cannot
  send an exact zero, such as 1-bit, would move it by ``O(scale / eps)``; such coordinates
  stay still, as DeepSpeed's ``exp_avg_mask`` keeps them).
* compressed step: each rank forms a message ``x_i`` in *exchange units* ``d^-alpha``
  (``alpha = 1``: update units, the preconditioned momentum; ``alpha = 0``: momentum
  units, as 1-bit Adam), the compressor sends ``C(x_i + e_i)`` with its own worker error
  buffer ``e_i`` (its residual; TernGrad is unbiased and keeps none), every rank decodes the
  same average ``xbar = (1/N) sum_i C(x_i + e_i)`` and applies it. Two message kinds:

  - ``"momentum"`` (1-bit Adam): ``x_i = kappa * (b1 m + (1 - b1) g_i) * d^-alpha``, then
    ``m <- kappa * xbar * d^alpha``;
  - ``"gradient"``: ``x_i = kappa * g_i * d^-alpha``, then
    ``m <- b1 m + (1 - b1) kappa * xbar * d^alpha`` (the momentum recursion runs after
    the exchange, identically on every rank, so the shared ``b1 m`` is never re-sent);

  and the update, with decoupled weight decay and AdamW's first-moment bias correction: ::

      theta <- theta * (1 - lr * wd) - lr / (1 - b1^s) * m / d

  With ``v`` frozen the update is linear in ``xbar``, so error feedback delivers every
  coordinate's whole message, only later; ``alpha = 1`` makes a sparsifier choose the
  coordinates whose *update* is largest rather than those whose momentum is (with ``d``
  fixed, ``|m|`` favours the coordinates that move least).

Every rank applies the same ``xbar`` to the same state, so the parameters stay identical on
every rank. Tensors below ``min_compress_numel`` elements travel exactly (the compressing
transport's ``small_compression``), in the same units.

:class:`FrozenAdamW` is one rank's optimizer; it wraps a ``torch.optim.AdamW`` (its
parameter groups, hyper-parameters and state: LR schedulers and checkpoints keep working)
and says, per step, which exchange it needs (:meth:`FrozenAdamW.phase`), what to send
(:meth:`FrozenAdamW.message`) and how to apply the average (:meth:`FrozenAdamW.apply`).
:class:`InProcessExchange` is the transport of N in-process ranks
(:mod:`hvdcomp.inprocess`): two worlds over the same parameters, one with the exact codec
and one with the compressor, whose traffic logs give the bytes of the run.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Sequence

import torch

Tensor = torch.Tensor

#: Phases of a step (:meth:`FrozenAdamW.phase`).
EXACT, COMPRESSED = "exact", "compressed"
#: Kinds of message (see the module docstring).
MESSAGES = ("momentum", "gradient", "delta", "velocity")


@dataclasses.dataclass(frozen=True)
class ExactSteps:
    """Which steps exchange the gradient exactly and update ``v``.

    warmup: the first ``warmup`` steps (0-based steps ``0 .. warmup-1``) are exact AdamW.
    refresh_every: 0 (default): ``v`` is frozen after the warm-up for good (1-bit Adam).
        g > 0: after the warm-up, exact steps recur with a gap of g steps, the gap doubling
        after every ``refresh_doubling`` refreshes (0/1 Adam's exponentially spaced
        variance updates; ``refresh_doubling=0`` keeps the gap constant).
    """

    warmup: int
    refresh_every: int = 0
    refresh_doubling: int = 1

    def __post_init__(self):
        for name in ("warmup", "refresh_every", "refresh_doubling"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"ExactSteps.{name} must be an integer >= 0, got {value!r}")

    def refresh_steps(self, steps: int) -> list[int]:
        """The exact steps after the warm-up, below ``steps``."""
        out, gap, at, count = [], self.refresh_every, self.warmup, 0
        if gap == 0:
            return out
        while True:
            at += gap
            if at >= steps:
                return out
            out.append(at)
            count += 1
            if self.refresh_doubling and count % self.refresh_doubling == 0:
                gap *= 2

    def exact(self, step: int, steps: int) -> bool:
        """Whether 0-based ``step`` of a ``steps``-step run is exact."""
        return step < self.warmup or step in self._refresh_set(steps)

    def _refresh_set(self, steps: int) -> frozenset:
        cache = self.__dict__.setdefault("_cache", {})
        if steps not in cache:
            cache[steps] = frozenset(self.refresh_steps(steps))
        return cache[steps]

    def count(self, steps: int) -> int:
        """Exact steps in a run of ``steps`` steps."""
        return min(self.warmup, steps) + len(self.refresh_steps(steps))


class FrozenAdamW:
    """One rank's AdamW with a frozen preconditioner between exact steps (see the module
    docstring for the equations).

    adamw: the ``torch.optim.AdamW`` to drive (``amsgrad`` and ``maximize`` off); its
        parameter groups carry ``lr``, ``betas``, ``eps``, ``weight_decay`` (an LR scheduler
        may change ``lr``), its state holds ``exp_avg`` (m), ``exp_avg_sq`` (v) and ``step``
        (s); this class adds ``variance_updates`` (k), ``denom`` (d) and ``live`` (kappa).
    schedule: the :class:`ExactSteps`. steps: the run's length (for the refresh steps).
    message: ``"momentum"`` or ``"gradient"``. units_power: alpha, in [0, 1].

    Each step: the caller computes the local gradients into ``p.grad``, asks :meth:`phase`,
    sends :meth:`message` through the matching exchange (exact or compressed), and hands
    the averages to :meth:`apply`.
    """

    def __init__(self, adamw: torch.optim.AdamW, schedule: ExactSteps, steps: int, message: str = "momentum",
                 units_power: float = 1.0, lr_units: bool = False):
        if not isinstance(adamw, torch.optim.AdamW):
            raise TypeError(f"FrozenAdamW drives a torch.optim.AdamW, got {type(adamw).__name__}")
        for group in adamw.param_groups:
            if group.get("amsgrad") or group.get("maximize"):
                raise ValueError("FrozenAdamW: amsgrad and maximize are not supported")
        if message not in MESSAGES:
            raise ValueError(f"message must be one of {MESSAGES}, got {message!r}")
        if message == "delta" and schedule.refresh_every:
            raise ValueError("the delta message keeps per-rank momenta that a refresh step would desynchronise "
                             "from the compressors' residuals: use refresh_every=0 with it")
        if not 0.0 <= units_power <= 1.0:
            raise ValueError(f"units_power must be in [0, 1], got {units_power!r}")
        self.adamw, self.schedule, self.steps = adamw, schedule, steps
        self.message_kind, self.units_power, self.lr_units = message, float(units_power), bool(lr_units)
        self.t = 0  # 0-based step about to be taken

    @property
    def params(self) -> list[Tensor]:
        return [p for g in self.adamw.param_groups for p in g["params"]]

    def phase(self) -> str:
        """``"exact"`` or ``"compressed"`` for the step about to be taken."""
        return EXACT if self.schedule.exact(self.t, self.steps) else COMPRESSED

    def _units(self, state: dict, group: dict) -> tuple[Tensor | None, float]:
        """``(d^alpha or None for alpha = 0, c)``: a message is ``c * m / d^alpha``, with
        ``c = lr / (1 - b1^s)`` (the step's own scale, s the step being taken) under
        ``lr_units``, else 1."""
        c = 1.0
        if self.lr_units:
            c = group["lr"] / (1 - group["betas"][0] ** (float(state["step"]) + 1))
            if not c > 0:
                raise ValueError("lr_units needs a learning rate > 0 on every compressed step")
        if self.units_power == 0.0:
            return None, c
        d = state["denom"]
        return (d if self.units_power == 1.0 else d.pow(self.units_power)), c

    @torch.no_grad()
    def message(self) -> list[Tensor]:
        """What this rank sends this step, one tensor per parameter (new tensors): the local
        gradient on an exact step, ``x_i`` (module docstring) on a compressed step."""
        if self.phase() == EXACT:
            return [p.grad.detach().clone() for p in self.params]
        out = []
        for group in self.adamw.param_groups:
            beta1 = group["betas"][0]
            for p in group["params"]:
                state = self.adamw.state[p]
                g = p.grad.detach()
                if self.message_kind == "momentum":
                    x = torch.lerp(state["exp_avg"], g, 1 - beta1)
                elif self.message_kind == "gradient":
                    x = g.clone()
                elif self.message_kind == "velocity":  # the compressor applies momentum (DGC's correction)
                    x = g.mul(1 - beta1)
                else:  # delta: the change of this rank's own momentum
                    local = state.setdefault("local_exp_avg", state["exp_avg"].clone())
                    state["next_local_exp_avg"] = torch.lerp(local, g, 1 - beta1)
                    x = state["next_local_exp_avg"] - local
                units, c = self._units(state, group)
                if units is not None:
                    x.div_(units)
                out.append(x.mul_(state["live"]).mul_(c))
        return out

    @torch.no_grad()
    def apply(self, averaged: Sequence[Tensor]) -> None:
        """Take the step with the exchange's average (one tensor per parameter)."""
        if self.phase() == EXACT:
            self._exact_step(averaged)
        else:
            self._compressed_step(averaged)
        self.t += 1

    def _exact_step(self, averaged: Sequence[Tensor]) -> None:
        # During the warm-up, AdamW's own step on the exact average: bit for bit
        # torch.optim.AdamW (k = s). On a refresh step its v update is right but its bias
        # correction (1 - b2^s) is not (v has had only k < s updates): the step is taken here.
        refresh = self.t >= self.schedule.warmup
        if not refresh:
            for p, avg in zip(self.params, averaged):
                p.grad = avg
            self.adamw.step()
        freeze = not self.schedule.exact(self.t + 1, self.steps)
        i = 0
        for group in self.adamw.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                state = self.adamw.state[p]
                if refresh:
                    avg = averaged[i].reshape(p.shape)
                    state["exp_avg"].lerp_(avg, 1 - beta1)
                    state["exp_avg_sq"].mul_(beta2).addcmul_(avg, avg, value=1 - beta2)
                    state["variance_updates"] += 1
                    self._freeze(state, group)
                    self._update(p, state, group, state["exp_avg"])
                else:
                    state["variance_updates"] = int(state["step"])
                    if freeze:
                        self._freeze(state, group)
                i += 1

    @staticmethod
    def _freeze(state: dict, group: dict) -> None:
        """d = sqrt(v / (1 - b2^k)) + eps and kappa = [v > 0], from the current v."""
        beta2, eps = group["betas"][1], group["eps"]
        correction = 1 - beta2 ** state["variance_updates"]
        v = state["exp_avg_sq"]
        state["denom"] = (v / correction).sqrt_().add_(eps)
        state["live"] = (v > 0).to(v.dtype)

    def _update(self, p: Tensor, state: dict, group: dict, m: Tensor) -> None:
        """theta <- theta (1 - lr wd) - lr / (1 - b1^s) * m / d, with s advanced by one."""
        state["step"] += 1
        beta1 = group["betas"][0]
        lr = group["lr"]
        p.mul_(1 - lr * group["weight_decay"])
        p.addcdiv_(m, state["denom"], value=-lr / (1 - beta1 ** float(state["step"])))

    def _compressed_step(self, averaged: Sequence[Tensor]) -> None:
        i = 0
        for group in self.adamw.param_groups:
            beta1 = group["betas"][0]
            for p in group["params"]:
                state = self.adamw.state[p]
                xbar = averaged[i].reshape(p.shape).mul(state["live"])
                i += 1
                units, c = self._units(state, group)
                value = (xbar if units is None else xbar.mul_(units)).div_(c)
                if self.message_kind in ("momentum", "velocity"):
                    state["exp_avg"].copy_(value)
                elif self.message_kind == "gradient":
                    state["exp_avg"].lerp_(value, 1 - beta1)
                else:
                    state["exp_avg"].add_(value)
                    state["local_exp_avg"] = state.pop("next_local_exp_avg")
                self._update(p, state, group, state["exp_avg"])


class InProcessExchange:
    """The exchange of N in-process ranks (:class:`hvdcomp.inprocess.World`): an exact world
    (``exact_compression``, e.g. ``Compression.bf16()``) and a compressing world
    (``compression``) over the same parameters, each rank's through a plain SGD that is
    never stepped (the worlds only average what is put in ``p.grad``). The compressors'
    error buffers live in the compressing world's state, as they would in a front end.

    params: per rank, the ``(name, parameter)`` list (same names on every rank).
    """

    def __init__(self, params: Sequence[Sequence[tuple[str, Tensor]]], exact_compression, compression,
                 min_compress_numel: int = 1024):
        import hvdcomp

        n = len(params)
        self.named = [list(named) for named in params]
        self.params = [[p for _, p in named] for named in self.named]
        self.worlds = {}
        for phase, comp in ((EXACT, exact_compression), (COMPRESSED, compression)):
            world = hvdcomp.inprocess.World(n)
            for r, named in enumerate(params):
                world.DistributedOptimizer(r, torch.optim.SGD([p for _, p in named], lr=0.0),
                                           named_parameters=list(named), compression=comp,
                                           min_compress_numel=min_compress_numel)
            self.worlds[phase] = world

    def exchange(self, phase: str, messages: Sequence[Sequence[Tensor]]) -> list[list[Tensor]]:
        """Every rank's average of ``messages[r]`` (one tensor per parameter) through the
        ``phase`` world; returns per rank the list of averages."""
        for params, msgs in zip(self.params, messages):
            for p, m in zip(params, msgs):
                p.grad = m
        self.worlds[phase].synchronize()
        return [[p.grad for p in params] for params in self.params]

    def traffic(self) -> dict:
        """Rank 0's cumulative bytes over both worlds: ``dense_bytes`` (fp32 of every tensor
        exchanged), ``payload_bytes`` and ``sent_bytes``, per phase and in total."""
        out = {}
        for phase, world in self.worlds.items():
            c = world.ranks[0].compression_stats()["cumulative"]
            out[phase] = {k: c[k] for k in ("dense_bytes", "payload_bytes", "sent_bytes", "steps")}
        out["total"] = {k: sum(out[p][k] for p in self.worlds) for k in ("dense_bytes", "payload_bytes", "sent_bytes")}
        return out


class _WorkerErrorFeedback:
    """Mixin of :func:`with_error_feedback` (placed before the compressor's class)."""

    def init_state(self, info):
        state = super().init_state(info)
        state["worker_error"] = torch.zeros(info.numel, dtype=torch.float32, device=info.device)
        # local_scale() gets no state: it reads the same dict, which the front end owns.
        self._states[(info.rank, info.name)] = state
        return state

    def config(self) -> dict:
        return {**super().config(), "worker_error_feedback": True}

    def _with_error(self, grad: Tensor, info) -> Tensor:
        return grad.reshape(-1).to(torch.float32) + self._states[(info.rank, info.name)]["worker_error"]

    def local_scale(self, grad: Tensor, info) -> Tensor:
        return super().local_scale(self._with_error(grad, info), info)

    def encode(self, grad: Tensor, state: dict, info, step: int):
        x = self._with_error(grad, info)
        encoded = super().encode(x, state, info, step)
        inner = encoded.pack

        def pack(out: Tensor) -> None:
            inner(out)
            # e <- x - C(x): what this rank's own payload decodes to, taken off what it meant.
            state["worker_error"].copy_(x - self.decode_sum([out], state, info).reshape(-1))

        return dataclasses.replace(encoded, pack=pack)

    def encode_chunked(self, grad: Tensor, state: dict, info, step: int) -> Tensor:
        # The compressed allreduce (TernGrad's choice on 4 ranks): the re-encoded sum of
        # levels is exact, so the worker error is the only one.
        x = self._with_error(grad, info)
        codes = super().encode_chunked(x, state, info, step)
        own = self.chunk_sum(codes.reshape(1, -1), info.numel, state, info)
        state["worker_error"].copy_(x - own.reshape(-1))
        return codes


def with_error_feedback(compressor):
    """A copy of ``compressor`` (a packed compressor without error feedback of its own:
    TernGrad) that sends ``C(x + e)`` and keeps the worker error ``e <- x + e - C(x + e)`` in
    its per-parameter state (``"worker_error"``, fp32 [n]), as 1-bit Adam does for its
    compressor; by allgather or by the compressed allreduce (whose re-encoded sum must be
    exact: TernGrad's is). Refuses compressors that keep a residual already."""
    from hvdcomp.compressor import TensorInfo

    probe = compressor.init_state(TensorInfo("probe", torch.Size([1]), torch.float32, torch.device("cpu")))
    if compressor.transport != "allgather" or probe:
        raise ValueError(f"{compressor.name}: worker error feedback is for stateless packed compressors "
                         f"(it keeps {sorted(probe)} already)" if probe else
                         f"{compressor.name}: worker error feedback needs a packed compressor")
    base = type(compressor)
    cls = type(f"ErrorFeedback{base.__name__}", (_WorkerErrorFeedback, base), {"__doc__": with_error_feedback.__doc__})
    other = copy.copy(compressor)
    other.__class__ = cls
    other._states = {}
    return other
