"""The speaker against real routers in namespaces: BIRD 2 (ECMP into the kernel) and GoBGP.

Lab: one router namespace with a bridge (10.0.0.254, 2001:db8::fe) and two node namespaces
(10.0.0.1 / 2001:db8::1 and 10.0.0.2 / 2001:db8::2), each running `python -m bgp` as a process
(SIGKILL and SIGTERM are real). The router configs are examples/bird.conf, examples/bird-ibgp.conf
and examples/gobgpd.toml, used verbatim.
"""
from __future__ import annotations

import json
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
EXAMPLES = REPO / "examples"
VIP, VIP6 = "192.0.2.10/32", "2001:db8:f::10/128"
NODES = {"n1": ("10.0.0.1", "2001:db8::1"), "n2": ("10.0.0.2", "2001:db8::2")}


class Net:
    """Router + two nodes on one bridge; processes and namespaces owned by the Lab."""

    def __init__(self, lab: Lab, tmp: Path) -> None:
        self.lab, self.tmp = lab, tmp
        self.router = lab.netns("r")
        self.ns = {name: lab.netns(name) for name in NODES}
        ports = []
        for i, (name, (ip4, ip6)) in enumerate(NODES.items(), 1):
            lab.veth(self.router, f"p{i}", self.ns[name], "eth0")
            ports.append(f"p{i}")
            lab.addr(self.ns[name], "eth0", f"{ip4}/24")
            lab.ns_run(self.ns[name], "ip", "addr", "add", f"{ip6}/64", "dev", "eth0", "nodad")
        lab.bridge(self.router, "br0", ports)
        lab.addr(self.router, "br0", "10.0.0.254/24")
        lab.ns_run(self.router, "ip", "addr", "add", "2001:db8::fe/64", "dev", "br0", "nodad")
        lab.ns_run(self.router, "sysctl", "-qw", "net.ipv4.fib_multipath_hash_policy=1")
        self.speakers: dict[str, subprocess.Popen[bytes]] = {}

    def link_local(self, name: str) -> str:
        def find() -> str:
            out = self.lab.ns_run(self.ns[name], "ip", "-6", "-o", "addr", "show", "dev", "eth0",
                                  "scope", "link").stdout
            return out.split()[3].split("/")[0] if out.strip() else ""
        return wait_until(find, timeout_s=5, what=f"{name} link-local address")

    def speaker(self, name: str, *, local_as: int, peer: dict, graceful_s: float = 0.0, listen: bool = False,
                announce: tuple[str, ...] = (VIP,), link_local: str | None = None) -> subprocess.Popen[bytes]:
        ip4, ip6 = NODES[name]
        cfg = {**({"next_hop_v6_link_local": link_local} if link_local else {}),
               "local_as": local_as, "router_id": ip4, "next_hop_v4": ip4, "next_hop_v6": ip6,
               "listen": listen, "graceful_shutdown_wait_s": graceful_s,
               "peers": [{"address": "10.0.0.254", "hold_time_s": 3, "connect_retry_s": 1, **peer}],
               "announce": [{"prefix": p} for p in announce]}
        path = self.tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        log = open(self.tmp / f"{name}.log", "ab")
        proc = self.lab.spawn(self.ns[name], sys.executable, "-m", "bgp", str(path), "--control-stdin",
                              "--log-level", "DEBUG", stdin=subprocess.PIPE, stdout=log, stderr=log, cwd=str(REPO))
        log.close()
        self.speakers[name] = proc
        return proc

    def command(self, name: str, line: str) -> None:
        proc = self.speakers[name]
        assert proc.stdin is not None
        proc.stdin.write(line.encode() + b"\n")
        proc.stdin.flush()

    def status(self, name: str) -> dict[str, Any]:
        return speaker_status(self.speakers[name], self.tmp / f"{name}.log", name)

    def kill(self, name: str, sig: signal.Signals) -> None:
        os.killpg(self.speakers[name].pid, sig)


