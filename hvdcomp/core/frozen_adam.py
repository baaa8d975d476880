"""AdamW whose preconditioner freezes after a warm-up, so that a compressed exchange of the
momentum with error feedback is sound (the optimizer side of the Adam-family recipe,
:mod:`hvdcomp.recipes`).

Error-compensated compression of the *gradient* fails under Adam: the update
``m / (sqrt(v) + eps)`` is not linear in the gradient, and the delayed, bursty releases of
error feedback inflate ``v``. Tang et al. ("1-bit Adam: Communication Efficient Large-Scale
Training with Adam's Convergence Speed", ICML 2021) run exact Adam while ``v`` settles, then
freeze ``v`` and exchange the momentum, compressed with error feedback: with ``v`` fixed the
update is linear in what is exchanged, so error feedback delivers all of it, only later.

Per parameter tensor, element-wise (N ranks, rank i, AdamW's step counter s, warm-up W):

* **warm-up** (``s < W``): the ranks average their gradients exactly,
  ``g = (1/N) sum_i g_i``, and the step is ``torch.optim.AdamW``'s, bit for bit: ::

      theta <- theta (1 - lr wd);  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
      theta <- theta - lr / (1 - b1^s) * m / (sqrt(v) / sqrt(1 - b2^s) + eps)

* **frozen** (``s >= W``): ``v`` stays as the warm-up left it (k = W updates) and the live
  mask ``kappa = [v > 0]`` marks the coordinates whose gradient was ever non-zero. Rank i
  sends ``x_i = kappa * (b1 m + (1 - b1) g_i)`` through the compressor (with its error
  feedback: 1-bit Adam's worker error buffer), every rank decodes the same average ``xbar``
  and applies ``m <- kappa * xbar`` and ::

      theta <- theta (1 - lr wd) - lr / (1 - b1^s) * m / (sqrt(v) / sqrt(1 - b2^k) + eps)

  The mask matters for quantizers that cannot send an exact zero (1-bit sends
  ``sign * scale``): a coordinate whose gradient is always zero (the embedding of a token
  never seen) has ``v = 0`` and a denominator of ``eps``, and would otherwise move by
  ``scale / eps`` per step (DeepSpeed's 1-bit Adam masks such coordinates the same way).

Adam with coupled weight decay (``torch.optim.Adam(weight_decay=wd)``, a group with
``decoupled_weight_decay=False``) adds ``wd * theta`` to the gradient before the momentum,
as torch does. ``amsgrad`` and ``maximize`` are refused (the frozen step defines neither).

:class:`FrozenAdamW` alone (no exchange) is that recursion on one rank. The optimizer
transports wrap it (:func:`hvdcomp.DistributedOptimizer`, the in-process ranks), read each
parameter's message with :meth:`FrozenAdamW.exchange_message` and write the averaged
momentum into ``p.grad`` before :meth:`FrozenAdamW.step`; the transport also switches each
compressed tensor from the exact codec to the compressor at its freeze
(:meth:`FrozenAdamW.is_frozen`, read at the start of every step, so every rank decides
alike from the same optimizer state), and after each exchange calls
:meth:`FrozenAdamW.exchanged`.

Under ``torch.amp.GradScaler`` with loss scale S the local gradient is ``S g``, and
GradScaler divides the exchanged tensors by S before the step. So that the frozen phase's
average is in the same units, the message is ``S x_i = kappa * (b1 S m + (1 - b1) S g_i)``
(:meth:`FrozenAdamW.use_grad_scaler` tells the optimizer the scaler); the compressors'
error buffers then hold it in the loss scale's units, as they hold gradients (a transient
after the scale changes). ``FrozenAdamW`` declares ``_step_supports_amp_scaling``, so
GradScaler hands :meth:`FrozenAdamW.step` its scale and inf flag instead of unscaling and
skipping itself; the step unscales and skips as GradScaler would, and refuses to run under
a scaler it was not told of.
"""
from __future__ import annotations

from numbers import Integral

import torch

Tensor = torch.Tensor

#: Exact AdamW steps before ``v`` freezes, when the compressor loses information. Measured
#: through hvdcomp's own path on the comparison's transformer (400 steps, AdamW betas
#: 0.9/0.99, 4 ranks, 3 seeds; ``python -m launch.adam_product table``): at 20 exact steps
#: 1-bit and TernGrad end +1.3 % and -0.1 % perplexity from the uncompressed run, every seed
#: within 3 %, at 11.8x and 8.8x fewer payload bytes over the run; at 40, -0.2 % and +0.8 %
#: (one TernGrad seed at +4.1 %) at only 7.5x and 6.2x, the exact fp32 warm-up's traffic
#: dominating. 20 steps is 0.2 / (1 - b2) of that run's v horizon; a longer run, or
#: b2 = 0.999, may want more.
DEFAULT_WARMUP_STEPS = 20


