"""launch.link: real Horovod and torch.distributed ranks exchange over a tbf-shaped loopback.

The qdisc's byte counter proves the collective's bytes went through the bucket; no test
looks at a timing. Where namespaces cannot be made (not root, no iproute2, no tbf) the
tests that need them skip with the reason, or fail with HVDCOMP_REQUIRE_NETNS=1.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from launch import link, netns
from tests.distributed import rank_results, requires_horovod

REPO = Path(__file__).resolve().parents[1]
UNAVAILABLE = link.unavailable_reason()
requires_netns = pytest.mark.skipif(
    UNAVAILABLE is not None and os.environ.get("HVDCOMP_REQUIRE_NETNS") != "1",
    reason=f"network namespaces with tbf unavailable here: {UNAVAILABLE}")
#: Bytes each rank contributes to the checked allreduce.
ALLREDUCE_BYTES = 1 << 20

RANK_PROGRAM = """
import json, os, socket, sys
import torch
framework = sys.argv[1]
numel = int(sys.argv[2]) // 4
if framework == "horovod":
    import horovod.torch as hvd
    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    total = hvd.allreduce(torch.full((numel,), rank + 1.0), op=hvd.Sum)
else:
    import torch.distributed as dist
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    total = torch.full((numel,), rank + 1.0)
    dist.all_reduce(total)
correct = bool(torch.equal(total, torch.full((numel,), size * (size + 1) / 2)))
# A file per rank: the launchers merge the ranks' stdout, and two lines can interleave.
with open(os.path.join(sys.argv[3], f"result{rank}.json"), "w") as f:
    json.dump({"rank": rank, "size": size, "correct": correct,
               "interfaces": [name for _, name in socket.if_nameindex()],
               "link": json.loads(os.environ["HVDCOMP_LINK"])}, f)
if framework != "horovod":
    dist.barrier()
    dist.destroy_process_group()  # exiting with a live Gloo group can abort the process
