"""Optimizer-family recipes: what each compressor's paper prescribes about the optimizer
it runs under, applied by the transports so that ``compression=hvdcomp.Compression.NAME()``
with any common optimizer gives the paper's behaviour with no other change.

Every transport that wraps or is given the optimizer calls :func:`apply_recipe` once, before
its first collective: :func:`hvdcomp.DistributedOptimizer`,
:meth:`hvdcomp.inprocess.World.DistributedOptimizer` and
``hvdcomp.ddp.CompressionState(..., optimizer=opt)``. The rules, by compressor and family
(:func:`optimizer_family`):

DGC (Lin, Han, Mao, Wang and Dally, "Deep Gradient Compression: Reducing the Communication
Bandwidth for Distributed Training", ICLR 2018) applies momentum itself (momentum
correction, eq. 2: ``u = m u + g; v = v + u``, the top-k of v is sent):

* ``sgd`` (``torch.optim.SGD`` and subclasses) with momentum m > 0 and DGC's
  ``momentum=None`` (the default): DGC takes over m, the optimizer's momentum is set to 0
  in every parameter group, and the tensors sent uncompressed (below ``min_compress_numel``)
  get the same momentum locally (:class:`hvdcomp.compressors.momentum.DenseMomentum`), so
  no tensor loses momentum and none gets it twice. Nesterov and dampening are not part of
  the paper's eq. 2: refused. Weight decay stays in the optimizer and is applied to the
  update without momentum.
* ``sgd`` with DGC's momentum set explicitly: the optimizer must have momentum 0 (else the
  momentum would be applied twice: refused); the small tensors get DGC's m locally.
* ``adaptive`` (Adam, AdamW and every optimizer with ``betas``): the first moment already is
  the momentum; DGC's ``None`` resolves to 0 (sparsification with error feedback, warm-up
  and clipping, no momentum correction), an explicit m > 0 is refused (applied twice, a
  combination the paper does not define).
* ``other`` (RMSprop, Adagrad, ...): ``None`` resolves to 0 and the optimizer keeps its own
  momentum; an explicit m > 0 is refused when the optimizer has momentum too.

Every other compressor (top-k, random-k, 1-bit, AdaComp, TernGrad, ScaleCom, casts) sends
an estimate of the gradient itself, with error feedback where it has one; their papers apply
momentum SGD to the exchanged sum, which is what the transports do: the recipe leaves an
SGD optimizer and the compressors as they are.

Adam and AdamW (exactly ``torch.optim.Adam`` / ``AdamW``, without amsgrad or maximize), in
the optimizer transports (:func:`hvdcomp.DistributedOptimizer`, the in-process ranks;
:func:`recipe_for`): error-compensated compression of the gradient fails under Adam, so the
wrapped optimizer becomes :class:`hvdcomp.FrozenAdamW` over the same parameter groups
(1-bit Adam's recipe, :mod:`hvdcomp.core.frozen_adam`): exact AdamW, with the gradients
exchanged by ``small_compression`` (default: uncompressed), for ``warmup_steps`` steps, then
``v`` frozen and the local momentum exchanged through ``compression`` with its error
feedback (TernGrad, which keeps none, gets a worker error buffer: ``error_feedback=True``),
``warmup_steps`` = :data:`~hvdcomp.core.frozen_adam.DEFAULT_WARMUP_STEPS`; pass a
``hvdcomp.FrozenAdamW(..., warmup_steps=W)`` instead to choose (None: never freeze). A
one-line ``RecipeNotice`` warning at construction says what was done. Under ``none``,
``fp16``, ``bf16`` and Horovod's own compressors, which lose (almost) nothing, and under
``Compression.auto()``, Adam and AdamW are left as they are.

All checks run before anything is changed, and a refusal is a ``ValueError`` raised while
the transport is being built, before any collective (a rank that refuses while others do
not is impossible: the rule depends only on settings the ranks compare anyway).
"""
from __future__ import annotations

import dataclasses
import warnings

import torch