def check_warmup_steps(value) -> int | None:
    """An integer >= 1, or None (never freeze: plain AdamW on the exchanged average)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"warmup_steps must be an integer >= 1 (exact AdamW steps before v freezes) or None "
                         f"(never freeze), got {value!r}")
    return int(value)


class FrozenAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` (or Adam, per group's ``decoupled_weight_decay``) with ``v``
    frozen after ``warmup_steps`` exact steps (see the module docstring).

    Arguments as ``torch.optim.AdamW``'s, plus ``warmup_steps`` (per parameter group, like
    ``lr``; default :data:`DEFAULT_WARMUP_STEPS`; None never freezes). State per parameter:
    AdamW's ``exp_avg`` (m), ``exp_avg_sq`` (v, frozen), ``step`` (s), and from the freeze
    on ``variance_steps`` (k, the updates v had), all in ``state_dict()``.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, *,
                 warmup_steps: int | None = DEFAULT_WARMUP_STEPS, amsgrad: bool = False, maximize: bool = False,
                 **kwargs):
        warmup_steps = check_warmup_steps(warmup_steps)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         maximize=maximize, **kwargs)
        self.defaults["warmup_steps"] = warmup_steps
        for group in self.param_groups:
            self._check_group(group)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if "warmup_steps" in self.defaults:  # not yet during torch's own __init__
            self._check_group(self.param_groups[-1])

    def _check_group(self, group: dict) -> None:
        group["warmup_steps"] = check_warmup_steps(group.setdefault("warmup_steps", self.defaults["warmup_steps"]))
        for flag in ("amsgrad", "maximize"):
            if group.get(flag):
                raise ValueError(f"FrozenAdamW: {flag}=True is not supported (the frozen step does not define it)")

    # ---- phases ---------------------------------------------------------------------------
    def group_of(self, p: Tensor) -> dict:
        """The parameter group holding ``p``."""
        groups = self.__dict__.get("_group_of")
        if groups is None or p not in groups:  # built once, again after add_param_group
            groups = self.__dict__["_group_of"] = {q: g for g in self.param_groups for q in g["params"]}
        return groups[p]

    def is_frozen(self, p: Tensor, group: dict | None = None) -> bool:
        """Whether ``p``'s next step is a frozen one (AdamW steps taken >= warm-up)."""
        group = self.group_of(p) if group is None else group
        state = self.state.get(p)
        warmup = group["warmup_steps"]
        return warmup is not None and state is not None and "step" in state and float(state["step"]) >= warmup

    def frozen_in(self, state_dict: dict) -> dict:
        """``{parameter: frozen}`` as :meth:`is_frozen` will say once ``state_dict`` (of this
        optimizer's layout) is loaded."""
        out = {}
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            warmup = saved.get("warmup_steps", group["warmup_steps"])
            for p, index in zip(group["params"], saved["params"]):
                state = state_dict["state"].get(index, {})
                out[p] = warmup is not None and "step" in state and float(state["step"]) >= warmup
        return out

    def warmups(self) -> list:
        """Each group's ``warmup_steps`` (part of the settings every rank must share)."""
        return [g["warmup_steps"] for g in self.param_groups]

    def exchanged(self, dropped: bool) -> None:
        """A transport's word on its last exchange: ``p.grad`` now holds averaged momenta of
        frozen parameters, and the step must be skipped when ``dropped``."""
        self._momentum_exchanged, self._dropped_exchange = True, bool(dropped)
        self.__dict__.pop("_exchange_scale", None)  # the scaler may change it before the next one

    # ---- loss scaling ---------------------------------------------------------------------
    #: torch.amp.GradScaler's protocol: it sets ``grad_scale`` and ``found_inf`` on the
    #: optimizer and calls step(), which unscales and skips itself (see :meth:`_amp_step`).
    _step_supports_amp_scaling = True

    def use_grad_scaler(self, scaler) -> None:
        """Train under ``scaler`` (a ``torch.amp.GradScaler``): the frozen phase's messages
        carry its loss scale (module docstring). Call once, on every rank, before the first
        step; :meth:`step` raises ``RuntimeError`` under a GradScaler it was not given."""
        if not callable(getattr(scaler, "get_scale", None)):
            raise TypeError(f"use_grad_scaler needs a torch.amp.GradScaler, got {type(scaler).__name__}")
        self.__dict__["_grad_scaler"] = scaler

    def _loss_scale(self) -> float:
        """The scale the current gradients carry (1.0 without a scaler, or a disabled one),
        read once per exchange (on a GPU ``get_scale()`` waits for the device)."""
        scaler = self.__dict__.get("_grad_scaler")
        if scaler is None:
            return 1.0
        if "_exchange_scale" not in self.__dict__:
            self.__dict__["_exchange_scale"] = float(scaler.get_scale())
        return self.__dict__["_exchange_scale"]

    @torch.no_grad()
    def exchange_message(self, p: Tensor, grad: Tensor) -> Tensor:
        """What this rank sends for ``p`` this step: ``grad`` during the warm-up, else the
        masked local momentum ``kappa * (b1 m + (1 - b1) g)`` in the gradient's loss scale
        (a new tensor, ``grad``'s shape)."""
        group = self.group_of(p)
        if not self.is_frozen(p, group):
            return grad
        state = self.state[p]
        scale = self._loss_scale()
        momentum = state["exp_avg"] if scale == 1.0 else state["exp_avg"] * scale
        local = torch.lerp(momentum, self._momentum_gradient(p, grad, group, scale), 1 - group["betas"][0])
        return torch.where(state["exp_avg_sq"] > 0, local, torch.zeros_like(local))

    @staticmethod
    def _momentum_gradient(p: Tensor, grad: Tensor, group: dict, scale: float = 1.0) -> Tensor:
        """The gradient the momentum takes: with coupled weight decay (Adam's L2), ``g + wd theta``
        (``grad`` and the result in loss scale ``scale``)."""
        if group["weight_decay"] and not group.get("decoupled_weight_decay", True):
            return grad.add(p, alpha=group["weight_decay"] * scale)
        return grad

    def _amp_step(self) -> bool:
        """GradScaler's part of a step: False when it found an inf (skip the step, as it
        would); else the gradients unscaled where it left that to the step (True)."""
        found_inf = getattr(self, "found_inf", None)
        if found_inf is None:
            return True  # not under a GradScaler
        if "_grad_scaler" not in self.__dict__ and getattr(self, "_momentum_exchanged", False) and any(
                g["warmup_steps"] is not None for g in self.param_groups):
            raise RuntimeError("hvdcomp.FrozenAdamW runs under a torch.amp.GradScaler it was not given: call "
                               "opt.use_grad_scaler(scaler) before training, so that the momentum messages "
                               "after the freeze carry the loss scale (docs/adam.md)")
        if float(found_inf.sum()) != 0:
            return False
        grad_scale = getattr(self, "grad_scale", None)
        if grad_scale is not None:  # GradScaler.unscale_ was not called: unscale as it would
            inv = grad_scale.double().reciprocal().float()
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.mul_(inv.to(p.grad.device))
        return True

    # ---- the step -------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """Frozen parameters take the frozen step; the others AdamW's own. Under a transport
        ``p.grad`` of a frozen parameter holds the averaged momentum, else the local gradient.
        A step the transport dropped (some rank non-finite, :mod:`hvdcomp.core.faults`) is
        skipped: parameters, m, v and the step counters stay as they were, as the
        compressors' error buffers do."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if getattr(self, "_dropped_exchange", False):
            self._dropped_exchange = False
            return loss
        if not self._amp_step():
            return loss
        frozen = [(p, group) for group in self.param_groups for p in group["params"]
                  if p.grad is not None and self.is_frozen(p, group)]
        # torch's step skips parameters without a gradient: hide the frozen ones from it.
        grads = [p.grad for p, _ in frozen]
        for p, _ in frozen:
            p.grad = None
        # Unscaled and checked above: torch's step must not see GradScaler's attributes.
        amp = {k: self.__dict__[k] for k in ("grad_scale", "found_inf") if k in self.__dict__}
        self.__dict__.update(dict.fromkeys(amp))
        try:
            super().step()
        finally:
            self.__dict__.update(amp)
            for (p, _), grad in zip(frozen, grads):
                p.grad = grad
        exchanged = getattr(self, "_momentum_exchanged", False)
        for p, group in frozen:
            self._frozen_step(p, group, p.grad if exchanged else None)
        return loss

    def _frozen_step(self, p: Tensor, group: dict, averaged: Tensor | None) -> None:
        """One frozen step of ``p`` (module docstring); ``averaged``: the exchanged momentum,
        or None to form it from the local gradient (no exchange)."""
        state = self.state[p]
        beta1, beta2 = group["betas"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        if "variance_steps" not in state:
            state["variance_steps"] = int(state["step"])
        if averaged is None:
            averaged = torch.lerp(m, self._momentum_gradient(p, p.grad, group), 1 - beta1)
        # Masked again: a decoded average need not be zero where every rank sent zero.
        m.copy_(torch.where(v > 0, averaged.reshape(m.shape).to(m.dtype), torch.zeros_like(m)))
        state["step"] += 1
        lr, wd = group["lr"], group["weight_decay"]
        if wd and group.get("decoupled_weight_decay", True):
            p.mul_(1 - lr * wd)
        bias_correction1 = 1 - beta1 ** float(state["step"])
        bias_correction2_sqrt = (1 - beta2 ** state["variance_steps"]) ** 0.5
        denom = (v.sqrt() / bias_correction2_sqrt).add_(group["eps"])
        p.addcdiv_(m, denom, value=-lr / bias_correction1)



def phase_compressors(optimizer: FrozenAdamW, table, params: dict, frozen: dict | None = None) -> dict:
    """``{name: compressor}`` for the parameters of ``params`` (``{name: parameter}``) with
    ``min_compress_numel`` elements or more in ``table``: the exact codec
    (``small_compression``) during the parameter's warm-up, ``compression`` once it is
    frozen. frozen: ``{parameter: bool}`` to decide from (a checkpoint's,
    :meth:`FrozenAdamW.frozen_in`), default the optimizer's current state."""
    out = {}
    for name, p in params.items():
        if p.numel() >= table.min_compress_numel:
            is_frozen = optimizer.is_frozen(p) if frozen is None else frozen.get(p, False)
            out[name] = table.compression if is_frozen else table.small_compression
    return out
