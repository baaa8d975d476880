"""One call of the DDP hook: the bucket's output, the future DDP waits on, and its chains."""
from __future__ import annotations

import threading
from typing import Callable

import torch
import torch.distributed as dist

from ..core.faults import reuse_like


def write_output(part: torch.Tensor, avg: torch.Tensor, nonfinite: torch.Tensor) -> None:
    """One tensor's averaged gradient ``avg`` (any shape, ``part.numel()`` elements) into its
    place ``part`` (1-D) of the bucket's output; all NaN where ``nonfinite`` (bool []) says a
    rank was non-finite: DDP may copy this bucket out before the step's other buckets are
    done."""
    part.copy_(avg.reshape(-1))
    # On a GPU decided on the device; on a CPU the flag is read (free there), as a masked
    # fill by a one-element mask writes every element.
    if part.device.type == "cpu":
        if bool(nonfinite):
            part.fill_(float("nan"))
    else:
        part.masked_fill_(nonfinite, float("nan"))


class BucketOutputs:
    """The output tensor of each bucket (by DDP's bucket index), kept from one iteration to
    the next. DDP copies a hook's result into the gradients when the backward pass ends
    (``finalize_backward``), so the tensor is free again by the bucket's next hook call; a
    fresh tensor per call would cost its first-touch page faults on a CPU every step."""

    def __init__(self):
        self._by_index: dict = {}

    def for_bucket(self, index: int, buffer: torch.Tensor) -> torch.Tensor:
        """A tensor of ``buffer``'s shape, dtype and device for bucket ``index``."""
        self._by_index[index] = reuse_like(self._by_index.get(index), buffer)
        return self._by_index[index]


class BucketRun:
    """One hook call: the output buffer, the future DDP waits on, and the chains' bookkeeping.

    on_finished(run) runs once every chain of the bucket is done, before DDP's future is
    set; on_failed(run, exc) once, when the first chain fails."""

    def __init__(self, bucket: dist.GradBucket, grads: list, slots: list,
                 on_finished: Callable[["BucketRun"], None], on_failed: Callable[["BucketRun", BaseException], None],
                 out: torch.Tensor):
        self.on_finished, self.on_failed = on_finished, on_failed
        self.index = bucket.index()
        self.buffer = bucket.buffer()
        self.grads = grads
        self.device = self.buffer.device
        # Averaged gradients are written here (BucketOutputs), not into the buffer: chains
        # that have not encoded yet (e.g. after TernGrad's scale exchange) still read the
        # gradients.
        self.out = out
        self.future = torch.futures.Future(devices=[self.device]) if self.device.type == "cuda" else torch.futures.Future()
        self.position = {id(s): j for j, s in enumerate(slots)}
        self.offsets = self._offsets()
        self.pending = 0
        self.records: list = []
        self.results: list = []
        self.done = False
        self.lock = threading.Lock()
        self.raised_later = False  # see LateErrors

    def _offsets(self) -> list[int]:
        base = self.buffer.storage_offset()
        offsets, expect = [], 0
        for g in self.grads:
            same = g.untyped_storage().data_ptr() == self.buffer.untyped_storage().data_ptr()
            offsets.append(g.storage_offset() - base if same else expect)
            expect += g.numel()
        if expect != self.buffer.numel():
            raise RuntimeError(f"hvdcomp.ddp: bucket {self.index} holds {self.buffer.numel()} elements, "
                               f"its gradients {expect}")
        return offsets

    def chain_done(self, result) -> None:
        for slot, avg in result.outputs:
            j = self.position[id(slot)]
            write_output(self.out[self.offsets[j]:self.offsets[j] + self.grads[j].numel()], avg, result.nonfinite)
        with self.lock:
            self.results.append(result)
            self.records += result.traffic + result.overhead
            self.pending -= 1
            finished = self.pending == 0 and not self.done
            if finished:
                self.done = True
        if finished:
            self.on_finished(self)
            self.future.set_result(self.out)

    def fail(self, exc: BaseException) -> None:
        with self.lock:
            if self.done:
                return
            self.done = True
        self.on_failed(self, exc)
        if self.raised_later:  # see LateErrors
            self.future.set_result(self.out.fill_(float("nan")))
        else:
            self.future.set_exception(exc)

    def guard(self, fn: Callable) -> Callable:
        """``fn`` with its exceptions routed to the bucket's future."""

        def run(*args):
            try:
                fn(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to DDP through the future
                self.fail(exc)

        return run

    def then(self, futures: list, fn: Callable[[], None]) -> None:
        """Run ``fn()`` once every future in ``futures`` is complete (errors -> fail)."""
        fut = futures[0] if len(futures) == 1 else torch.futures.collect_all(futures)

        def callback(f):
            for x in (f.value() if len(futures) > 1 else [f]):
                x.value()  # raises the collective's error, if any
            fn()

        fut.then(self.guard(callback))
