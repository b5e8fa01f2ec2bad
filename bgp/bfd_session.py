"""BFD's only I/O module: UDP sockets, TTL 255 and one trio task per session around `bfd_fsm`.

Theory of operation
-------------------
`BfdEndpoint.run` owns a nursery (start it with `await nursery.start(endpoint.run)`; ready once
bound). Single-hop BFD (RFC 5881): one receive socket per address family on port 3784 with
IP_RECVTTL / IPV6_RECVHOPLIMIT, so `recvmsg` reports each datagram's TTL, which must be 255
(§5); and one send socket per session bound to a source port in 49152-65535, kept for the
session's life (§4), with IP_TTL / IPV6_UNICAST_HOPS set to 255. A receive loop only runs
`Demux.route` (TTL, decode, session lookup; drops counted by reason) and posts the packet to
its session's inbox. The session loop is the only place its `Session` is touched: it waits for
the next inbox item or the session's next deadline, feeds that in with `trio.current_time()`,
sends what the machine asks for, and reports state changes to `on_change` (the speaker tears
the BGP session down when BFD fails: Up -> Down, unless the peer said AdminDown, RFC 5882 §3.2).

Send errors (no route while a link is down, ICMP port unreachable) are counted and logged at
DEBUG; they never stop the session: silence is what BFD detects.
"""
from __future__ import annotations

import errno
import ipaddress
import logging
import math
import random
import secrets
import socket
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import trio

from bgp.bfd_codec import ControlPacket, Diag, DropReason, State, encode
from bgp.bfd_fsm import TTL_SINGLE_HOP, Action, Demux, Session, SessionConfig, StateChange, Transmit
from bgp.errors import BgpError

log = logging.getLogger(__name__)

BFD_PORT = 3784  # RFC 5881 §4: single-hop control packets
SOURCE_PORT_MIN, SOURCE_PORT_MAX = 49152, 65535
IP_RECVTTL = 12  # linux/in.h; not exported by Python's socket module
SEND_ERRNOS = frozenset({errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ECONNREFUSED, errno.EHOSTDOWN,
                         errno.ENETDOWN, errno.EADDRNOTAVAIL, errno.ENOBUFS, errno.EPERM})
BIND_ATTEMPTS = 64
CANCEL_ADMIN_DOWN_S = 0.5  # on cancellation, time allowed to send AdminDown

Sender = Callable[[str, bytes], Awaitable[None]]  # (peer address, datagram): replaces the UDP sockets in tests
OnChange = Callable[[str, StateChange, bool], None]  # (peer, change, failed)


@dataclass(frozen=True, slots=True)
class BfdStatus:
    """A snapshot of one session, for status output. Intervals in milliseconds."""

    peer: str
    state: str
    remote_state: str
    local_diag: str
    remote_diag: int
    local_discriminator: int
    remote_discriminator: int
    tx_interval_ms: float | None
    detection_time_ms: float | None
    poll_active: bool
    packets_sent: int
    packets_received: int
    send_errors: int
    up_transitions: int
    failures: int  # Up -> Down other than by the peer's AdminDown
    last_change_s: float | None  # trio clock of the last state change


@dataclass(eq=False)
class _Runtime:
    peer: str
    session: Session
    inbox_send: trio.MemorySendChannel[tuple[object, ...]]
    inbox_recv: trio.MemoryReceiveChannel[tuple[object, ...]]
    sock: trio.socket.SocketType | None = None
    packets_sent: int = 0
    packets_received: int = 0
    send_errors: int = 0
    up_transitions: int = 0
    failures: int = 0
    last_change_s: float | None = None