from .compressor import Compressor, Selector
from .compressors.casts import BF16Compressor, FP16Compressor, NoneCompressor
from .compressors.dgc import DGCCompressor
from .compressors.horovod_builtin import HorovodCompressor
from .compressors.momentum import DenseMomentum
from .compressors.terngrad import TernGradCompressor
from .core.frozen_adam import DEFAULT_WARMUP_STEPS, FrozenAdamW
from .core.options import ExchangeOptions

FAMILIES = ("sgd", "adaptive", "other")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What :func:`apply_recipe` decided.

    compression / small_compression: the compressors the transport must use (DGC with its
    momentum resolved; the small tensors' compressor wrapped in :class:`DenseMomentum` when
    DGC applies momentum). family: :func:`optimizer_family` of the optimizer.
    moved_momentum: the momentum taken out of the optimizer's parameter groups (0: none).
    note: one sentence saying what was done, for logs.
    """

    compression: Compressor
    small_compression: Compressor
    family: str
    moved_momentum: float = 0.0
    note: str = "optimizer and compressors unchanged"


def optimizer_family(optimizer: torch.optim.Optimizer) -> str:
    """``"sgd"`` for ``torch.optim.SGD`` (and subclasses), ``"adaptive"`` for optimizers with
    ``betas`` in their defaults (Adam, AdamW, NAdam, RAdam, Adamax, ...), else ``"other"``."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if isinstance(optimizer, torch.optim.SGD):
        return "sgd"
    if "betas" in optimizer.defaults:
        return "adaptive"
    return "other"


def _group_value(optimizer: torch.optim.Optimizer, key: str, default=0.0):
    values = {g.get(key, default) for g in optimizer.param_groups}
    if len(values) > 1:
        raise ValueError(f"hvdcomp: DGC's momentum correction uses one momentum for every tensor, but the "
                         f"optimizer's parameter groups have {key} = {sorted(values)}; give every group the same "
                         f"{key} or set DGC's momentum explicitly with the optimizer's momentum at 0")
    return values.pop() if values else default


def _has_momentum(optimizer: torch.optim.Optimizer, family: str) -> bool:
    if family == "adaptive":
        return any(g.get("betas", (0.0,))[0] > 0 for g in optimizer.param_groups)
    return any(g.get("momentum", 0.0) > 0 for g in optimizer.param_groups)


def _dgc_momentum(optimizer: torch.optim.Optimizer, family: str, dgc: DGCCompressor) -> tuple[float, bool]:
    """(m for DGC, whether the optimizer's momentum moves into DGC); raises on a bad mix."""
    name = type(optimizer).__name__
    if family == "sgd":
        opt_m = float(_group_value(optimizer, "momentum"))
        if opt_m > 0:
            if _group_value(optimizer, "nesterov", False):
                raise ValueError(f"hvdcomp: DGC's momentum correction is plain momentum (eq. 2 of the paper); "
                                 f"{name}(nesterov=True) cannot be moved into it: use nesterov=False")
            if float(_group_value(optimizer, "dampening")) != 0:
                raise ValueError(f"hvdcomp: DGC's momentum correction has no dampening; "
                                 f"{name}(dampening=...) cannot be moved into it: use dampening=0")
        if dgc.momentum is None:
            return opt_m, opt_m > 0
        if dgc.momentum > 0 and opt_m > 0:
            raise ValueError(f"hvdcomp: DGC(momentum={dgc.momentum}) and {name}(momentum={opt_m}) would apply "
                             "momentum twice; leave DGC's momentum at None (it then takes over the optimizer's) "
                             "or set the optimizer's momentum to 0")
        return dgc.momentum, False
    if dgc.momentum is None:
        return 0.0, False
    if dgc.momentum > 0 and (family == "adaptive" or _has_momentum(optimizer, family)):
        what = "its first moment (betas[0])" if family == "adaptive" else "its own momentum"
        raise ValueError(f"hvdcomp: DGC(momentum={dgc.momentum}) under {name}, which applies {what}, would apply "
                         "momentum twice (undefined by the DGC paper); leave DGC's momentum at None (0 under "
                         f"{name}) or use torch.optim.SGD")
    return dgc.momentum, False


