"""Network namespaces and ``tc tbf`` shaping, shared by ``launch.link`` and ``launch.cluster``.

Units follow tc(8), so a value means here what it means to ``tc``:

==================  ==============================================================
rates               ``bit`` or a bare number: bits/s; ``kbit`` ``mbit`` ``gbit``
                    ``tbit``: 10^3..10^12 bits/s; ``kibit`` ``mibit`` ``gibit``:
                    2^10..2^30 bits/s; ``bps``: bytes/s, ``kbps`` ``mbps`` ``gbps``:
                    10^3..10^9 bytes/s. ``unshaped`` or ``none``: no qdisc.
sizes (burst)       ``b`` or a bare number: bytes; ``kb``/``k``, ``mb``/``m``,
                    ``gb``/``g``: 2^10, 2^20, 2^30 bytes (tc's, binary); ``kbit``
                    ``mbit`` ``gbit``: bits (binary as well, as in tc)
times (latency)     ``s`` ``ms`` ``us``; a bare number: microseconds (tc's)
==================  ==============================================================

A token-bucket filter (``tbf``) lets a packet leave only when the bucket holds as many
tokens as the packet has bytes; tokens arrive at ``rate`` and the bucket holds ``burst``.
A packet larger than the bucket can never leave: it is dropped, again on every
retransmission, and the connection stalls (Gloo then fails with "Connection timed out").
So the burst must hold the device's largest frame: its MTU plus the 14-byte Ethernet
header; :func:`make_shape` refuses anything smaller with that reason. ``latency`` is tbf's
bound on the time a packet may wait in the queue (it sizes the queue); it does not delay
anything (``netem`` would, and is absent from many kernels).
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import subprocess
import threading
from dataclasses import dataclass

#: Loopback's MTU on Linux; shaped loopbacks need a burst above it.
LOOPBACK_MTU = 65536
#: The largest frame a device of MTU ``m`` hands the qdisc is ``m + FRAME_HEADER`` bytes.
FRAME_HEADER = 14
#: Head-room over the largest frame: tc stores the burst as a time at the rate, and the
#: round trip loses a few bytes (``burst 65545b`` comes back as 65537 and drops 65550-byte
#: frames; 65549 works at 100mbit). One KiB keeps every rate clear of that rounding.
BURST_MARGIN = 1024
DEFAULT_BURST = "256kb"
DEFAULT_LATENCY = "100ms"
UNSHAPED = ("unshaped", "none")

_RATE_UNITS = {"": 1, "bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12,
               "kibit": 2**10, "mibit": 2**20, "gibit": 2**30, "tibit": 2**40,
               "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9, "tbps": 8e12}
_SIZE_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "m": 2**20, "mb": 2**20, "g": 2**30, "gb": 2**30,
               "kbit": 2**10 / 8, "mbit": 2**20 / 8, "gbit": 2**30 / 8}
_TIME_UNITS = {"": 1e-6, "us": 1e-6, "usec": 1e-6, "ms": 1e-3, "msec": 1e-3, "s": 1.0, "sec": 1.0}
_NUMBER_UNIT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


class NetnsError(RuntimeError):
    """The emulator cannot do what was asked here (privileges, tools, kernel); the message
    says why and what to do about it."""


def _parse(text, units: dict, what: str, examples: str) -> float:
    match = _NUMBER_UNIT.match(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in units:
        raise ValueError(f"cannot read {what} {text!r}: expected a number with one of the units "
                         f"{', '.join(u for u in units if u)} (for example {examples})")
    return float(match.group(1)) * units[unit]


def parse_rate(text) -> float | None:
    """Bits per second of a tc rate (``"200mbit"`` -> 2e8); None for ``unshaped``/``none``."""
    if text is None or str(text).strip().lower() in UNSHAPED:
        return None
    bits = _parse(text, _RATE_UNITS, "rate", "50mbit, 1gbit, 12500kbps, or unshaped")
    if bits <= 0:
        raise ValueError(f"rate {text!r} must be positive (use 'unshaped' for no shaping)")
    return bits


def parse_size(text) -> int:
    """Bytes of a tc size (``"256kb"`` -> 262144)."""
    return int(_parse(text, _SIZE_UNITS, "size", "256kb, 1mb, 300000"))


def parse_time(text) -> float:
    """Seconds of a tc time (``"100ms"`` -> 0.1; a bare number is microseconds)."""
    return _parse(text, _TIME_UNITS, "time", "100ms, 1s")


@dataclass(frozen=True)
class Shape:
    """How one device's egress is shaped: a tbf of ``rate_bits_per_s`` (None: no qdisc),
    bucket ``burst_bytes`` and queue bound ``latency_s``."""

    rate_bits_per_s: float | None
    burst_bytes: int
    latency_s: float

    @property
    def shaped(self) -> bool:
        return self.rate_bits_per_s is not None

    @property
    def rate_bytes_per_s(self) -> float | None:
        """The rate a cost model divides bytes by (None when unshaped)."""
        return None if self.rate_bits_per_s is None else self.rate_bits_per_s / 8

    def tbf_args(self) -> list[str]:
        """``tc qdisc ... tbf`` arguments, in units tc cannot misread."""
        return ["tbf", "rate", f"{self.rate_bits_per_s:.0f}bit", "burst", f"{self.burst_bytes}b",
                "latency", f"{self.latency_s * 1e6:.0f}us"]

    def describe(self) -> str:
        if not self.shaped:
            return "unshaped (no qdisc)"
        return (f"tbf rate {self.rate_bits_per_s / 1e6:g} Mbit/s ({self.rate_bytes_per_s:,.0f} B/s), "
                f"burst {self.burst_bytes:,} B, latency {self.latency_s * 1e3:g} ms")

    def to_record(self) -> dict:
        """The JSON form benchmarks store (and read back from the environment)."""
        return {"rate_bits_per_s": self.rate_bits_per_s, "rate_bytes_per_s": self.rate_bytes_per_s,
                "burst_bytes": self.burst_bytes, "latency_s": self.latency_s}


def make_shape(rate="unshaped", burst=DEFAULT_BURST, latency=DEFAULT_LATENCY, mtu: int = LOOPBACK_MTU) -> Shape:
    """A validated :class:`Shape` for a device of MTU ``mtu``; ValueError says what is wrong."""
    rate_bits = parse_rate(rate)
    burst_bytes = parse_size(burst)
    latency_s = parse_time(latency)
    smallest = mtu + FRAME_HEADER + BURST_MARGIN
    if rate_bits is not None and burst_bytes < smallest:
        raise ValueError(
            f"burst {burst!r} ({burst_bytes:,} B) is too small for a device of MTU {mtu:,}: a frame "
            f"larger than the bucket is dropped on every retry and the connection stalls (Gloo times "
            f"out); use at least {smallest:,} B ({-(-smallest // 1024)}kb), e.g. --burst {DEFAULT_BURST}")
    if latency_s <= 0:
        raise ValueError(f"latency {latency!r} must be positive")
    return Shape(rate_bits, burst_bytes, latency_s)


def require_root(tool: str) -> None:
    if os.geteuid() != 0:
        raise NetnsError(f"{tool} needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) to create network "
                         f"namespaces and shape links; run it with sudo or as root")


def require_tools(tool: str, *names: str) -> None:
    """Every command of ``names`` on PATH, else a NetnsError naming the missing ones."""
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        raise NetnsError(f"{tool} needs {' and '.join(f'`{n}`' for n in missing)} (iproute2), not found "
                         f"on PATH; install iproute2 (apt-get install iproute2)")


_CLONE_NEWNET = 0x40000000


def _libc_call(name: str, *args) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if getattr(libc, name)(*args) != 0:
        err = ctypes.get_errno()
        raise NetnsError(f"cannot create or enter a network namespace ({name}: {os.strerror(err)}); "
                         + ("it needs root with CAP_SYS_ADMIN, and a container may forbid it "
                            "(docker: --privileged or --cap-add SYS_ADMIN)" if err == errno.EPERM else
                            "this kernel may lack network namespaces (CONFIG_NET_NS)"))


def unshare_network() -> None:
    """Move this process (single-threaded) into a new network namespace of its own."""
    _libc_call("unshare", _CLONE_NEWNET)


def call_in_netns(name: str, fn):
    """``fn()`` on a thread that entered named namespace ``name`` (``ip netns``); returns its
    result. Sockets it opens stay in that namespace, whatever thread later serves them;
    this process and its other threads stay where they are (setns moves one thread)."""
    result = {}

    def body():
        try:
            with open(f"/run/netns/{name}") as ns:
                _libc_call("setns", ns.fileno(), _CLONE_NEWNET)
            result["value"] = fn()
        except BaseException as err:  # handed to the caller's thread
            result["error"] = err

    thread = threading.Thread(target=body, name=f"netns-{name}")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def run_tool(argv: list[str], what: str) -> str:
    """Run an ``ip``/``tc`` command; its stdout, or a NetnsError quoting its stderr."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True)
    except FileNotFoundError:
        raise NetnsError(f"cannot {what}: `{argv[0]}` not found (install iproute2)") from None
    if done.returncode != 0:
        raise NetnsError(f"cannot {what}: `{' '.join(argv)}` failed: {done.stderr.strip() or done.returncode}")
    return done.stdout


