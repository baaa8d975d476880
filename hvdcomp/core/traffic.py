"""Traffic accounting: what each step sent and received, per tensor and in total.

Byte models (per rank, per step; ``S`` a payload in bytes, ``N`` ranks):

* dense bytes: ``numel * element size`` of the gradient, what the uncompressed exchange
  of that gradient carries;
* allreduce (ring): sent = received = ``2 (N-1) / N * S``;
* allgather: received = the other ranks' payloads, ``sum_{r != me} S_r``; sent =
  ``(N-1) * S_me`` (every peer needs our payload once; a ring forwards the same total);
* ratio: dense bytes / own payload bytes, the compression ratio the papers quote.

``HVDCOMP_LOG=1`` (or a handler on the ``hvdcomp`` logger at INFO) prints one line per step.
"""
from __future__ import annotations

import dataclasses
import logging
import os

logger = logging.getLogger("hvdcomp")


@dataclasses.dataclass
class TensorTraffic:
    """One tensor's exchange in one step."""

    name: str
    numel: int
    dense_bytes: int
    payload_bytes: int
    sent_bytes: float
    received_bytes: float
    transport: str
    compressor: str
    selected: int | None = None
    shape: tuple = ()

    @property
    def ratio(self) -> float:
        return self.dense_bytes / self.payload_bytes if self.payload_bytes else float("inf")


def layer_kind(shape) -> str:
    """"conv" for >= 3-D weights, "fc" for 2-D (fully-connected, LSTM, embedding), else "other"."""
    return "conv" if len(shape) >= 3 else "fc" if len(shape) == 2 else "other"


def ratio_by_kind(tensors: dict) -> dict:
    """Cumulative compression ratio per layer kind from ``stats()["tensors"]``."""
    acc: dict[str, list[int]] = {}
    for t in tensors.values():
        a = acc.setdefault(layer_kind(t["shape"]), [0, 0])
        a[0] += t["cumulative_dense_bytes"]
        a[1] += t["cumulative_payload_bytes"]
    return {kind: _ratio(d, p) for kind, (d, p) in sorted(acc.items())}


def allreduce_traffic(payload_bytes: int, nranks: int) -> tuple[float, float]:
    """(sent, received) bytes of a ring allreduce of ``payload_bytes``."""
    moved = 2.0 * (nranks - 1) / nranks * payload_bytes if nranks > 1 else 0.0
    return moved, moved


def allgather_traffic(own_bytes: int, all_bytes: list[int], rank: int) -> tuple[float, float]:
    """(sent, received) bytes of an allgather where rank r contributes ``all_bytes[r]``."""
    n = len(all_bytes)
    return float((n - 1) * own_bytes), float(sum(b for r, b in enumerate(all_bytes) if r != rank))


def log_line(line: str) -> None:
    """``line`` on the ``hvdcomp`` logger (INFO), and on stdout when ``HVDCOMP_LOG`` is set."""
    if os.environ.get("HVDCOMP_LOG", "") not in ("", "0"):
        print(line, flush=True)
    logger.info(line)


class TrafficLog:
    """Per-step and cumulative traffic of one optimizer (see module docstring)."""

    def __init__(self) -> None:
        self.steps = 0
        self.current: dict[str, TensorTraffic] = {}
        self.last: dict[str, TensorTraffic] = {}
        self.totals = {"dense_bytes": 0, "payload_bytes": 0, "sent_bytes": 0.0, "received_bytes": 0.0}
        #: name -> [dense bytes, payload bytes] summed over all steps
        self.per_tensor: dict[str, list[int]] = {}

    def record(self, traffic: TensorTraffic) -> None:
        self.current[traffic.name] = traffic
        acc = self.per_tensor.setdefault(traffic.name, [0, 0])
        acc[0] += traffic.dense_bytes
        acc[1] += traffic.payload_bytes

    def end_step(self) -> None:
        self.last, self.current = self.current, {}
        self.steps += 1
        summary = _summarize(self.last.values())
        for key in self.totals:
            self.totals[key] += summary[key]
        if os.environ.get("HVDCOMP_LOG", "") not in ("", "0") or logger.isEnabledFor(logging.INFO):
            log_line(
                f"hvdcomp step {self.steps}: dense {summary['dense_bytes']} B, payload "
                f"{summary['payload_bytes']} B (ratio {summary['ratio']:.1f}x), sent "
                f"{summary['sent_bytes']:.0f} B, received {summary['received_bytes']:.0f} B"
            )

    def stats(self) -> dict:
        """``{"step": {...}, "cumulative": {...}, "tensors": {name: {...}}}`` for the last step."""
        cumulative = dict(self.totals)
        cumulative["ratio"] = _ratio(cumulative["dense_bytes"], cumulative["payload_bytes"])
        cumulative["steps"] = self.steps
        tensors = {}
        for name, t in self.last.items():
            dense, payload = self.per_tensor.get(name, (0, 0))
            tensors[name] = {**dataclasses.asdict(t), "ratio": t.ratio, "cumulative_dense_bytes": dense,
                             "cumulative_payload_bytes": payload, "cumulative_ratio": _ratio(dense, payload)}
        return {"step": _summarize(self.last.values()), "cumulative": cumulative, "tensors": tensors}


def _ratio(dense: float, payload: float) -> float:
    return dense / payload if payload else float("inf")


def _summarize(items) -> dict:
    items = list(items)
    out = {
        "dense_bytes": sum(t.dense_bytes for t in items),
        "payload_bytes": sum(t.payload_bytes for t in items),
        "sent_bytes": sum(t.sent_bytes for t in items),
        "received_bytes": sum(t.received_bytes for t in items),
    }
    out["ratio"] = _ratio(out["dense_bytes"], out["payload_bytes"])
    out["transports"] = sorted({t.transport for t in items})
    return out
