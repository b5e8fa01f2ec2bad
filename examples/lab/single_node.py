"""One lbnode data plane in front of three backends, on one L2 segment in namespaces.

    client (10.99.0.2) ---+
    node   (10.99.0.5) ---+--- bridge (in its own "sw" namespace)
    b1..b3 (10.99.0.11-13)+

The client routes the VIPs via the node and computes checksums itself, as on a real wire.
The node has no VIP and no forwarding: only its XDP program moves VIP traffic, rewriting MACs
towards a backend (XDP_TX). Backends hold the VIPs on loopback (arp_ignore=1, arp_announce=2 so
they never answer ARP for them) and reply to the client directly: layer-2 direct server return.
The switch-side peer of the node's veth runs an XDP_PASS program, without which XDP_TX frames
would vanish in the veth driver.
"""
from __future__ import annotations

import contextlib
import ipaddress
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bpf.dataplane import BackendSpec, DataPlane, ServiceSpec
from bpf.loader import XdpMode
from bpf.structs import IPPROTO_TCP
from cluster import status
from examples.lab.hosts import (
    ECHO_PORT,
    HTTP_PORT,
    REPO,
    Host,
    PeerPass,
    add_host,
    make_backend,
    make_client,
    start_backend_server,
)
from examples.lab.netns import Lab, read_line

VIP4 = ipaddress.ip_address("10.99.1.100")
VIP6 = ipaddress.ip_address("fd00:99:1::100")
__all__ = ["ECHO_PORT", "HTTP_PORT", "VIP4", "VIP6", "Host", "SingleNodeLab", "EchoSession", "node_status",
           "running_lab"]


class SingleNodeLab:
    """Builds the topology inside a `Lab` (which owns teardown) and drives it."""

    def __init__(self, lab: Lab, backends: int = 3) -> None:
        self.lab = lab
        self.sw = lab.netns("sw")
        self.client = self._host("client", 2)
        self.node = self._host("node", 5)
        self.backends = [self._host(f"b{i}", 10 + i) for i in range(1, backends + 1)]
        lab.bridge(self.sw, "br0", [f"p-{h.name}" for h in [self.client, self.node, *self.backends]])
        make_client(lab, self.client.ns)
        for vip in (VIP4, VIP6):
            lab.ns_run(self.client.ns, "ip", "route", "add", str(vip), "via",
                       self.node.ip4 if vip.version == 4 else self.node.ip6)
        for b in self.backends:
            make_backend(lab, b, (VIP4, VIP6))
        self.backend_procs: dict[str, subprocess.Popen[bytes]] = {}
        self.dataplane: DataPlane | None = None
        self._peer_pass: PeerPass | None = None

    def _host(self, name: str, octet: int) -> Host:
        return add_host(self.lab, self.sw, name, f"10.99.0.{octet}", f"fd00:99::{octet:x}")

    # ---- processes ------------------------------------------------------------------------------

    def start_backends(self, timeout_s: float = 10.0) -> None:
        for b in self.backends:
            self.backend_procs[b.name] = start_backend_server(self.lab, b, timeout_s)

    def start_dataplane(self, mode: XdpMode = XdpMode.NATIVE) -> DataPlane:
        dp = DataPlane()
        self.dataplane = dp
        dp.set_config(self.node.mac)
        dp.attach("eth0", mode, netns=self.node.ns)
        if mode is XdpMode.NATIVE:
            self.attach_peer_pass()
        return dp

    def attach_peer_pass(self) -> None:
        """XDP_PASS on the switch side of the node's veth, so the node's XDP_TX frames arrive."""
        self._peer_pass = PeerPass()
        self._peer_pass.attach(self.sw, f"p-{self.node.name}")

    def start_node(self, config_path: Path, status_socket: Path, *extra: str) -> subprocess.Popen[bytes]:
        """A real `lbnode` process in the node namespace (log on its stderr, inherited)."""
        return self.lab.spawn(self.node.ns, sys.executable, "-m", "cluster.cli", "--ip", self.node.ip4, "--if", "eth0",
                              "--config", str(config_path), "--status-socket", str(status_socket), *extra, cwd=REPO)

    def stop_dataplane(self) -> None:
        try:
            if self._peer_pass is not None:
                self._peer_pass.close()
                self._peer_pass = None
        finally:
            if self.dataplane is not None:
                self.dataplane.close()
                self.dataplane = None

    # ---- services -------------------------------------------------------------------------------

    def services(self, out_of_hash: frozenset[str] = frozenset(),
                 removed: frozenset[str] = frozenset()) -> list[ServiceSpec]:
        """HTTP and echo on both VIPs, to every backend not `removed`; `out_of_hash` keep their flows only."""
        specs = []
        for vip in (VIP4, VIP6):
            members = tuple(
                BackendSpec(ipaddress.ip_address(b.ip4 if vip.version == 4 else b.ip6), b.mac,
                            in_hash=b.name not in out_of_hash)
                for b in self.backends if b.name not in removed
            )
            specs += [ServiceSpec(vip, port, IPPROTO_TCP, members) for port in (HTTP_PORT, ECHO_PORT)]
        return specs

    def backend_name(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
        return next(b.name for b in self.backends if str(address) in (b.ip4, b.ip6))

    # ---- clients --------------------------------------------------------------------------------

    def http_spread(self, vip: ipaddress.IPv4Address | ipaddress.IPv6Address, count: int) -> dict[str, object]:
        host = f"[{vip}]" if vip.version == 6 else str(vip)
        out = self.lab.ns_run(self.client.ns, sys.executable, "-m", "examples.lab.clients", "http",
                              f"http://{host}:{HTTP_PORT}/", "--count", str(count), timeout_s=60 + count)
        return json.loads(out.stdout)  # type: ignore[no-any-return]

    def open_echo(self, vip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> EchoSession:
        proc = self.lab.spawn(self.client.ns, sys.executable, "-m", "examples.lab.clients", "echo",
                              str(vip), str(ECHO_PORT), cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        line = read_line(proc, timeout_s=10)
        if not line.startswith("connected "):
            raise RuntimeError(f"echo client: {line}")
        return EchoSession(proc, backend=line.split()[1])


class EchoSession:
    """A long-lived TCP connection held by a client process; `ping` proves it still works."""

    def __init__(self, proc: subprocess.Popen[bytes], backend: str) -> None:
        self.proc = proc
        self.backend = backend  # the name the backend greeted with
        self.sent = 0

    def ping(self, timeout_s: float = 5.0) -> str:
        assert self.proc.stdin is not None
        self.sent += 1
        self.proc.stdin.write(f"ping-{self.sent}\n".encode())
        self.proc.stdin.flush()
        return read_line(self.proc, timeout_s=timeout_s)


@contextlib.contextmanager
def running_lab(prefix: str, backends: int = 3) -> Iterator[SingleNodeLab]:
    """A `SingleNodeLab` with its backend servers up and the XDP_PASS peer attached, torn down
    (data plane closed, namespaces deleted) on exit, even on failure."""
    with Lab(prefix=prefix) as owner:
        single = SingleNodeLab(owner, backends)
        try:
            single.start_backends()
            single.attach_peer_pass()
            yield single
        finally:
            single.stop_dataplane()


def node_status(sock: Path) -> dict[str, Any] | None:
    """A node's status document, None while it does not answer."""
    try:
        return status.query(str(sock))
    except OSError:
        return None
