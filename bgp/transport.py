"""The BGP speaker's TCP side: connect, listen, read, send and close, feeding the peers' inboxes.

Theory of operation
-------------------
Part of the speaker's I/O (`bgp.speaker` runs the peer loops; this module owns the sockets). Each
task here only moves bytes and posts what happened to its peer's `Inbox`: `attempt` posts
`Connected` or `ConnectFailed`; `read` frames bytes (`Framer.frames`, headers checked, nothing
decoded: the loop decodes, so the 4-octet-AS switch applies exactly from the message after the
OPEN) and posts `Frame`s, blocking while the inbox holds INBOX_FRAMES of them, then `Closed` or
`ReadError`; `listen` accepts only configured peer addresses and posts `Accepted`. `send` is
bounded by a deadline the caller computes (its Hold deadline). A connection is dropped by
cancelling its tasks and closing it after a FIN and a short linger (`drop`), so a NOTIFICATION
queued before it still arrives.

Accept errors: out of file descriptors or memory, accept() waits ACCEPT_BACKOFF_S and retries,
as trio.serve_listeners does; errnos that leave the listener usable are logged at most every
ACCEPT_LOG_INTERVAL_S; anything else is raised.

TCP MD5 (RFC 2385) uses Linux's TCP_MD5SIG socket option, set before connect() and per peer on
the listener, so unsigned or wrongly signed segments never reach us.
"""
from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping, Sequence
from ipaddress import IPv4Address, IPv6Address
from typing import Any

import trio

from bgp.codec import Framer, Notification, encode
from bgp.config import PeerConfig
from bgp.errors import BgpError, DecodeError
from bgp.inbox import Accepted, Closed, Conn, Connected, ConnectFailed, Frame, Inbox, ReadError
from bpf.loglimit import LogLimiter

log = logging.getLogger(__name__)

TCP_MD5SIG = 14
TCP_MD5SIG_MAXKEYLEN = 80
CLOSE_LINGER_S = 1.0
ACCEPT_LOG_INTERVAL_S = 10.0
ACCEPT_BACKOFF_S = 0.1  # as trio.serve_listeners: out of file descriptors or memory, wait and retry
# accept() errnos that leave the listener usable (trio's SocketListener list, plus resource exhaustion).
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_TRANSIENT_ERRNOS = frozenset({errno.EAGAIN, errno.ECONNABORTED, errno.EPROTO, errno.ENETDOWN, errno.ENOPROTOOPT,
                                     errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH, errno.EOPNOTSUPP,
                                     errno.ENETUNREACH, errno.EPERM})
RETRY_ERRNOS = frozenset({errno.ECONNREFUSED, errno.ECONNRESET, errno.ETIMEDOUT, errno.EHOSTUNREACH,
                          errno.ENETUNREACH, errno.ECONNABORTED, errno.EPIPE, errno.EADDRNOTAVAIL})
_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)

Connector = Callable[[PeerConfig], Awaitable[trio.abc.Stream]]
AcceptFn = Callable[[trio.socket.SocketType], Awaitable[tuple[trio.socket.SocketType, Any]]]


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


