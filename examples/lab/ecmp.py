"""The ECMP lab: a BIRD router in front of 2-4 lbnode nodes (two by default), backends and a client.

    client 10.1.0.2 --- router 10.1.0.254 | 10.0.0.254 (br0, BIRD, ECMP) ---+--- node1 10.0.0.1  (lbnode)
                                                                            +--- node2 10.0.0.2  (lbnode)
                                                                            +--- ... nodeN 10.0.0.N
                                                                            +--- b1..bM 10.0.0.11-

The router runs examples/bird-bfd.conf (eBGP, one AS per node, `merge paths on`, BFD 100 ms x 3)
unchanged for two nodes; for more, the same file plus one `protocol bgp` per extra node. It
hashes ECMP on ports (fib_multipath_hash_policy=1). Each node announces the VIP while its
service is healthy; the router spreads client flows over the nodes; a node forwards by MAC
rewrite (XDP_TX) to a backend, which answers the client directly through the router. The two
nodes share new flows over multicast on br0 (flow sync), so a flow that the router moves to
the other node keeps its backend.
"""
from __future__ import annotations

import ipaddress
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

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
from examples.lab.netns import Lab, read_line, wait_until

VIP = ipaddress.ip_address("192.0.2.10")
ROUTER_LAN, ROUTER_CLIENT = "10.0.0.254", "10.1.0.254"
MAX_NODES = 4


def node_as(index: int) -> int:
    """node<index>'s AS, as in bird-bfd.conf (4200000001 for node1, ...)."""
    return 4200000000 + index
BIRD_CONF = REPO / "examples" / "bird-bfd.conf"  # bird.conf plus BFD (100 ms x 3) towards the nodes
SYNC_KEY = b"lab-flow-sync-key-0123456789abcdef\n"


