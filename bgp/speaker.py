"""The BGP speaker's only I/O module: trio sockets, timers and tasks around the sans-IO core.

Theory of operation
-------------------
`Speaker.run` owns a nursery (start it with `await nursery.start(speaker.run)`; it reports ready
once the listener, if any, is bound). Inside: an optional listener that accepts only configured
peer addresses, and one loop per peer. A peer loop is the only place its `Fsm` is touched: it
waits for the next inbox item (bytes from a connection, a finished connect attempt, an accepted
connection, a RIB change, a stop request) or the FSM's next deadline, feeds that in with
`trio.current_time()`, and carries out the actions. Each connection has a reader task that only
frames bytes and posts them to the inbox; decoding happens in the loop, so the 4-octet-AS switch
applies exactly from the message after the OPEN.

Backpressure: at most INBOX_FRAMES received messages wait in a peer's inbox. The reader takes a
slot (`_Peer.frame_slots`) before it posts a frame and the loop gives it back as it takes the
frame out, so a reader that is that far ahead blocks and stops reading its socket: TCP flow
control then holds the peer back instead of our memory growing (the framer keeps at most one
read's bytes). Everything else in the inbox (connects, accepts, BFD, sync, stop, send failures)
is posted without waiting, often by the loop itself or from synchronous callbacks, and is few by
construction (one sync pending, one item per connection or BFD change), so the loop never waits
on its own inbox, and a flooded peer still gets its keepalives: the FSM's deadline is checked
between any two items. A peer that floods and does not read our messages in turn is dropped by
the send bound below when its Hold time runs out, as RFC 4271 expects.

Collisions (RFC 4271 §6.8): a connection accepted while the peer's FSM is in OpenSent/OpenConfirm
gets its own FSM (`peer.other`); once an OPEN names the peer's identifier, `collision_loser` picks
the connection to dump (Cease 6/7) and the survivor becomes the peer's FSM. If the primary
connection closes first (the peer resolved the collision its own way), the other one is promoted;
if the primary reaches Established first, the other one is dumped. Routes go out on whichever FSM
is Established.

Shutdown (`shutdown()`): optionally re-advertise everything with GRACEFUL_SHUTDOWN and wait, then
withdraw all routes, then NOTIFICATION Cease/Administrative Shutdown and close (FIN after data).
Cancelled without `shutdown()` (the node stops on an error), `run` still sends Cease 6/2 on every
session and closes every connection, shielded, within CANCEL_CLEANUP_S, so routers drop our routes
at once instead of at hold expiry; BFD sessions go AdminDown as they are cancelled.

Sends are awaited by the peer loop, so each is bounded by the Hold deadline (and SEND_TIMEOUT_S):
a peer that stops reading cannot hold our timers back. A second connection while Established is
answered with Cease 6/7. Logging: FSM transitions at INFO (Idle/Connect/Active flapping at most once
a minute per peer), NOTIFICATIONs sent and received at WARNING with code/subcode; `snapshot()`
shows the latest failure reason as `last_error`.

BFD (RFC 5880/5881): peers with a `bfd` config get one session each in a `BfdEndpoint` that the
speaker's nursery runs. The endpoint's callback posts every change into or out of Up to the
peer's inbox. A failure (Up -> Down, not the peer's AdminDown) feeds BFD_DOWN into the FSM: Cease
6/10, close, restart after IdleHold. Up again resets the connect backoff and retries at once
(`Fsm.set_path_up`), so a node whose link comes back is not kept out by a backoff that grew. On shutdown the sessions go AdminDown after the BGP Cease.
`snapshot()` reports BGP and BFD state and counters per peer.

TCP MD5 (RFC 2385) uses Linux's TCP_MD5SIG socket option, set before connect() and per peer on
the listener, so unsigned or wrongly signed segments never reach us.
"""
from __future__ import annotations

import errno
import ipaddress
import logging
import math
import random
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from typing import Any

import trio

from bgp.bfd.fsm import SessionConfig as BfdSessionConfig
from bgp.bfd.fsm import State as BfdState
from bgp.bfd.fsm import StateChange as BfdStateChange
from bgp.bfd.session import BFD_PORT, BfdEndpoint, BfdStatus
from bgp.bfd.session import Sender as BfdSender
from bgp.attrs import Prefix
from bgp.codec import Framer, Message, Notification, Open, Update, decode, encode
from bgp.config import PeerConfig, SpeakerConfig
from bgp.errors import BgpError, DecodeError, notification_text
from bgp.fsm import (Close, Connect, Event, EventKind, Fsm, FsmConfig, ResendRoutes, Send, SessionDown, SessionUp,
                     State, Timer, collision_loser, event_for)
from bgp.rib import AdjRibOut, DesiredRib, ExportPolicy, RouteAttrs, end_of_rib