async def listen(address: str, port: int, peers: Sequence[PeerConfig], inboxes: Mapping[str, Inbox],
                 accept: AcceptFn, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Accept connections from the configured peers (`inboxes`, by address) and post them there.
    Reports the bound port once listening."""
    addr = ipaddress.ip_address(address)
    family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        for peer in peers:
            if peer.md5_password and (family == socket.AF_INET6 or peer.address.version == 4):
                sock.setsockopt(socket.IPPROTO_TCP, TCP_MD5SIG, md5sig(
                    peer.address, peer.md5_password, v6_socket=family == socket.AF_INET6))
        await sock.bind((str(addr), port))
        sock.listen(16)
        bound: int = sock.getsockname()[1]
        log.info("listening on %s port %s", addr, bound)
        task_status.started(bound)
        accept_log = LogLimiter(ACCEPT_LOG_INTERVAL_S)
        while True:
            try:
                conn_sock, remote = await accept(sock)
            except OSError as exc:
                if exc.errno not in ACCEPT_CAPACITY_ERRNOS | ACCEPT_TRANSIENT_ERRNOS:
                    raise
                held = accept_log.allow(trio.current_time())
                if held is not None:
                    log.warning("accept() failed: %s%s", exc, f" ({held} more since the last report)" if held else "")
                if exc.errno in ACCEPT_CAPACITY_ERRNOS:
                    await trio.sleep(ACCEPT_BACKOFF_S)
                continue
            remote_ip = ipaddress.ip_address(remote[0])
            if isinstance(remote_ip, IPv6Address) and remote_ip.ipv4_mapped:
                remote_ip = remote_ip.ipv4_mapped
            inbox = inboxes.get(str(remote_ip))
            if inbox is None:
                log.warning("refusing connection from unconfigured %s", remote_ip)
                conn_sock.close()
                continue
            inbox.post(Accepted(trio.SocketStream(conn_sock)))


async def attempt(peer: PeerConfig, conn: Conn, connector: Connector, inbox: Inbox) -> None:
    """One outgoing connection attempt, cancelled with `conn.scope`."""
    with conn.scope:
        try:
            stream = await connector(peer)
        except OSError as exc:
            if exc.errno not in RETRY_ERRNOS:
                log.warning("%s: connect failed: %s", peer.address, exc)
            inbox.post(ConnectFailed(conn, str(exc)))
            return
        inbox.post(Connected(conn, stream))


def start_reader(nursery: trio.Nursery, conn: Conn, inbox: Inbox) -> None:
    conn.reader_done = trio.Event()
    nursery.start_soon(read, conn, inbox)


async def read(conn: Conn, inbox: Inbox) -> None:
    """The reader task: frames, then why it stopped. `conn.reader_done` is set on the way out."""
    try:
        framer = Framer()
        stream = conn.stream
        assert stream is not None
        with conn.scope:
            try:
                while True:
                    data = await stream.receive_some(65536)
                    if not data:
                        inbox.post(Closed(conn, "peer closed the connection"))
                        return
                    framer.feed(data)
                    for raw in framer.frames():
                        await inbox.post_frame(Frame(conn, raw))  # backpressure: no reading meanwhile
            except DecodeError as exc:
                inbox.post(ReadError(conn, exc))
            except _STREAM_ERRORS as exc:
                inbox.post(Closed(conn, f"connection error: {exc}"))
    finally:
        assert conn.reader_done is not None
        conn.reader_done.set()


async def send(conn: Conn, data: bytes, deadline: float, *, by_hold: bool) -> str | None:
    """Send one whole message by `deadline`. None, or why the connection is unusable now (`conn.torn`
    stays set if the message was cut short). `by_hold`: the deadline is the Hold timer's."""
    assert conn.stream is not None
    conn.torn = True
    try:
        with trio.fail_at(deadline):
            await conn.stream.send_all(data)
        conn.torn = False
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError) as exc:
        if isinstance(exc, trio.TooSlowError) and by_hold:
            return "send blocked until the hold timer expired"
        return f"send failed: {exc!r}"
    return None


async def drop(conn: Conn, nursery: trio.Nursery | None, *, inline: bool) -> None:
    """Stop the connection's tasks; close it after a FIN and a short linger: right here if `inline`
    (shutting down: the FIN must not be cut short), else in the background in `nursery`."""
    conn.scope.cancel()
    if conn.reader_done is not None:
        await conn.reader_done.wait()  # the reader is gone before anyone else reads the stream
    stream, conn.stream = conn.stream, None
    if stream is None:
        return
    if inline:
        await close_gracefully(stream)
    elif nursery is not None:
        nursery.start_soon(close_gracefully, stream)


async def refuse(stream: trio.abc.Stream) -> None:
    """Cease/Connection Collision Resolution on a connection we will not use, then close it."""
    with trio.move_on_after(CLOSE_LINGER_S):
        try:
            await stream.send_all(encode(Notification(6, 7)))
        except _STREAM_ERRORS:
            pass
    await close_gracefully(stream)


async def close_gracefully(stream: trio.abc.Stream) -> None:
    """FIN after the queued data (so a NOTIFICATION arrives), wait briefly for the peer's FIN, close."""
    with trio.move_on_after(CLOSE_LINGER_S):
        try:
            if isinstance(stream, trio.abc.HalfCloseableStream):
                await stream.send_eof()
            while await stream.receive_some(65536):
                pass
        except _STREAM_ERRORS:
            pass
    await close_quietly(stream)


async def close_quietly(stream: trio.abc.Stream) -> None:
    with trio.CancelScope(shield=True):
        try:
            await stream.aclose()
        except _STREAM_ERRORS:
            pass
