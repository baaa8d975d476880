"""Trying a proposed choice of compressors before it stands (``Compression.auto()``).

:mod:`hvdcomp.core.choice` predicts each candidate's cost from start-up measurements, and
the prediction misses costs it does not count: where the ranks share their cores, a
transfer over an unshaped loopback is CPU work of the ranks themselves, timed by the link
probes while the ranks idle; DDP overlaps an allreduce with the backward pass. Either can
turn a predicted saving into a slower step. So a decision that changes any tensor's
compressor proposes, and the steps decide (``T`` = the selector's ``trial_steps``)::

    step d              the decision; its calibration is in this step's time (untimed)
    steps d+1 .. d+T    the current choice, timed: the baseline window
    step s = d+T+1      the proposal takes over; its first use (Horovod negotiates the
                        new dtypes, first allocations) is in this step's time (untimed)
    steps s+1 .. s+T    the proposal, timed: the trial window
    step s+T+1          the verdict: the proposal stands when its window's median step is
                        shorter than the baseline's, else the current choice returns

The baseline is timed after the decision, not taken from the warm-up steps before it: the
first steps of a run and the steps right after a calibration are slower than later ones
with the same exchange, and a baseline from them would favour any proposal. Each window's
time is the slowest rank's median (every rank waits for it), so every rank reaches the same
verdict. A switch either way carries error-feedback state as any switch does
(:meth:`hvdcomp.core.slots.Slot.assign`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

#: Timed steps per window when ``Compression.auto()`` is not told otherwise: a median of
#: three tolerates one disturbed step in each window, and the whole trial costs 2T + 2 steps
#: once per decision.
DEFAULT_TRIAL_STEPS = 3


@dataclasses.dataclass
class Trial:
    """One decision's trial (all ranks alike).

    current / proposal: slot name -> candidate index, before the decision and proposed.
    steps: timed steps per window (T). decided_at: the decision's step (d).
    switched_at: the step the proposal took over (s; None during the baseline window).
    baseline_s / trial_s: the windows' median step seconds (slowest rank).
    stands: the verdict (None until it is reached); verdict_at: the step it took effect."""

    current: dict
    proposal: dict
    steps: int
    decided_at: int
    switched_at: int | None = None
    baseline_s: float | None = None
    trial_s: float | None = None
    stands: bool | None = None
    verdict_at: int | None = None

    @property
    def finished(self) -> bool:
        return self.stands is not None

    def due(self, step: int) -> bool:
        """Whether a window closes at the start of ``step`` (its T timed steps have ended)."""
        opened = self.decided_at if self.switched_at is None else self.switched_at
        return not self.finished and step >= opened + self.steps + 1

    def window_seconds(self, observed_step_seconds: Callable[[int], float | None]) -> float | None:
        """This rank's median of the window that just closed (``observed_step_seconds(k)``:
        the median of the last k steps)."""
        return observed_step_seconds(self.steps)

    def close_window(self, windows: Sequence[float | None], step: int) -> dict:
        """Close the window from every rank's :meth:`window_seconds`; returns the assignment
        to serve from ``step`` on. A window some rank could not time counts as not shorter,
        so the current choice stays."""
        slowest = None if any(w is None for w in windows) else max(windows)
        if self.switched_at is None:
            self.baseline_s, self.switched_at = slowest, step
            return dict(self.proposal)
        self.trial_s, self.verdict_at = slowest, step
        self.stands = slowest is not None and self.baseline_s is not None and slowest < self.baseline_s
        return dict(self.proposal if self.stands else self.current)

    def summary(self) -> dict:
        """For telemetry (``compression_stats()["auto"]["trial"]``)."""
        return {"steps": self.steps, "decided_at": self.decided_at, "switched_at": self.switched_at,
                "verdict_at": self.verdict_at, "baseline_step_s": self.baseline_s, "trial_step_s": self.trial_s,
                "stands": self.stands}

    def report(self, names: Sequence[str]) -> str:
        """One line for the log when the verdict is reached."""
        verb = "stands" if self.stands else "reverted to the current choice"
        moved = [i for n, i in self.proposal.items() if self.current.get(n) != i]
        tensors = f"{len(moved)} tensor{'' if len(moved) == 1 else 's'}"

        def secs(value):
            return "untimed" if value is None else f"{value:.4g} s"

        return (f"hvdcomp auto trial at step {self.verdict_at}: the proposal ({tensors} to "
                f"{', '.join(sorted({names[i] for i in moved}))}) stepped {secs(self.trial_s)} against "
                f"{secs(self.baseline_s)}: {verb}")
