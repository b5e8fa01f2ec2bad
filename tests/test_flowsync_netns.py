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
from examples.lab.sync_runner import HostProcess, SyncLab
from examples.lab.netns import Lab, wait_until

pytestmark = pytest.mark.netns

KEY = b"netns-test-key-0123456789abcdef"


@pytest.fixture
def sync_lab(tmp_path: Path) -> Iterator[SyncLab]:
    key_file = tmp_path / "sync.key"
    key_file.write_bytes(KEY)
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
    forged = gossip.encode_flows(b"wrong-key-wrong-key-wrong-key!!", a.ready["node_id"], 1, 1 << 40, [record])
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
