"""Two real lbnode processes behind a real BIRD router (examples/lab/ecmp.py): ECMP over both,
flows shared by flow sync, forged gossip rejected, and a restarted node that resyncs before it
advertises, all while 100 long-lived connections must survive."""
from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.sync.codec import encode_flows
from examples.lab.ecmp import EcmpLab, Load
from examples.lab.netns import wait_until
from tests.ecmp_lab import running_ecmp_lab

pytestmark = pytest.mark.netns

N1, N2 = "10.0.0.1", "10.0.0.2"
LONG = 100


@pytest.fixture
def ecmp(tmp_path: Path) -> Iterator[EcmpLab]:
    with running_ecmp_lab(tmp_path, "lbc", EcmpLab) as e:
        yield e


def entries(e: EcmpLab, node: str) -> int:
    status = e.node_status(node)
    return status["flows"]["entries"] if status else -1


def sync_counter(e: EcmpLab, node: str, name: str) -> int:
    status = e.node_status(node)
    return status["sync"]["counters"][name] if status and "sync" in status else -1


def send_from_router(e: EcmpLab, payload: bytes, to: str, port: int = 7946) -> None:
    code = f"import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto({payload!r}, ({to!r}, {port}))"
    e.lab.ns_run(e.router, sys.executable, "-c", code)


def test_flows_are_shared_forgeries_dropped_and_a_restart_resyncs_first(ecmp: EcmpLab) -> None:
    for node in ecmp.nodes:
        ecmp.start_node(node)
    ecmp.wait_next_hops({N1, N2})
    load = Load(ecmp, long=LONG, short_rate=10)

    # Each node pinned its share; flow sync gives each node all of them.
    wait_until(lambda: min(entries(ecmp, n) for n in ecmp.nodes) >= LONG, timeout_s=15, what="flows on both nodes")
    assert all(sync_counter(ecmp, n, "installed") > 0 for n in ecmp.nodes)

    # Forged (wrong key) and malformed datagrams are dropped and counted, never installed.
    forged0, malformed0 = sync_counter(ecmp, "node2", "forged"), sync_counter(ecmp, "node2", "malformed")
    send_from_router(ecmp, encode_flows(b"not-the-cluster-key-at-all", 7, 1, 1, []), N2)
    send_from_router(ecmp, b"LBFS\x01garbage", N2)
    wait_until(lambda: sync_counter(ecmp, "node2", "forged") > forged0
               and sync_counter(ecmp, "node2", "malformed") > malformed0, timeout_s=10, what="forgery counted")

    # node2 leaves (SIGTERM: withdraw, drain, exit): its flows move to node1, which knows them.
    ecmp.kill_node("node2", signal.SIGTERM)
    ecmp.wait_next_hops({N1})
    # node2 returns: it must hold every flow before the router sends it any, learned by a resync
    # that node1 answered (counters, not log lines: "resync" also matches "resync incomplete").
    served0 = sync_counter(ecmp, "node1", "resync_served")
    ecmp.start_node("node2")
    seen_at_return: list[int] = []

    def node2_routed() -> bool:
        if N2 not in ecmp.next_hops():
            return False
        seen_at_return.append(entries(ecmp, "node2"))
        return True

    wait_until(node2_routed, timeout_s=40, interval_s=0.02, what="node2 back in the ECMP route")
    assert seen_at_return[0] >= LONG, f"node2 advertised with {seen_at_return[0]} flows, before its resync"
    assert sync_counter(ecmp, "node1", "resync_served") > served0, "node1 answered node2's resync request"
    assert sync_counter(ecmp, "node2", "resync_chunks") >= 1, "node2 installed node1's resync answer"

    report = load.stop()
    assert report["long"]["alive"] == LONG and report["long"]["lost"] == {}, report
    assert report["short"]["ok"] > 0
    assert ecmp.node_procs["node1"].poll() is None
