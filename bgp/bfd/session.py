"""BFD's only I/O module: UDP sockets, TTL 255 and one trio task per session around `bgp.bfd.fsm`.

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

Send errors (no route while a link is down, ICMP port unreachable, the device gone) are counted
and logged at DEBUG; they never stop the session: silence is what BFD detects.

The peer's interface: each session's send socket is bound (SO_BINDTODEVICE) to the interface of
the route to the peer, and the receive sockets report each datagram's arrival interface
(IP_PKTINFO / IPV6_RECVPKTINFO), which `Demux` checks against that route: a packet from another
interface is dropped (`wrong_interface`), like one without TTL 255. The route is looked up over
netlink (`RouteResolver`, opened when `run` starts, so in the network namespace the endpoint runs
in) before the first packet and again every RESOLVE_INTERVAL_S, and at once (at most every
RESOLVE_MIN_S) after a send error or a packet from the peer on another interface. With no route
(the link is down) the session accepts nothing and its sends fail, which is what a dead link looks
like anyway; when the route returns, on the same interface or a recreated one with a new index,
the socket is bound to it again and the session comes back by itself. A lookup or bind that fails
is logged and retried, never raised. (A link-local IPv6 peer, whose route needs a scope, is not
supported here.)
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
from typing import cast

import trio

from bgp.bfd.codec import ControlPacket, DropReason, State, encode
from bgp.bfd.fsm import (
    TTL_SINGLE_HOP,
    Action,
    Demux,
    Discard,
    Session,
    SessionConfig,
    StateChange,
    Transmit,
    is_failure,
)
from bgp.errors import BgpError

log = logging.getLogger(__name__)

BFD_PORT = 3784  # RFC 5881 §4: single-hop control packets
SOURCE_PORT_MIN, SOURCE_PORT_MAX = 49152, 65535
IP_RECVTTL = 12  # linux/in.h; not exported by Python's socket module
IP_PKTINFO = 8  # linux/in.h; struct in_pktinfo starts with int ipi_ifindex
SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)
SEND_ERRNOS = frozenset({errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ECONNREFUSED, errno.EHOSTDOWN,
                         errno.ENETDOWN, errno.EADDRNOTAVAIL, errno.ENOBUFS, errno.EPERM,
                         errno.ENODEV, errno.ENXIO})  # the last two: the bound device is gone
BIND_ERRNOS = frozenset({errno.ENODEV, errno.ENXIO, errno.EINVAL})  # SO_BINDTODEVICE on a device just gone
RESOLVE_INTERVAL_S = 1.0  # the route to each peer is looked up again this often
RESOLVE_MIN_S = 0.1  # and at most this often after send errors
BIND_ATTEMPTS = 64
CANCEL_ADMIN_DOWN_S = 0.5  # on cancellation, time allowed to send AdminDown

Sender = Callable[[str, bytes], Awaitable[None]]  # (peer address, datagram): replaces the UDP sockets in tests
Interface = tuple[int, str]  # (ifindex, name), both in the endpoint's network namespace
Resolver = Callable[[str], "Interface | None"]  # peer address -> the interface of the route to it, None: no route
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
    interface: str | None  # the device the session's socket is bound to (None: not bound)
    interface_changes: int  # times the route to the peer moved to another (or a recreated) device


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
    interface: Interface | None = None  # what the send socket is bound to
    routed: bool | None = None  # the latest lookup found a route (else Demux accepts nothing from the peer)
    interface_changes: int = 0


class RouteResolver:
    """The interface of the route to a peer, over one netlink socket opened in the calling thread's
    network namespace (pyroute2's `route get`, as `ip route get` does). No route: None."""

    def __init__(self) -> None:
        from pyroute2 import IPRoute

        self._ipr = IPRoute()

    def __call__(self, peer: str) -> Interface | None:
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            routes = self._ipr.route("get", dst=peer)
        except NetlinkError as exc:  # ENETUNREACH and the like: the kernel's answer, no route now
            log.debug("BFD %s: no route: %s", peer, exc)
            return None
        except OSError as exc:  # the netlink socket itself failed (ENOBUFS...): a new one next time
            log.warning("BFD %s: route lookup failed: %s; reopening netlink", peer, exc)
            self._reopen()
            return None
        for route in routes:
            oif = route.get_attr("RTA_OIF")
            if oif:
                try:
                    return int(oif), socket.if_indextoname(int(oif))
                except OSError:  # gone between the two lookups
                    return None
        return None

    def _reopen(self) -> None:
        from pyroute2 import IPRoute

        try:
            self._ipr.close()
        except OSError:
            pass
        self._ipr = IPRoute()  # still on the endpoint's thread, so in its namespace

    def close(self) -> None:
        self._ipr.close()


class BfdEndpoint:
    """Runs one BFD session per configured peer address."""

    def __init__(self, sessions: Mapping[str, SessionConfig], *, on_change: OnChange | None = None,
                 port: int = BFD_PORT, rng: Callable[[], float] = random.random,
                 discriminator: Callable[[], int] = lambda: secrets.randbits(32),
                 sender: Sender | None = None, resolver: Callable[[], Resolver] | None = None) -> None:
        """`sender` replaces the sockets (tests). `resolver` makes the route lookup used to bind each
        session to its interface; it is called in `run` (default: `RouteResolver`). Without sockets
        (a `sender`), sessions are bound only if a `resolver` is given."""
        if not sessions:
            raise BgpError("a BFD endpoint needs at least one session")
        self.port = port
        self.demux = Demux()
        self._on_change = on_change
        self._sender = sender
        self._make_resolver = resolver if resolver is not None or sender is not None else RouteResolver
        self._resolver: Resolver | None = None
        self._resolve_now = trio.Event()
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

    def received(self, data: bytes, ttl: int | None, source: str, ifindex: int | None = None) -> DropReason | None:
        """One datagram from the network (or a test): checked, then queued for its session."""
        routed = self.demux.route(data, ttl, source, ifindex)
        if isinstance(routed, DropReason):
            log.debug("BFD from %s dropped: %s", source, routed.value)
            if routed is DropReason.WRONG_INTERFACE:
                self._resolve_now.set()  # the route may have moved here (a recreated device): look now
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
        try:
            async with trio.open_nursery() as nursery:
                if self._sender is None:
                    for rt in self._runtimes.values():
                        rt.sock = await self._send_socket(rt.peer)
                if self._make_resolver is not None:
                    self._resolver = self._make_resolver()  # here: in the namespace the endpoint runs in
                    self._bind_interfaces()  # before the first packet is accepted
                    nursery.start_soon(self._interface_loop)
                if self._sender is None:
                    for family in sorted(self._families):
                        sock = await self._receive_socket(family)
                        nursery.start_soon(self._receive_loop, sock)
                for rt in self._runtimes.values():
                    nursery.start_soon(self._session_loop, rt)
                log.info("BFD running for %s (port %s)", ", ".join(
                    f"{rt.peer} on {rt.interface[1] if rt.interface else 'no interface'}"
                    if self._resolver is not None else rt.peer for rt in self._runtimes.values()), self.port)
                task_status.started()
        finally:
            close = getattr(self._resolver, "close", None)
            if close is not None:
                close()
            for rt in self._runtimes.values():  # a session loop that never started has not closed it
                if rt.sock is not None:
                    rt.sock.close()

    # ---- the peer's interface ----------------------------------------------------------------

    async def _interface_loop(self) -> None:
        while True:
            with trio.move_on_after(RESOLVE_INTERVAL_S):
                await self._resolve_now.wait()
                await trio.sleep(RESOLVE_MIN_S)
            self._resolve_now = trio.Event()
            self._bind_interfaces()

    def _bind_interfaces(self) -> None:
        for rt in self._runtimes.values():
            self._bind_interface(rt)

    def _bind_interface(self, rt: _Runtime) -> None:
        """Look the route to the peer up; bind the socket to its interface and tell `Demux`."""
        assert self._resolver is not None
        found = self._resolver(rt.peer)
        if found is None:
            if rt.routed is not False:  # log the loss once, not every lookup
                log.info("BFD %s: no route to the peer%s; accepting no packets until it returns", rt.peer,
                         f" (was on {rt.interface[1]})" if rt.interface else "")
            rt.routed = False
            self.demux.set_interface(rt.peer, None)
            return  # the socket stays bound to the old device: sends fail, as on a dead link
        if found != rt.interface:
            if rt.sock is not None:
                try:
                    rt.sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, found[1].encode())
                except OSError as exc:
                    if exc.errno not in BIND_ERRNOS:
                        raise
                    log.log(logging.INFO if rt.routed is not False else logging.DEBUG,
                            "BFD %s: cannot bind to %s (index %s): %s; retrying", rt.peer, found[1], found[0], exc)
                    rt.routed = False
                    self.demux.set_interface(rt.peer, None)
                    return
            if rt.interface is not None:
                rt.interface_changes += 1
            log.info("BFD %s: bound to %s (index %s)%s", rt.peer, found[1], found[0],
                     f", was {rt.interface[1]} (index {rt.interface[0]})" if rt.interface else "")
            rt.interface = found
        elif rt.routed is False:
            log.info("BFD %s: route to the peer back on %s", rt.peer, found[1])
        rt.routed = True
        self.demux.set_interface(rt.peer, found[0])

    # ---- sockets -----------------------------------------------------------------------------

    async def _receive_socket(self, family: int) -> trio.socket.SocketType:
        if family == 4:
            sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setsockopt(socket.IPPROTO_IP, IP_RECVTTL, 1)
            sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            addr = "0.0.0.0"
        else:
            sock = trio.socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVHOPLIMIT, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
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
                data, ancdata, _flags, addr = await sock.recvmsg(512, socket.CMSG_SPACE(4) + socket.CMSG_SPACE(20))
                host = cast("tuple[str, int]", addr)[0]  # AF_INET/AF_INET6: (host, port, ...)
                self.received(data, _ttl(ancdata), _source(host), _ifindex(ancdata))

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
            self._resolve_now.set()  # the route may have moved

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
            elif isinstance(action, Discard):
                self.demux.drops[action.reason] += 1
                log.debug("BFD %s: packet discarded: %s", rt.peer, action.reason.value)
            elif isinstance(action, StateChange):
                failed = is_failure(action, rt.session.remote_state)
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


def _ifindex(ancdata: list[tuple[int, int, bytes]]) -> int | None:
    """The arrival interface from IP_PKTINFO (struct in_pktinfo: ifindex first) or IPV6_PKTINFO
    (struct in6_pktinfo: 16-byte address, then ifindex)."""
    for level, kind, data in ancdata:
        if (level, kind) == (socket.IPPROTO_IP, IP_PKTINFO) and len(data) >= 4:
            return int.from_bytes(data[:4], sys.byteorder)
        if (level, kind) == (socket.IPPROTO_IPV6, socket.IPV6_PKTINFO) and len(data) >= 20:
            return int.from_bytes(data[16:20], sys.byteorder)
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
        last_change_s=rt.last_change_s, interface=rt.interface[1] if rt.interface else None,
        interface_changes=rt.interface_changes)

