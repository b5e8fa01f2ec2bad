"""`sync.digest_mismatch_blocks` with real lbnode processes behind a real BIRD router.

node1 serves the lab's service with backends b1..b3. node2 comes up with another view (only b1
and b2: its digest differs from node1's). Nothing holds node2 back: its health checks pass at
once, and its start-up resync takes milliseconds. The resync completes only once node1's
answer *and* a heartbeat of node1 (sent before the answer) are in, so node2 knows node1's
digest before it may advertise. With the option on, node2 announces nothing, at no point; once a
reload gives it node1's view, it advertises. With the option off, the same node2 advertises
despite the mismatch, which it still reports.
"""
from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from examples.lab.ecmp import EcmpLab
from examples.lab.netns import wait_until
from tests.ecmp_lab import running_ecmp_lab

pytestmark = pytest.mark.netns

N1, N2 = "10.0.0.1", "10.0.0.2"


class DigestLab(EcmpLab):
    """The ECMP lab with `digest_mismatch_blocks` set, and node2 listing fewer backends if asked."""

    blocks = False
    node2_backends: int | None = None  # None: node1's list

    def node_config(self, name: str, *, sync: bool = True) -> dict[str, Any]:
        cfg = super().node_config(name, sync=sync)
        cfg["sync"]["digest_mismatch_blocks"] = self.blocks
        if name == "node2" and self.node2_backends is not None:
            service = cfg["services"][0]
            service["backends"] = service["backends"][:self.node2_backends]
        return cfg


@pytest.fixture
def digest_lab(tmp_path: Path) -> Iterator[DigestLab]:
    with running_ecmp_lab(tmp_path, "lbd", DigestLab) as e:
        yield e


def established_with_mismatch(e: DigestLab, *, healthy: bool) -> dict[str, Any] | None:
    """node2's status once it is serving, its BGP session is up, it knows that node1's view
    differs and (`healthy`) every service has `need` usable backends, or (not) none has."""
    status = e.node_status("node2")
    if not status or status["node"]["state"] != "serving" or "sync" not in status:
        return None
    peers = status.get("bgp", {}).get("peers", [])
    if not (peers and peers[0]["state"] == "Established" and status["sync"]["digest_mismatch"]):
        return None
    if healthy != all(s["usable"] >= s["need"] for s in status["services"]):
        return None
    return status


def start_node1_then_divergent_node2(e: DigestLab, *, blocks: bool) -> tuple[dict[str, Any], set[str]]:
    """node2 up with another view; its status once it is serving, Established, healthy and
    knows the mismatch, and every next hop the router had for the VIP meanwhile."""
    e.blocks, e.node2_backends = blocks, 2
    e.start_node("node1")
    e.wait_next_hops({N1})
    seen: set[str] = set()

    def ready() -> dict[str, Any] | None:
        seen.update(e.next_hops())
        return established_with_mismatch(e, healthy=True)

    e.start_node("node2")
    status = wait_until(ready, timeout_s=40, what="node2 serving, Established, healthy, mismatch known")
    return status, seen


def test_a_node_with_another_view_does_not_start_advertising(digest_lab: DigestLab) -> None:
    e = digest_lab
    status, seen = start_node1_then_divergent_node2(e, blocks=True)
    # Nothing stops node2 from announcing now but the digest guard. It must announce nothing (a
    # node that had announced once would be past the guard and announcing still), and the router
    # must never have routed to it.
    assert status["bgp"]["announced"] == [], status["bgp"]
    assert seen <= {N1} and e.next_hops() == {N1}, seen

    # A reload to node1's view ends the mismatch, and node2 starts advertising.
    reloads = status["node"]["reloads"]["ok"]
    e.node2_backends = None
    (e.workdir / "node2.yaml").write_text(yaml.safe_dump(e.node_config("node2")))
    e.kill_node("node2", signal.SIGHUP)
    wait_until(lambda: (e.node_status("node2") or {}).get("node", {}).get("reloads", {}).get("ok", 0) > reloads,
               timeout_s=10, what="node2 reloaded")
    e.wait_next_hops({N1, N2})
    # Right after a reload the two views still differ for a moment (node2's new backend is not up
    # in its checks yet, and a heartbeat carries the digest once a second): wait for the match,
    # with node2 announcing. (Seen once in ten runs: the route already on node2 while its status
    # said mismatch, or not announced; the cause is not known yet.)
    wait_until(lambda: (s := e.node_status("node2")) and not s["sync"]["digest_mismatch"]
               and s["bgp"]["announced"] == ["192.0.2.10/32"], timeout_s=10,
               what="node2's view matching node1's, and node2 announcing")
    assert e.next_hops() == {N1, N2}


def test_without_the_option_a_node_with_another_view_advertises(digest_lab: DigestLab) -> None:
    e = digest_lab
    start_node1_then_divergent_node2(e, blocks=False)
    e.wait_next_hops({N1, N2})
    status = e.node_status("node2")
    assert status is not None and status["sync"]["digest_mismatch"], "the mismatch is still reported"
    assert status["bgp"]["announced"] == ["192.0.2.10/32"], status["bgp"]
