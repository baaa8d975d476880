"""An emulated multi-node cluster on one machine: one network namespace per node, slow links.

    python -m launch.cluster --nodes 2 --ranks-per-node 2 --inter-rate 50mbit --launcher horovod \\
        -- python -m bench.collectives_sweep
    python -m launch.cluster --nodes 2 --ranks-per-node 2 --inter-rate 1gbit --intra-rate unshaped \\
        --launcher torch -- python -m launch.train ...

Topology (addresses exist only inside this run's namespaces)::

    node k namespace                          bridge namespace
    ranks k*G .. k*G+G-1 --- lo (intra-rate)
                         --- eth0 10.213.0.(k+1) ==veth== n<k> --- br0 --- n<j> ==veth== eth0 of node j
                         tbf on eth0's egress (uplink)   tbf on n<k>'s egress (downlink)

Ranks of one node reach each other through their node's loopback (fast, or shaped with
``--intra-rate``); bytes between nodes leave through the node's ``eth0`` and arrive through
the bridge's port to the other node. Both ends of every veth are shaped, so each node has
one token bucket per direction, as a full-duplex NIC has: node k's uplink carries only what
k sends, its downlink only what it receives (unlike ``launch.link``'s one shared bucket).

Launchers, no ssh: ``horovod`` starts Horovod's own Gloo rendezvous server (the one
``horovodrun`` starts) inside node 0's namespace and gives each rank the ``HOROVOD_*``
variables ``horovodrun`` would (hostname ``node<k>``, so ``hvd.local_rank()``,
``hvd.cross_rank()`` and their process sets follow the emulated nodes); ``torch`` sets
``env://``'s variables as torchrun does (MASTER_ADDR = node 0's address, RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK = node index). Every rank also gets
``HVDCOMP_CLUSTER`` (the topology and shaping as JSON), ``HVDCOMP_CLUSTER_NODE`` and
``HVDCOMP_CLUSTER_IFACE`` (its node's link to the bridge, whose counters are in
/sys/class/net/<iface>/statistics inside the rank).

Namespaces are named ``hvdcomp-<pid>-<random>-…`` and removed on exit, failure, Ctrl-C and
SIGTERM; after a SIGKILL, ``python -m launch.cluster --cleanup`` removes those whose process
is gone. Exit status: 0 when every rank exits 0, else the first failure's status; 124 on
``--timeout``; 125 when the emulator itself fails (privileges, iproute2, tbf).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from launch import netns
from launch.netns import DEFAULT_BURST, DEFAULT_LATENCY, NetnsError

OWN_FAILURE = 125
TIMED_OUT = 124
NAME_PREFIX = "hvdcomp-"
NODE_IFACE = "eth0"
#: Where ``ip netns exec`` finds files it mounts over /etc inside a namespace.
NETNS_ETC = "/etc/netns"
VETH_MTU = 1500
LAUNCHERS = ("horovod", "torch")


def node_address(k: int) -> str:
    """Node k's address on the emulated network (10.213.0.0/24, private to this run)."""
    return f"10.213.0.{k + 1}"


@dataclass
class ClusterRun:
    """What :meth:`Cluster.run` returns: the overall exit status, each rank's (rank order;
    None for a rank killed after another failed or the timeout), and every output line."""

    returncode: int
    rank_returncodes: list
    timed_out: bool = False
    lines: list = field(default_factory=list)


