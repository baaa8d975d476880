"""Run any command on a slow link: a fresh network namespace whose loopback is shaped by tbf.

    python -m launch.link --rate 200mbit -- horovodrun -np 2 -H localhost:2 --gloo python -m launch.train
    python -m launch.link --rate 50mbit -- torchrun --nproc-per-node 2 --master-addr 127.0.0.1 -m bench.collectives_sweep
    python -m launch.link --rate unshaped -- ...    # the same namespace without a qdisc: the baseline

Every process the command starts (horovodrun's ranks, torchrun's workers, mpirun's) lives in
the new namespace, whose only device is its loopback ``lo``; ranks on 127.0.0.1 talk through
``tc qdisc add dev lo root tbf rate R burst B latency L``. Needs root, ``ip`` and ``tc``
(iproute2) and the kernel's tbf qdisc; without them it stops with a message saying which.

One bucket for everything: loopback has one egress queue, so every byte any rank sends to
any other, in either direction, draws from the same bucket of ``rate``. A collective in
which each of N ranks sends ``b`` bytes therefore takes about ``N * b / rate`` on this link,
not ``b / rate`` as over N full-duplex NICs (docs/emulator.md gives the cost per collective;
``launch.cluster`` gives each node its own link, one bucket per direction).

Exit status: the command's; 128 + N when a signal N killed it; 125 when launch.link itself
fails (bad arguments, no privileges, no tc); 126/127 when the command cannot be run or
found. SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 sent to launch.link are passed
on to the command (a terminal's Ctrl-C already reaches both, and is not sent twice).
The command's environment gets ``HVDCOMP_LINK`` (the shaping as JSON, which
``bench.collectives_sweep`` records) and ``HVDCOMP_LAUNCH_COMMAND`` (this command line).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from launch import netns
from launch.netns import DEFAULT_BURST, DEFAULT_LATENCY, NetnsError, Shape

#: Exit status when launch.link itself fails (as ``env`` and ``timeout`` do).
OWN_FAILURE = 125
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
_REPO = Path(__file__).resolve().parents[1]


def shape(rate="unshaped", burst=DEFAULT_BURST, latency=DEFAULT_LATENCY) -> Shape:
    """The validated shaping of a loopback; ``shape("50mbit").rate_bytes_per_s`` is 6.25e6."""
    return netns.make_shape(rate, burst, latency, mtu=netns.LOOPBACK_MTU)


def command_in_shaped_namespace(cmd, rate="unshaped", burst=DEFAULT_BURST, latency=DEFAULT_LATENCY,
                                report_qdisc=None, python: str = sys.executable) -> list[str]:
    """The argv that runs ``cmd`` (a list of strings) on a loopback shaped as given.

    Raises ValueError for a bad rate, burst or latency before anything starts. The argv runs
    ``python -m launch.link``: start it with this repository importable (:func:`run` does).
    """
    shape(rate, burst, latency)
    if not cmd:
        raise ValueError("no command to run on the shaped link")
    extra = ["--report-qdisc", str(report_qdisc)] if report_qdisc else []
    return [python, "-m", "launch.link", "--rate", str(rate), "--burst", str(burst), "--latency", str(latency),
            *extra, "--", *map(str, cmd)]


def run(cmd, rate="unshaped", burst=DEFAULT_BURST, latency=DEFAULT_LATENCY, report_qdisc=None,
        env: dict | None = None, **subprocess_kwargs) -> subprocess.CompletedProcess:
    """Run ``cmd`` on a shaped loopback and wait: ``subprocess.run`` of
    :func:`command_in_shaped_namespace` with this repository on PYTHONPATH; keyword
    arguments (``capture_output``, ``timeout``, ``check``...) go to ``subprocess.run``."""
    argv = command_in_shaped_namespace(cmd, rate, burst, latency, report_qdisc)
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO), env.get("PYTHONPATH")]))
    return subprocess.run(argv, env=env, **subprocess_kwargs)


def unavailable_reason() -> str | None:
    """Why a shaped loopback cannot be made here (None when it can): runs ``true`` on a
    10 Mbit/s loopback the way users do, and returns the emulator's message if that fails."""
    done = run(["true"], rate="10mbit", capture_output=True, text=True)
    return None if done.returncode == 0 else (done.stderr.strip() or f"exit status {done.returncode}")


