"""The trio speaker against a scripted peer over memory streams, on trio's virtual clock."""
from __future__ import annotations

from collections.abc import AsyncIterator
from ipaddress import IPv4Address, IPv4Network
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from bgp import config as bgp_config
from bgp.attrs import GRACEFUL_SHUTDOWN
from bgp.codec import (
    FourOctetAsCap,
    Framer,
    Keepalive,
    Message,
    MultiprotocolCap,
    Notification,
    Open,
    RouteRefresh,
    Update,
    encode,
)
from bgp.config import PeerConfig
from bgp.errors import ConfigError
from bgp.fsm import State
from bgp.inbox import INBOX_FRAMES
from bgp.rib import RouteAttrs
from bgp.speaker import Speaker
from bgp.transport import md5sig

pytestmark = pytest.mark.unit

VIP = IPv4Network("192.0.2.10/32")
ROUTER = "10.0.0.254"
CFG = bgp_config.load({
    "local_as": 4200000001, "router_id": "10.0.0.1", "next_hop_v4": "10.0.0.1",
    "peers": [{"address": ROUTER, "asn": 65000, "hold_time_s": 3, "connect_retry_s": 1}],
})
PEER_OPEN = Open(65000, 3, IPv4Address(ROUTER), (MultiprotocolCap(1, 1), FourOctetAsCap(65000)))


class FakePeer:
    """The router's side of the connection: scripted sends, decoded receives."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.framer = Framer(four_octet_as=True)
        self.pending: list[Message] = []

    async def send(self, msg: Message | bytes) -> None:
        await self.stream.send_all(msg if isinstance(msg, bytes) else encode(msg))

    async def receive(self) -> Message | None:
        while not self.pending:
            data = await self.stream.receive_some(65536)
            if not data:
                return None
            self.framer.feed(data)
            self.pending.extend(self.framer.messages())
        return self.pending.pop(0)

    async def establish(self) -> tuple[Open, list[Update]]:
        """Handshake; returns our speaker's OPEN and the UPDATEs up to End-of-RIB."""
        their_open = await self.receive()
        assert isinstance(their_open, Open)
        await self.send(PEER_OPEN)
        assert isinstance(await self.receive(), Keepalive)
        await self.send(Keepalive())
        updates = []
        while True:
            m = await self.receive()
            if isinstance(m, Keepalive):
                continue
            assert isinstance(m, Update)
            updates.append(m)
            if m.is_end_of_rib:
                return their_open, updates

    async def next_non_keepalive(self) -> Message | None:
        while True:
            m = await self.receive()
            if not isinstance(m, Keepalive):
                return m


class Harness:
    def __init__(self) -> None:
        self.send, self.recv = trio.open_memory_channel[FakePeer](10)
        self.attempts = 0

    async def connector(self, peer: PeerConfig) -> trio.abc.Stream:
        self.attempts += 1
        ours, theirs = trio.testing.memory_stream_pair()
        await self.send.send(FakePeer(theirs))
        return ours