log = logging.getLogger(__name__)

TCP_MD5SIG = 14
TCP_MD5SIG_MAXKEYLEN = 80
SEND_TIMEOUT_S = 10.0
INBOX_FRAMES = 64  # received messages (at most 4096 bytes each) read ahead of a peer's loop
CLOSE_LINGER_S = 1.0
CANCEL_CLEANUP_S = 2.0  # Cease and close on cancellation, shielded, at most this long
FLAP_LOG_INTERVAL_S = 60.0  # at most one INFO line per peer per interval for Idle/Connect/Active flaps
ACCEPT_LOG_INTERVAL_S = 10.0
ACCEPT_BACKOFF_S = 0.1  # as trio.serve_listeners: out of file descriptors or memory, wait and retry
# accept() errnos that leave the listener usable (trio's SocketListener list, plus resource exhaustion).
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_TRANSIENT_ERRNOS = frozenset({errno.EAGAIN, errno.ECONNABORTED, errno.EPROTO, errno.ENETDOWN, errno.ENOPROTOOPT,
                                     errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH, errno.EOPNOTSUPP,
                                     errno.ENETUNREACH, errno.EPERM})
_QUIET_STATES = frozenset({State.IDLE, State.CONNECT, State.ACTIVE})
RETRY_ERRNOS = frozenset({errno.ECONNREFUSED, errno.ECONNRESET, errno.ETIMEDOUT, errno.EHOSTUNREACH,
                          errno.ENETUNREACH, errno.ECONNABORTED, errno.EPIPE, errno.EADDRNOTAVAIL})

Connector = Callable[[PeerConfig], Awaitable[trio.abc.Stream]]


def md5sig(address: IPv4Address | IPv6Address, password: str, *, v6_socket: bool) -> bytes:
    """`struct tcp_md5sig` (linux/tcp.h) for one peer address and key."""
    key = password.encode()
    if len(key) > TCP_MD5SIG_MAXKEYLEN:
        raise BgpError(f"MD5 key of {len(key)} bytes exceeds {TCP_MD5SIG_MAXKEYLEN}")
    if v6_socket:
        ip6 = address if isinstance(address, IPv6Address) else IPv6Address(f"::ffff:{address}")
        sa = struct.pack("=HHI16sI", socket.AF_INET6, 0, 0, ip6.packed, 0)
    else:
        sa = struct.pack("=HH4s", socket.AF_INET, 0, address.packed)
    return sa.ljust(128, b"\0") + struct.pack("=BBHi", 0, 0, len(key), 0) + key.ljust(TCP_MD5SIG_MAXKEYLEN, b"\0")