def run_forwarding_signals(cmd: list[str], env: dict) -> int:
    """Start ``cmd``, pass on the signals of FORWARDED that are sent to this process, wait;
    returns its exit status (128 + N when signal N killed it, 126/127 when it cannot start)."""
    # Blocked, the signals queue up for sigtimedwait instead of interrupting this process;
    # the child must start with them unblocked, hence the mask reset before its exec.
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED + (signal.SIGCHLD,))
    try:
        child = subprocess.Popen(cmd, env=env, preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_SETMASK, []))
    except FileNotFoundError:
        print(f"launch.link: {cmd[0]}: command not found", file=sys.stderr)
        return 127
    except PermissionError:
        print(f"launch.link: {cmd[0]}: permission denied", file=sys.stderr)
        return 126
    while child.poll() is None:
        info = signal.sigtimedwait(FORWARDED + (signal.SIGCHLD,), 0.5)
        # si_code <= 0: sent by a process (kill, killall...). A terminal's Ctrl-C comes from
        # the kernel (SI_KERNEL) to the whole foreground group, the child included already.
        if info is not None and info.si_signo != signal.SIGCHLD and info.si_code <= 0:
            child.send_signal(info.si_signo)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED + (signal.SIGCHLD,))
    return 128 - child.returncode if child.returncode < 0 else child.returncode


def stop_stragglers(grace_s: float = 2.0) -> int:
    """Stop every other process still in this process's network namespace once ``grace_s``
    has passed (the command's orphans, such as multiprocessing's resource tracker, which
    usually exit by themselves: the namespace is this run's alone); returns how many had
    to be signalled."""
    mine = os.readlink("/proc/self/ns/net")

    def others() -> list[int]:
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if int(pid) != os.getpid() and os.readlink(f"/proc/{pid}/ns/net") == mine:
                    found.append(int(pid))
            except OSError:  # gone meanwhile
                pass
        return found

    def wait_until_gone() -> list[int]:
        deadline = time.monotonic() + grace_s
        while (left := others()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return left

    signalled = wait_until_gone()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in others():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if not wait_until_gone():
            break
    return len(signalled)


def _report(path: str | None, shape_: Shape, cmd: list[str], status: int) -> None:
    stats = netns.qdisc_stats("lo") if shape_.shaped else None
    counters = netns.link_stats("lo")
    if stats:
        print(f"[launch.link] lo's tbf passed {stats['bytes']:,} B in {stats['packets']:,} packets, "
              f"{stats['drops']:,} dropped", file=sys.stderr)
    if path:
        record = {"device": "lo", "shape": shape_.to_record(), "qdisc": stats, "link": counters,
                  "command": cmd, "returncode": status}
        Path(path).write_text(json.dumps(record, indent=1))


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(OWN_FAILURE, f"{self.prog}: error: {message}\n")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = _Parser(prog="python -m launch.link", description=__doc__.split("\n\n")[0],
                usage="%(prog)s [--rate RATE] [--burst SIZE] [--latency TIME] [--report-qdisc PATH] -- CMD [ARGS...]")
    p.add_argument("--rate", default="unshaped",
                   help="tc rate of the loopback: 50mbit, 1gbit, 12500kbps; a bare number is bits/s; "
                        "'unshaped' (default) or 'none': a fresh namespace without a qdisc")
    p.add_argument("--burst", default=DEFAULT_BURST,
                   help=f"tbf bucket size (tc size; default {DEFAULT_BURST}); must hold a 64 KiB loopback frame")
    p.add_argument("--latency", default=DEFAULT_LATENCY,
                   help=f"tbf's bound on queueing time, which sizes its queue (default {DEFAULT_LATENCY}); "
                        "adds no delay")
    p.add_argument("--report-qdisc", metavar="PATH",
                   help="write the loopback's qdisc and link counters at exit to PATH (JSON)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="the command (after --)")
    args = p.parse_args(argv)
    if args.cmd[:1] == ["--"]:
        args.cmd = args.cmd[1:]
    if not args.cmd:
        p.error("no command given: python -m launch.link --rate 50mbit -- CMD [ARGS...]")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        link = shape(args.rate, args.burst, args.latency)
        netns.require_root("launch.link")
        netns.require_tools("launch.link", "ip", "tc")
        netns.unshare_network()
        netns.run_tool(["ip", "link", "set", "lo", "up"], "bring up the namespace's loopback")
        if link.shaped:
            netns.add_tbf("lo", link)
    except (ValueError, NetnsError) as err:
        print(f"launch.link: error: {err}", file=sys.stderr)
        return OWN_FAILURE
    print(f"[launch.link] new network namespace, lo {link.describe()}", file=sys.stderr)
    env = dict(os.environ)
    env["HVDCOMP_LINK"] = json.dumps({"emulator": "launch.link", "device": "lo",
                                      "shared_bucket": link.shaped, **link.to_record()})
    env.setdefault("HVDCOMP_LAUNCH_COMMAND", shlex.join(["python", "-m", "launch.link", *argv]))
    status = run_forwarding_signals(args.cmd, env)
    left = stop_stragglers()
    if left:
        print(f"[launch.link] stopped {left} process(es) the command left in the namespace", file=sys.stderr)
    try:
        _report(args.report_qdisc, link, args.cmd, status)
    except (OSError, NetnsError) as err:
        print(f"launch.link: error: cannot report the qdisc: {err}", file=sys.stderr)
        return status or OWN_FAILURE
    return status


if __name__ == "__main__":
    sys.exit(main())
