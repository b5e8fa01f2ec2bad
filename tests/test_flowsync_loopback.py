"""FlowSync end to end in one process: two data planes, two sync instances, real UDP on loopback.

Node A pins flows through its XDP program (BPF_PROG_TEST_RUN); node B must hold them with its
own indexes. Unicast mode (127.0.0.1 <-> 127.0.0.2); the multicast path runs in the netns test.
"""
from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio
from scapy.all import IP, TCP, Ether  # type: ignore[attr-defined]

from bpf.dataplane import BackendSpec, DataPlane, ServiceSpec
from bpf.flowtable import synthetic_flows
from bpf.structs import FLOW_F_CLOSING, FLOW_F_SYNCED, IPPROTO_TCP, FlowKey, addr16
from bpf.testrun import run_xdp
from cluster.sync import codec as gossip
from cluster.sync.config import SyncConfig
from cluster.sync.flowsync import FlowSync
from cluster.sync.records import RecordBuilder

pytestmark = pytest.mark.bpf

ip = ipaddress.ip_address
SECRET = b"0123456789abcdef0123456789abcdef"
KEY = gossip.Keyring(SECRET)
MAC = "02:00:00:00:00:01"
VIP = ip("10.0.0.100")
B1 = BackendSpec(ip("10.0.0.11"), "02:00:00:00:0b:01")
B2 = BackendSpec(ip("10.0.0.12"), "02:00:00:00:0b:02")
OTHER = ServiceSpec(ip("10.0.0.200"), 443, IPPROTO_TCP, (BackendSpec(ip("10.0.0.21"), "02:00:00:00:0c:01"),))
WEB = ServiceSpec(VIP, 80, IPPROTO_TCP, (B1, B2))
A_IP, B_IP = ip("127.0.0.1"), ip("127.0.0.2")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def planes() -> Iterator[tuple[DataPlane, DataPlane]]:
    a, b = DataPlane(), DataPlane()
    try:
        a.set_config(MAC)
        b.set_config(MAC)
        a.apply([WEB])
        b.apply([OTHER])  # B numbers its services and backends differently: translation matters
        b.apply([OTHER, WEB])
        yield a, b
    finally:
        a.close()
        b.close()


@pytest.fixture
def config(tmp_path: Path) -> SyncConfig:
    key_file = tmp_path / "sync.key"
    key_file.write_bytes(SECRET)
    key_file.chmod(0o600)
    return SyncConfig.from_dict({"key_file": str(key_file), "peers": [str(A_IP), str(B_IP)], "port": free_port(),
                                 "batch_ms": 1, "heartbeat_s": 0.2})


@pytest.fixture
def clean(planes: tuple[DataPlane, DataPlane]) -> tuple[DataPlane, DataPlane]:
    for dp in planes:
        dp.delete_flows([k for k, _ in dp.flows()])
    return planes


def ack(sport: int, flags: str = "A") -> bytes:
    return bytes(Ether(dst=MAC, src="02:00:00:00:00:fe") / IP(src="192.0.2.7", dst=str(VIP))
                 / TCP(sport=sport, dport=80, flags=flags))


def key(sport: int) -> FlowKey:
    return FlowKey.make("192.0.2.7", sport, VIP, 80, IPPROTO_TCP)


async def until(predicate: Callable[[], object], what: str, timeout_s: float = 10.0) -> None:
    with trio.fail_after(timeout_s):
        while not predicate():  # noqa: ASYNC110  # polls counters fed by real sockets, under fail_after
            await trio.sleep(0.01)


async def start(nursery: trio.Nursery, cfg: SyncConfig, dp: DataPlane, node_ip: object, **kw: object) -> FlowSync:
    sync = FlowSync(cfg, dp, node_ip, **kw)  # type: ignore[arg-type]
    await nursery.start(sync.run)
    return sync


