"""Flow sync between two real processes in two namespaces on one bridge (multicast).

Node A pins flows through its XDP program; node B (numbering its services differently) must
hold them with the same backend; a forged datagram is rejected and counted; a node that starts
late resyncs before it reports ready; 20% loss on B's input still converges through resends.
"""
from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.sync import codec as gossip
from examples.lab.netns import Lab, wait_until
from examples.lab.sync_runner import HostProcess, SyncLab

pytestmark = pytest.mark.netns

KEY = b"netns-test-key-0123456789abcdef"


@pytest.fixture
def sync_lab(tmp_path: Path) -> Iterator[SyncLab]:
    key_file = tmp_path / "sync.key"
    key_file.write_bytes(KEY)
    key_file.chmod(0o600)
    with Lab(prefix="lbs") as lab:
        net = SyncLab(lab, str(key_file))
        net.add_node("a", 1)
        net.add_node("b", 2)
        yield net


def flows(host: HostProcess) -> dict[str, object]:
    reply: dict[str, object] = host.call(cmd="flows")
    return reply


def test_flows_replicate_close_and_forgeries_are_counted(sync_lab: SyncLab) -> None:
    a, b = sync_lab.start("a"), sync_lab.start("b", "--skew")
    a.wait_ready(), b.wait_ready()
    sports = list(range(10000, 10200))
    a.call(cmd="pin", sports=sports)
    on_a = flows(a)["by_sport"]
    assert len(on_a) == 200  # type: ignore[arg-type]
    wait_until(lambda: len(flows(b)["by_sport"]) == 200, timeout_s=15, what="200 flows on B")  # type: ignore[arg-type]
    assert flows(b)["by_sport"] == on_a  # same backend address for every flow, despite other indexes
    assert flows(b)["synced"] == 200

    a.call(cmd="pin", sports=[10007], flags="FA")
    wait_until(lambda: 10007 in flows(b)["closing"], timeout_s=15, what="close on B")  # type: ignore[operator]

    # A forged datagram (wrong key) from inside B's namespace, and garbage, to the group.
    record = gossip.flow_wire(bytes(40), bytes(16), gossip.FlowOp.NEW)
    forged = bytearray(gossip.encode_flows(gossip.Keyring(b"wrong-key-wrong-key-wrong-key!!"), a.ready["node_id"], 1,
                                           1 << 40, [record]))
    forged[8:12] = gossip.key_id(KEY).to_bytes(4, "big")  # as captured: the cluster's key id, but no valid tag
    code = ("import socket,sys; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); "
            "s.setsockopt(socket.IPPROTO_IP,socket.IP_MULTICAST_LOOP,1); "
            f"s.setsockopt(socket.IPPROTO_IP,socket.IP_MULTICAST_IF,socket.inet_aton('{sync_lab.ips['b']}')); "
            f"[s.sendto(bytes.fromhex(h),('239.255.76.66',{sync_lab.port})) for h in sys.argv[1:]]")
    sync_lab.lab.ns_run(sync_lab.hosts["b"], sys.executable, "-c", code, forged.hex(), b"junk".hex())
    wait_until(lambda: b.call(cmd="snapshot")["counters"]["forged"] >= 1, timeout_s=10, what="forged counted")
    counters = b.call(cmd="snapshot")["counters"]
    assert counters["malformed"] >= 1 and counters["installed"] >= 200
    assert flows(b)["count"] == 200
    peers = b.call(cmd="snapshot")["peers"]
    assert [p["address"] for p in peers] == [sync_lab.ips["a"]] and peers[0]["alive"]


def test_late_node_resyncs_before_ready(sync_lab: SyncLab) -> None:
    a = sync_lab.start("a")
    a.wait_ready()
    a.call(cmd="pin", sports=list(range(30000, 30500)))
    b = sync_lab.start("b", "--skew", "--resync", "--resync-timeout", "10")
    ready = b.wait_ready()
    assert ready["resync"] is True and ready["installed"] >= 500
    assert flows(b)["by_sport"] == flows(a)["by_sport"]


def test_twenty_percent_loss_converges_through_resends(sync_lab: SyncLab) -> None:
    sync_lab.drop_percent("b", 20)
    a, b = sync_lab.start("a"), sync_lab.start("b")
    a.wait_ready(), b.wait_ready()
    for first in range(40000, 43000, 100):  # 30 bursts: many datagrams, many chances to lose one
        a.call(cmd="pin", sports=list(range(first, first + 100)))
    wait_until(lambda: flows(b)["synced"] == 3000, timeout_s=30, what="3000 flows on B despite loss")
    snap = b.call(cmd="snapshot")["counters"]
    assert sync_lab.dropped("b") > 0 and snap["gaps"] > 0 and snap["resend_requests"] > 0
    assert snap["lost"] == 0
    assert a.call(cmd="snapshot")["counters"]["resends"] > 0