class Cluster:
    """``nodes`` namespaces of ``ranks_per_node`` ranks, joined through a bridge namespace.

    ``with Cluster(2, 2, inter_rate="50mbit") as c: c.run(argv, launcher="horovod")`` builds
    the namespaces, runs as many jobs as asked (each :meth:`run` is one launch of all ranks),
    and removes everything on leaving the block, also on error and KeyboardInterrupt.
    Rates and sizes are tc's (see ``launch.netns``); ValueError for bad ones, NetnsError
    where this machine cannot build the cluster.
    """

    def __init__(self, nodes: int = 2, ranks_per_node: int = 1, inter_rate="unshaped", intra_rate="unshaped",
                 burst=DEFAULT_BURST, latency=DEFAULT_LATENCY):
        if not 1 <= int(nodes) <= 250 or int(ranks_per_node) < 1:
            raise ValueError(f"need 1..250 nodes and at least 1 rank per node, got {nodes} x {ranks_per_node}")
        self.nodes, self.ranks_per_node = int(nodes), int(ranks_per_node)
        self.inter = netns.make_shape(inter_rate, burst, latency, mtu=VETH_MTU)
        self.intra = netns.make_shape(intra_rate, burst, latency, mtu=netns.LOOPBACK_MTU)
        run_id = f"{NAME_PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
        self.bridge_ns = f"{run_id}-br"
        self.node_ns = [f"{run_id}-n{k}" for k in range(self.nodes)]
        self._made: list[str] = []

    @property
    def size(self) -> int:
        return self.nodes * self.ranks_per_node

    def __enter__(self) -> "Cluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        """Create the namespaces, veths, bridge and qdiscs (removed again if any step fails)."""
        netns.require_root("launch.cluster")
        netns.require_tools("launch.cluster", "ip", "tc")
        try:
            self._add_ns(self.bridge_ns)
            _ip(self.bridge_ns, "link", "add", "br0", "type", "bridge")
            _ip(self.bridge_ns, "link", "set", "br0", "up")
            for k, ns in enumerate(self.node_ns):
                self._add_ns(ns)
                _ip(self.bridge_ns, "link", "add", f"n{k}", "mtu", str(VETH_MTU), "type", "veth",
                    "peer", "name", NODE_IFACE, "mtu", str(VETH_MTU), "netns", ns)
                _ip(self.bridge_ns, "link", "set", f"n{k}", "master", "br0", "up")
                _ip(ns, "addr", "add", f"{node_address(k)}/24", "dev", NODE_IFACE)
                _ip(ns, "link", "set", NODE_IFACE, "up")
                self._write_hosts(k)
                if self.inter.shaped:
                    netns.add_tbf(NODE_IFACE, self.inter, ns)  # what node k sends
                    netns.add_tbf(f"n{k}", self.inter, self.bridge_ns)  # what node k receives
                if self.intra.shaped:
                    netns.add_tbf("lo", self.intra, ns)
        except BaseException:
            self.close()
            raise

    def _write_hosts(self, k: int) -> None:
        """Inside node k, this machine's hostname resolves to node k's address.

        ``ip netns exec`` mounts /etc/netns/<ns>/hosts over /etc/hosts. Gloo binds to the
        address the hostname resolves to wherever no interface is named, which Horovod's
        process-set contexts do (they drop HOROVOD_GLOO_IFACE); without this they would
        bind 127.0.0.1 and ranks of other nodes could not reach them.
        """
        folder = os.path.join(NETNS_ETC, self.node_ns[k])
        os.makedirs(folder, exist_ok=True)
        names = [f"{node_address(j)} node{j}" + (f" {socket.gethostname()}" if j == k else "")
                 for j in range(self.nodes)]
        with open(os.path.join(folder, "hosts"), "w") as f:
            f.write("\n".join(["127.0.0.1 localhost", *names, ""]))

    def _add_ns(self, name: str) -> None:
        netns.run_tool(["ip", "netns", "add", name], f"create network namespace {name}")
        self._made.append(name)
        _ip(name, "link", "set", "lo", "up")

    def close(self) -> None:
        """Stop every process left in this cluster's namespaces and delete them (idempotent)."""
        for name in reversed(self._made):
            remove_namespace(name)
        self._made.clear()

    def describe(self) -> str:
        return (f"{self.nodes} nodes x {self.ranks_per_node} ranks; between nodes {self.inter.describe()} per "
                f"direction; inside a node (loopback) {self.intra.describe()}")

    def to_record(self) -> dict:
        """The topology and shaping as JSON (also in each rank's ``HVDCOMP_CLUSTER``)."""
        return {"emulator": "launch.cluster", "nodes": self.nodes, "ranks_per_node": self.ranks_per_node,
                "inter": self.inter.to_record(), "intra": self.intra.to_record(),
                "inter_buckets": "one per node and direction", "intra_buckets": "one per node (shared)",
                "node_addresses": [node_address(k) for k in range(self.nodes)], "node_iface": NODE_IFACE}

    def counters(self) -> list[dict]:
        """Per node, bytes so far: ``uplink_bytes`` (sent to the bridge), ``downlink_bytes``
        (received from it), ``loopback_bytes`` (between its own ranks), and the tbf counters
        ``uplink_qdisc``/``downlink_qdisc``/``loopback_qdisc`` (None where unshaped)."""
        out = []
        for k, ns in enumerate(self.node_ns):
            out.append({
                "node": k,
                "uplink_bytes": netns.link_stats(NODE_IFACE, ns)["tx_bytes"],
                "downlink_bytes": netns.link_stats(f"n{k}", self.bridge_ns)["tx_bytes"],
                "loopback_bytes": netns.link_stats("lo", ns)["tx_bytes"],
                "uplink_qdisc": netns.qdisc_stats(NODE_IFACE, ns),
                "downlink_qdisc": netns.qdisc_stats(f"n{k}", self.bridge_ns),
                "loopback_qdisc": netns.qdisc_stats("lo", ns)})
        return out

    def run(self, argv: list[str], launcher: str = "horovod", env: dict | None = None,
            timeout: float | None = None, echo: bool = True) -> ClusterRun:
        """Run ``argv`` as every rank (``ip netns exec`` into its node) and wait.

        ``launcher`` sets the variables of ``horovod`` (Gloo rendezvous) or ``torch``
        (``env://``); ``env`` (default: this process's) is the base environment. Output lines
        are prefixed ``[node k rank r]`` and echoed unless ``echo`` is False. The first rank
        to fail, or ``timeout`` seconds, stops all the others.
        """
        if launcher not in LAUNCHERS:
            raise ValueError(f"unknown launcher {launcher!r}; expected one of {', '.join(LAUNCHERS)}")
        if not self._made:
            raise RuntimeError("the cluster is not started: use it as a context manager or call start()")
        base = dict(os.environ if env is None else env)
        base.update(PYTHONUNBUFFERED="1", HVDCOMP_CLUSTER=json.dumps(self.to_record()), HVDCOMP_CLUSTER_IFACE=NODE_IFACE)
        base.setdefault("HVDCOMP_LAUNCH_COMMAND", shlex.join(["launch.cluster", launcher, *argv]))
        rendezvous = _HorovodRendezvous(self) if launcher == "horovod" else None
        try:
            port = rendezvous.port if rendezvous else self._free_port()
            envs = [{**base, **_rank_env(self, launcher, rank, port)} for rank in range(self.size)]
            return _RankGroup(self, argv, envs, echo).wait(timeout)
        finally:
            if rendezvous:
                rendezvous.stop()

    def _free_port(self) -> int:
        def pick():
            with socket.socket() as s:
                s.bind((node_address(0), 0))
                return s.getsockname()[1]

        return netns.call_in_netns(self.node_ns[0], pick)