async def test_flows_pinned_on_a_appear_on_b_with_b_indexes_and_close(config: SyncConfig, clean) -> None:  # type: ignore[no-untyped-def]
    dp_a, dp_b = clean
    async with trio.open_nursery() as nursery:
        sync_a = await start(nursery, config, dp_a, A_IP)
        sync_b = await start(nursery, config, dp_b, B_IP)
        ports = range(20000, 20300)
        for port in ports:
            run_xdp(dp_a.fd, ack(port))
        await until(lambda: sync_b.counters["installed"] >= 300, "300 flows on B")
        for port in ports:
            flow_a, flow_b = dp_a.lookup_flow(key(port)), dp_b.lookup_flow(key(port))
            assert flow_a is not None and flow_b is not None
            address = {i: a for i, a in dp_a.backend_addresses().items()}[flow_a.backend]
            assert flow_b.backend == dp_b.backend_index(VIP, 80, IPPROTO_TCP, address)
            assert flow_b.service == dp_b.service_index(VIP, 80, IPPROTO_TCP) != flow_a.service
            assert flow_b.flags == FLOW_F_SYNCED
        run_xdp(dp_a.fd, ack(20000, "FA"))
        await until(lambda: (f := dp_b.lookup_flow(key(20000))) is not None and f.flags & FLOW_F_CLOSING, "close on B")
        # Heartbeats make each a live peer of the other; B's view differs once digests do.
        sync_a.set_digest(b"a" * 16)
        sync_b.set_digest(b"b" * 16)
        await until(lambda: sync_b.digest_mismatch, "digest mismatch")
        snap = sync_b.snapshot()
        assert snap["peers"][0]["node_id"] == int(A_IP) and snap["peers"][0]["alive"]
        # (A datagram A sent before B had bound its socket is a gap, repaired: nothing is lost.)
        assert snap["counters"]["forged"] == snap["counters"]["replayed"] == snap["counters"]["lost"] == 0
        nursery.cancel_scope.cancel()


async def test_forged_replayed_and_malformed_datagrams_are_dropped_and_counted(config: SyncConfig, clean) -> None:  # type: ignore[no-untyped-def]
    dp_a, dp_b = clean
    async with trio.open_nursery() as nursery:
        sync_a = await start(nursery, config, dp_a, A_IP)
        sync_b = await start(nursery, config, dp_b, B_IP)
        run_xdp(dp_a.fd, ack(21000))
        await until(lambda: sync_b.counters["installed"] >= 1, "first flow")
        record = gossip.flow_wire(bytes(key(21001)), bytes(16), gossip.FlowOp.NEW)
        forged = bytearray(gossip.encode_flows(gossip.Keyring(b"x" * 32), sync_a.node_id, sync_a.incarnation, 10**6,
                                               [record]))
        forged[8:12] = KEY.current_id.to_bytes(4, "big")  # our key id (seen on the wire), a tag made without our key
        replay = sync_a.retransmit.lookup([gossip.ResendRange(sync_a.node_id, sync_a.incarnation, 1, 10**6)],
                                          sync_a.node_id, sync_a.incarnation)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for datagram in [bytes(forged), b"garbage", *replay]:
                s.sendto(datagram, (str(B_IP), config.port))
        await until(lambda: sync_b.counters["forged"] == 1 and sync_b.counters["malformed"] == 1
                    and sync_b.snapshot()["counters"]["replayed"] >= len(replay), "drops counted")
        assert dp_b.lookup_flow(key(21001)) is None
        nursery.cancel_scope.cancel()


async def test_resync_installs_the_peer_table_before_returning(config: SyncConfig, clean) -> None:  # type: ignore[no-untyped-def]
    dp_a, dp_b = clean
    async with trio.open_nursery() as nursery:
        sync_a = await start(nursery, config, dp_a, A_IP)
        for port in range(22000, 23000):  # pinned while B is away
            run_xdp(dp_a.fd, ack(port))
        await until(lambda: sync_a.counters["events"] >= 1000, "A read its events")
        sync_b = await start(nursery, config, dp_b, B_IP)
        assert dp_b.lookup_flow(key(22500)) is None
        assert await sync_b.resync(5.0)
        assert all(dp_b.lookup_flow(key(port)) is not None for port in range(22000, 23000))
        assert sync_b.ready and sync_a.counters["resync_served"] == 1
        nursery.cancel_scope.cancel()


async def test_resync_without_peers_times_out(config: SyncConfig, clean) -> None:  # type: ignore[no-untyped-def]
    _, dp_b = clean
    async with trio.open_nursery() as nursery:
        sync_b = await start(nursery, config, dp_b, B_IP)
        with trio.fail_after(5):
            assert not await sync_b.resync(0.3)
        nursery.cancel_scope.cancel()


