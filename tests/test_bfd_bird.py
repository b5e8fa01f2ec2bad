"""BFD against BIRD 2 in namespaces: a frozen or unplugged node leaves the router's ECMP route in < 1 s.

Lab: a router namespace with a bridge (10.0.0.254) and two node namespaces (10.0.0.1, 10.0.0.2),
each running `python -m bgp` with `bfd: {interval_ms: 100, multiplier: 3}` towards the router.
BIRD runs examples/bird-bfd.conf verbatim (plus a debug line). BGP hold time is 3 s, so anything
well under that is BFD's doing; the bound asserted is 1 s, typically it is about 0.3 s.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from examples.lab.netns import Lab, wait_until
from tests.speaker_control import speaker_status

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parent.parent
VIP = "192.0.2.10/32"
NODES = {"n1": ("10.0.0.1", 4200000001), "n2": ("10.0.0.2", 4200000002)}
DETECT_BOUND_S = 1.0  # the bound at 100 ms x 3; typically ~0.3 s


class BfdLab:
    def __init__(self, lab: Lab, tmp: Path) -> None:
        self.lab, self.tmp = lab, tmp
        self.router = lab.netns("r")
        self.ns = {name: lab.netns(name) for name in NODES}
        for i, (name, (ip4, _)) in enumerate(NODES.items(), 1):
            lab.veth(self.router, f"p{i}", self.ns[name], "eth0")
            lab.addr(self.ns[name], "eth0", f"{ip4}/24")
        lab.bridge(self.router, "br0", ["p1", "p2"])
        lab.addr(self.router, "br0", "10.0.0.254/24")
        self.speakers: dict[str, subprocess.Popen[bytes]] = {}
        text = (REPO / "examples" / "bird-bfd.conf").read_text()
        assert "log stderr all;" in text
        conf = tmp / "bird.conf"
        conf.write_text(text.replace("log stderr all;", "log stderr all;\ndebug protocols { states };"))
        self.sock = str(tmp / "bird.ctl")
        with open(tmp / "bird.log", "ab") as log:
            lab.spawn(self.router, "bird", "-f", "-c", str(conf), "-s", self.sock, stdout=log, stderr=log)
        wait_until(lambda: self.birdc("show status").returncode == 0, timeout_s=10, what="bird control socket")

    def speaker(self, name: str) -> None:
        ip4, asn = NODES[name]
        cfg = {"local_as": asn, "router_id": ip4, "next_hop_v4": ip4,
               "peers": [{"address": "10.0.0.254", "asn": 65000, "hold_time_s": 3, "connect_retry_s": 1,
                          "bfd": {"interval_ms": 100, "multiplier": 3}}],
               "announce": [{"prefix": VIP}]}
        path = self.tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        with open(self.tmp / f"{name}.log", "ab") as log:
            self.speakers[name] = self.lab.spawn(
                self.ns[name], sys.executable, "-m", "bgp", str(path), "--control-stdin", "--log-level", "DEBUG",
                stdin=subprocess.PIPE, stdout=log, stderr=log, cwd=str(REPO))

    def status(self, name: str) -> dict[str, Any]:
        """The speaker's `status` answer (one JSON line in its log)."""
        return speaker_status(self.speakers[name], self.tmp / f"{name}.log", name)

    def birdc(self, cmd: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["birdc", "-s", self.sock, *cmd.split()], capture_output=True, text=True, timeout=10)

    def bfd_sessions(self) -> dict[str, str]:
        """BIRD's BFD session state per neighbour address."""
        out = self.birdc("show bfd sessions").stdout
        return {m.group(1): m.group(2) for m in re.finditer(r"^(\d+\.\d+\.\d+\.\d+)\s+\S+\s+(\w+)", out, re.M)}

    def kernel(self) -> list[str]:
        out = self.lab.ns_run(self.router, "ip", "-4", "route", "show", VIP.split("/")[0]).stdout
        return sorted(re.findall(r"via (\S+)", out))

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}"
                         for p in sorted(self.tmp.glob("*.log")))


@pytest.fixture
def net(tmp_path: Path) -> Iterator[BfdLab]:
    with Lab(prefix="lbbfd") as lab:
        net = BfdLab(lab, tmp_path)
        try:
            yield net
        finally:
            for proc in net.speakers.values():  # a frozen speaker must be able to die on SIGTERM
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGCONT)


def timed_until(predicate: Any, *, timeout_s: float, what: str) -> float:
    t0 = time.monotonic()
    wait_until(predicate, timeout_s=timeout_s, interval_s=0.01, what=what)
    return time.monotonic() - t0