class Bird:
    def __init__(self, net: Net, conf: Path) -> None:
        self.net = net
        # The example config as is, plus protocol debug output (session states, route changes).
        conf_debug = net.tmp / "bird.conf"
        text = conf.read_text()
        assert "log stderr all;" in text
        conf_debug.write_text(text.replace("log stderr all;", "log stderr all;\ndebug protocols { states, routes };"))
        conf = conf_debug
        self.sock = str(net.tmp / "bird.ctl")
        self.logfile = net.tmp / "bird.log"
        log = open(self.logfile, "ab")
        net.lab.spawn(net.router, "bird", "-f", "-c", str(conf), "-s", self.sock, stdout=log, stderr=log)
        log.close()
        wait_until(lambda: self.birdc("show status").returncode == 0, timeout_s=10, what="bird control socket")

    def birdc(self, cmd: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["birdc", "-s", self.sock, *cmd.split()], capture_output=True, text=True, timeout=10)

    def state(self, proto: str) -> str:
        out = self.birdc(f"show protocols {proto}").stdout
        line = next((ln for ln in out.splitlines() if ln.startswith(proto)), "")
        return line.split()[-1] if line else ""

    def routes(self, prefix: str) -> str:
        return self.birdc(f"show route {prefix} all").stdout

    def kernel(self, prefix: str) -> list[str]:
        """Next hops of `prefix` in the router namespace's kernel table."""
        out = self.net.lab.ns_run(self.net.router, "ip", "-6" if ":" in prefix else "-4", "route", "show",
                                  prefix.split("/")[0]).stdout
        return sorted(re.findall(r"via (\S+)", out))


def tcp_ext(net: Net, ns: str) -> dict[str, int]:
    """The TcpExt counters of /proc/net/netstat inside `ns`."""
    lines = [ln.split() for ln in net.lab.ns_run(ns, "cat", "/proc/net/netstat").stdout.splitlines()
             if ln.startswith("TcpExt:")]
    return {k: int(v) for k, v in zip(lines[0][1:], lines[1][1:], strict=True)}


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Net]:
    with Lab(prefix="lbbgp") as lab:
        yield Net(lab, tmp_path)


def _dump_logs_on_failure(net: Net) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(net.tmp.glob("*.log")))


def test_bird_ebgp_four_octet_as_ecmp_withdraw_kill_and_graceful_shutdown(net: Net) -> None:
    bird = Bird(net, EXAMPLES / "bird.conf")
    try:
        n1_ll = net.link_local("n1")
        net.speaker("n1", local_as=4200000001, peer={"asn": 65000}, graceful_s=1.0, announce=(VIP, VIP6),
                    link_local=n1_ll)
        net.speaker("n2", local_as=4200000002, peer={"asn": 65000}, announce=(VIP, VIP6))
        for proto in ("node1", "node2"):
            wait_until(lambda proto=proto: bird.state(proto) == "Established", timeout_s=15,
                       what=f"{proto} Established")
        # Both nodes' routes merged into one multipath kernel route.
        wait_until(lambda: bird.kernel(VIP) == ["10.0.0.1", "10.0.0.2"], timeout_s=10, what="ECMP route")
        routes = bird.routes(VIP)
        assert "BGP.as_path: 4200000001" in routes and "BGP.as_path: 4200000002" in routes
        wait_until(lambda: bird.kernel(VIP6) == ["2001:db8::1", "2001:db8::2"], timeout_s=10, what="IPv6 ECMP")
        # RFC 2545: n1 also sends its link-local next hop (32-byte MP_REACH next hop), n2 only the global one.
        routes6 = bird.routes(VIP6)
        assert f"BGP.next_hop: 2001:db8::1 {n1_ll}" in routes6 and "BGP.next_hop: 2001:db8::2\n" in routes6

        net.command("n1", f"withdraw {VIP}")
        wait_until(lambda: bird.kernel(VIP) == ["10.0.0.2"], timeout_s=5, what="withdraw of n1's path")
        net.command("n1", f"announce {VIP}")
        wait_until(lambda: bird.kernel(VIP) == ["10.0.0.1", "10.0.0.2"], timeout_s=5, what="re-announce")

        t0 = time.monotonic()
        net.kill("n2", signal.SIGKILL)  # FIN from the kernel: the router drops n2 at once
        wait_until(lambda: bird.kernel(VIP) == ["10.0.0.1"], timeout_s=5, what="n2's path gone after SIGKILL")
        killed_s = time.monotonic() - t0
        print(f"\nSIGKILL -> kernel route updated in {killed_s * 1000:.0f} ms")
        assert killed_s < 2.0

        # Graceful shutdown: routes tagged 65535:0 (BIRD's filter drops their preference), then
        # withdrawn, then Cease/Administrative Shutdown.
        t0 = time.monotonic()
        net.kill("n1", signal.SIGTERM)
        wait_until(lambda: "(65535,0)" in bird.routes(VIP), timeout_s=3, what="GRACEFUL_SHUTDOWN community")
        wait_until(lambda: bird.kernel(VIP) == [], timeout_s=5, what="route withdrawn")
        assert net.speakers["n1"].wait(timeout=10) == 0
        drained_s = time.monotonic() - t0
        print(f"graceful shutdown -> route gone after {drained_s * 1000:.0f} ms (wait 1 s)")
        assert drained_s >= 1.0
        wait_until(lambda: "Administrative shutdown" in bird.birdc("show protocols all node1").stdout,
                   timeout_s=5, what="Cease/Administrative Shutdown at BIRD")
        # The withdrawal reached BIRD over the live session, before the NOTIFICATION closed it.
        log = bird.logfile.read_text()
        removed = log.rfind("node1.ipv4 > removed [sole] 192.0.2.10/32")
        ceased = log.find("node1: Received: Administrative shutdown")
        assert 0 <= removed < ceased, log
    except BaseException:
        print(_dump_logs_on_failure(net))
        raise