async def test_refresh_resends_flows_active_here_but_never_echoes_learned_ones(tmp_path: Path, clean) -> None:  # type: ignore[no-untyped-def]
    dp_a, dp_b = clean
    (tmp_path / "k").write_bytes(SECRET)
    (tmp_path / "k").chmod(0o600)
    cfg = SyncConfig.from_dict({"key_file": str(tmp_path / "k"), "peers": [str(A_IP), str(B_IP)],
                                "port": free_port(), "refresh_s": 1, "heartbeat_s": 0.2})
    async with trio.open_nursery() as nursery:
        sync_a = await start(nursery, cfg, dp_a, A_IP)
        sync_b = await start(nursery, cfg, dp_b, B_IP)
        dp_a.tick()  # the node publishes its clock; flows pinned now are "seen now"
        for port in range(24000, 24010):
            run_xdp(dp_a.fd, ack(port))
        await until(lambda: sync_b.counters["installed"] >= 10, "flows on B")
        await until(lambda: sync_a.counters["refreshed"] >= 10 and sync_b.counters["refresh_passes"] >= 2,
                    "a refresh pass on each node", timeout_s=15)
        assert sync_b.counters["refreshed"] == 0  # B carries no traffic for them: it must not echo them
        assert sync_b.counters["installed"] >= 20  # the refresh reached B (its LRU keeps the flows)
        nursery.cancel_scope.cancel()


async def test_a_resync_request_from_a_spoofed_source_is_not_answered(config: SyncConfig, clean) -> None:  # type: ignore[no-untyped-def]
    # A captured request replayed with a victim's source address must not send the table there.
    dp_a, dp_b = clean
    async with trio.open_nursery() as nursery:
        sync_a = await start(nursery, config, dp_a, A_IP)
        sync_b = await start(nursery, config, dp_b, B_IP)
        run_xdp(dp_a.fd, ack(25000))
        await until(lambda: sync_b.node_id in sync_a.policy.peers, "A heard B")
        request = gossip.encode_resync_request(KEY, sync_b.node_id, sync_b.incarnation, 0, 77)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as victim, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as attacker:
            victim.bind(("127.0.0.3", config.port))
            victim.setblocking(False)
            attacker.bind(("127.0.0.3", 0))
            attacker.sendto(request, (str(A_IP), config.port))
            await until(lambda: sync_a.counters.get("resync_misdirected") == 1, "spoofed request refused")
            await trio.sleep(0.2)  # an answer, if any had started, would be on its way by now
            with pytest.raises(BlockingIOError):
                victim.recvfrom(2048)
        assert sync_a.counters["resync_served"] == 0
        nursery.cancel_scope.cancel()


async def test_resync_answers_are_one_at_a_time_per_peer_and_bound_to_its_incarnation(  # type: ignore[no-untyped-def]
        config: SyncConfig, clean) -> None:
    dp_a, dp_b = clean
    async with trio.open_nursery() as nursery:
        sync_a = await start(nursery, config, dp_a, A_IP)
        sync_b = await start(nursery, config, dp_b, B_IP)
        await until(lambda: sync_b.node_id in sync_a.policy.peers, "A heard B")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((str(B_IP), 0))  # B's own address (replayed by someone who can spoof it)
            old = gossip.encode_resync_request(KEY, sync_b.node_id, sync_b.incarnation - 1, 1, 1)
            s.sendto(old, (str(A_IP), config.port))
            for request_id in range(10, 15):  # one burst: A reads them in one wake-up
                # distinct control numbers (a repeated number is a replay, refused before this check)
                s.sendto(gossip.encode_resync_request(KEY, sync_b.node_id, sync_b.incarnation, 1000 + request_id,
                                                      request_id), (str(A_IP), config.port))
        await until(lambda: sync_a.counters["resync_served"] >= 1, "one answer")
        assert sync_a.counters.get("resync_stale") == 1  # an older incarnation than A knows for B
        assert sync_a.counters.get("resync_busy") == 4 and sync_a.counters["resync_served"] == 1
        nursery.cancel_scope.cancel()