def apply_recipe(optimizer: torch.optim.Optimizer, compression: Compressor,
                 small_compression: Compressor) -> Recipe:
    """Apply the rules of the module docstring to ``optimizer`` and the two compressors.

    optimizer: the user's optimizer (its parameter groups' ``momentum`` may be set to 0).
    compression: the compressor of tensors with at least ``min_compress_numel`` elements;
    small_compression: that of the others. Returns the :class:`Recipe` whose compressors the
    transport must use. Raises ``ValueError`` (before changing anything) on a combination
    that would apply momentum twice or that DGC's momentum correction cannot represent.
    Idempotent: a second call on its own result changes nothing.
    """
    family = optimizer_family(optimizer)
    if not isinstance(compression, DGCCompressor):
        return Recipe(compression, small_compression, family)
    m, move = _dgc_momentum(optimizer, family, compression)
    small = small_compression
    if m > 0:
        if isinstance(small, DenseMomentum):
            if small.momentum != m:
                raise ValueError(f"hvdcomp: small_compression applies momentum {small.momentum}, DGC {m}")
        else:
            try:
                small = DenseMomentum(small, m)
            except ValueError as err:
                raise ValueError(f"hvdcomp: with DGC's momentum correction the uncompressed tensors get the same "
                                 f"momentum locally, which needs a dense small_compression (none or fp16): {err}") from None
    # Everything is checked: now change the optimizer.
    if move:
        for group in optimizer.param_groups:
            group["momentum"] = 0.0
        if "momentum" in optimizer.defaults:
            optimizer.defaults["momentum"] = 0.0
        note = f"DGC took over {type(optimizer).__name__}'s momentum {m} (the optimizer now runs without momentum)"
    elif m > 0:
        note = f"DGC applies momentum {m}; the optimizer has none"
    else:
        note = f"DGC without momentum correction; {type(optimizer).__name__} applies its own momentum, if any"
    return Recipe(compression.with_momentum(m), small, family, m if move else 0.0, note)


def reapply_after_load(optimizer: torch.optim.Optimizer, compression: Compressor) -> None:
    """After ``optimizer.load_state_dict``: a checkpoint of the optimizer saved before it was
    wrapped brings back the momentum DGC took over (its parameter groups hold it); set it to
    0 again, so the momentum is applied once. ``compression``: the transport's (resolved)
    compressor. ValueError when the loaded momentum is not DGC's (another run's settings)."""
    if not isinstance(compression, DGCCompressor) or optimizer_family(optimizer) != "sgd":
        return
    loaded = float(_group_value(optimizer, "momentum"))
    if loaded == 0 or compression.effective_momentum == 0:
        return
    if loaded != compression.effective_momentum:
        raise ValueError(f"hvdcomp: the loaded optimizer state has momentum {loaded}, DGC took over "
                         f"{compression.effective_momentum} when the optimizer was wrapped")
    for group in optimizer.param_groups:
        group["momentum"] = 0.0


def recipe_options(optimizer: torch.optim.Optimizer | None, options: ExchangeOptions) -> ExchangeOptions:
    """The transports' hook point: ``options`` with :func:`apply_recipe`'s two compressors, or
    unchanged when ``optimizer`` is None (the DDP hook built without ``optimizer=``); under a
    :class:`FrozenAdamW`, TernGrad with its worker error buffer."""
    if optimizer is None:
        return options
    if isinstance(optimizer, FrozenAdamW) and isinstance(options.compression, Selector):
        raise ValueError("hvdcomp.FrozenAdamW switches each tensor to one compressor when v freezes; "
                         "Compression.auto() chooses among several: give FrozenAdamW one compressor")
    recipe = apply_recipe(optimizer, options.compression, options.small_compression)
    options = dataclasses.replace(options, compression=recipe.compression, small_compression=recipe.small_compression)
    return _worker_error_options(options) if isinstance(optimizer, FrozenAdamW) else options


