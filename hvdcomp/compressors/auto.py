"""``Compression.auto()``: each tensor's compressor chosen by measurement, on the ranks.

A selector, not a codec (:class:`~hvdcomp.compressor.Selector`): every tensor starts with
the first candidate; after ``warmup_steps`` steps the transports' step driver measures, on
every rank, what each candidate costs for each tensor (its real chain, locally) and what the
link costs per byte (probes through the transport itself), and gives each tensor the
candidate with the smallest predicted time (:mod:`hvdcomp.core.choice`). Where that changes
any tensor's compressor, the change is tried for a few steps against the current choice and
stands only if the steps are shorter (:mod:`hvdcomp.core.trial`). All ranks compute the same
choice and verdict from the same gathered numbers. After that the choice changes only when asked
(``redecide_compression()`` on the optimizer or the DDP state); error-feedback state owed by
a replaced compressor is carried into the next gradient.

The default candidates cannot change what training computes beyond rounding: ``none`` and
``bf16`` (fp32's range, 8 bits of mantissa; within 0.2 points and 0.05 % of the baseline in
every task of the comparison). ``fp16`` is not a default: its range ends at 65504, and a
larger gradient would drop the step. Lossy candidates (``topk``, ``onebit``, ...) are the
user's trade-off to make; DGC cannot be a candidate (it takes over the optimizer's
momentum, which a switch could not hand back).
"""
from __future__ import annotations

import numbers
from typing import Sequence

from ..compressor import Compressor, Selector
from ..core.choice import LinkFit
from ..core.trial import DEFAULT_TRIAL_STEPS

#: The candidates ``Compression.auto()`` chooses among by default (see the module docstring).
DEFAULT_CANDIDATES = ("none", "bf16")
#: Steps run with the first candidate before the first decision (their median time is the
#: observed step the prediction starts from).
DEFAULT_WARMUP_STEPS = 3
#: Bytes per rank of the largest link probe (the smallest is 4 KiB).
DEFAULT_PROBE_BYTES = 1 << 20
#: Candidates that cannot be switched in and out.
REFUSED = {"dgc": "DGC takes over the optimizer's momentum, which a switch could not hand back",
           "auto": "a selector cannot choose among selectors"}


def _candidate(item) -> Compressor:
    from ..registry import compression_from_name  # the registry imports this module lazily

    comp = compression_from_name(item) if isinstance(item, str) else item
    if not isinstance(comp, Compressor):
        raise TypeError(f"auto candidates must be compressor names or hvdcomp compressors, got {item!r}")
    if comp.name in REFUSED or isinstance(comp, Selector):
        raise ValueError(f"{comp.name} cannot be an auto candidate: {REFUSED.get(comp.name, REFUSED['auto'])}")
    return comp


class AutoCompression(Selector, Compressor):
    """Each tensor's compressor chosen among ``candidates`` by measurement.

    candidates: compressor names or instances, in order of preference (ties go to the
        earlier; the first serves until the first decision). Default ``("none", "bf16")``.
    warmup_steps: steps before the first decision (>= 0; the decision needs observed steps
        to predict a step time, so 0 predicts exchange time only).
    link: None (measure the link through the transport: the real ranks' case), or a
        :class:`hvdcomp.core.choice.LinkFit` to use instead (in-process ranks, which have no
        link of their own, simulate one with it; without one they see a free link).
    probe_bytes: bytes per rank of the largest link probe.
    trial_steps: where the link is measured, a decision that changes any tensor's
        compressor is tried before it stands: ``trial_steps`` steps of the current choice,
        then as many of the proposal and as many of the current choice again, and the
        proposal stands only when its median step is shorter than the current choice's
        shorter window (:mod:`hvdcomp.core.trial`). 0: the model's choice stands at once.
    """

    name = "auto"
    transport = "select"  # never routed: the slots hold its candidates

    def __init__(self, candidates: Sequence = DEFAULT_CANDIDATES, warmup_steps: int = DEFAULT_WARMUP_STEPS,
                 link: LinkFit | None = None, probe_bytes: int = DEFAULT_PROBE_BYTES,
                 trial_steps: int = DEFAULT_TRIAL_STEPS):
        if isinstance(candidates, (str, Compressor)) or not len(candidates):
            raise ValueError("auto candidates must be a non-empty sequence of compressor names or compressors")
        self.candidates = tuple(_candidate(c) for c in candidates)
        configs = [c.config() for c in self.candidates]
        if len({repr(c) for c in configs}) != len(configs):
            raise ValueError(f"auto candidates repeat a compressor: {configs}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"auto warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        if link is not None and not isinstance(link, LinkFit):
            raise TypeError(f"auto link must be None or a hvdcomp.core.choice.LinkFit, got {type(link).__name__}")
        if isinstance(probe_bytes, bool) or not isinstance(probe_bytes, numbers.Integral) or probe_bytes < 4096:
            raise ValueError(f"auto probe_bytes must be an integer >= 4096, got {probe_bytes!r}")
        if isinstance(trial_steps, bool) or not isinstance(trial_steps, numbers.Integral) or trial_steps < 0:
            raise ValueError(f"auto trial_steps must be an integer >= 0, got {trial_steps!r}")
        self.warmup_steps = warmup_steps
        self.trial_steps = int(trial_steps)
        self.link = link
        self.probe_bytes = int(probe_bytes)

    def config(self) -> dict:
        """Settings that must match on every rank."""
        return {"name": self.name, "candidates": [c.config() for c in self.candidates],
                "warmup_steps": self.warmup_steps, "probe_bytes": self.probe_bytes, "trial_steps": self.trial_steps,
                "link": None if self.link is None else {"alpha_s": self.link.alpha_s,
                                                        "seconds_per_byte": self.link.seconds_per_byte}}

    def compress(self, tensor):
        raise TypeError("hvdcomp.Compression.auto() chooses each tensor's compressor by measuring on the ranks: "
                        "use it with hvdcomp.DistributedOptimizer, the DDP hook or hvdcomp.inprocess, not "
                        "hvd.DistributedOptimizer")