def _ip(ns: str, *args: str) -> None:
    netns.run_tool(["ip", "-n", ns, *args], f"set up {ns}")


def _rank_env(cluster: Cluster, launcher: str, rank: int, port: int) -> dict:
    """The variables rank ``rank`` gets from ``launcher`` (what horovodrun/torchrun would set)."""
    node, local = divmod(rank, cluster.ranks_per_node)
    common = {"HVDCOMP_CLUSTER_NODE": str(node)}
    if launcher == "horovod":
        return {**common, "HOROVOD_HOSTNAME": f"node{node}", "HOROVOD_RANK": str(rank),
                "HOROVOD_SIZE": str(cluster.size), "HOROVOD_LOCAL_RANK": str(local),
                "HOROVOD_LOCAL_SIZE": str(cluster.ranks_per_node), "HOROVOD_CROSS_RANK": str(node),
                "HOROVOD_CROSS_SIZE": str(cluster.nodes), "HOROVOD_GLOO_RENDEZVOUS_ADDR": node_address(0),
                "HOROVOD_GLOO_RENDEZVOUS_PORT": str(port), "HOROVOD_CONTROLLER": "gloo",
                "HOROVOD_CPU_OPERATIONS": "gloo", "HOROVOD_GLOO_IFACE": NODE_IFACE}
    return {**common, "MASTER_ADDR": node_address(0), "MASTER_PORT": str(port), "RANK": str(rank),
            "WORLD_SIZE": str(cluster.size), "LOCAL_RANK": str(local),
            "LOCAL_WORLD_SIZE": str(cluster.ranks_per_node), "GROUP_RANK": str(node),
            "GROUP_WORLD_SIZE": str(cluster.nodes), "ROLE_RANK": str(rank), "ROLE_WORLD_SIZE": str(cluster.size),
            "ROLE_NAME": "default", "GLOO_SOCKET_IFNAME": NODE_IFACE}


