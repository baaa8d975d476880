"""How an exchange that fails after its DDP hook returned reaches the user."""
from __future__ import annotations

from typing import Callable

import torch


def queue_callback(fn: Callable[[], None]) -> None:
    """Run ``fn`` when the current backward pass ends (RuntimeError outside one)."""
    torch.autograd.Variable._execution_engine.queue_callback(fn)


class LateErrors:
    """How an exchange that fails after its hook returned (a peer died, a collective raised)
    reaches the user: from ``loss.backward()``, with its own type and message.

    A hook's future completed with an exception reaches DDP's reducer, which reports it as
    ``RuntimeError: Unable to cast <message> to Tensor``. So at a step's first bucket a
    callback is queued on the autograd engine (it runs when the backward pass ends); a failed
    bucket's future completes with a NaN gradient, and the callback waits for the step's
    buckets and raises the first error as it is. It queues itself once more first: DDP
    queues its own end-of-backward callback after the last bucket, and raising before it
    ran would leave DDP's reducer unfinished (the next backward would fail inside DDP
    instead of in our hook). Outside a backward pass (no engine to queue on) the future
    carries the exception as before."""

    def __init__(self):
        self.error: BaseException | None = None
        self._futures: list = []
        self._queued = False
        self._reported = False

    def watch(self, future: torch.futures.Future) -> bool:
        """Whether ``future``'s failure will be raised by the step's callback."""
        if not self._queued:
            try:
                queue_callback(self._queue_last)
            except RuntimeError:  # not called from a backward pass
                return False
            self._queued = True
        self._futures.append(future)
        return True

    def _queue_last(self) -> None:
        queue_callback(self._raise)  # runs after the callbacks queued so far (DDP's)

    def _raise(self) -> None:
        futures, self._futures, self._queued = self._futures, [], False
        for future in futures:
            future.wait()
        if self.error is not None and not self._reported:
            self._reported = True
            raise self.error
