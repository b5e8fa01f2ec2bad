"""`make demo`: one lbnode data plane forwarding real HTTP to three backends, in namespaces.

Builds the lab of examples/lab/single_node.py, loads and attaches the XDP program, sends HTTP
over IPv4 and IPv6 to the VIPs, prints how requests and packets spread over the backends,
holds a long-lived connection while its backend is drained, and tears everything down (also on
Ctrl-C or failure). Needs root.
"""
from __future__ import annotations

import ipaddress
import sys

from bpf.dataplane import DataPlane
from bpf.structs import IPPROTO_TCP
from examples.lab.netns import Lab
from examples.lab.single_node import ECHO_PORT, HTTP_PORT, VIP4, VIP6, SingleNodeLab


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def spread_table(lab: SingleNodeLab, dp: DataPlane) -> None:
    print(f"   {'backend':8} {'address':12} {'packets':>8} {'bytes':>9} {'new flows':>9}")
    for b in lab.backends:
        index = dp.backend_index(VIP4, HTTP_PORT, IPPROTO_TCP, ipaddress.ip_address(b.ip4))
        assert index is not None
        s = dp.backend_stats(index)
        print(f"   {b.name:8} {b.ip4:12} {s.packets:8d} {s.bytes:9d} {s.new_flows:9d}")


def main() -> int:
    with Lab(prefix="lbdemo") as owner:
        say("building the lab: client, node, three backends on one bridge (network namespaces)")
        lab = SingleNodeLab(owner)
        for host in (lab.client, lab.node, *lab.backends):
            print(f"   {host.name:7} {host.ns:20} {host.ip4:11} {host.ip6:12} {host.mac}")
        print(f"   VIPs {VIP4} and {VIP6} live on the backends' loopback; the client routes them via the node")
        lab.start_backends()
        try:
            say("compiling the XDP program with bcc and attaching it to the node's eth0 (native mode)")
            dp = lab.start_dataplane()
            dp.apply(lab.services())
            print(f"   services: {VIP4} and {VIP6}, TCP ports {HTTP_PORT} (HTTP) and {ECHO_PORT} (echo), "
                  "3 backends each")

            for vip in (VIP4, VIP6):
                say(f"60 HTTP requests to {vip}, each on a new connection")
                result = lab.http_spread(vip, 60)
                print(f"   ok={result['ok']} failed={result['failed']} answered by {result['backends']}")
            say("packets the node forwarded to each backend for the IPv4 HTTP service (per-CPU counters summed)")
            spread_table(lab, dp)

            say(f"a long-lived connection to {VIP4}:{ECHO_PORT}")
            session = lab.open_echo(VIP4)
            print(f"   {session.ping()}")
            [flow] = [f for k, f in dp.flows() if k.dst_port == ECHO_PORT]
            pinned = next(b.name for b in lab.backends if dp.backend_index(
                VIP4, ECHO_PORT, IPPROTO_TCP, ipaddress.ip_address(b.ip4)) == flow.backend)
            print(f"   it is pinned to {pinned} in the node's flow table")
            say(f"draining {pinned}: it leaves the hash, so new connections avoid it; the pinned one goes on")
            dp.apply(lab.services(out_of_hash=frozenset({pinned})))
            print(f"   long-lived connection: {session.ping()}")
            result = lab.http_spread(VIP4, 30)
            print(f"   30 new HTTP requests: ok={result['ok']} answered by {result['backends']}")

            say("verdict counters")
            for stat, value in dp.stats().items():
                if value:
                    print(f"   {stat.name.lower():16} {value}")
            passed = result["ok"] == 30 and pinned not in result["backends"]  # type: ignore[operator]
        finally:
            say("tearing down: detaching XDP, stopping processes, deleting namespaces")
            lab.stop_dataplane()
    print("\ndemo " + ("passed" if passed else "FAILED"))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
