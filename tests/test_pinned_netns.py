"""A restarted node keeps every connection: real `lbnode` processes on the single-node lab, whose
maps are pinned in bpffs (bpf/pinned.py). Stopped with --keep-forwarding and started again with
a backend added, then killed with -9 and started again: 300+ long-lived connections checked byte
by byte lose nothing. Two nodes on `eth0` in two namespaces never see each other's pins; plain
`lbnode stop` and `lbnode cleanup` leave nothing behind."""
from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bpf.loader import attached_program_id
from examples.lab.ecmp import Load
from examples.lab.hosts import ECHO_PORT, HTTP_PORT, REPO, add_host
from examples.lab.netns import read_line, wait_until
from examples.lab.single_node import VIP4, SingleNodeLab, node_status, running_lab

pytestmark = pytest.mark.netns

LONG = 300
CONFIG = """
xdp: native
drain_s: 0.2
services:
  - name: web
    vips: [{vip}]
    ports: [{http}, {echo}]
    need: 1
    checks: [{{kind: tcp, interval_ms: 200, timeout_ms: 150, rise: 1, fall: 2}}]
    backends:
{backends}
"""


def config_text(addresses: list[str]) -> str:
    lines = "\n".join(f"      - {{address: {a}}}" for a in addresses)
    return CONFIG.format(vip=VIP4, http=HTTP_PORT, echo=ECHO_PORT, backends=lines)