def _ns(netns: str | None) -> list[str]:
    return ["-n", netns] if netns else []


def add_tbf(dev: str, shape: Shape, netns: str | None = None) -> None:
    """Shape ``dev``'s egress with ``shape`` (in namespace ``netns``, else this process's)."""
    try:
        run_tool(["tc", *_ns(netns), "qdisc", "add", "dev", dev, "root", *shape.tbf_args()],
                 f"shape {dev} with tbf")
    except NetnsError as err:
        raise NetnsError(f"{err}; the tbf qdisc may be unavailable in this kernel (module sch_tbf: "
                         f"modprobe sch_tbf)") from None


def qdisc_stats(dev: str, netns: str | None = None) -> dict | None:
    """The root qdisc's counters on ``dev``: kind, bytes, packets, drops, overlimits; None
    when the device has no qdisc of its own (``noqueue``) ."""
    out = run_tool(["tc", *_ns(netns), "-s", "-j", "qdisc", "show", "dev", dev], f"read {dev}'s qdisc")
    for q in json.loads(out or "[]"):
        if q.get("root") and q.get("kind") != "noqueue":
            return {k: q.get(k) for k in ("kind", "bytes", "packets", "drops", "overlimits")}
    return None


def link_stats(dev: str, netns: str | None = None) -> dict:
    """``dev``'s byte and packet counters: ``{"tx_bytes", "rx_bytes", "tx_packets", "rx_packets"}``."""
    out = run_tool(["ip", *_ns(netns), "-s", "-j", "link", "show", "dev", dev], f"read {dev}'s counters")
    stats = json.loads(out)[0]["stats64"]
    return {"tx_bytes": stats["tx"]["bytes"], "rx_bytes": stats["rx"]["bytes"],
            "tx_packets": stats["tx"]["packets"], "rx_packets": stats["rx"]["packets"]}
