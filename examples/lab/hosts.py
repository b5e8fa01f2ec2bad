"""Hosts of the namespace labs: a host on a switch, a DSR backend, a client, a backend server.

Shared by examples/lab/single_node.py and examples/lab/ecmp.py.
"""
from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bpf.loader import PASS_SOURCE, Attachment, XdpMode, attach, compile_program, detach
from bpf.structs import IPAddress
from examples.lab.netns import Lab, read_line

REPO = Path(__file__).resolve().parents[2]
HTTP_PORT, ECHO_PORT = 80, 9000


@dataclass(frozen=True)
class Host:
    name: str
    ns: str
    ip4: str
    ip6: str
    mac: str


def add_host(lab: Lab, switch_ns: str, name: str, ip4: str, ip6: str, prefix4: int = 24) -> Host:
    """A namespace whose eth0 is cabled to port `p-<name>` in `switch_ns` (bridge it afterwards)."""
    ns = lab.netns(name)
    lab.veth(ns, "eth0", switch_ns, f"p-{name}")
    lab.addr(ns, "eth0", f"{ip4}/{prefix4}")
    lab.ns_run(ns, "ip", "addr", "add", f"{ip6}/64", "dev", "eth0", "nodad")
    return Host(name, ns, ip4, ip6, lab.mac(ns, "eth0"))


def make_backend(lab: Lab, host: Host, vips: Sequence[IPAddress]) -> None:
    """Hold the VIPs on loopback without ever answering ARP for them (DSR backend)."""
    for key, value in (("net.ipv4.conf.all.arp_ignore", "1"), ("net.ipv4.conf.all.arp_announce", "2")):
        lab.ns_run(host.ns, "sysctl", "-qw", f"{key}={value}")
    for vip in vips:
        lab.ns_run(host.ns, "ip", "addr", "add", f"{vip}/{32 if vip.version == 4 else 128}", "dev", "lo")


def make_client(lab: Lab, ns: str, dev: str = "eth0") -> None:
    """A veth hands frames on with the TCP/UDP checksum left to "offload" (CHECKSUM_PARTIAL);
    once XDP_TX turns them into raw frames the backend sees a bad checksum and drops them.
    A real NIC delivers complete checksums, so a lab client computes them as if on a wire."""
    lab.ns_run(ns, "ethtool", "-K", dev, "tx", "off")


def start_backend_server(lab: Lab, host: Host, timeout_s: float = 10.0) -> subprocess.Popen[bytes]:
    proc = lab.spawn(host.ns, sys.executable, "-m", "examples.lab.backend_server", "--name", host.name,
                     "--http-port", str(HTTP_PORT), "--echo-port", str(ECHO_PORT), cwd=REPO, stdout=subprocess.PIPE)
    if read_line(proc, timeout_s=timeout_s) != "ready":
        raise RuntimeError(f"backend {host.name} did not start")
    return proc


class PeerPass:
    """XDP_PASS on the switch side of nodes' veths: without an XDP program there, the veth
    driver drops the frames a node sends with XDP_TX. Compiled once, attached per port."""

    def __init__(self) -> None:
        self._bpf, self._fn = compile_program(PASS_SOURCE, "xdp_pass")
        self._attached: list[Attachment] = []

    def attach(self, switch_ns: str, port: str) -> None:
        self._attached.append(attach(self._fn.fd, port, XdpMode.NATIVE, netns=switch_ns))

    def close(self) -> None:
        try:
            while self._attached:
                detach(self._attached.pop())
        finally:
            self._bpf.cleanup()