def test_bird_drops_a_silent_node_at_hold_expiry_and_takes_it_back(net: Net) -> None:
    bird = Bird(net, EXAMPLES / "bird.conf")
    try:
        net.speaker("n1", local_as=4200000001, peer={"asn": 65000})
        wait_until(lambda: bird.kernel(VIP) == ["10.0.0.1"], timeout_s=15, what="route via n1")
        t0 = time.monotonic()
        net.kill("n1", signal.SIGSTOP)  # no FIN: only the hold timer (3 s) can notice
        wait_until(lambda: bird.kernel(VIP) == [], timeout_s=10, interval_s=0.02, what="hold-time expiry")
        silent_s = time.monotonic() - t0
        print(f"\nSIGSTOP -> route gone after {silent_s:.2f} s (hold time 3 s)")
        assert 2.0 <= silent_s <= 8.0
        t0 = time.monotonic()
        net.kill("n1", signal.SIGCONT)  # the speaker finds its session dead and reconnects
        wait_until(lambda: bird.kernel(VIP) == ["10.0.0.1"], timeout_s=20, what="n1 taken back")
        print(f"SIGCONT -> route back after {time.monotonic() - t0:.2f} s (error wait time 1 s)")
    except BaseException:
        print(_dump_logs_on_failure(net))
        raise