def test_bird_bfd_up_then_frozen_and_unplugged_nodes_leave_the_route_in_under_a_second(net: BfdLab) -> None:
    try:
        net.speaker("n1")
        net.speaker("n2")
        both = ["10.0.0.1", "10.0.0.2"]
        wait_until(lambda: net.kernel() == both, timeout_s=20, what="ECMP route via both nodes")
        wait_until(lambda: net.bfd_sessions() == {"10.0.0.1": "Up", "10.0.0.2": "Up"}, timeout_s=10,
                   what="BIRD's BFD sessions Up")
        for name in NODES:
            (peer,) = wait_until(lambda name=name: [p for p in net.status(name)["peers"]
                                                    if p["bfd"]["remote_state"] == "UP"],
                                 timeout_s=5, what=f"{name}'s BFD Up")
            assert peer["state"] == "Established" and peer["bfd"]["state"] == "UP"
            assert peer["bfd"]["tx_interval_ms"] == 100 and peer["bfd"]["detection_time_ms"] == 300

        # Frozen node (SIGSTOP): its BFD packets stop, BIRD's session times out after 3 x 100 ms and
        # BIRD drops the BGP session (hold time 3 s would take ten times longer).
        net.lab.ns_run(net.router, "true")  # warm up `ip netns exec` before timing
        t0 = time.monotonic()
        os.killpg(net.speakers["n1"].pid, signal.SIGSTOP)
        wait_until(lambda: net.kernel() == ["10.0.0.2"], timeout_s=5, interval_s=0.01, what="n1 gone after SIGSTOP")
        frozen_s = time.monotonic() - t0
        assert net.bfd_sessions().get("10.0.0.1") == "Down"
        os.killpg(net.speakers["n1"].pid, signal.SIGCONT)
        thawed_s = timed_until(lambda: net.kernel() == both, timeout_s=20, what="n1 back after SIGCONT")

        # Unplugged node: its link goes down. BIRD's BFD times out the same way; the node's own BFD
        # notices too and tears its BGP session down (Cease 6/10, undeliverable).
        t0 = time.monotonic()
        net.lab.ns_run(net.ns["n2"], "ip", "link", "set", "eth0", "down")
        wait_until(lambda: net.kernel() == ["10.0.0.1"], timeout_s=5, interval_s=0.01, what="n2 gone after link down")
        unplugged_s = time.monotonic() - t0
        (peer,) = wait_until(lambda: [p for p in net.status("n2")["peers"] if p["bfd"]["failures"] >= 1],
                             timeout_s=5, what="n2's own BFD failure")
        assert peer["bfd_downs"] == 1 and peer["state"] != "Established"
        net.lab.ns_run(net.ns["n2"], "ip", "link", "set", "eth0", "up")
        restored_s = timed_until(lambda: net.kernel() == both, timeout_s=20, what="n2 back after link up")
        # BIRD does not hold BGP back until BFD is Up, so the route may return first.
        (peer,) = wait_until(lambda: [p for p in net.status("n2")["peers"] if p["bfd"]["state"] == "UP"],
                             timeout_s=10, what="n2's BFD Up again")
        assert peer["bfd"]["up_transitions"] == 2 and peer["state"] == "Established"
        assert peer["bfd"]["interface"] == "eth0"  # SO_BINDTODEVICE, resolved inside n2
        assert net.status("n1")["bfd_drops"] == {}

        # The interface goes away and comes back as a new device: n2's BFD rebinds and is Up by itself.
        ifindex = lambda: int(net.lab.ns_run(net.ns["n2"], "cat", "/sys/class/net/eth0/ifindex").stdout)  # noqa: E731
        old_index = ifindex()
        net.lab.ns_run(net.ns["n2"], "ip", "link", "del", "eth0")  # takes the router's p2 with it
        wait_until(lambda: net.kernel() == ["10.0.0.1"], timeout_s=5, interval_s=0.01, what="n2 gone with its eth0")
        wait_until(lambda: [p for p in net.status("n2")["peers"] if p["bfd"]["failures"] >= 2],
                   timeout_s=5, what="n2's own BFD failure with eth0 deleted")
        net.lab.veth(net.router, "p2", net.ns["n2"], "eth0")
        net.lab.ns_run(net.router, "ip", "link", "set", "p2", "master", "br0")
        net.lab.addr(net.ns["n2"], "eth0", "10.0.0.2/24")
        new_index = ifindex()
        recreated_s = timed_until(lambda: net.kernel() == both, timeout_s=20, what="n2 back on a new eth0")
        (peer,) = wait_until(lambda: [p for p in net.status("n2")["peers"] if p["bfd"]["state"] == "UP"
                                      and p["state"] == "Established"],
                             timeout_s=10, what="n2's BFD Up on the new eth0")
        assert peer["bfd"]["up_transitions"] == 3 and peer["bfd"]["interface"] == "eth0"
        assert peer["bfd"]["interface_changes"] == (1 if new_index != old_index else 0)
        drops = net.status("n2")["bfd_drops"]  # packets that beat the new route's lookup may be dropped
        assert set(drops) <= {"wrong_interface"}, drops

        print(f"\nBFD 100 ms x 3 against BIRD: SIGSTOP -> next hop gone in {frozen_s * 1000:.0f} ms, "
              f"SIGCONT -> back in {thawed_s:.2f} s; link down -> gone in {unplugged_s * 1000:.0f} ms, "
              f"link up -> back in {restored_s:.2f} s; eth0 recreated (index {old_index} -> {new_index}) -> "
              f"back in {recreated_s:.2f} s ({drops.get('wrong_interface', 0)} BFD packets before the rebind)")
        assert frozen_s < DETECT_BOUND_S and unplugged_s < DETECT_BOUND_S
    except BaseException:
        print(net.logs())
        raise