"""


def _link_cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), **kwargs.pop("env", {})}
    return subprocess.run([sys.executable, "-m", "launch.link", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, **kwargs)


def _check_exchange(tmp_path: Path, launch: list[str], framework: str) -> None:
    """Two ranks allreduce ALLREDUCE_BYTES each on a 100 Mbit/s loopback: right sums, only a
    loopback in their namespace, and at least every rank's ring bytes through the tbf."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_PROGRAM)
    report = tmp_path / "qdisc.json"
    done = _link_cli("--rate", "100mbit", "--report-qdisc", str(report), "--",
                     *launch, str(script), framework, str(ALLREDUCE_BYTES), str(tmp_path), timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    results = rank_results(tmp_path)
    assert sorted(r["rank"] for r in results) == [0, 1], done.stdout
    for r in results:
        assert r["correct"] and r["size"] == 2
        assert r["interfaces"] == ["lo"]  # a namespace of its own
        assert r["link"]["rate_bytes_per_s"] == 12.5e6 and r["link"]["shared_bucket"] is True
    counters = json.loads(report.read_text())
    assert counters["qdisc"]["kind"] == "tbf"
    assert counters["shape"]["rate_bits_per_s"] == 100e6
    # Ring allreduce: each of N ranks sends 2 (N-1)/N S, all of it through lo's one bucket.
    assert counters["qdisc"]["bytes"] >= 2 * (2 * (2 - 1) / 2 * ALLREDUCE_BYTES)
    assert "tbf rate 100 Mbit/s" in done.stderr


@requires_netns
@requires_horovod
def test_horovodrun_ranks_allreduce_through_the_shaped_loopback(tmp_path):
    horovodrun = Path(sys.executable).with_name("horovodrun")
    _check_exchange(tmp_path, [str(horovodrun), "-np", "2", "-H", "localhost:2", "--gloo", sys.executable],
                    "horovod")


@requires_netns
def test_torchrun_ranks_allreduce_through_the_shaped_loopback(tmp_path):
    _check_exchange(tmp_path, [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                               "--master-addr", "127.0.0.1", "--master-port", "29533"], "torch")


@requires_netns
def test_exit_status_and_forwarded_signal_reach_the_caller(tmp_path):
    assert _link_cli("--rate", "unshaped", "--", "sh", "-c", "exit 3").returncode == 3
    assert _link_cli("--", "no-such-command-hvdcomp").returncode == 127
    # The command turns SIGTERM into exit status 7: 7 comes back only if launch.link passed it on.
    child = ("import signal, sys, time\n"
             "signal.signal(signal.SIGTERM, lambda *a: sys.exit(7))\n"
             "print('ready', flush=True)\n"
             "time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-m", "launch.link", "--rate", "10mbit", "--", sys.executable, "-c", child],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 7
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("args, message", [
    (["--rate", "fast"], "cannot read rate 'fast'"),
    (["--rate=-5mbit"], "cannot read rate"),
    (["--rate", "0mbit"], "must be positive"),
    (["--rate", "50mbit", "--burst", "64kb"], "burst '64kb' (65,536 B) is too small"),
    (["--rate", "50mbit", "--burst", "lots"], "cannot read size 'lots'"),
    (["--rate", "50mbit", "--latency", "0ms"], "latency '0ms' must be positive"),
])
def test_bad_shaping_stops_with_a_clear_message_before_anything_runs(args, message, tmp_path):
    marker = tmp_path / "ran"
    done = _link_cli(*args, "--", "touch", str(marker))
    assert done.returncode == link.OWN_FAILURE
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not marker.exists()


def test_no_command_is_a_usage_error():
    done = _link_cli("--rate", "50mbit")
    assert done.returncode == link.OWN_FAILURE and "no command given" in done.stderr


def test_missing_tc_gives_the_clear_message(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ip").symlink_to("/bin/true")  # `ip` present, `tc` absent from PATH
    done = _link_cli("--rate", "50mbit", "--", "true", env={"PATH": str(bin_dir)})
    assert done.returncode == link.OWN_FAILURE
    assert "needs `tc` (iproute2), not found on PATH" in done.stderr and "Traceback" not in done.stderr


def test_without_root_it_refuses_before_touching_the_network():
    code = ("import os, sys; os.geteuid = lambda: 1000\n"
            "from launch import link\n"
            "sys.exit(link.main(['--rate', '50mbit', '--', 'true']))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == link.OWN_FAILURE
    assert "needs root" in done.stderr and "Traceback" not in done.stderr


def test_rates_sizes_and_times_read_as_tc_reads_them():
    assert netns.parse_rate("200mbit") == 200e6
    assert netns.parse_rate("1gbit") == 1e9
    assert netns.parse_rate("1000") == 1000  # a bare number is bits/s, as in tc
    assert netns.parse_rate("2mbps") == 16e6  # bytes/s
    assert netns.parse_rate("1mibit") == 2**20
    assert netns.parse_rate("unshaped") is None and netns.parse_rate("None") is None
    assert netns.parse_size("256kb") == 262144 and netns.parse_size("1500") == 1500
    assert netns.parse_time("100ms") == pytest.approx(0.1) and netns.parse_time("2s") == 2.0
    shape = link.shape("50mbit")
    assert shape.rate_bytes_per_s == 6.25e6 and shape.burst_bytes == 262144
    assert shape.tbf_args() == ["tbf", "rate", "50000000bit", "burst", "262144b", "latency", "100000us"]
    assert link.shape("unshaped").rate_bytes_per_s is None


def test_api_builds_the_command_and_validates_first():
    argv = link.command_in_shaped_namespace(["horovodrun", "-np", "2"], rate="200mbit", report_qdisc="/tmp/q.json")
    assert argv[1:3] == ["-m", "launch.link"]
    assert argv[argv.index("--rate") + 1] == "200mbit" and argv[argv.index("--") + 1:] == ["horovodrun", "-np", "2"]
    with pytest.raises(ValueError, match="too small"):
        link.command_in_shaped_namespace(["true"], rate="200mbit", burst="32kb")
    with pytest.raises(ValueError, match="no command"):
        link.command_in_shaped_namespace([], rate="200mbit")