async def tcp_connect(peer: PeerConfig) -> trio.abc.Stream:
    """Default connector: a TCP connection to the peer, MD5-signed if configured."""
    family = socket.AF_INET6 if peer.address.version == 6 else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        if peer.md5_password:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_MD5SIG,
                            md5sig(peer.address, peer.md5_password, v6_socket=family == socket.AF_INET6))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await sock.connect((str(peer.address), peer.port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


@dataclass(eq=False)
class _Conn:
    """One TCP connection (or outgoing attempt) and the tasks that serve it."""

    outgoing: bool
    stream: trio.abc.Stream | None = None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    reader_done: trio.Event | None = None  # set when the reader task has exited
    torn: bool = False  # a send was cut short mid-message: the stream is unusable for BGP


@dataclass(frozen=True, slots=True)
class PeerStatus:
    """A snapshot of one peer for status output."""

    address: str
    state: str
    established_count: int
    received_updates: int
    treat_as_withdraw: int
    bfd_downs: int  # BGP sessions torn down because BFD failed
    inbox_peak: int  # most received messages ever waiting in the inbox (at most INBOX_FRAMES)
    reader_waits: int  # times a reader stopped reading because the inbox was full (backpressure)
    last_error: str
    bfd: BfdStatus | None


@dataclass(eq=False)
class _Peer:
    config: PeerConfig
    fsm: Fsm
    inbox_send: trio.MemorySendChannel[tuple[Any, ...]]
    inbox_recv: trio.MemoryReceiveChannel[tuple[Any, ...]]
    conn: _Conn | None = None  # the connection the FSM drives
    other: tuple[Fsm, _Conn] | None = None  # a colliding incoming connection and its FSM
    adj_out: AdjRibOut = field(default_factory=AdjRibOut)
    sync_pending: bool = False
    established_count: int = 0
    up: trio.Event = field(default_factory=trio.Event)
    received_updates: int = 0
    treat_as_withdraw: int = 0  # received UPDATEs with attribute errors (RFC 7606), ignored
    bfd_downs: int = 0
    frame_slots: trio.Semaphore = field(default_factory=lambda: trio.Semaphore(INBOX_FRAMES))
    inbox_peak: int = 0
    reader_waits: int = 0
    last_error: str = ""  # the latest reason a session failed or did not come up
    flap_logged_at: float = -math.inf  # rate limit of Idle/Connect/Active transition logs
    flaps_suppressed: int = 0
    state_before: State = State.IDLE  # the FSM's state before the event whose actions are being carried out


class Speaker:
    """Originates routes to the configured peers. The node calls `announce` and `withdraw`."""

    def __init__(self, config: SpeakerConfig, *, connector: Connector = tcp_connect,
                 rng: Callable[[], float] = random.random, bfd_port: int = BFD_PORT,
                 bfd_sender: BfdSender | None = None, on_sessions_changed: Callable[[], None] | None = None) -> None:
        """`on_sessions_changed` is called whenever a session comes up or goes down (read
        `established_peers()` then)."""
        self.config = config
        self._on_sessions_changed = on_sessions_changed
        self.rib = DesiredRib()
        self.draining = False
        self._connector = connector
        self._rng = rng
        self._nursery: trio.Nursery | None = None
        self._peers: dict[str, _Peer] = {}
        self.listen_port: int | None = None
        self._stopping = False
        for pc in config.peers:
            send, recv = trio.open_memory_channel[tuple[Any, ...]](math.inf)
            self._peers[str(pc.address)] = _Peer(pc, self._new_fsm(pc), send, recv)
        bfd = {str(pc.address): BfdSessionConfig.from_ms(pc.bfd.interval_ms, pc.bfd.multiplier)
               for pc in config.peers if pc.bfd is not None}
        self.bfd = BfdEndpoint(bfd, on_change=self._bfd_changed, port=bfd_port, rng=rng,
                               sender=bfd_sender) if bfd else None

    # ---- the node's API -------------------------------------------------------------------

    def announce(self, prefix: Prefix, attrs: RouteAttrs = RouteAttrs()) -> None:
        self.rib.announce(prefix, attrs)
        self._request_sync()

    def withdraw(self, prefix: Prefix) -> None:
        self.rib.withdraw(prefix)
        self._request_sync()

    def peer_state(self, address: str) -> State:
        return self._peers[str(ipaddress.ip_address(address))].fsm.state

    def established_peers(self) -> int:
        """How many peers have an Established session (on either of two colliding connections)."""
        return sum(any(fsm.state is State.ESTABLISHED for fsm, _ in self._fsms(p)) for p in self._peers.values())

    async def wait_established(self, address: str) -> None:
        await self._peers[str(ipaddress.ip_address(address))].up.wait()

    def snapshot(self) -> list[PeerStatus]:
        bfd = self.bfd.snapshot() if self.bfd is not None else {}
        return [PeerStatus(address=name, state=p.fsm.state.value, established_count=p.established_count,
                           received_updates=p.received_updates, treat_as_withdraw=p.treat_as_withdraw,
                           bfd_downs=p.bfd_downs, inbox_peak=p.inbox_peak, reader_waits=p.reader_waits,
                           last_error=p.last_error or p.fsm.last_error, bfd=bfd.get(name))
                for name, p in self._peers.items()]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self.bfd is not None:
                    await nursery.start(self.bfd.run)
                if self.config.listen:
                    await nursery.start(self._listen)
                for peer in self._peers.values():
                    nursery.start_soon(self._peer_loop, peer)
                task_status.started()
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True):
                await self._abort()

    async def _abort(self) -> None:
        """Cancelled or crashed without `shutdown()`: tell every peer now rather than at its hold expiry.

        Cease/Administrative Shutdown (6/2), as `shutdown()` sends: stopping the speaker is the
        node's decision (it stops attracting traffic it may not be able to forward), not a protocol
        error, and routers handle it like any Cease. No withdrawals first: closing the session
        drops its routes at once. Bounded by CANCEL_CLEANUP_S; then whatever is still open is
        closed forcefully. (BFD sessions send AdminDown from `BfdEndpoint.run` as they are cancelled.)
        """
        self._stopping = True  # connections are closed inline: FIN after the NOTIFICATION
        with trio.move_on_after(CANCEL_CLEANUP_S):
            try:
                async with trio.open_nursery() as nursery:
                    for peer in self._peers.values():
                        nursery.start_soon(self._stop_fsms, peer)
            except Exception:  # noqa: BLE001 - the streams below must be closed whatever happened
                log.exception("Cease on cancellation failed; closing the connections")
        for peer in self._peers.values():
            streams = [c.stream for _, c in self._fsms(peer) if c is not None and c.stream is not None]
            while True:
                try:
                    item = peer.inbox_recv.receive_nowait()
                except trio.WouldBlock:
                    break
                if item[0] == "accepted":
                    streams.append(item[1])
                elif item[0] == "connected":
                    streams.append(item[2])
            for stream in streams:
                await trio.aclose_forcefully(stream)

    async def shutdown(self, *, timeout_s: float = 10.0) -> None:
        """Graceful: GRACEFUL_SHUTDOWN + wait (if configured), withdraw all, Cease 6/2, close."""
        if self.config.graceful_shutdown_wait_s > 0 and any(p.fsm.state is State.ESTABLISHED
                                                             for p in self._peers.values()):
            log.info("graceful shutdown: tagging routes 65535:0 for %ss", self.config.graceful_shutdown_wait_s)
            self.draining = True
            self._request_sync()
            await trio.sleep(self.config.graceful_shutdown_wait_s)
        self.rib.routes.clear()
        self._stopping = True  # from now on connections are closed inline, so the FIN is not cut short
        with trio.move_on_after(timeout_s) as scope:
            done = []
            for peer in self._peers.values():
                ev = trio.Event()
                done.append(ev)
                peer.inbox_send.send_nowait(("stop", ev))
            for ev in done:
                await ev.wait()
        if scope.cancelled_caught:
            log.warning("graceful shutdown: peers did not finish within %ss", timeout_s)
        if self.bfd is not None:
            await self.bfd.shutdown()  # AdminDown: the routers must not take this for a failure
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    # ---- internals --------------------------------------------------------------------------

    def _new_fsm(self, pc: PeerConfig) -> Fsm:
        cfg = FsmConfig(local_as=self.config.local_as, peer_as=pc.asn, router_id=self.config.router_id,
                        hold_time_s=pc.hold_time_s, passive=pc.passive, connect_retry_s=pc.connect_retry_s,
                        families=self.config.families)
        return Fsm(cfg, self._rng)

    def _bfd_changed(self, address: str, change: BfdStateChange, failed: bool) -> None:
        if self._stopping:
            return
        if failed or BfdState.UP in (change.old, change.new):
            self._peers[address].inbox_send.send_nowait(("bfd", change.new is BfdState.UP, failed, change.diag.name))

    def _request_sync(self) -> None:
        for peer in self._peers.values():
            if not peer.sync_pending:
                peer.sync_pending = True
                peer.inbox_send.send_nowait(("sync",))

    def _policy(self, peer: _Peer, fsm: Fsm) -> ExportPolicy:
        assert fsm.negotiated is not None
        return ExportPolicy(local_as=self.config.local_as, ibgp=fsm.negotiated.ibgp,
                            next_hop_v4=self.config.next_hop_v4, next_hop_v6=self.config.next_hop_v6,
                            families=fsm.negotiated.families, peer_attrs=peer.config.attrs,
                            graceful_shutdown=self.draining,
                            next_hop_v6_link_local=self.config.next_hop_v6_link_local)

    async def _listen(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        addr = ipaddress.ip_address(self.config.listen_address)
        family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
        sock = trio.socket.socket(family, socket.SOCK_STREAM)
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            for peer in self._peers.values():
                if peer.config.md5_password and (family == socket.AF_INET6 or peer.config.address.version == 4):
                    sock.setsockopt(socket.IPPROTO_TCP, TCP_MD5SIG, md5sig(
                        peer.config.address, peer.config.md5_password, v6_socket=family == socket.AF_INET6))
            await sock.bind((str(addr), self.config.listen_port))
            sock.listen(16)
            self.listen_port = sock.getsockname()[1]
            log.info("listening on %s port %s", addr, self.listen_port)
            task_status.started()
            logged_at, suppressed = -math.inf, 0
            while True:
                try:
                    conn_sock, remote = await self._accept(sock)
                except OSError as exc:
                    if exc.errno not in ACCEPT_CAPACITY_ERRNOS | ACCEPT_TRANSIENT_ERRNOS:
                        raise
                    now = trio.current_time()
                    if now - logged_at >= ACCEPT_LOG_INTERVAL_S:
                        log.warning("accept() failed: %s%s", exc,
                                    f" ({suppressed} more since the last report)" if suppressed else "")
                        logged_at, suppressed = now, 0
                    else:
                        suppressed += 1
                    if exc.errno in ACCEPT_CAPACITY_ERRNOS:
                        await trio.sleep(ACCEPT_BACKOFF_S)
                    continue
                remote_ip = ipaddress.ip_address(remote[0])
                if isinstance(remote_ip, IPv6Address) and remote_ip.ipv4_mapped:
                    remote_ip = remote_ip.ipv4_mapped
                peer = self._peers.get(str(remote_ip))
                if peer is None:
                    log.warning("refusing connection from unconfigured %s", remote_ip)
                    conn_sock.close()
                    continue
                peer.inbox_send.send_nowait(("accepted", trio.SocketStream(conn_sock)))

    async def _accept(self, sock: trio.socket.SocketType) -> tuple[trio.socket.SocketType, Any]:
        return await sock.accept()

    async def _attempt(self, peer: _Peer, conn: _Conn) -> None:
        with conn.scope:
            try:
                stream = await self._connector(peer.config)
            except OSError as exc:
                if exc.errno not in RETRY_ERRNOS:
                    log.warning("%s: connect failed: %s", peer.config.address, exc)
                peer.inbox_send.send_nowait(("connect_failed", conn, str(exc)))
                return
            peer.inbox_send.send_nowait(("connected", conn, stream))

    def _start_reader(self, peer: _Peer, conn: _Conn) -> None:
        assert self._nursery is not None
        conn.reader_done = trio.Event()
        self._nursery.start_soon(self._reader, peer, conn)

    async def _reader(self, peer: _Peer, conn: _Conn) -> None:
        try:
            await self._read(peer, conn)
        finally:
            assert conn.reader_done is not None
            conn.reader_done.set()

    async def _read(self, peer: _Peer, conn: _Conn) -> None:
        framer = Framer()
        stream = conn.stream
        assert stream is not None
        with conn.scope:
            try:
                while True:
                    data = await stream.receive_some(65536)
                    if not data:
                        peer.inbox_send.send_nowait(("closed", conn, "peer closed the connection"))
                        return
                    framer.feed(data)
                    for raw in framer.frames():
                        slots = peer.frame_slots
                        if slots.value == 0:
                            peer.reader_waits += 1
                        await slots.acquire()  # backpressure: wait for the loop; no reading meanwhile
                        peer.inbox_send.send_nowait(("frame", conn, raw))
                        peer.inbox_peak = max(peer.inbox_peak, INBOX_FRAMES - slots.value)
            except DecodeError as exc:
                peer.inbox_send.send_nowait(("error", conn, exc))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                peer.inbox_send.send_nowait(("closed", conn, f"connection error: {exc}"))

    def _fsm_for(self, peer: _Peer, conn: _Conn) -> Fsm | None:
        if peer.conn is conn:
            return peer.fsm
        if peer.other is not None and peer.other[1] is conn:
            return peer.other[0]
        return None

    async def _peer_loop(self, peer: _Peer) -> None:
        name = str(peer.config.address)
        start = EventKind.MANUAL_START_PASSIVE if peer.config.passive else EventKind.MANUAL_START
        await self._apply(peer, peer.fsm, None, Event(start))
        while True:
            deadline = peer.fsm.next_deadline()
            if peer.other is not None:
                d2 = peer.other[0].next_deadline()
                deadline = d2 if deadline is None else min(deadline, d2 if d2 is not None else deadline)
            item: tuple[Any, ...] | None = None
            with trio.move_on_at(math.inf if deadline is None else deadline):
                item = await peer.inbox_recv.receive()
            if item is None:
                now = trio.current_time()
                for fsm, conn in self._fsms(peer):
                    await self._apply(peer, fsm, conn, None)
                continue
            kind = item[0]
            if kind == "frame":
                peer.frame_slots.release()  # out of the inbox: the reader may read on
            if kind == "sync":
                peer.sync_pending = False
                await self._sync(peer)
            elif kind == "stop":
                await self._stop(peer)
                item[1].set()
                return
            elif kind == "accepted":
                await self._accepted(peer, item[1])
            elif kind == "bfd":
                up, failed, diag = item[1], item[2], item[3]
                now = trio.current_time()
                for fsm, _ in self._fsms(peer):  # Up: the path works again, no backoff left from its outage
                    fsm.set_path_up(up, now)
                if failed:
                    if peer.fsm.state in (State.OPEN_SENT, State.OPEN_CONFIRM, State.ESTABLISHED):
                        peer.bfd_downs += 1
                    log.info("%s: BFD session down (%s) in BGP state %s", name, diag, peer.fsm.state.value)
                    for fsm, conn in self._fsms(peer):
                        await self._apply(peer, fsm, conn, Event(EventKind.BFD_DOWN))
            elif kind == "connected":
                conn, stream = item[1], item[2]
                if peer.conn is not conn or conn.stream is not None:
                    await _close_quietly(stream)
                    continue
                conn.stream = stream
                conn.scope = trio.CancelScope()  # the attempt used the first one
                self._start_reader(peer, conn)
                await self._apply(peer, peer.fsm, conn, Event(EventKind.TCP_CONNECTED))
            elif kind == "connect_failed":
                if peer.conn is item[1] and item[1].stream is None:
                    log.debug("%s: connect failed: %s", name, item[2])
                    await self._apply(peer, peer.fsm, item[1], Event(EventKind.TCP_FAILS))
            else:
                conn = item[1]
                fsm = self._fsm_for(peer, conn)
                if fsm is None:
                    continue  # from a connection already given up
                if kind == "frame":
                    four = fsm.negotiated.four_octet_as if fsm.negotiated else False
                    try:
                        msg = decode(item[2], four_octet_as=four)
                    except DecodeError as exc:
                        await self._apply(peer, fsm, conn, Event(EventKind.MESSAGE_ERROR, error=exc))
                        continue
                    await self._received(peer, fsm, conn, msg)
                elif kind == "error":
                    await self._apply(peer, fsm, conn, Event(EventKind.MESSAGE_ERROR, error=item[2]))
                elif kind == "closed":
                    fsm.last_error = item[2]
                    await self._apply(peer, fsm, conn, Event(EventKind.TCP_FAILS))

    def _fsms(self, peer: _Peer) -> list[tuple[Fsm, _Conn | None]]:
        out: list[tuple[Fsm, _Conn | None]] = [(peer.fsm, peer.conn)]
        if peer.other is not None:
            out.append(peer.other)
        return out

    async def _received(self, peer: _Peer, fsm: Fsm, conn: _Conn, msg: Message) -> None:
        log.debug("%s: received %s", peer.config.address, type(msg).__name__)
        if isinstance(msg, Update):
            peer.received_updates += 1  # parsed and validated; we originate only
            if msg.errors:
                peer.treat_as_withdraw += 1
                log.debug("%s: UPDATE treated as withdraw: %s", peer.config.address, msg.errors)
        if isinstance(msg, Notification):
            text = notification_text(msg.code, msg.subcode)
            log.warning("%s: received NOTIFICATION %s/%s (%s) in %s%s", peer.config.address, msg.code, msg.subcode,
                        text, fsm.state.value, f", data {msg.data.hex()}" if msg.data else "")
        await self._apply(peer, fsm, conn, event_for(msg))
        if isinstance(msg, Notification):
            peer.last_error = f"received NOTIFICATION {msg.code}/{msg.subcode} ({text})"
        if isinstance(msg, Open) and fsm.state is State.OPEN_CONFIRM and peer.other is not None:
            await self._resolve_collision(peer, msg)

    def _promote_other(self, peer: _Peer) -> None:
        """The primary connection is gone: the colliding incoming one becomes the peer's FSM."""
        assert peer.other is not None
        log.info("%s: primary connection gone (%s); carrying on with the incoming one in %s",
                 peer.config.address, peer.fsm.state.value, peer.other[0].state.value)
        peer.fsm, peer.conn = peer.other
        peer.other = None

    async def _dump_other(self, peer: _Peer) -> None:
        """Close the colliding connection with Cease 6/7; the primary one carries on."""
        assert peer.other is not None
        other_fsm, other_conn = peer.other
        peer.other = None
        await self._apply(peer, other_fsm, other_conn, Event(EventKind.OPEN_COLLISION_DUMP))

    async def _resolve_collision(self, peer: _Peer, msg: Open) -> None:
        if peer.other is None:
            return
        other_fsm, other_conn = peer.other
        if peer.conn is None or peer.fsm.state not in (State.OPEN_SENT, State.OPEN_CONFIRM, State.ESTABLISHED):
            self._promote_other(peer)  # no collision any more: the primary connection has gone
            return
        if peer.fsm.state is State.ESTABLISHED:
            # RFC 4271 §6.8: a collision with an Established session closes the new connection.
            if other_fsm.state in (State.OPEN_SENT, State.OPEN_CONFIRM):
                log.info("%s: connection collision with an Established session, closing the incoming one",
                         peer.config.address)
                await self._dump_other(peer)
            return
        if other_fsm.state not in (State.OPEN_SENT, State.OPEN_CONFIRM):
            return
        loser = collision_loser(self.config.router_id, msg.bgp_id)
        # Dump the connection in the losing direction; if both share a direction, the newer one.
        dump_primary = peer.conn.outgoing == (loser == "outgoing") and other_conn.outgoing != peer.conn.outgoing
        log.info("%s: connection collision, closing the %s one", peer.config.address,
                 "outgoing" if (peer.conn.outgoing if dump_primary else other_conn.outgoing) else "incoming")
        if dump_primary:
            old_fsm, old_conn = peer.fsm, peer.conn
            peer.fsm, peer.conn, peer.other = other_fsm, other_conn, None
            await self._apply(peer, old_fsm, old_conn, Event(EventKind.OPEN_COLLISION_DUMP))
        else:
            await self._dump_other(peer)

    async def _accepted(self, peer: _Peer, stream: trio.abc.Stream) -> None:
        state = peer.fsm.state
        conn = _Conn(outgoing=False, stream=stream)
        if state in (State.CONNECT, State.ACTIVE):
            if peer.conn is not None:
                await self._drop(peer.conn)  # abandon our own attempt: the peer's connection wins
            peer.conn = conn
            self._start_reader(peer, conn)
            await self._apply(peer, peer.fsm, conn, Event(EventKind.TCP_ACCEPTED))
        elif state in (State.OPEN_SENT, State.OPEN_CONFIRM) and peer.other is None and peer.conn is not None:
            fsm = self._new_fsm(peer.config)
            fsm.path_up = peer.fsm.path_up
            peer.other = (fsm, conn)
            self._start_reader(peer, conn)
            await self._apply(peer, fsm, conn, Event(EventKind.MANUAL_START_PASSIVE))
            await self._apply(peer, fsm, conn, Event(EventKind.TCP_ACCEPTED))
        else:
            # Idle (refused by the table) or an Established session already exists.
            if state is State.IDLE:
                await self._apply(peer, peer.fsm, conn, Event(EventKind.TCP_ACCEPTED))
            else:
                # RFC 4271 §6.8: a collision with an Established session closes the new connection.
                log.warning("%s: refusing another connection in %s: sent NOTIFICATION 6/7 (%s)",
                            peer.config.address, state.value, notification_text(6, 7))
                assert self._nursery is not None
                self._nursery.start_soon(_refuse, stream)

    async def _apply(self, peer: _Peer, fsm: Fsm, conn: _Conn | None, event: Event | None) -> None:
        """Feed one event (None: the passage of time) into an FSM, log the transition, carry out the actions."""
        old, old_error = fsm.state, fsm.last_error
        now = trio.current_time()
        actions = fsm.poll(now) if event is None else fsm.handle(event, now)
        if fsm.last_error and fsm.last_error != old_error:
            peer.last_error = fsm.last_error
        if fsm.state is not old:
            self._log_transition(peer, fsm, old, now)
        peer.state_before = old
        await self._run_actions(peer, fsm, conn, actions)

    def _log_transition(self, peer: _Peer, fsm: Fsm, old: State, now: float) -> None:
        """INFO. Only the Connect/Active cycle of a peer that refuses TCP (and the restarts out of Idle)
        is rate-limited; a fall to Idle, which an error or a stop causes, is always shown."""
        which = "" if fsm is peer.fsm else " (other connection)"
        why = f" ({fsm.last_error})" if fsm.last_error and fsm.state in _QUIET_STATES else ""
        if old in _QUIET_STATES and fsm.state in (State.CONNECT, State.ACTIVE):
            if now - peer.flap_logged_at < FLAP_LOG_INTERVAL_S:
                peer.flaps_suppressed += 1
                log.debug("%s%s: %s -> %s%s", peer.config.address, which, old.value, fsm.state.value, why)
                return
            if peer.flaps_suppressed:
                why += f" ({peer.flaps_suppressed} similar transitions not logged)"
            peer.flap_logged_at, peer.flaps_suppressed = now, 0
        log.info("%s%s: %s -> %s%s", peer.config.address, which, old.value, fsm.state.value, why)

    async def _run_actions(self, peer: _Peer, fsm: Fsm, conn: _Conn | None, actions: list[Any]) -> None:
        name = peer.config.address
        for action in actions:
            if isinstance(action, Send):
                await self._send(peer, fsm, conn, action.message)
            elif isinstance(action, Connect):
                if fsm is not peer.fsm:
                    continue  # an FSM given up (collision) does not start connections
                if peer.conn is not None:
                    await self._drop(peer.conn)
                conn = peer.conn = _Conn(outgoing=True)
                assert self._nursery is not None
                self._nursery.start_soon(self._attempt, peer, conn)
            elif isinstance(action, Close):
                if conn is not None:
                    await self._drop(conn)
                if peer.conn is conn and fsm is peer.fsm:
                    peer.conn = None
                    if peer.other is not None:
                        self._promote_other(peer)  # the colliding connection is all we have now
                elif peer.other is not None and peer.other[1] is conn:
                    peer.other = None
            elif isinstance(action, SessionUp):
                peer.established_count += 1
                peer.adj_out = AdjRibOut()
                log.info("%s: session Established (hold %ss, peer id %s, families %s)", name,
                         action.negotiated.hold_time_s, action.negotiated.peer_id, sorted(action.negotiated.families))
                policy = self._policy(peer, fsm)
                for update in peer.adj_out.sync(self.rib.routes, policy) + end_of_rib(policy.families):
                    await self._send(peer, fsm, conn, update)
                peer.up.set()
                if fsm is peer.fsm and peer.other is not None and \
                        peer.other[0].state in (State.OPEN_SENT, State.OPEN_CONFIRM):
                    log.info("%s: connection collision with the Established session, closing the incoming one",
                             name)
                    await self._dump_other(peer)  # RFC 4271 §6.8
                if self._on_sessions_changed is not None:
                    self._on_sessions_changed()
            elif isinstance(action, SessionDown):
                peer.last_error = action.reason
                peer.up = trio.Event()
                log.info("%s: session down: %s", name, action.reason)
                if self._on_sessions_changed is not None:
                    self._on_sessions_changed()
            elif isinstance(action, ResendRoutes):
                for update in peer.adj_out.resend((action.afi, action.safi), self._policy(peer, fsm)):
                    await self._send(peer, fsm, conn, update)

    async def _send(self, peer: _Peer, fsm: Fsm, conn: _Conn | None, msg: Message) -> None:
        """Send one message. The peer loop waits for it, so it is bounded: by SEND_TIMEOUT_S, and by the
        Hold deadline, so that a peer that stops reading cannot hold our timers back. (Keepalives
        could not get through a full send buffer anyway; the peer's Hold timer runs out as ours would.)"""
        if conn is None or conn.stream is None or conn.torn:
            return  # a send that was cut short left half a message: nothing more can be framed on it
        if isinstance(msg, Notification):
            text = f"sent NOTIFICATION {msg.code}/{msg.subcode} ({notification_text(msg.code, msg.subcode)})"
            why = fsm.last_error.split(": ", 1)[-1] if fsm.last_error.startswith("sent NOTIFICATION") \
                else fsm.last_error
            # Our own Cease on shutdown and a collision resolved are expected; anything else explains
            # why a session failed or does not come up.
            expected = (msg.code, msg.subcode) == (6, 7) or (self._stopping and (msg.code, msg.subcode) == (6, 2))
            level = logging.INFO if expected else logging.WARNING
            log.log(level, "%s: %s in %s%s", peer.config.address, text, peer.state_before.value,
                    f": {why}" if why else "")
            if level == logging.WARNING:
                peer.last_error = f"{text}: {why}" if why else text
        four = fsm.negotiated.four_octet_as if fsm.negotiated else True
        now = trio.current_time()
        deadline = now + SEND_TIMEOUT_S
        hold = fsm.timer(Timer.HOLD)
        by_hold = hold is not None and hold < deadline
        if by_hold:
            deadline = max(hold, now)  # type: ignore[type-var]
        conn.torn = True
        try:
            with trio.fail_at(deadline):
                await conn.stream.send_all(encode(msg, four_octet_as=four))
            conn.torn = False
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError) as exc:
            reason = "send blocked until the hold timer expired" if isinstance(exc, trio.TooSlowError) and by_hold \
                else f"send failed: {exc!r}"
            peer.inbox_send.send_nowait(("closed", conn, reason))

    async def _sync(self, peer: _Peer) -> None:
        for fsm, conn in self._fsms(peer):  # routes follow whichever FSM is Established
            if fsm.state is State.ESTABLISHED:
                for update in peer.adj_out.sync(self.rib.routes, self._policy(peer, fsm)):
                    await self._send(peer, fsm, conn, update)
                return

    async def _stop(self, peer: _Peer) -> None:
        await self._sync(peer)  # the desired RIB is empty now: withdraw everything
        await self._stop_fsms(peer)

    async def _stop_fsms(self, peer: _Peer) -> None:
        """ManualStop: Cease 6/2 on a session (OpenSent and later), then close; attempts abandoned."""
        if peer.other is not None:
            other_fsm, other_conn = peer.other
            await self._apply(peer, other_fsm, other_conn, Event(EventKind.MANUAL_STOP))
        await self._apply(peer, peer.fsm, peer.conn, Event(EventKind.MANUAL_STOP))

    async def _drop(self, conn: _Conn) -> None:
        """Stop the connection's tasks; close it in the background after a FIN and a short linger."""
        conn.scope.cancel()
        if conn.reader_done is not None:
            await conn.reader_done.wait()  # the reader is gone before anyone else reads the stream
        stream, conn.stream = conn.stream, None
        if stream is None:
            return
        if self._stopping:
            await _close_gracefully(stream)
        elif self._nursery is not None:
            self._nursery.start_soon(_close_gracefully, stream)


async def _refuse(stream: trio.abc.Stream) -> None:
    """Cease/Connection Collision Resolution on a connection we will not use, then close it."""
    with trio.move_on_after(CLOSE_LINGER_S):
        try:
            await stream.send_all(encode(Notification(6, 7)))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
    await _close_gracefully(stream)


async def _close_gracefully(stream: trio.abc.Stream) -> None:
    """FIN after the queued data (so a NOTIFICATION arrives), wait briefly for the peer's FIN, close."""
    with trio.move_on_after(CLOSE_LINGER_S):
        try:
            if isinstance(stream, trio.abc.HalfCloseableStream):
                await stream.send_eof()
            while await stream.receive_some(65536):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
    await _close_quietly(stream)


async def _close_quietly(stream: trio.abc.Stream) -> None:
    with trio.CancelScope(shield=True):
        try:
            await stream.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
