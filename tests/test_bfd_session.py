"""BFD I/O (trio) and its BGP integration: virtual-clock endpoints back to back, real UDP on loopback, config."""
from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing
from test_bgp_speaker import Harness

from bgp import config as bgp_config
from bgp.bfd import session as bfd_session
from bgp.bfd.codec import ControlPacket, DropReason, State, encode
from bgp.bfd.fsm import SessionConfig, StateChange
from bgp.bfd.session import SOURCE_PORT_MAX, SOURCE_PORT_MIN, BfdEndpoint
from bgp.codec import Notification
from bgp.errors import ConfigError
from bgp.fsm import State as BgpState
from bgp.speaker import Speaker

pytestmark = pytest.mark.unit

NODE, ROUTER = "10.0.0.1", "10.0.0.254"
FAST = SessionConfig.from_ms(100, 3)


async def wait_for(predicate: Callable[[], object], *, step_s: float = 0.01) -> None:
    """Wait (inside the caller's fail_after) until `predicate()` holds."""
    while not predicate():  # noqa: ASYNC110  # polls a state with no event to wait on, under the caller's fail_after
        await trio.sleep(step_s)


@dataclass
class Wire:
    """Two endpoints joined in memory; either direction can be cut (a frozen or unplugged peer)."""

    cut: set[str] = field(default_factory=set)
    changes: list[tuple[float, str, StateChange, bool]] = field(default_factory=list)
    a: BfdEndpoint | None = None
    b: BfdEndpoint | None = None

    def on_change(self, side: str) -> Callable[[str, StateChange, bool], None]:
        return lambda peer, ch, failed: self.changes.append((trio.current_time(), side, ch, failed))

    def sender(self, side: str) -> Callable[[str, bytes], object]:
        async def send(peer: str, data: bytes) -> None:
            if side in self.cut:
                return
            other = self.b if side == "a" else self.a
            assert other is not None
            other.received(data, 255, NODE if side == "a" else ROUTER)
        return send


@pytest.fixture
async def wire() -> AsyncIterator[Wire]:
    w = Wire()
    w.a = BfdEndpoint({ROUTER: FAST}, on_change=w.on_change("a"), sender=w.sender("a"), discriminator=lambda: 11)
    w.b = BfdEndpoint({NODE: FAST}, on_change=w.on_change("b"), sender=w.sender("b"), discriminator=lambda: 22)
    async with trio.open_nursery() as nursery:
        await nursery.start(w.a.run)
        await nursery.start(w.b.run)
        yield w
        nursery.cancel_scope.cancel()


async def test_endpoints_come_up_and_detect_silence_in_detection_time(wire: Wire, autojump_clock: object) -> None:
    a, b = wire.a, wire.b
    assert a is not None and b is not None
    with trio.fail_after(10):
        await wait_for(lambda: a.state(ROUTER) is State.UP and b.state(NODE) is State.UP
                       and not a.snapshot()[ROUTER].poll_active)
        snap = a.snapshot()[ROUTER]
        assert (snap.state, snap.remote_discriminator, snap.local_discriminator) == ("UP", 22, 11)
        assert snap.tx_interval_ms == 100 and snap.detection_time_ms == 300 and snap.up_transitions == 1
        await trio.sleep(1.0)  # steady state: ~10 packets per second each way
        before = a.snapshot()[ROUTER].packets_received
        await trio.sleep(1.0)
        assert 10 <= a.snapshot()[ROUTER].packets_received - before <= 14
        wire.cut.add("b")  # the router goes silent
        t0 = trio.current_time()
        await wait_for(lambda: a.state(ROUTER) is State.DOWN, step_s=0.001)
        assert trio.current_time() - t0 <= 0.3 + 0.002
        (when, side, change, failed) = [c for c in wire.changes if c[1] == "a" and c[2].new is State.DOWN][0]
        assert failed and change.diag.name == "CONTROL_DETECTION_TIME_EXPIRED"
        assert a.snapshot()[ROUTER].failures == 1
        wire.cut.clear()
        await wait_for(lambda: a.state(ROUTER) is State.UP and b.state(NODE) is State.UP)
        assert a.snapshot()[ROUTER].up_transitions == 2