class BfdEndpoint:
    """Runs one BFD session per configured peer address."""

    def __init__(self, sessions: Mapping[str, SessionConfig], *, on_change: OnChange | None = None,
                 port: int = BFD_PORT, rng: Callable[[], float] = random.random,
                 discriminator: Callable[[], int] = lambda: secrets.randbits(32),
                 sender: Sender | None = None) -> None:
        if not sessions:
            raise BgpError("a BFD endpoint needs at least one session")
        self.port = port
        self.demux = Demux()
        self._on_change = on_change
        self._sender = sender
        self._runtimes: dict[str, _Runtime] = {}
        for peer, cfg in sessions.items():
            peer = str(ipaddress.ip_address(peer))
            discr = 0
            while discr == 0 or discr in self.demux.by_discr:
                discr = discriminator() & 0xFFFFFFFF
            self.demux.add(peer, discr)
            send, recv = trio.open_memory_channel[tuple[object, ...]](math.inf)
            self._runtimes[peer] = _Runtime(peer, Session(cfg, discr, rng), send, recv)
        self._families = {ipaddress.ip_address(p).version for p in self._runtimes}

    # ---- API ---------------------------------------------------------------------------------

    def state(self, peer: str) -> State:
        return self._runtimes[str(ipaddress.ip_address(peer))].session.state

    def snapshot(self) -> dict[str, BfdStatus]:
        return {peer: _status(rt) for peer, rt in self._runtimes.items()}

    @property
    def drops(self) -> dict[str, int]:
        return {r.value: n for r, n in sorted(self.demux.drops.items(), key=lambda kv: kv[0].value)}

    def received(self, data: bytes, ttl: int | None, source: str) -> DropReason | None:
        """One datagram from the network (or a test): checked, then queued for its session."""
        routed = self.demux.route(data, ttl, source)
        if isinstance(routed, DropReason):
            log.debug("BFD from %s dropped: %s", source, routed.value)
            return routed
        peer, packet = routed
        self._runtimes[peer].inbox_send.send_nowait(("packet", packet))
        return None

    async def shutdown(self, *, timeout_s: float = 1.0) -> None:
        """AdminDown on every session, so the peer does not take our going away as a failure."""
        with trio.move_on_after(timeout_s):
            done = []
            for rt in self._runtimes.values():
                ev = trio.Event()
                done.append(ev)
                rt.inbox_send.send_nowait(("admin_down", ev))
            for ev in done:
                await ev.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            if self._sender is None:
                for family in sorted(self._families):
                    sock = await self._receive_socket(family)
                    nursery.start_soon(self._receive_loop, sock)
                for rt in self._runtimes.values():
                    rt.sock = await self._send_socket(rt.peer)
            for rt in self._runtimes.values():
                nursery.start_soon(self._session_loop, rt)
            log.info("BFD running for %s (port %s)", ", ".join(self._runtimes), self.port)
            task_status.started()

    # ---- sockets -----------------------------------------------------------------------------

    async def _receive_socket(self, family: int) -> trio.socket.SocketType:
        if family == 4:
            sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setsockopt(socket.IPPROTO_IP, IP_RECVTTL, 1)
            addr = "0.0.0.0"
        else:
            sock = trio.socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVHOPLIMIT, 1)
            addr = "::"
        try:
            await sock.bind((addr, self.port))
        except OSError as exc:
            sock.close()
            raise BgpError(f"BFD: cannot bind UDP port {self.port} for IPv{family}: {exc}") from exc
        return sock

    async def _send_socket(self, peer: str) -> trio.socket.SocketType:
        v6 = ipaddress.ip_address(peer).version == 6
        sock = trio.socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
        if v6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, TTL_SINGLE_HOP)
        else:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, TTL_SINGLE_HOP)
        rnd = random.Random()
        for _ in range(BIND_ATTEMPTS):  # RFC 5881 §4: a source port in 49152-65535, fixed per session
            try:
                await sock.bind(("::" if v6 else "0.0.0.0", rnd.randint(SOURCE_PORT_MIN, SOURCE_PORT_MAX)))
                return sock
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    sock.close()
                    raise
        sock.close()
        raise BgpError(f"BFD {peer}: no free source port in {SOURCE_PORT_MIN}-{SOURCE_PORT_MAX}")

    async def _receive_loop(self, sock: trio.socket.SocketType) -> None:
        with sock:
            while True:
                data, ancdata, _flags, addr = await sock.recvmsg(512, socket.CMSG_SPACE(4))
                self.received(data, _ttl(ancdata), _source(addr[0]))

    async def _send(self, rt: _Runtime, packet: ControlPacket) -> None:
        data = encode(packet)
        try:
            if self._sender is not None:
                await self._sender(rt.peer, data)
            else:
                assert rt.sock is not None
                await rt.sock.sendto(data, (rt.peer, self.port))
            rt.packets_sent += 1
        except OSError as exc:
            if exc.errno not in SEND_ERRNOS:
                raise
            rt.send_errors += 1
            log.debug("BFD %s: send failed: %s", rt.peer, exc)

    # ---- the session loop --------------------------------------------------------------------

    async def _session_loop(self, rt: _Runtime) -> None:
        s = rt.session
        try:
            await self._carry_out(rt, s.start(trio.current_time()))
            while True:
                deadline = s.next_deadline()
                item: tuple[object, ...] | None = None
                with trio.move_on_at(math.inf if deadline is None else deadline):
                    item = await rt.inbox_recv.receive()
                now = trio.current_time()
                actions: list[Action] = []
                done: trio.Event | None = None
                if item is not None and item[0] == "packet":
                    assert isinstance(item[1], ControlPacket)
                    rt.packets_received += 1
                    actions += s.receive(item[1], now)
                elif item is not None and item[0] == "admin_down":
                    assert isinstance(item[1], trio.Event)
                    actions += s.admin_down(now)
                    done = item[1]
                actions += s.poll(now)
                await self._carry_out(rt, actions)
                if done is not None:
                    done.set()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(CANCEL_ADMIN_DOWN_S):
                # Cancelled without `shutdown()` (the node stopping on an error): still say AdminDown,
                # so the router does not count a failure (RFC 5882 §3.2); the BGP Cease follows.
                try:
                    await self._carry_out(rt, s.admin_down(trio.current_time()))
                except OSError as exc:  # the socket failed already; the session is gone either way
                    log.debug("BFD %s: AdminDown on exit not sent: %s", rt.peer, exc)
            if rt.sock is not None:
                rt.sock.close()

    async def _carry_out(self, rt: _Runtime, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Transmit):
                await self._send(rt, action.packet)
            elif isinstance(action, StateChange):
                s = rt.session
                failed = (action.old is State.UP and action.new is State.DOWN
                          and not (action.diag is Diag.NEIGHBOR_SIGNALED_SESSION_DOWN
                                   and s.remote_state is State.ADMIN_DOWN))
                rt.last_change_s = trio.current_time()
                if action.new is State.UP:
                    rt.up_transitions += 1
                if failed:
                    rt.failures += 1
                level = logging.INFO if State.UP in (action.old, action.new) else logging.DEBUG
                log.log(level, "BFD %s: %s -> %s (diag %s)", rt.peer, action.old.name, action.new.name,
                        action.diag.name)
                if self._on_change is not None:
                    self._on_change(rt.peer, action, failed)


def _ttl(ancdata: list[tuple[int, int, bytes]]) -> int | None:
    for level, kind, data in ancdata:
        if (level, kind) in ((socket.IPPROTO_IP, socket.IP_TTL), (socket.IPPROTO_IPV6, socket.IPV6_HOPLIMIT)) \
                and len(data) >= 4:
            return int.from_bytes(data[:4], sys.byteorder, signed=True)
    return None


def _source(address: str) -> str:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        return str(ip.ipv4_mapped)
    return str(ip)


def _status(rt: _Runtime) -> BfdStatus:
    s = rt.session
    tx, detect = s.tx_interval_us, s.detection_time_us
    return BfdStatus(
        peer=rt.peer, state=s.state.name, remote_state=s.remote_state.name, local_diag=s.local_diag.name,
        remote_diag=s.remote_diag, local_discriminator=s.local_discr, remote_discriminator=s.remote_discr,
        tx_interval_ms=None if tx is None else tx / 1000, detection_time_ms=None if detect is None else detect / 1000,
        poll_active=s.poll_active, packets_sent=rt.packets_sent, packets_received=rt.packets_received,
        send_errors=rt.send_errors, up_transitions=rt.up_transitions, failures=rt.failures,
        last_change_s=rt.last_change_s)