@pytest.fixture
async def running() -> AsyncIterator[tuple[Speaker, Harness]]:
    h = Harness()
    speaker = Speaker(CFG, connector=h.connector, rng=lambda: 0.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(speaker.run)
        yield speaker, h
        nursery.cancel_scope.cancel()


async def test_announce_withdraw_and_only_changes(running: tuple[Speaker, Harness], autojump_clock: object) -> None:
    speaker, h = running
    speaker.announce(VIP, RouteAttrs(med=5))
    with trio.fail_after(10):
        peer = await h.recv.receive()
        their_open, updates = await peer.establish()
        assert their_open.asn == 4200000001 and their_open.my_as == 23456
        assert updates[0].nlri == (VIP,) and updates[0].attributes.med == 5
        assert speaker.peer_state(ROUTER) is State.ESTABLISHED
        speaker.announce(VIP, RouteAttrs(med=5))  # no change: nothing sent
        speaker.withdraw(VIP)
        assert await peer.next_non_keepalive() == Update(withdrawn=(VIP,))


async def test_silent_peer_dropped_at_hold_expiry_and_routes_resent(
        running: tuple[Speaker, Harness], autojump_clock: object) -> None:
    speaker, h = running
    speaker.announce(VIP)
    with trio.fail_after(30):
        peer = await h.recv.receive()
        await peer.establish()
        start = trio.current_time()
        assert await peer.next_non_keepalive() == Notification(4, 0)
        assert trio.current_time() - start == pytest.approx(3.0, abs=0.01)
        assert await peer.receive() is None  # closed
        peer2 = await h.recv.receive()  # automatic restart after IdleHold
        assert 0.7 <= trio.current_time() - start - 3.0 <= 1.1
        _, updates = await peer2.establish()
        assert updates[0].nlri == (VIP,)  # everything re-sent on the new session


async def test_keepalives_at_a_third_of_hold(running: tuple[Speaker, Harness], autojump_clock: object) -> None:
    _, h = running
    with trio.fail_after(10):
        peer = await h.recv.receive()
        await peer.establish()
        t0 = trio.current_time()
        assert isinstance(await peer.receive(), Keepalive)
        assert trio.current_time() - t0 == pytest.approx(1.0, abs=0.01)


async def test_malformed_update_gets_notification(running: tuple[Speaker, Harness], autojump_clock: object) -> None:
    _, h = running
    with trio.fail_after(10):
        peer = await h.recv.receive()
        await peer.establish()
        await peer.send(b"\xff" * 16 + bytes.fromhex("0017 02 0005 0000"))  # withdrawn length overrun
        assert await peer.next_non_keepalive() == Notification(3, 1)


async def test_route_refresh_is_answered(running: tuple[Speaker, Harness], autojump_clock: object) -> None:
    speaker, h = running
    speaker.announce(VIP)
    with trio.fail_after(10):
        peer = await h.recv.receive()
        await peer.establish()
        await peer.send(RouteRefresh(1, 1))
        m = await peer.next_non_keepalive()
        assert isinstance(m, Update) and m.nlri == (VIP,)
        m = await peer.next_non_keepalive()
        assert isinstance(m, Update) and m.is_end_of_rib


async def test_graceful_shutdown_tags_waits_withdraws_then_ceases(autojump_clock: object) -> None:
    h = Harness()
    cfg = bgp_config.load({
        "local_as": 65000, "router_id": "10.0.0.1", "next_hop_v4": "10.0.0.1", "graceful_shutdown_wait_s": 5,
        "peers": [{"address": ROUTER, "asn": 65000, "hold_time_s": 0}],
    })
    speaker = Speaker(cfg, connector=h.connector, rng=lambda: 0.0)
    speaker.announce(VIP)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(speaker.run)
            peer = await h.recv.receive()
            await peer.establish()
            nursery.start_soon(speaker.shutdown)
            t0 = trio.current_time()
            tagged = await peer.next_non_keepalive()
            assert isinstance(tagged, Update) and GRACEFUL_SHUTDOWN in tagged.attributes.communities
            assert tagged.attributes.local_pref == 100 and tagged.attributes.as_path == ()
            assert await peer.next_non_keepalive() == Update(withdrawn=(VIP,))
            assert trio.current_time() - t0 == pytest.approx(5.0, abs=0.01)
            assert await peer.next_non_keepalive() == Notification(6, 2)
            assert await peer.receive() is None


def test_md5sig_struct_layout() -> None:
    raw = md5sig(IPv4Address("10.0.0.254"), "secret", v6_socket=False)
    assert len(raw) == 216  # sizeof(struct tcp_md5sig)
    assert raw[:8] == bytes([2, 0, 0, 0, 10, 0, 0, 254])  # AF_INET (host order), port 0, address
    assert raw[128:136] == bytes([0, 0, 6, 0, 0, 0, 0, 0]) and raw[136:142] == b"secret"
    raw6 = md5sig(IPv4Address("10.0.0.254"), "k", v6_socket=True)
    assert raw6[:2] == bytes([10, 0]) and raw6[8:24] == bytes(10) + b"\xff\xff" + bytes([10, 0, 0, 254])


@pytest.mark.parametrize("cfg,error", [
    ({"router_id": "1.2.3.4", "peers": []}, "local_as: required"),
    ({"local_as": 0, "router_id": "1.2.3.4", "peers": []}, "local_as: must be an AS number"),
    ({"local_as": 65000, "router_id": "1.2.3.4", "next_hop_v4": "1.2.3.4",
      "peers": [{"address": "10.0.0.1", "asn": 65001}, {"address": "10.0.0.2", "asn": 65001, "hold_time_s": 2}]},
     "peers[1].hold_time_s: must be 0 or 3..65535"),
    ({"local_as": 65000, "router_id": "::1", "peers": []}, "router_id: must be an IPv4 address"),
    ({"local_as": 65000, "router_id": "1.2.3.4", "next_hop_v4": "1.2.3.4",
      "peers": [{"address": "10.0.0.1", "asn": 65001, "attrs": {"communities": ["65536:1"]}}]},
     "peers[0].attrs.communities[0]: must be 'ASN:VALUE'"),
    ({"local_as": 65000, "router_id": "1.2.3.4", "next_hop_v4": "1.2.3.4",
      "peers": [{"address": "10.0.0.1", "asn": 65001, "passive": True}]}, "peers[0].passive: a passive peer needs"),
    ({"local_as": 65000, "router_id": "1.2.3.4", "next_hop_v4": "1.2.3.4", "peers": [{"address": "10.0.0.1",
      "asn": 65001}], "announce": [{"prefix": "2001:db8::/64"}]}, "announce[0].prefix: IPv6 route but no next_hop_v6"),
    ({"local_as": 65000, "router_id": "1.2.3.4", "bogus": 1}, "bogus: unknown key"),
    ({"local_as": 65000, "router_id": "1.2.3.4", "next_hop_v4": "1.2.3.4",
      "peers": [{"address": "10.0.0.1", "asn": 65001, "hold_time": 3}]}, "peers[0].hold_time: unknown key"),
    ({"local_as": 65000, "router_id": "1.2.3.4", "next_hop_v4": "1.2.3.4",
      "peers": [{"address": "10.0.0.1", "asn": 65001, "attrs": {"comunities": ["65000:1"]}}]},
     "peers[0].attrs.comunities: unknown key"),
    ({"local_as": 65000, "router_id": "1.2.3.4", "next_hop_v4": "1.2.3.4",
      "peers": [{"address": "10.0.0.1", "asn": 65001, "attrs": 5}]}, "peers[0].attrs: must be a mapping, got int"),
    ({"local_as": 65000, "router_id": "1.2.3.4", "next_hop_v4": "1.2.3.4",
      "peers": [{"address": "10.0.0.1", "asn": 65001, "attrs": ["med"]}]}, "peers[0].attrs: must be a mapping"),
    ({"local_as": 65000, "router_id": "1.2.3.4", "next_hop_v4": "1.2.3.4",
      "peers": [{"address": "10.0.0.1", "asn": 65001, "bfd": {"interval": 100}}]},
     "peers[0].bfd.interval: unknown key"),
    ({"local_as": 65000, "router_id": "1.2.3.4", "next_hop_v4": "1.2.3.4", "peers": [{"address": "10.0.0.1",
      "asn": 65001}], "announce": [{"prefix": "192.0.2.1/32", "metric": 5}]}, "announce[0].metric: unknown key"),
    ({"local_as": 65000, "router_id": "1.2.3.4", "next_hop_v4": "1.2.3.4", "listen_port": 70000,
      "peers": [{"address": "10.0.0.1", "asn": 65001}]}, "listen_port: must be 0..65535 (0: any free port), got 70000"),
    ({"local_as": 65000, "router_id": "1.2.3.4", "next_hop_v4": "1.2.3.4", "listen_port": -1,
      "peers": [{"address": "10.0.0.1", "asn": 65001}]}, "listen_port: must be 0..65535"),
])
def test_config_errors_name_the_key_path(cfg: dict, error: str) -> None:
    with pytest.raises(ConfigError) as e:
        bgp_config.load(cfg)
    assert str(e.value).startswith(error)


async def loopback_speaker(**peer: Any) -> tuple[trio.socket.SocketType, Speaker]:
    """A listening speaker (127.0.0.1) whose one peer is a fake router listening on `listener`."""
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    cfg = bgp_config.load({
        "local_as": 65001, "router_id": "10.0.0.1", "next_hop_v4": "10.0.0.1", "listen": True,
        "listen_address": "127.0.0.1", "listen_port": 0,
        "peers": [{"address": "127.0.0.1", "port": listener.getsockname()[1], "asn": 65000, "hold_time_s": 30,
                   **peer}],
    })
    return listener, Speaker(cfg, rng=lambda: 0.0)



async def test_collision_keeps_the_connection_of_the_higher_identifier() -> None:
    """Real loopback sockets: both sides connect; the peer (10.0.0.254 > 10.0.0.1) keeps its own."""
    listener, speaker = await loopback_speaker()
    speaker.announce(VIP)
    with trio.fail_after(10), listener:
        async with trio.open_nursery() as nursery:
            await nursery.start(speaker.run)
            sock, _ = await listener.accept()
            outgoing = FakePeer(trio.SocketStream(sock))  # the speaker's connection to us
            assert isinstance(await outgoing.receive(), Open)
            incoming = FakePeer(await trio.open_tcp_stream("127.0.0.1", speaker.listen_port))
            assert isinstance(await incoming.receive(), Open)
            await outgoing.send(PEER_OPEN)
            await incoming.send(PEER_OPEN)
            assert await outgoing.next_non_keepalive() == Notification(6, 7)  # collision resolution
            assert await outgoing.receive() is None
            assert isinstance(await incoming.receive(), Keepalive)
            await incoming.send(Keepalive())
            await speaker.wait_established("127.0.0.1")
            m = await incoming.next_non_keepalive()
            assert isinstance(m, Update) and m.nlri == (VIP,)
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("with_notification", [True, False], ids=["cease-then-close", "just-close"])
async def test_collision_peer_dumps_our_outgoing_connection_first(with_notification: bool) -> None:
    """The router resolves the collision before we do: it closes our outgoing connection in
    OpenSent, then sends its OPEN on the incoming one. That one becomes the session (no crash),
    and later changes are sent on it."""
    listener, speaker = await loopback_speaker(connect_retry_s=0.5)
    speaker.announce(VIP)
    with trio.fail_after(10), listener:
        async with trio.open_nursery() as nursery:
            await nursery.start(speaker.run)
            sock, _ = await listener.accept()
            outgoing = FakePeer(trio.SocketStream(sock))
            assert isinstance(await outgoing.receive(), Open)
            incoming = FakePeer(await trio.open_tcp_stream("127.0.0.1", speaker.listen_port))
            assert isinstance(await incoming.receive(), Open)
            if with_notification:
                await outgoing.send(Notification(6, 7))
            await outgoing.stream.aclose()
            # The speaker must see the close before the OPEN: wait until it records the failure.
            while not speaker.snapshot()[0].last_error:  # noqa: ASYNC110  # no event for it; under fail_after(10)
                await trio.sleep(0.005)
            await incoming.send(PEER_OPEN)
            assert isinstance(await incoming.receive(), Keepalive)
            await incoming.send(Keepalive())
            await speaker.wait_established("127.0.0.1")
            assert speaker.peer_state("127.0.0.1") is State.ESTABLISHED
            m = await incoming.next_non_keepalive()
            assert isinstance(m, Update) and m.nlri == (VIP,)
            assert isinstance(await incoming.next_non_keepalive(), Update)  # End-of-RIB
            speaker.withdraw(VIP)
            assert await incoming.next_non_keepalive() == Update(withdrawn=(VIP,))
            with trio.move_on_after(1.0) as idle:  # > connect_retry_s: no new outgoing attempt
                await listener.accept()
            assert idle.cancelled_caught, "connected out again while a session is Established"
            nursery.cancel_scope.cancel()


async def test_collision_with_a_session_that_becomes_established_closes_the_new_connection() -> None:
    """RFC 4271 §6.8: our outgoing session reaches Established while the peer's incoming connection
    is still in OpenSent: the incoming one gets Cease 6/7 rather than becoming a second session."""
    listener, speaker = await loopback_speaker()
    with trio.fail_after(10), listener:
        async with trio.open_nursery() as nursery:
            await nursery.start(speaker.run)
            sock, _ = await listener.accept()
            outgoing = FakePeer(trio.SocketStream(sock))
            assert isinstance(await outgoing.receive(), Open)
            await outgoing.send(PEER_OPEN)
            assert isinstance(await outgoing.receive(), Keepalive)  # OpenConfirm
            incoming = FakePeer(await trio.open_tcp_stream("127.0.0.1", speaker.listen_port))
            assert isinstance(await incoming.receive(), Open)  # the incoming connection has its own FSM
            await outgoing.send(Keepalive())
            await speaker.wait_established("127.0.0.1")
            assert await incoming.next_non_keepalive() == Notification(6, 7)
            assert await incoming.receive() is None
            assert speaker.peer_state("127.0.0.1") is State.ESTABLISHED
            nursery.cancel_scope.cancel()


async def _run_cancellable(nursery: trio.Nursery, speaker: Speaker) -> trio.CancelScope:
    """Start `speaker.run` under its own cancel scope, as the node does; returns the scope."""
    scope = trio.CancelScope()

    async def run_in(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await speaker.run(task_status=task_status)
    await nursery.start(run_in)
    return scope


async def test_cancelled_speaker_sends_cease_and_closes(autojump_clock: object) -> None:
    """The node cancels the speaker on an error: the router hears Cease 6/2 and EOF at once,
    rather than keeping our routes until its hold timer expires."""
    h = Harness()
    speaker = Speaker(CFG, connector=h.connector, rng=lambda: 0.0)
    speaker.announce(VIP)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            scope = await _run_cancellable(nursery, speaker)
            peer = await h.recv.receive()
            await peer.establish()
            t0 = trio.current_time()
            scope.cancel()
            assert await peer.next_non_keepalive() == Notification(6, 2)
            assert await peer.receive() is None
            assert trio.current_time() - t0 < 0.1


async def test_second_connection_while_established_gets_cease_collision() -> None:
    listener, speaker = await loopback_speaker()
    with trio.fail_after(10), listener:
        async with trio.open_nursery() as nursery:
            await nursery.start(speaker.run)
            sock, _ = await listener.accept()
            await FakePeer(trio.SocketStream(sock)).establish()
            assert speaker.peer_state("127.0.0.1") is State.ESTABLISHED
            second = FakePeer(await trio.open_tcp_stream("127.0.0.1", speaker.listen_port))
            assert await second.receive() == Notification(6, 7)
            assert await second.receive() is None
            assert speaker.peer_state("127.0.0.1") is State.ESTABLISHED
            nursery.cancel_scope.cancel()


async def test_accept_errors_do_not_kill_the_speaker(monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """EMFILE from accept(): logged once (rate-limited), retried after a short pause."""
    import errno

    cfg = bgp_config.load({
        "local_as": 65001, "router_id": "10.0.0.1", "next_hop_v4": "10.0.0.1", "listen": True,
        "listen_address": "127.0.0.1", "listen_port": 0,
        "peers": [{"address": "127.0.0.1", "asn": 65000, "hold_time_s": 30, "passive": True}],
    })
    speaker = Speaker(cfg, rng=lambda: 0.0)
    failures = 3
    real_accept = speaker._accept

    async def flaky_accept(sock: trio.socket.SocketType) -> object:
        nonlocal failures
        await trio.lowlevel.checkpoint()
        if failures:
            failures -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return await real_accept(sock)

    monkeypatch.setattr(speaker, "_accept", flaky_accept)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(speaker.run)
            peer = FakePeer(await trio.open_tcp_stream("127.0.0.1", speaker.listen_port))
            await peer.establish()
            assert failures == 0
            assert len([r for r in caplog.records if "accept() failed" in r.getMessage()]) == 1
            nursery.cancel_scope.cancel()


async def test_a_peer_that_stops_reading_cannot_stall_the_hold_timer(autojump_clock: object) -> None:
    """Our KEEPALIVE blocks (the peer reads nothing and sends nothing): the session still ends at
    hold expiry (3 s), not when the 10 s send timeout gives up."""
    sent: trio.MemorySendChannel[FakePeer]
    sent, received = trio.open_memory_channel[FakePeer](10)

    async def connector(peer: PeerConfig) -> trio.abc.Stream:
        ours, theirs = trio.testing.lockstep_stream_pair()
        await sent.send(FakePeer(theirs))
        return ours

    speaker = Speaker(CFG, connector=connector, rng=lambda: 0.0)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(speaker.run)
            peer = await received.receive()
            await peer.establish()
            t0 = trio.current_time()
            await trio.sleep(3.2)
            assert speaker.peer_state(ROUTER) is not State.ESTABLISHED
            (status,) = speaker.snapshot()
            assert status.last_error == "hold timer expired"
            assert trio.current_time() - t0 < 3.3
            nursery.cancel_scope.cancel()


class SlowSpeaker(Speaker):
    """Takes 5 ms (of virtual time) to process each received UPDATE."""

    async def _received(self, peer: Any, fsm: Any, conn: Any, msg: Message) -> None:
        if isinstance(msg, Update):
            await trio.sleep(0.005)
        await super()._received(peer, fsm, conn, msg)


async def test_a_flooding_peer_is_held_back_by_a_bounded_inbox_and_keeps_its_session(
        autojump_clock: object) -> None:
    """The peer sends UPDATEs as fast as the connection takes them, and we process one per 5 ms. The
    inbox never holds more than INBOX_FRAMES received messages, the reader stops reading (the
    peer's sends block: lockstep streams have no buffer, as a full TCP window), KEEPALIVEs still go
    out every second, the session stays up, every UPDATE is processed, and shutdown still works."""
    sent: trio.MemorySendChannel[FakePeer]
    sent, received = trio.open_memory_channel[FakePeer](10)

    async def connector(peer: PeerConfig) -> trio.abc.Stream:
        ours, theirs = trio.testing.lockstep_stream_pair()
        await sent.send(FakePeer(theirs))
        return ours

    speaker = SlowSpeaker(CFG, connector=connector, rng=lambda: 0.0)
    ours = speaker._peers[ROUTER]
    flood = [encode(Update(withdrawn=(IPv4Network(f"198.51.{i // 256}.{i % 256}/32"),))) for i in range(1500)]
    keepalives: list[float] = []
    got: list[Message] = []
    notified = trio.Event()  # a router stops sending once it has our NOTIFICATION
    outstanding_peak = inbox_peak = 0
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(speaker.run)
            peer = await received.receive()
            await peer.establish()

            async def drain() -> None:
                while (m := await peer.receive()) is not None:
                    got.append(m)
                    if isinstance(m, Keepalive):
                        keepalives.append(trio.current_time())
                    elif isinstance(m, Notification):
                        notified.set()

            nursery.start_soon(drain)
            t0 = trio.current_time()
            for n, data in enumerate(flood):
                outstanding_peak = max(outstanding_peak, n - ours.received_updates)
                inbox_peak = max(inbox_peak, ours.inbox_recv.statistics().current_buffer_used)
                await peer.send(data)
            while ours.received_updates < len(flood):  # noqa: ASYNC110  # a counter; under fail_after(60)
                await trio.sleep(0.01)
            elapsed = trio.current_time() - t0
            assert elapsed == pytest.approx(len(flood) * 0.005, rel=0.02)  # the loop never waited for the reader
            assert inbox_peak <= INBOX_FRAMES
            assert outstanding_peak <= INBOX_FRAMES + 2  # the peer was held back: one in hand, one in process
            (status,) = speaker.snapshot()
            assert status.state == "Established" and status.established_count == 1
            assert status.inbox_peak == INBOX_FRAMES and status.reader_waits > 0
            gaps = [b - a for a, b in pairwise([t0, *keepalives])]
            assert len(keepalives) >= 7 and max(gaps) <= 1.0 + 0.006  # late by one UPDATE's processing at most

            async def flood_until_notified() -> None:
                while not notified.is_set():
                    await peer.send(flood[0])

            nursery.start_soon(flood_until_notified)  # the reader is blocked again when we shut down
            await trio.sleep(1.0)
            assert ours.inbox_recv.statistics().current_buffer_used <= INBOX_FRAMES
            with trio.fail_after(2):
                await speaker.shutdown()
            assert [m for m in got if not isinstance(m, Keepalive)] == [Notification(6, 2)]
            nursery.cancel_scope.cancel()


async def test_rejected_open_is_logged_and_shown_in_the_snapshot(
        running: tuple[Speaker, Harness], autojump_clock: object, caplog: pytest.LogCaptureFixture) -> None:
    speaker, h = running
    caplog.set_level("INFO", logger="bgp.speaker")
    with trio.fail_after(10):
        peer = await h.recv.receive()
        assert isinstance(await peer.receive(), Open)
        await peer.send(Open(65099, 3, IPv4Address(ROUTER), (MultiprotocolCap(1, 1), FourOctetAsCap(65099))))
        assert await peer.next_non_keepalive() == Notification(2, 2)
        (status,) = speaker.snapshot()
        assert status.last_error == "sent NOTIFICATION 2/2 (Open Message/Bad Peer AS): peer AS 65099, expected 65000"
        peer2 = await h.recv.receive()  # IdleHold restart
        assert isinstance(await peer2.receive(), Open)
        await peer2.send(Notification(6, 5))  # the router rejects us
        assert await peer2.receive() is None
        (status,) = speaker.snapshot()
        assert status.last_error == "received NOTIFICATION 6/5 (Cease/Connection Rejected)"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("sent NOTIFICATION 2/2 (Open Message/Bad Peer AS) in OpenSent" in m for m in warnings)
    assert any("received NOTIFICATION 6/5 (Cease/Connection Rejected) in OpenSent" in m for m in warnings)
    infos = [r.getMessage() for r in caplog.records if r.levelname == "INFO"]
    assert infos.count(f"{ROUTER}: Connect -> OpenSent") == 2
    assert any(m.startswith(f"{ROUTER}: OpenSent -> Idle") for m in infos)


async def test_connect_flaps_are_logged_at_a_limited_rate(
        autojump_clock: object, caplog: pytest.LogCaptureFixture) -> None:
    import errno

    attempts = 0

    async def refused(peer: PeerConfig) -> trio.abc.Stream:
        nonlocal attempts
        attempts += 1
        raise OSError(errno.ECONNREFUSED, "Connection refused")

    caplog.set_level("DEBUG", logger="bgp.speaker")
    speaker = Speaker(CFG, connector=refused, rng=lambda: 0.0)
    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            await nursery.start(speaker.run)
            await trio.sleep(50)  # ConnectRetry 1 s with backoff: several refused attempts
            nursery.cancel_scope.cancel()
    assert attempts >= 4
    info = [r.getMessage() for r in caplog.records if r.levelname == "INFO" and "->" in r.getMessage()]
    debug = [r for r in caplog.records if r.levelname == "DEBUG" and "->" in r.getMessage()]
    assert [m for m in info if "-> Idle" not in m] == [f"{ROUTER}: Idle -> Connect"]
    assert len(debug) >= 2 * attempts - 2


def test_parse_attrs_keeps_its_signature_for_the_node_config() -> None:
    """cluster/config.py calls parse_attrs(d, "services[0].route.") for a service's `route`."""
    attrs = bgp_config.parse_attrs({"med": 0, "communities": ["65000:100"]}, "services[0].route.")
    assert attrs == RouteAttrs(med=0, communities=(65000 << 16 | 100,))
    with pytest.raises(ConfigError, match=r"^services\[0\]\.route\.localpref: unknown key$"):
        bgp_config.parse_attrs({"localpref": 200}, "services[0].route.")


def test_example_node_config_loads() -> None:
    import yaml

    path = Path(__file__).resolve().parent.parent / "examples" / "bgp-node.yaml"
    cfg = bgp_config.load(yaml.safe_load(path.read_text()))
    assert cfg.local_as == 4200000001 and cfg.peers[0].hold_time_s == 3
    assert [str(p) for p, _ in cfg.announce] == ["192.0.2.10/32", "2001:db8:f::10/128"]
    assert cfg.peers[0].attrs.communities == (65000 << 16 | 100,)


def test_runner_rejects_a_bad_config_with_the_key_path(tmp_path: Path) -> None:
    import subprocess
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_text("local_as: 65000\nrouter_id: 10.0.0.1\nnext_hop_v4: 10.0.0.1\n"
                   "peers:\n  - {address: 10.0.0.254, asn: 65000, hold_time_s: 1}\n")
    proc = subprocess.run([sys.executable, "-m", "bgp", str(bad)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "peers[0].hold_time_s: must be 0 or 3..65535 (RFC 4271 §4.2), got 1" in proc.stderr