async def test_admin_down_is_not_a_failure(wire: Wire, autojump_clock: object) -> None:
    a, b = wire.a, wire.b
    assert a is not None and b is not None
    with trio.fail_after(10):
        await wait_for(lambda: a.state(ROUTER) is State.UP and b.state(NODE) is State.UP)
        await b.shutdown()
        assert b.state(NODE) is State.ADMIN_DOWN
        await wait_for(lambda: a.state(ROUTER) is State.DOWN)
        downs = [c for c in wire.changes if c[1] == "a" and c[2].new is State.DOWN]
        assert downs and not downs[0][3] and a.snapshot()[ROUTER].failures == 0
        assert a.snapshot()[ROUTER].remote_state == "ADMIN_DOWN"


async def test_malformed_and_foreign_packets_are_counted(wire: Wire, autojump_clock: object) -> None:
    a = wire.a
    assert a is not None
    good = encode(ControlPacket(State.DOWN, 5, 0, 1_000_000, 100_000, 3))
    assert a.received(good, 64, ROUTER) is DropReason.TTL
    assert a.received(good, 255, "10.0.0.9") is DropReason.UNKNOWN_PEER
    assert a.received(good[:20], 255, ROUTER) is DropReason.SHORT
    assert a.received(encode(ControlPacket(State.UP, 5, 999, 1, 1, 3)), 255, ROUTER) is DropReason.UNKNOWN_DISCRIMINATOR
    assert a.drops == {"short": 1, "ttl": 1, "unknown_discriminator": 1, "unknown_peer": 1}


# ---- real sockets on loopback -------------------------------------------------------------------

def free_udp_port(family: int, host: str) -> int:
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(("family", "host"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
async def test_udp_ttl_255_source_port_and_ttl_check_on_loopback(family: int, host: str) -> None:
    """A session to our own address hears itself (TTL 255 both ways) and comes Up; TTL 64 is dropped."""
    port = free_udp_port(family, host)
    ep = BfdEndpoint({host: FAST}, port=port)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(ep.run)
            sport = ep._runtimes[host].sock.getsockname()[1]  # type: ignore[union-attr]
            assert SOURCE_PORT_MIN <= sport <= SOURCE_PORT_MAX
            await wait_for(lambda: ep.state(host) is State.UP)
            assert ep.drops == {}
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                if family == socket.AF_INET:
                    s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 64)
                else:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 64)
                s.sendto(encode(ControlPacket(State.DOWN, 5, 0, 1_000_000, 100_000, 3)), (host, port))
            await wait_for(lambda: ep.drops.get("ttl") == 1)
            assert ep.state(host) is State.UP
            nursery.cancel_scope.cancel()


async def test_on_link_spoofer_with_ttl_255_cannot_take_an_up_session_down() -> None:
    """RFC 5880 §6.8.6 over real sockets: forged Down/AdminDown with Your Discriminator 0 (or ours) and a
    forged My Discriminator, TTL 255, from the peer's address, is dropped and counted; Up stays Up."""
    host = "127.0.0.1"
    port = free_udp_port(socket.AF_INET, host)
    ep = BfdEndpoint({host: FAST}, port=port, discriminator=lambda: 11)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(ep.run)
            await wait_for(lambda: ep.state(host) is State.UP)
            assert ep.snapshot()[host].remote_discriminator == 11  # it hears itself
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 255)
                for state, your in [(State.DOWN, 0), (State.ADMIN_DOWN, 0), (State.DOWN, 11), (State.UP, 0)]:
                    s.sendto(encode(ControlPacket(state, 0xBAD, your, 1_000_000, 100_000, 3)), (host, port))
            await wait_for(lambda: sum(ep.drops.values()) == 4)
            assert ep.drops == {"remote_discriminator_changed": 3, "your_discriminator_zero": 1}
            await trio.sleep(0.5)  # longer than the detection time: the genuine packets kept it Up
            snap = ep.snapshot()[host]
            assert (snap.state, snap.failures, snap.up_transitions) == ("UP", 0, 1)
            nursery.cancel_scope.cancel()