class _HorovodRendezvous:
    """Horovod's own rendezvous HTTP server (the one horovodrun starts), listening in node 0's
    namespace and told the slots of this cluster (its scopes: global, local_node<k>, cross_<l>)."""

    def __init__(self, cluster: Cluster):
        try:
            from horovod.runner.common.util.hosts import SlotInfo
            from horovod.runner.http.http_server import RendezvousServer
        except ImportError as err:
            raise NetnsError(f"the horovod launcher needs Horovod installed (bash launch/setup.sh): {err}") from None
        g, n = cluster.ranks_per_node, cluster.nodes
        slots = [SlotInfo(hostname=f"node{r // g}", rank=r, local_rank=r % g, cross_rank=r // g,
                          size=cluster.size, local_size=g, cross_size=n) for r in range(cluster.size)]
        self._server = RendezvousServer(verbose=0)
        # start() binds its socket on the calling thread: inside node 0's namespace.
        self.port = netns.call_in_netns(cluster.node_ns[0], self._server.start)
        self._server.init(slots)

    def stop(self) -> None:
        self._server.stop()
        httpd = getattr(self._server, "_httpd", None)
        if httpd is not None:  # stop() leaves the socket open, and with it node 0's namespace
            httpd.server_close()


class _RankGroup:
    """Every rank's process (in its own session, so a terminal's Ctrl-C reaches only the
    launcher, which stops them), its prefixed output, and the wait that stops all of them
    when one fails or time is up."""

    def __init__(self, cluster: Cluster, argv: list[str], envs: list[dict], echo: bool):
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._echo = echo
        self._procs: list[subprocess.Popen] = []
        self._pumps: list[threading.Thread] = []
        try:
            for rank, env in enumerate(envs):
                node = rank // cluster.ranks_per_node
                proc = subprocess.Popen(["ip", "netns", "exec", cluster.node_ns[node], *argv], env=env,
                                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        start_new_session=True)
                self._procs.append(proc)
                for stream, sink in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr)):
                    pump = threading.Thread(target=self._pump, args=(stream, f"[node {node} rank {rank}] ", sink),
                                            daemon=True)
                    pump.start()
                    self._pumps.append(pump)
        except BaseException:
            self._stop()
            raise

    def _pump(self, stream, prefix: str, sink) -> None:
        for raw in iter(stream.readline, b""):
            line = prefix + raw.decode(errors="replace").rstrip("\n")
            with self._lock:
                self.lines.append(line)
                if self._echo:
                    print(line, file=sink, flush=True)

    def wait(self, timeout: float | None) -> ClusterRun:
        deadline = None if timeout is None else time.monotonic() + timeout
        failed, timed_out = None, False
        try:
            while True:
                codes = [p.poll() for p in self._procs]
                failed = next((r for r, c in enumerate(codes) if c not in (None, 0)), None)
                if failed is not None or all(c == 0 for c in codes):
                    break
                if deadline is not None and time.monotonic() > deadline:
                    timed_out = True
                    break
                time.sleep(0.05)
        finally:
            finished = [p.returncode for p in self._procs]
            self._stop()
        for pump in self._pumps:
            pump.join(5)
        if timed_out:
            self.lines.append(f"[launch.cluster] timed out after {timeout:g} s: every rank killed")
            print(self.lines[-1], file=sys.stderr)
            status = TIMED_OUT
        elif failed is not None:
            code = finished[failed]
            status = 128 - code if code < 0 else code
            if any(c is None for c in finished):
                self.lines.append(f"[launch.cluster] rank {failed} exited with {status}: the other ranks stopped")
                print(self.lines[-1], file=sys.stderr)
        else:
            status = 0
        return ClusterRun(status, finished, timed_out, self.lines)

    def _stop(self, grace_s: float = 3.0) -> None:
        """SIGTERM to every rank's process group still running, SIGKILL after ``grace_s``."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            live = [p for p in self._procs if p.poll() is None]
            for p in live:
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace_s
            while any(p.poll() is None for p in live) and time.monotonic() < deadline:
                time.sleep(0.05)


def unavailable_reason() -> str | None:
    """Why an emulated cluster cannot be built here (None when it can): builds and removes
    two shaped nodes."""
    try:
        with Cluster(2, 1, inter_rate="10mbit", intra_rate="10mbit"):
            return None
    except NetnsError as err:
        return str(err)


def remove_namespace(name: str) -> None:
    """Kill whatever still runs in namespace ``name``, then delete it (and the veth ends in it)."""
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    shutil.rmtree(os.path.join(NETNS_ETC, name), ignore_errors=True)


def remove_stale() -> list[str]:
    """Delete the namespaces of runs whose process is gone (a SIGKILLed launch.cluster)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    stale = []
    for name in (line.split()[0] for line in out.splitlines() if line.strip()):
        match = re.fullmatch(rf"{NAME_PREFIX}(\d+)-[0-9a-f]+-(br|n\d+)", name)
        if match and not os.path.exists(f"/proc/{match.group(1)}"):
            remove_namespace(name)
            stale.append(name)
    return stale


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(OWN_FAILURE, f"{self.prog}: error: {message}\n")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = _Parser(prog="python -m launch.cluster", description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--ranks-per-node", type=int, default=1)
    p.add_argument("--inter-rate", default="unshaped", help="each node's link, each direction (tc rate: 50mbit)")
    p.add_argument("--intra-rate", default="unshaped", help="each node's loopback, shared by its ranks")
    p.add_argument("--burst", default=DEFAULT_BURST, help=f"tbf bucket of every shaped device (default {DEFAULT_BURST})")
    p.add_argument("--latency", default=DEFAULT_LATENCY, help="tbf's queueing bound (sizes its queue; adds no delay)")
    p.add_argument("--launcher", choices=LAUNCHERS, default="horovod")
    p.add_argument("--timeout", type=float, help="seconds after which every rank is killed (exit 124)")
    p.add_argument("--report-counters", metavar="PATH", help="write every node's byte counters at exit (JSON)")
    p.add_argument("--cleanup", action="store_true", help="only remove namespaces left by killed runs")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="each rank's command (after --)")
    args = p.parse_args(argv)
    args.cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not args.cmd and not args.cleanup:
        p.error("no command given: python -m launch.cluster --nodes 2 --ranks-per-node 2 -- CMD [ARGS...]")
    return args