class EcmpLab:
    """Builds the topology inside a `Lab` (which owns teardown); starts and stops its processes."""

    def __init__(self, lab: Lab, workdir: Path, *, nodes: int = 2, backends: int = 3,
                 initial_backends: int | None = None) -> None:
        """`initial_backends`: how many of the backends the nodes' config lists at first (default all)."""
        if not 2 <= nodes <= MAX_NODES:
            raise ValueError(f"the lab has 2 to {MAX_NODES} nodes, not {nodes}")
        self.lab, self.workdir = lab, workdir
        self.initial_backends = backends if initial_backends is None else initial_backends
        self.router = lab.netns("router")
        self.nodes = {f"node{i}": add_host(lab, self.router, f"node{i}", f"10.0.0.{i}", f"2001:db8::{i}")
                      for i in range(1, nodes + 1)}
        self.backends = [add_host(lab, self.router, f"b{i}", f"10.0.0.{10 + i}", f"2001:db8::{10 + i:x}")
                         for i in range(1, backends + 1)]
        hosts = [*self.nodes.values(), *self.backends]
        lab.bridge(self.router, "br0", [f"p-{h.name}" for h in hosts])
        # Flow sync is multicast: flood it, no IGMP snooping (there is no querier in the lab).
        lab.ns_run(self.router, "ip", "link", "set", "br0", "type", "bridge", "mcast_snooping", "0")
        lab.addr(self.router, "br0", f"{ROUTER_LAN}/24")
        lab.ns_run(self.router, "ip", "addr", "add", "2001:db8::fe/64", "dev", "br0", "nodad")
        self.client = lab.netns("client")
        lab.veth(self.router, "eth1", self.client, "eth0")
        lab.addr(self.router, "eth1", f"{ROUTER_CLIENT}/24")
        lab.addr(self.client, "eth0", "10.1.0.2/24")
        lab.ns_run(self.client, "ip", "route", "add", "default", "via", ROUTER_CLIENT)
        make_client(lab, self.client)
        for key, value in (("net.ipv4.ip_forward", "1"), ("net.ipv4.fib_multipath_hash_policy", "1")):
            lab.ns_run(self.router, "sysctl", "-qw", f"{key}={value}")
        for b in self.backends:
            make_backend(lab, b, (VIP,))
            lab.ns_run(b.ns, "ip", "route", "add", "default", "via", ROUTER_LAN)
        self.peer_pass = PeerPass()
        for name in self.nodes:
            self.peer_pass.attach(self.router, f"p-{name}")
        (workdir / "sync.key").write_bytes(SYNC_KEY)
        (workdir / "sync.key").chmod(0o600)  # a key file others can read is refused
        self.backend_procs: dict[str, subprocess.Popen[bytes]] = {}
        self.node_procs: dict[str, subprocess.Popen[bytes]] = {}
        self.bird: subprocess.Popen[bytes] | None = None

    def close(self) -> None:
        self.peer_pass.close()

    # ---- processes ----------------------------------------------------------------------------

    def start_backends(self) -> None:
        for b in self.backends:
            self.backend_procs[b.name] = start_backend_server(self.lab, b)

    def bird_conf(self) -> Path:
        """bird-bfd.conf as it is for two nodes; with one more BGP protocol per extra node."""
        if len(self.nodes) == 2:
            return BIRD_CONF
        extra = "".join(f"protocol bgp {name} from lbnode {{ neighbor {host.ip4} as {node_as(i)}; }}\n"
                        for i, (name, host) in enumerate(self.nodes.items(), 1) if i > 2)
        path = self.workdir / "bird.conf"
        path.write_text(BIRD_CONF.read_text() + extra)
        return path

    def start_router(self) -> None:
        log = open(self.workdir / "bird.log", "ab")
        self.bird = self.lab.spawn(self.router, "bird", "-f", "-c", str(self.bird_conf()), "-s",
                                   str(self.workdir / "bird.ctl"), stdout=log, stderr=log)
        log.close()

    def node_config(self, name: str, *, sync: bool = True) -> dict[str, Any]:
        return {
            "xdp": "native",
            "drain_s": 1,
            "bgp": {"local_as": node_as(int(name.removeprefix("node"))),
                    "peers": [{"address": ROUTER_LAN, "asn": 65000, "hold_time_s": 3, "connect_retry_s": 1,
                               "bfd": {"interval_ms": 100, "multiplier": 3}}]},
            "sync": {"enabled": sync, "key_file": str(self.workdir / "sync.key"), "resync_timeout_s": 3},
            "services": [{
                "name": "web", "vips": [str(VIP)], "ports": [HTTP_PORT, ECHO_PORT], "need": 1,
                "checks": [{"kind": "tcp", "interval_ms": 500, "timeout_ms": 300, "rise": 1, "fall": 2}],
                "backends": [{"address": b.ip4} for b in self.backends[:self.initial_backends]],
            }],
        }

    def status_socket(self, name: str) -> Path:
        return self.workdir / f"{name}.sock"

    def start_node(self, name: str, *, sync: bool = True) -> subprocess.Popen[bytes]:
        host = self.nodes[name]
        config = self.workdir / f"{name}.yaml"
        config.write_text(yaml.safe_dump(self.node_config(name, sync=sync)))
        log = open(self.workdir / f"{name}.log", "ab")
        proc = self.lab.spawn(host.ns, sys.executable, "-m", "cluster.cli", "--ip", host.ip4, "--if", "eth0",
                              "--config", str(config), "--status-socket", str(self.status_socket(name)),
                              # in the lab's directory: the default's netns inode may be reused by a later lab
                              "--admin-state", str(self.workdir / f"{name}.admin.json"),
                              cwd=REPO, stdout=log, stderr=log)
        log.close()
        self.node_procs[name] = proc
        return proc

    def kill_node(self, name: str, sig: signal.Signals = signal.SIGKILL) -> None:
        proc = self.node_procs[name]
        proc.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            proc.wait(timeout=30)

    def node_log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")

    # ---- observations -----------------------------------------------------------------------------

    def node_status(self, name: str) -> dict[str, Any] | None:
        try:
            return status.query(str(self.status_socket(name)))
        except OSError:
            return None

    def next_hops(self) -> set[str]:
        """The router's kernel next hops for the VIP (ECMP: one per announcing node)."""
        out = self.lab.ns_run(self.router, "ip", "-j", "route", "show", f"{VIP}/32").stdout
        hops: set[str] = set()
        for route in json.loads(out or "[]"):
            if "gateway" in route:
                hops.add(route["gateway"])
            hops.update(nh["gateway"] for nh in route.get("nexthops", []) if "gateway" in nh)
        return hops

    def wait_next_hops(self, expected: set[str], timeout_s: float = 30) -> None:
        wait_until(lambda: self.next_hops() == expected, timeout_s=timeout_s,
                   what=f"router next hops {sorted(expected)} (now {sorted(self.next_hops())})")

    def node_ip(self, name: str) -> str:
        return self.nodes[name].ip4

    def client_run(self, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
        return self.lab.ns_run(self.client, sys.executable, "-m", *args, timeout_s=timeout_s)

    def http_spread(self, count: int) -> dict[str, Any]:
        out = self.client_run("examples.lab.clients", "http", f"http://{VIP}:{HTTP_PORT}/", "--count", str(count),
                              timeout_s=30 + count)
        return json.loads(out.stdout)  # type: ignore[no-any-return]


__all__ = ["EcmpLab", "Load", "Host", "VIP", "ECHO_PORT", "HTTP_PORT"]


class Load:
    """The load generator running in the client namespace (examples/lab/loadgen.py)."""

    def __init__(self, ecmp: EcmpLab, *, long: int = 200, short_rate: float = 20.0, interval_ms: int = 100) -> None:
        self.proc = ecmp.lab.spawn(ecmp.client, sys.executable, "-m", "examples.lab.loadgen", str(VIP),
                                   "--long", str(long), "--short-rate", str(short_rate),
                                   "--interval-ms", str(interval_ms), cwd=REPO,
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        line = read_line(self.proc, timeout_s=60)
        if line != "ready":
            raise RuntimeError(f"loadgen: {line}")

    def report(self, command: str = "report") -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()
        return json.loads(read_line(self.proc, timeout_s=30))  # type: ignore[no-any-return]

    def stop(self) -> dict[str, Any]:
        final = self.report("stop")
        self.proc.wait(timeout=30)
        return final