def bound_device(ep: BfdEndpoint, peer: str) -> str:
    sock = ep._runtimes[peer].sock
    assert sock is not None
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, 16).rstrip(b"\0").decode()


async def test_socket_bound_to_the_route_interface_which_may_go_away_and_return(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """SO_BINDTODEVICE to the route's interface (lo here); no route: nothing accepted, the session
    goes Down by detection time; a device that vanished before the bind is retried; the route back:
    bound again and Up again by itself. The node never sees an exception."""
    monkeypatch.setattr(bfd_session, "RESOLVE_INTERVAL_S", 0.05)
    host = "127.0.0.1"
    port = free_udp_port(socket.AF_INET, host)
    lo = socket.if_nametoindex("lo")
    real = bfd_session.RouteResolver()
    route: dict[str, tuple[int, str] | None | str] = {"now": "real"}  # what the route lookup answers

    def lookup(peer: str) -> tuple[int, str] | None:
        answer = route["now"]
        return real(peer) if answer == "real" else answer  # type: ignore[return-value]

    ep = BfdEndpoint({host: FAST}, port=port, resolver=lambda: lookup)
    try:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                await nursery.start(ep.run)
                assert bound_device(ep, host) == "lo" and ep.snapshot()[host].interface == "lo"
                assert ep.demux.interfaces == {host: lo}
                await wait_for(lambda: ep.state(host) is State.UP)
                route["now"] = None  # the link goes down: the route to the peer is gone
                await wait_for(lambda: ep.state(host) is State.DOWN)
                assert ep.snapshot()[host].failures == 1 and ep.drops.get("wrong_interface", 0) >= 1
                route["now"] = (999_999, "lbnodevanished0")  # the route names a device that is gone again
                await trio.sleep(0.3)
                assert bound_device(ep, host) == "lo" and ep.state(host) is State.DOWN
                route["now"] = "real"  # the link is back
                await wait_for(lambda: ep.state(host) is State.UP)
                snap = ep.snapshot()[host]
                assert snap.interface == "lo" and snap.up_transitions == 2 and bound_device(ep, host) == "lo"
                nursery.cancel_scope.cancel()
    finally:
        real.close()


# ---- BGP integration ------------------------------------------------------------------------------

BFD_CFG = bgp_config.load({
    "local_as": 4200000001, "router_id": NODE, "next_hop_v4": NODE,
    "peers": [{"address": ROUTER, "asn": 65000, "hold_time_s": 90, "connect_retry_s": 1,
               "bfd": {"interval_ms": 100, "multiplier": 3}}],
})


async def test_bfd_failure_tears_the_bgp_session_down_and_it_comes_back(autojump_clock: object) -> None:
    h = Harness()
    w = Wire()
    speaker = Speaker(BFD_CFG, connector=h.connector, rng=lambda: 0.0, bfd_sender=w.sender("a"))
    assert speaker.bfd is not None
    w.a = speaker.bfd
    w.b = BfdEndpoint({NODE: FAST}, on_change=w.on_change("b"), sender=w.sender("b"))
    async with trio.open_nursery() as nursery:
        await nursery.start(w.b.run)
        await nursery.start(speaker.run)
        with trio.fail_after(30):
            peer = await h.recv.receive()
            await peer.establish()
            await wait_for(lambda: speaker.bfd.state(ROUTER) is State.UP)  # type: ignore[union-attr]
            (status,) = speaker.snapshot()
            assert status.state == "Established" and status.bfd is not None and status.bfd.state == "UP"
            w.cut.add("b")  # the router's BFD packets stop (link cut): hold time (90 s) is far away
            t0 = trio.current_time()
            assert await peer.next_non_keepalive() == Notification(6, 10)  # Cease / BFD Down
            assert trio.current_time() - t0 <= 0.3 + 0.002
            assert await peer.receive() is None
            assert speaker.peer_state(ROUTER) is not BgpState.ESTABLISHED
            (status,) = speaker.snapshot()
            assert status.bfd_downs == 1 and status.bfd is not None and status.bfd.failures == 1
            assert status.last_error == "BFD session down"
            w.cut.clear()
            peer2 = await h.recv.receive()  # IdleHold restart: 0.75 x connect_retry_s
            assert 0.7 <= trio.current_time() - t0 <= 1.1
            await peer2.establish()
            await wait_for(lambda: speaker.bfd.state(ROUTER) is State.UP)  # type: ignore[union-attr]
        await speaker.shutdown()
        with trio.fail_after(1):
            await wait_for(lambda: w.b.state(NODE) is State.DOWN)  # type: ignore[union-attr]
        assert w.b.snapshot()[NODE].remote_state == "ADMIN_DOWN"
        assert w.b.snapshot()[NODE].failures == 1  # only the cut (our Down told it), not the shutdown
        nursery.cancel_scope.cancel()


BAD = [
    ({"bfd": 5}, "peers[0].bfd: must be a mapping"),
    ({"bfd": {"interval_ms": 0}}, "peers[0].bfd.interval_ms: must be 10..60000, got 0"),
    ({"bfd": {"interval_ms": "100"}}, "peers[0].bfd.interval_ms: must be int, got '100'"),
    ({"bfd": {"multiplier": 0}}, "peers[0].bfd.multiplier: must be 1..255, got 0"),
    ({"bfd": {"multiplier": True}}, "peers[0].bfd.multiplier: must be int, got True"),
    ({"bfd": {"interval": 100}}, "peers[0].bfd.interval: unknown key"),
]


@pytest.mark.parametrize(("peer", "error"), BAD, ids=[b[1] for b in BAD])
def test_bfd_config_errors_name_the_key_path(peer: dict, error: str) -> None:
    with pytest.raises(ConfigError) as info:
        bgp_config.load({"local_as": 65001, "router_id": NODE, "next_hop_v4": NODE,
                         "peers": [{"address": ROUTER, "asn": 65000, **peer}]})
    assert str(info.value).startswith(error)


def test_bfd_config_defaults_and_absence() -> None:
    cfg = bgp_config.load({"local_as": 65001, "router_id": NODE, "next_hop_v4": NODE,
                           "peers": [{"address": ROUTER, "asn": 65000, "bfd": {}},
                                     {"address": "10.0.0.253", "asn": 65000}]})
    assert cfg.peers[0].bfd == bgp_config.BfdConfig(300, 3) and cfg.peers[1].bfd is None
    assert Speaker(cfg).bfd is not None and Speaker(bgp_config.load({
        "local_as": 65001, "router_id": NODE, "next_hop_v4": NODE,
        "peers": [{"address": ROUTER, "asn": 65000}]})).bfd is None


async def test_cancelled_speaker_sends_bfd_admin_down_and_bgp_cease(autojump_clock: object) -> None:
    """Cancelled without shutdown() (the node stopping on an error): the router's BFD session sees
    AdminDown (not a failure, RFC 5882 §3.2) and BGP gets Cease 6/2, both at once."""
    h = Harness()
    w = Wire()
    speaker = Speaker(BFD_CFG, connector=h.connector, rng=lambda: 0.0, bfd_sender=w.sender("a"))
    assert speaker.bfd is not None
    w.a = speaker.bfd
    w.b = BfdEndpoint({NODE: FAST}, on_change=w.on_change("b"), sender=w.sender("b"))
    async with trio.open_nursery() as nursery:
        await nursery.start(w.b.run)
        scope = trio.CancelScope()

        async def run_speaker(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                await speaker.run(task_status=task_status)

        await nursery.start(run_speaker)
        with trio.fail_after(30):
            peer = await h.recv.receive()
            await peer.establish()
            await wait_for(lambda: speaker.bfd.state(ROUTER) is State.UP  # type: ignore[union-attr]
                           and w.b.state(NODE) is State.UP)  # type: ignore[union-attr]
            t0 = trio.current_time()
            scope.cancel()
            assert await peer.next_non_keepalive() == Notification(6, 2)
            assert await peer.receive() is None
            await wait_for(lambda: w.b.state(NODE) is State.DOWN, step_s=0.001)  # type: ignore[union-attr]
            assert trio.current_time() - t0 < 0.05  # not the 300 ms detection time
        assert w.b.snapshot()[NODE].remote_state == "ADMIN_DOWN" and w.b.snapshot()[NODE].failures == 0
        nursery.cancel_scope.cancel()