def test_bird_ibgp_md5_ecmp_and_wrong_password(net: Net) -> None:
    bird = Bird(net, EXAMPLES / "bird-ibgp.conf")
    try:
        # n1: right password, also listening (BIRD connects to it too: collisions get resolved).
        net.speaker("n1", local_as=65000, peer={"asn": 65000, "md5_password": "lab-md5-secret"}, listen=True)
        net.speaker("n2", local_as=65000, peer={"asn": 65000, "md5_password": "wrong"})
        wait_until(lambda: bird.state("node1") == "Established", timeout_s=15, what="node1 Established")
        wait_until(lambda: bird.kernel(VIP) == ["10.0.0.1"], timeout_s=10, what="iBGP route in kernel")
        assert "BGP.local_pref: 100" in bird.routes(VIP)
        # The wrong key never gets a session: the router's kernel drops n2's SYNs (and BIRD's
        # towards n2, which carry no or another key) as MD5 failures, repeatedly.
        wait_until(lambda: tcp_ext(net, net.router)["TCPMD5Failure"] >= 2, timeout_s=10, what="MD5 failures")
        assert bird.state("node2") != "Established"
        (n2_peer,) = net.status("n2")["peers"]
        assert n2_peer["established_count"] == 0 and n2_peer["state"] != "Established", n2_peer

        net.kill("n2", signal.SIGTERM)
        net.speakers["n2"].wait(timeout=10)
        net.speaker("n2", local_as=65000, peer={"asn": 65000, "md5_password": "lab-md5-secret"})
        wait_until(lambda: bird.kernel(VIP) == ["10.0.0.1", "10.0.0.2"], timeout_s=15, what="iBGP ECMP")
        assert bird.state("node2") == "Established"
    except BaseException:
        print(_dump_logs_on_failure(net))
        raise


class GoBgp:
    def __init__(self, net: Net, conf: Path) -> None:
        self.net = net
        self.port = 50051
        log = open(net.tmp / "gobgpd.log", "ab")
        net.lab.spawn(net.router, "gobgpd", "-f", str(conf), "-p", "--api-hosts", f"127.0.0.1:{self.port}",
                      "--pprof-disable", stdout=log, stderr=log)
        log.close()
        wait_until(lambda: self.gobgp("neighbor").returncode == 0, timeout_s=10, what="gobgpd API")

    def gobgp(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.net.lab.ns_run(self.net.router, "gobgp", "-u", "127.0.0.1", "-p", str(self.port), *args,
                                   check=False)

    def state(self, addr: str) -> str:
        out = self.gobgp("neighbor", addr, "-j")
        if out.returncode != 0:
            return ""
        return str(json.loads(out.stdout).get("state", {}).get("session_state", ""))

    def rib(self, family: str = "ipv4") -> list[dict]:
        out = self.gobgp("global", "rib", "-a", family, "-j")
        if out.returncode != 0 or not out.stdout.strip():
            return []
        return [path for paths in json.loads(out.stdout).values() for path in paths]

    def nexthops(self, prefix: str, family: str = "ipv4") -> list[str]:
        hops = []
        for path in self.rib(family):
            if path.get("nlri", {}).get("prefix") == prefix:
                hops += [a.get("nexthop") for a in path.get("attrs", []) if a.get("type") == 3]
                hops += [a["nexthop"] for a in path.get("attrs", []) if a.get("type") == 14 and "nexthop" in a]
        return sorted(h for h in hops if h)


def test_gobgp_ebgp_and_ibgp(net: Net) -> None:
    gobgp = GoBgp(net, EXAMPLES / "gobgpd.toml")
    try:
        net.speaker("n1", local_as=4200000001, peer={"asn": 65000, "md5_password": "lab-md5-secret"},
                    announce=(VIP, VIP6))
        net.speaker("n2", local_as=65000, peer={"asn": 65000}, announce=(VIP, VIP6))
        for addr in ("10.0.0.1", "10.0.0.2"):
            wait_until(lambda addr=addr: gobgp.state(addr) in ("established", "6", "ESTABLISHED"), timeout_s=20,
                       what=f"gobgp {addr} established")
        wait_until(lambda: gobgp.nexthops(VIP) == ["10.0.0.1", "10.0.0.2"], timeout_s=10, what="VIP in gobgp rib")
        wait_until(lambda: gobgp.nexthops(VIP6, "ipv6") == ["2001:db8::1", "2001:db8::2"], timeout_s=10,
                   what="IPv6 VIP in gobgp rib")
        net.command("n2", f"withdraw {VIP}")
        wait_until(lambda: gobgp.nexthops(VIP) == ["10.0.0.1"], timeout_s=5, what="withdraw")
        net.kill("n1", signal.SIGKILL)
        wait_until(lambda: gobgp.nexthops(VIP) == [], timeout_s=5, what="SIGKILL drops the route")
    except BaseException:
        print(_dump_logs_on_failure(net))
        raise
