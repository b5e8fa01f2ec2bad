"""FRR as the ECMP router: examples/frr.conf, verbatim, in front of three real lbnode nodes.

The router namespace runs FRR's zebra, bgpd and bfdd (examples/lab/frr.py: private state paths,
nothing under /etc/frr or /var/run/frr). The nodes peer through the config's `bgp listen range`,
with BFD 100 ms x 3. Asserted: the VIP is one kernel route with a next hop per node (ECMP, through
`multipath-relax` across the nodes' different ASes), BFD is up to every node, HTTP through the VIP
is answered, a frozen node leaves the route through BFD well before the 3 s hold time and is taken
back when it resumes (FRR needs no `error wait time`), and a stopped node withdraws.
"""
from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest

from examples.lab.frr import FRR_BIN, FrrEcmpLab
from examples.lab.netns import Lab, wait_until

pytestmark = pytest.mark.netns

BFD_BOUND_S = 1.0  # 3 x 100 ms detection, plus the route change; the hold time is 3 s


class ThreeNodeFrrLab(FrrEcmpLab):
    def __init__(self, lab: Lab, workdir: Path) -> None:
        super().__init__(lab, workdir, nodes=3)


def test_frr_router_installs_the_vip_as_an_ecmp_route_over_three_nodes(tmp_path: Path) -> None:
    if not (FRR_BIN / "bgpd").exists() or shutil.which("vtysh") is None:
        pytest.fail("needs Debian's frr (zebra, bgpd, bfdd, vtysh in /usr/lib/frr)")
    with Lab(prefix="lbf") as owner:
        e = ThreeNodeFrrLab(owner, tmp_path)
        try:
            e.start_backends()
            e.start_router()
            for name in e.nodes:
                e.start_node(name)
            ips = {h.ip4 for h in e.nodes.values()}
            e.wait_next_hops(ips, timeout_s=90)
            route = e.route_lines()
            assert route.count("nexthop via") == 3 and "proto bgp" in route, route
            assert e.bgp_established() == ips
            wait_until(lambda: e.bfd_up() == ips, timeout_s=30, what=f"BFD up to {sorted(ips)} ({e.bfd_up()})")
            # The README's checks on the router.
            summary = e.vtysh("-c", "show bgp summary").stdout
            peers = e.vtysh("-c", "show bfd peers brief").stdout
            assert all(ip in summary and ip in peers for ip in ips), summary + peers
            assert peers.count(" up ") >= 3, peers
            spread = e.http_spread(30)
            assert spread["ok"] == 30, spread

            # node1 freezes: BFD takes it out of the route, long before the hold time would.
            node1 = e.node_procs["node1"]
            node1.send_signal(signal.SIGSTOP)
            gone = e.wait_next_hops_timed(ips - {e.node_ip("node1")}, timeout_s=10)
            print(f"frozen node out of FRR's route after {gone:.2f}s")
            assert gone < BFD_BOUND_S, gone
            node1.send_signal(signal.SIGCONT)
            back = e.wait_next_hops_timed(ips, timeout_s=30)
            print(f"resumed node back in FRR's route after {back:.2f}s")

            # node2 stops (SIGTERM: withdraw, drain, detach): the route keeps the other two.
            e.kill_node("node2", signal.SIGTERM)
            assert e.node_procs["node2"].returncode == 0, e.node_log("node2")[-2000:]
            e.wait_next_hops(ips - {e.node_ip("node2")}, timeout_s=15)
            assert e.http_spread(10)["ok"] == 10
        finally:
            e.close()