def _worker_error_options(options: ExchangeOptions) -> ExchangeOptions:
    """TernGrad, which keeps no error feedback, with a worker error buffer: the frozen-v
    recipe's momentum messages need every coordinate delivered, not only in expectation."""
    comp = options.compression
    if not isinstance(comp, TernGradCompressor) or comp.error_feedback:
        return options
    comp = TernGradCompressor(clip=comp.clip, seed=comp.seed, rng=comp.rng, error_feedback=True)
    return dataclasses.replace(options, compression=comp)


class RecipeNotice(UserWarning):
    """The one-line notice of what the Adam-family recipe did (filter it to silence it)."""


#: Compressors that lose (almost) nothing: under them Adam and AdamW stay as they are.
LOSSLESS = (NoneCompressor, FP16Compressor, BF16Compressor, HorovodCompressor)


def _replaceable(optimizer: torch.optim.Optimizer, compression: Compressor) -> bool:
    """Whether an Adam/AdamW gets the frozen-v recipe: one lossy compressor (not a selector,
    not a cast), no amsgrad or maximize (the frozen step does not define them)."""
    return not (isinstance(compression, (Selector,) + LOSSLESS)
                or any(g.get("amsgrad") or g.get("maximize") for g in optimizer.param_groups))


def frozen_adam_class(optimizer: torch.optim.Optimizer, compression: Compressor) -> tuple[type | None, str]:
    """``(class, note)``: :class:`FrozenAdamW` (its groups' ``warmup_steps`` set to the
    default where unset) for a plain ``torch.optim.Adam`` / ``AdamW`` under a lossy
    compressor, None to keep the optimizer's class; note: what was done, one sentence ("" when
    nothing was)."""
    name = type(optimizer).__name__
    if isinstance(optimizer, FrozenAdamW):
        warmups = sorted({str(g["warmup_steps"]) for g in optimizer.param_groups})
        return None, (f"{name}: exact AdamW for warmup_steps={'/'.join(warmups)} steps, then v frozen and the "
                      f"momentum exchanged through {compression.name} with error feedback")
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW) or not _replaceable(optimizer, compression):
        return None, ""
    for group in optimizer.param_groups:
        group.setdefault("warmup_steps", DEFAULT_WARMUP_STEPS)
    warmup = "/".join(sorted({str(g["warmup_steps"]) for g in optimizer.param_groups}))
    return FrozenAdamW, (f"{name} became hvdcomp.FrozenAdamW: exact {name} for {warmup} steps, then v frozen and "
                         f"the momentum exchanged through {compression.name} with error feedback (1-bit Adam's "
                         "recipe; choose the warm-up with hvdcomp.FrozenAdamW(warmup_steps=W))")


def recipe_for(optimizer: torch.optim.Optimizer, options: ExchangeOptions) -> tuple[ExchangeOptions, type]:
    """The optimizer transports' hook point: :func:`recipe_options`, and the class the
    transport must wrap (the optimizer's own, or :class:`FrozenAdamW` for Adam and AdamW:
    :func:`frozen_adam_class`, whose note is warned once as a :class:`RecipeNotice`)."""
    options = recipe_options(optimizer, options)
    cls, note = frozen_adam_class(optimizer, options.compression)
    if cls is not None:
        options = _worker_error_options(options)
    if note and isinstance(options.compression, TernGradCompressor):
        note += "; TernGrad gets a worker error buffer (error_feedback=True)"
    if note:
        warnings.warn(f"hvdcomp: {note}", RecipeNotice, stacklevel=3)
    return options, cls or optimizer.__class__


def ddp_adam_notice(optimizer: torch.optim.Optimizer | None, compression: Compressor) -> None:
    """The DDP hook's notice for a plain Adam/AdamW under a lossy compressor: the hook cannot
    replace the optimizer, so it stays on the compressed gradient sum unless the script
    builds a :class:`FrozenAdamW`."""
    if optimizer is None or isinstance(optimizer, FrozenAdamW):
        return
    if type(optimizer) in (torch.optim.Adam, torch.optim.AdamW) and _replaceable(optimizer, compression):
        warnings.warn(f"hvdcomp: {type(optimizer).__name__} stays on the compressed gradient sum, which fails under "
                      f"Adam; build hvdcomp.FrozenAdamW(...) instead to get the frozen-v recipe", RecipeNotice,
                      stacklevel=3)