def test_three_nodes_loss_at_one_is_repaired_without_gaps_at_the_others(sync_lab: SyncLab) -> None:
    # Version 1's storm: a repair took a new number, so every third node saw a gap and asked.
    sync_lab.add_node("c", 3)
    sync_lab.drop_percent("c", 20)
    a, b, c = sync_lab.start("a"), sync_lab.start("b", "--skew"), sync_lab.start("c")
    a.wait_ready(), b.wait_ready(), c.wait_ready()
    wait_until(lambda: all(len(h.call(cmd="snapshot")["peers"]) == 2 for h in (a, b, c)), timeout_s=10,
               what="everyone heard everyone")
    # Datagrams sent before a peer had bound its socket are gaps too (started together): baseline.
    base = {h.name: h.call(cmd="snapshot")["counters"]["gaps"] for h in (a, b)}
    for first in range(50000, 52000, 100):
        a.call(cmd="pin", sports=list(range(first, first + 100)))
    b.call(cmd="pin", sports=list(range(52000, 52500)))
    wait_until(lambda: flows(c)["synced"] == 2500 and flows(b)["synced"] == 2000 and flows(a)["synced"] == 500,
               timeout_s=30, what="every flow on every node despite loss at C")
    snap_c = c.call(cmd="snapshot")["counters"]
    assert sync_lab.dropped("c") > 0 and snap_c["gaps"] > 0 and snap_c["resend_requests"] > 0
    for host in (a, b):  # repairs for C never opened a gap at A or B
        snap = host.call(cmd="snapshot")["counters"]
        assert snap["gaps"] == base[host.name], (host.name, snap)
    # and repair traffic stops with the loss
    sync_lab.lab.ns_run(sync_lab.hosts["c"], "nft", "delete", "table", "inet", "lbloss")
    wait_until(lambda: c.call(cmd="snapshot")["gaps_open"] == 0, timeout_s=10, what="no gaps open at C")
    before = c.call(cmd="snapshot")["counters"]["resend_requests"]
    wait_until(lambda: c.call(cmd="snapshot")["peers"][0]["last_seen_s"] < 1.0, timeout_s=5, what="heartbeats")
    a.call(cmd="pin", sports=[52999])
    wait_until(lambda: "52999" in flows(c)["by_sport"], timeout_s=10, what="a new flow on C")  # type: ignore[operator]
    assert c.call(cmd="snapshot")["counters"]["resend_requests"] == before


def test_a_link_flap_breaks_sending_until_the_link_is_back_then_everything_converges(sync_lab: SyncLab) -> None:
    a, b = sync_lab.start("a"), sync_lab.start("b", "--skew")
    a.wait_ready(), b.wait_ready()
    a.call(cmd="pin", sports=list(range(60000, 60100)))
    wait_until(lambda: flows(b)["synced"] == 100, timeout_s=15, what="100 flows on B")
    ns_b = sync_lab.hosts["b"]
    sync_lab.lab.ns_run(ns_b, "ip", "link", "set", "eth0", "down")
    b.call(cmd="pin", sports=list(range(61000, 61100)))  # B's sends fail: its link is down
    a.call(cmd="pin", sports=list(range(60100, 60300)))  # B misses these
    wait_until(lambda: b.call(cmd="snapshot")["counters"]["send_errors_link"] > 0, timeout_s=10,
               what="B counts its failed sends")
    sync_lab.lab.ns_run(ns_b, "ip", "link", "set", "eth0", "up")
    wait_until(lambda: flows(b)["synced"] == 300 and flows(a)["synced"] == 100, timeout_s=30,
               what="both directions repaired after the link is back")
    snap_b = b.call(cmd="snapshot")
    assert snap_b["counters"]["gaps"] > 0 or snap_b["counters"]["peer_resyncs"] > 0
    # The membership survived the flap: new multicast flows reach B without any repair.
    a.call(cmd="pin", sports=[60999])
    wait_until(lambda: "60999" in flows(b)["by_sport"], timeout_s=10, what="a new flow on B")  # type: ignore[operator]


def test_an_interface_recreated_under_the_node_is_joined_again(sync_lab: SyncLab) -> None:
    a, b = sync_lab.start("a"), sync_lab.start("b", "--skew")
    a.wait_ready(), b.wait_ready()
    lab, ns_b = sync_lab.lab, sync_lab.hosts["b"]
    lab.ns_run(ns_b, "ip", "link", "del", "eth0")  # and its peer pb on the switch
    a.call(cmd="pin", sports=list(range(62000, 62050)))
    lab.veth(ns_b, "eth0", sync_lab.sw, "pb")
    lab.addr(ns_b, "eth0", "10.9.0.2/24")
    lab.ns_run(sync_lab.sw, "ip", "link", "set", "pb", "master", "br0")
    wait_until(lambda: b.call(cmd="snapshot")["counters"]["membership_rejoins"] >= 1, timeout_s=10,
               what="B joined the group again on the new interface")
    a.call(cmd="pin", sports=list(range(62050, 62100)))
    b.call(cmd="pin", sports=list(range(63000, 63010)))
    wait_until(lambda: flows(b)["synced"] == 100 and flows(a)["synced"] == 10, timeout_s=30,
               what="flows in both directions over the new interface")
