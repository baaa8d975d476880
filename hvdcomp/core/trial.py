"""Trying a proposed choice of compressors before it stands (``Compression.auto()``).

:mod:`hvdcomp.core.choice` predicts each candidate's cost from start-up measurements, and
the prediction misses costs it does not count: where the ranks share their cores, a
transfer over an unshaped loopback is CPU work of the ranks themselves, timed by the link
probes while the ranks idle; DDP overlaps an allreduce with the backward pass. Either can
turn a predicted saving into a slower step. So a decision that changes any tensor's
compressor proposes, and the steps decide (``T`` = the selector's ``trial_steps``)::

    step d              the decision; its calibration is in this step's time (untimed)
    steps d+1 .. d+T    the current choice, timed: the first baseline window
    step s = d+T+1      the proposal takes over; its first use (Horovod negotiates the
                        new dtypes, first allocations) is in this step's time (untimed)
    steps s+1 .. s+T    the proposal, timed: the trial window
    step b = s+T+1      the current choice comes back (untimed, as the switch)
    steps b+1 .. b+T    the current choice, timed: the second baseline window
    step b+T+1          the verdict: the proposal stands when its window's median step is
                        shorter than the shorter baseline window's, else the current
                        choice stays

The steps right after a calibration, and the first steps of a run, are slower than later
ones with the same exchange, by an amount and for a time that vary from run to run
(docs/performance.md has measured cases): a baseline timed only before the trial would
favour any proposal. The second baseline, timed after the trial window, is clear of them,
and taking the shorter of the two windows leaves a tie to the current choice. Each
window's time is the slowest rank's median (every rank waits for it), so every rank
reaches the same verdict. A switch either way carries error-feedback state as any switch
does (:meth:`hvdcomp.core.slots.Slot.assign`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

#: Timed steps per window when ``Compression.auto()`` is not told otherwise: a median of
#: three tolerates one disturbed step in each window, and the whole trial costs 3T + 3 steps
#: once per decision.
DEFAULT_TRIAL_STEPS = 3


@dataclasses.dataclass
class Trial:
    """One decision's trial (all ranks alike).

    current / proposal: slot name -> candidate index, before the decision and proposed.
    steps: timed steps per window (T). decided_at: the decision's step (d).
    switched_at: the step the proposal took over (s; None during the first baseline window).
    returned_at: the step the current choice came back (b; None until the trial window closed).
    baseline_s / trial_s / second_baseline_s: the windows' median step seconds (slowest rank).
    stands: the verdict (None until it is reached); verdict_at: the step it took effect."""

    current: dict
    proposal: dict
    steps: int
    decided_at: int
    switched_at: int | None = None
    returned_at: int | None = None
    baseline_s: float | None = None
    trial_s: float | None = None
    second_baseline_s: float | None = None
    stands: bool | None = None
    verdict_at: int | None = None

    @property
    def finished(self) -> bool:
        return self.stands is not None

    @property
    def baseline_step_s(self) -> float | None:
        """The current choice's step: the shorter baseline window timed so far (None: none)."""
        timed = [w for w in (self.baseline_s, self.second_baseline_s) if w is not None]
        return min(timed) if timed else None

    def due(self, step: int) -> bool:
        """Whether a window closes at the start of ``step`` (its T timed steps have ended)."""
        opened = next(at for at in (self.returned_at, self.switched_at, self.decided_at) if at is not None)
        return not self.finished and step >= opened + self.steps + 1

    def window_seconds(self, observed_step_seconds: Callable[[int], float | None]) -> float | None:
        """This rank's median of the window that just closed (``observed_step_seconds(k)``:
        the median of the last k steps)."""
        return observed_step_seconds(self.steps)

    def close_window(self, windows: Sequence[float | None], step: int) -> dict:
        """Close the window from every rank's :meth:`window_seconds`; returns the assignment
        to serve from ``step`` on. A trial window some rank could not time counts as not
        shorter, so the current choice stays; a baseline window some rank could not time is
        left out of :attr:`baseline_step_s`."""
        slowest = None if any(w is None for w in windows) else max(windows)
        if self.switched_at is None:
            self.baseline_s, self.switched_at = slowest, step
            return dict(self.proposal)
        if self.returned_at is None:
            self.trial_s, self.returned_at = slowest, step
            return dict(self.current)
        self.second_baseline_s, self.verdict_at = slowest, step
        baseline = self.baseline_step_s
        self.stands = self.trial_s is not None and baseline is not None and self.trial_s < baseline
        return dict(self.proposal if self.stands else self.current)

    def summary(self) -> dict:
        """For telemetry (``compression_stats()["auto"]["trial"]``)."""
        return {"steps": self.steps, "decided_at": self.decided_at, "switched_at": self.switched_at,
                "returned_at": self.returned_at, "verdict_at": self.verdict_at, "baseline_step_s": self.baseline_s,
                "trial_step_s": self.trial_s, "second_baseline_step_s": self.second_baseline_s,
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
                f"{secs(self.baseline_s)} and {secs(self.second_baseline_s)} with the current choice "
                f"before and after it: {verb}")