def _raise_on_sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        if args.cleanup:
            print(f"[launch.cluster] removed {len(remove_stale())} stale namespace(s)", file=sys.stderr)
            return 0
        # SIGTERM and SIGHUP unwind like Ctrl-C, so the namespaces are removed.
        signal.signal(signal.SIGTERM, _raise_on_sigterm)
        signal.signal(signal.SIGHUP, _raise_on_sigterm)
        cluster = Cluster(args.nodes, args.ranks_per_node, args.inter_rate, args.intra_rate, args.burst, args.latency)
        env = {**os.environ, "HVDCOMP_LAUNCH_COMMAND": shlex.join(["python", "-m", "launch.cluster", *argv])}
        with cluster:
            print(f"[launch.cluster] {cluster.describe()}", file=sys.stderr)
            result = cluster.run(args.cmd, launcher=args.launcher, env=env, timeout=args.timeout)
            if args.report_counters:
                with open(args.report_counters, "w") as f:
                    json.dump({"cluster": cluster.to_record(), "counters": cluster.counters(),
                               "command": args.cmd, "returncode": result.returncode}, f, indent=1)
        return result.returncode
    except (ValueError, NetnsError) as err:
        print(f"launch.cluster: error: {err}", file=sys.stderr)
        return OWN_FAILURE
    except KeyboardInterrupt:
        print("[launch.cluster] interrupted: ranks stopped, namespaces removed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