class SingleLoad(Load):
    """examples/lab/loadgen.py in the single-node lab's client namespace."""

    def __init__(self, single: SingleNodeLab, long: int) -> None:
        self.proc = single.lab.spawn(single.client.ns, sys.executable, "-m", "examples.lab.loadgen", str(VIP4),
                                     "--echo-port", str(ECHO_PORT), "--http-port", str(HTTP_PORT),
                                     "--long", str(long), "--short-rate", "5", "--interval-ms", "200",
                                     "--max-s", "900", cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        line = read_line(self.proc, timeout_s=120)
        if line != "ready":
            raise RuntimeError(f"loadgen: {line}")


@pytest.fixture
def lab() -> Iterator[SingleNodeLab]:
    with running_lab("lbp", backends=4) as single:
        yield single


def serving_in_hash(sock: Path, count: int) -> dict[str, Any] | None:
    """The status once the node serves with `count` backends in the hash of every service."""
    snap = node_status(sock)
    if snap is None or snap["node"]["state"] != "serving":
        return None
    ok = all(sum(b["in_hash"] for b in s["backends"]) == count for s in snap["services"])
    return snap if ok else None


def wait_serving(sock: Path, count: int, what: str) -> dict[str, Any]:
    snap = wait_until(lambda: serving_in_hash(sock, count), timeout_s=60, what=what)
    assert snap is not None
    return snap


def lbnode(single: SingleNodeLab, ns: str, *args: str) -> subprocess.CompletedProcess[str]:
    return single.lab.ns_run(ns, sys.executable, "-m", "cluster.cli", *args, check=False, timeout_s=90)


def all_echo_again(load: Load, alive: int) -> dict[str, Any]:
    """Every connection echoes again after the mark; returns the report."""
    load.report("mark")
    wait_until(lambda: load.report()["long"]["min_echoed_since_mark"] >= 3, timeout_s=60,
               interval_s=0.5, what="every long connection echoing again")
    report = load.report()
    assert report["long"]["lost"] == {} and report["long"]["alive"] == alive, report["long"]
    return report


def test_restarts_keep_every_connection(lab: SingleNodeLab, tmp_path: Path) -> None:
    addresses = [b.ip4 for b in lab.backends]
    config = tmp_path / "node.yaml"
    config.write_text(config_text(addresses[:3]))
    sock = tmp_path / "status.sock"
    node = lab.start_node(config, sock)
    first = wait_serving(sock, 3, "the first node serving")
    pins = Path(first["node"]["pins"]["dir"])
    assert pins.is_dir() and first["node"]["pins"]["note"] == "no pinned state"
    assert 0 < first["process"]["rss_bytes"] < 80 * 2**20, first["process"]  # no bcc / LLVM in the node
    mapped = Path(f"/proc/{node.pid}/maps").read_text()
    assert "libbcc" not in mapped and "libLLVM" not in mapped and "libclang" not in mapped
    load = SingleLoad(lab, LONG)
    try:
        assert load.report()["long"]["alive"] == LONG

        # 1. Stop for an upgrade: the program keeps forwarding with the pinned maps; the next
        # node, whose config adds b4, adopts them and replaces the program in place.
        stopped = lbnode(lab, lab.node.ns, "stop", "--if", "eth0", "--keep-forwarding")
        assert stopped.returncode == 0, stopped.stderr
        assert node.wait(timeout=30) == 0
        left = attached_program_id("eth0", netns=lab.node.ns)
        assert left != 0 and pins.is_dir()
        config.write_text(config_text(addresses))
        node = lab.start_node(config, sock)
        second = wait_serving(sock, 4, "the restarted node with b4")
        assert second["node"]["pins"]["adopted_flows"] >= LONG and second["node"]["pins"]["note"] is None
        assert attached_program_id("eth0", netns=lab.node.ns) not in (0, left)
        all_echo_again(load, LONG)
        opened = load.report("open 60")  # new connections now reach b4 too
        assert opened["long"]["alive"] == LONG + 60 and opened["long"]["by_backend"].get("b4", 0) > 0, opened["long"]

        # 2. Killed with -9: the program stays attached; the next node finds the maps again.
        node.send_signal(signal.SIGKILL)
        node.wait(timeout=10)
        assert attached_program_id("eth0", netns=lab.node.ns) != 0 and pins.is_dir()
        node = lab.start_node(config, sock)
        third = wait_serving(sock, 4, "the node after kill -9")
        assert third["node"]["pins"]["adopted_flows"] >= LONG + 60
        refused = lbnode(lab, lab.node.ns, "cleanup", "--if", "eth0")
        assert refused.returncode == 2 and "a node runs on eth0" in refused.stderr
        report = all_echo_again(load, LONG + 60)
        assert sum(report["long"]["by_backend"].values()) == LONG + 60
        print(f"\nrestarts: kept={report['long']['alive']} lost={sum(report['long']['lost'].values())} "
              f"max_stall_ms={report['long']['max_stall_ms']} short_failed={report['short']['failed']} "
              f"node_rss_mb={third['process']['rss_bytes'] / 2**20:.1f}")

        # 3. A plain stop drains, detaches and removes the pins: nothing is left.
        stopped = lbnode(lab, lab.node.ns, "stop", "--if", "eth0")
        assert stopped.returncode == 0, stopped.stderr
        assert node.wait(timeout=30) == 0
        assert attached_program_id("eth0", netns=lab.node.ns) == 0 and not pins.exists()
    finally:
        load.stop()


def test_namespaces_never_share_pins_and_cleanup_removes_them(lab: SingleNodeLab, tmp_path: Path) -> None:
    other = add_host(lab.lab, lab.sw, "other", "10.99.0.40", "fd00:99::40")  # not bridged: no traffic
    config = tmp_path / "node.yaml"
    config.write_text(config_text([b.ip4 for b in lab.backends]))
    socks = {lab.node.ns: tmp_path / "a.sock", other.ns: tmp_path / "b.sock"}
    nodes = {lab.node.ns: lab.start_node(config, socks[lab.node.ns]),
             other.ns: lab.lab.spawn(other.ns, sys.executable, "-m", "cluster.cli", "--ip", other.ip4, "--if", "eth0",
                                     "--config", str(config), "--status-socket", str(socks[other.ns]), cwd=REPO)}

    def pin_dir(ns: str) -> Path | None:
        snap = node_status(socks[ns])
        return Path(snap["node"]["pins"]["dir"]) if snap and snap["node"]["state"] == "serving" else None

    dirs: dict[str, Path] = {}
    for ns in nodes:
        found = wait_until(lambda ns=ns: pin_dir(ns), timeout_s=60, what=f"the node in {ns} serving")  # type: ignore[misc]
        assert found is not None
        dirs[ns] = found
    assert dirs[lab.node.ns] != dirs[other.ns] and dirs[lab.node.ns].name.endswith("-eth0")
    for proc in nodes.values():  # both leave their pins and programs behind
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    assert all(d.is_dir() for d in dirs.values())

    done = lbnode(lab, other.ns, "cleanup")  # every interface of *its* namespace only
    assert done.returncode == 0 and "detached program id" in done.stdout, (done.stdout, done.stderr)
    assert not dirs[other.ns].exists() and dirs[lab.node.ns].is_dir()
    assert attached_program_id("eth0", netns=other.ns) == 0
    assert attached_program_id("eth0", netns=lab.node.ns) != 0
    done = lbnode(lab, lab.node.ns, "cleanup", "--if", "eth0")
    assert done.returncode == 0 and not dirs[lab.node.ns].exists(), (done.stdout, done.stderr)
    assert attached_program_id("eth0", netns=lab.node.ns) == 0