async def test_a_replayed_resync_request_is_answered_once_and_answers_are_rate_limited(  # type: ignore[no-untyped-def]
        config: SyncConfig, clean) -> None:
    dp_a, dp_b = clean
    async with trio.open_nursery() as nursery:
        sync_a = await start(nursery, config, dp_a, A_IP)
        sync_b = await start(nursery, config, dp_b, B_IP)
        await until(lambda: sync_b.node_id in sync_a.policy.peers, "A heard B")
        c = sync_a.counters
        outcomes = lambda: c["resync_served"] + c["resync_duplicate"] + c["resync_limited"]  # noqa: E731

        def request(request_id: int) -> bytes:  # sealed as B would: B's next control number
            return gossip.encode_resync_request(KEY, sync_b.node_id, sync_b.incarnation, sync_b.engine._control(),
                                                request_id, sync_a.node_id)

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((str(B_IP), 0))  # B's own address (replayed by someone who can spoof it)
            captured = request(500)
            s.sendto(captured, (str(A_IP), config.port))
            await until(lambda: c["resync_served"] == 1, "the request answered")
            for i in range(3):  # the captured datagram replayed, slower than any duplicate window
                s.sendto(captured, (str(A_IP), config.port))
                await until(lambda i=i: sync_a.policy.counters.control_replayed == i + 1, "a replay refused")
            s.sendto(request(500), (str(A_IP), config.port))  # its id under a new control number
            await until(lambda: c["resync_duplicate"] == 1, "an id answered already")
            for i in range(6):  # new ids, one after the other's answer: more than the burst
                before = outcomes()
                s.sendto(request(600 + i), (str(A_IP), config.port))
                await until(lambda before=before: outcomes() == before + 1 and not sync_a.engine._answering,
                            "an outcome")
        burst = sync_a.engine.timing.resync_answer_burst
        assert c["resync_served"] == burst and c["resync_limited"] == 6 - (burst - 1)
        nursery.cancel_scope.cancel()


async def test_old_incarnations_are_renewed_and_refused_by_a_fresh_receiver(config: SyncConfig, clean) -> None:  # type: ignore[no-untyped-def]
    dp_a, dp_b = clean
    old = int(time.time()) - 3 * 3600  # older than two renewals (30 min); accepted up to 6 h before
    async with trio.open_nursery() as nursery:
        sync_b = await start(nursery, config, dp_b, B_IP)
        # A datagram captured from a life of A three hours ago, replayed to B (which never heard A).
        record = gossip.flow_wire(bytes(key(26000)), addr16(B1.address), gossip.FlowOp.NEW)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((str(A_IP), 0))
            s.sendto(gossip.encode_flows(KEY, int(A_IP), old, 5, [record]), (str(B_IP), config.port))
        await until(lambda: sync_b.counters["received"] >= 1, "B read it")
        assert dp_b.lookup_flow(key(26000)) is None and int(A_IP) not in sync_b.policy.peers
        # A node whose incarnation has grown old renews it, so fresh receivers adopt it.
        sync_a = await start(nursery, config, dp_a, A_IP, incarnation=old)
        await until(lambda: int(A_IP) in sync_b.policy.peers, "B heard A")
        assert sync_a.incarnation > time.time() - 60
        assert sync_b.policy.peers[int(A_IP)].incarnation == sync_a.incarnation
        nursery.cancel_scope.cancel()


def test_record_builder_makes_the_wire_records_of_a_chunk() -> None:
    # numpy per chunk; the same bytes as codec.flow_wire per flow. Unknown backends are skipped,
    # a closing flow is a CLOSE, and with a floor only flows seen since then are kept.
    addresses = {1: B1.address, 3: B2.address}
    chunk = synthetic_flows(0, 4, addr16(VIP), 80, IPPROTO_TCP, 1, 0, last_seen_ns=100)
    values = bytearray(chunk.values)
    values[16 + 0:16 + 4] = (3).to_bytes(4, "little")  # flow 1 on backend 3, closing
    values[16 + 6:16 + 8] = FLOW_F_CLOSING.to_bytes(2, "little")
    values[32:36] = (2).to_bytes(4, "little")  # flow 2 on a backend with no address here
    values[48 + 8:48 + 16] = (50).to_bytes(8, "little")  # flow 3 seen long ago
    chunk = type(chunk)(chunk.keys, bytes(values))
    keys = [chunk.keys[i * 40:(i + 1) * 40] for i in range(4)]
    want = [gossip.flow_wire(keys[0], addr16(B1.address), gossip.FlowOp.REFRESH),
            gossip.flow_wire(keys[1], addr16(B2.address), gossip.FlowOp.CLOSE),
            gossip.flow_wire(keys[3], addr16(B1.address), gossip.FlowOp.REFRESH)]
    builder = RecordBuilder(addresses)
    assert builder.records(chunk) == b"".join(want)
    assert builder.records(chunk, floor_ns=60) == b"".join(want[:2])
    assert RecordBuilder({}).records(chunk) == b""
