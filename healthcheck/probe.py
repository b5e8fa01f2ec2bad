"""Probes: TCP connect, HTTP and HTTPS requests, with trio.

A probe makes one attempt and returns a `ProbeResult`; it never raises for anything the network
or the backend does. The runner wraps it in a cancel scope for the check's timeout and reads
`Attempt.phase` to say what was being waited for ("timeout after 500 ms waiting for response").
Sockets are plain trio sockets (no happy-eyeballs, no DNS: addresses are numeric), so a check
costs a handful of syscalls; HTTPS adds `trio.SSLStream` with the `ssl.SSLContext` the target
carries (built once per checker).
"""
from __future__ import annotations

import errno
import os
import socket as stdsocket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import trio

from healthcheck.config import CheckConfig, CheckKind, HttpOptions
from healthcheck.errors import HttpParseError
from healthcheck.http import ResponseParser, build_request

RECV_SIZE = 16 * 1024
SocketFactory = Callable[[int], stdsocket.socket]


def plain_socket(family: int) -> stdsocket.socket:
    return stdsocket.socket(family, stdsocket.SOCK_STREAM)


@dataclass(frozen=True, slots=True)
class ProbeTarget:
    """Where one (backend, check) connects to.

    For a through-VIP check `address` is the VIP and `mark` selects the routing table that sends
    it to the backend's MAC (see `healthcheck.vipnet`); `open_socket` may create the socket in
    another network namespace.
    """

    address: str
    port: int
    host: str  # Host header / default SNI
    mark: int | None = None
    open_socket: SocketFactory = field(default=plain_socket, compare=False)
    ssl_context: ssl.SSLContext | None = field(default=None, compare=False)  # HTTPS; see `make_ssl_context`

    @property
    def family(self) -> int:
        return stdsocket.AF_INET6 if ":" in self.address else stdsocket.AF_INET


@dataclass(frozen=True, slots=True)
class ProbeResult:
    ok: bool
    latency_ms: float
    error: str | None = None
    status: int | None = None


class Attempt:
    """Mutable progress of one probe, read by the runner when the timeout fires."""

    __slots__ = ("phase",)

    def __init__(self) -> None:
        self.phase = "while connecting"


async def probe(check: CheckConfig, target: ProbeTarget, attempt: Attempt) -> ProbeResult:
    """One attempt of `check` against `target`; failures come back as results with a reason."""
    start = trio.current_time()
    status: int | None = None
    error: str | None = None
    try:
        raw = _open(target)
        try:
            attempt.phase = "while connecting"
            await _connect(raw, (target.address, target.port))
            if check.kind is not CheckKind.TCP:
                assert check.http is not None
                io: _Stream = (await _tls(check.http, target, raw, attempt) if check.kind is CheckKind.HTTPS
                               else _RawStream(raw))
                status, error = await _exchange(check.http, target, io, attempt)
        finally:
            # No task can be waiting on `raw` here (this task is its only user), so there is no
            # one for trio.lowlevel.notify_closing to wake; the kernel drops the fd from epoll.
            raw.close()
    except HttpParseError as exc:
        error = str(exc)
    except trio.BrokenResourceError as exc:
        error = failure_reason(exc.__cause__ or exc)
    except (OSError, ssl.SSLError) as exc:
        error = failure_reason(exc)
    return ProbeResult(error is None, _ms_since(start), error, status)


def failure_reason(exc: BaseException) -> str:
    """A short, stable reason string for a network failure."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS verify failed: {exc.verify_message or exc.reason}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ConnectionResetError):
        return "reset"
    if isinstance(exc, (BrokenPipeError, trio.BrokenResourceError)):
        return "connection broken"
    if isinstance(exc, OSError) and exc.errno is not None:
        if exc.errno == errno.EHOSTUNREACH:
            return "host unreachable"
        if exc.errno == errno.ENETUNREACH:
            return "network unreachable"
        return f"{errno.errorcode.get(exc.errno, exc.errno)}: {os.strerror(exc.errno)}"
    return f"{type(exc).__name__}: {exc}"


def _open(target: ProbeTarget) -> stdsocket.socket:
    raw = target.open_socket(target.family)
    try:
        raw.setblocking(False)
        if target.mark is not None:
            raw.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_MARK, target.mark)
        return raw
    except BaseException:
        raw.close()
        raise


# TCP and HTTP use the non-blocking stdlib socket with trio's wait_readable/wait_writable
# directly: a thousand checks a second make trio.socket's generic wrappers a visible cost.

async def _connect(raw: stdsocket.socket, address: tuple[str, int]) -> None:
    err = raw.connect_ex(address)
    if err == errno.EINPROGRESS:
        await trio.lowlevel.wait_writable(raw)
        err = raw.getsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_ERROR)
    else:
        await trio.lowlevel.checkpoint()
    if err:
        raise OSError(err, os.strerror(err))


class _Stream(Protocol):
    """The part of `trio.abc.Stream` a request needs."""

    async def send_all(self, data: bytes) -> None: ...

    async def receive_some(self, max_bytes: int) -> bytes | bytearray: ...


class _RawStream:
    """`_Stream` over the non-blocking stdlib socket, without trio.socket's wrappers."""

    __slots__ = ("_raw",)

    def __init__(self, raw: stdsocket.socket) -> None:
        self._raw = raw

    async def send_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[self._raw.send(view):]
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self._raw)

    async def receive_some(self, max_bytes: int) -> bytes:
        while True:
            try:
                return self._raw.recv(max_bytes)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self._raw)


async def _tls(opts: HttpOptions, target: ProbeTarget, raw: stdsocket.socket,
               attempt: Attempt) -> trio.SSLStream[trio.SocketStream]:
    attempt.phase = "in TLS handshake"
    # An address (no SNI sent) is matched against the certificate's IP SANs.
    server_hostname = opts.sni or opts.host or target.address
    ctx = target.ssl_context or make_ssl_context(opts.verify, opts.ca_file)
    stream = trio.SSLStream(trio.SocketStream(trio.socket.from_stdlib_socket(raw)), ctx,
                            server_hostname=server_hostname, https_compatible=True)
    await stream.do_handshake()
    return stream


async def _exchange(opts: HttpOptions, target: ProbeTarget, io: _Stream,
                    attempt: Attempt) -> tuple[int | None, str | None]:
    """Send the request, read the response, judge it: (status, failure reason or None)."""
    attempt.phase = "while sending request"
    await io.send_all(build_request(opts.method, opts.path, opts.host or target.host))
    attempt.phase = "waiting for response"
    parser = ResponseParser(want_body=opts.body_contains is not None, head_request=opts.method == "HEAD")
    while True:
        data = await io.receive_some(RECV_SIZE)
        response = parser.feed(data) if data else parser.eof()
        if response is not None:
            return response.status, _judge(opts, response.status, response.body)


def _judge(opts: HttpOptions, status: int, body: bytes) -> str | None:
    if not opts.status_ok(status):
        return f"bad status {status} (expected {opts.expected_text()})"
    if opts.body_contains is not None and opts.body_contains.encode() not in body:
        return f"body mismatch: {opts.body_contains!r} not in the first {len(body)} bytes"
    return None


def make_ssl_context(verify: bool, ca_file: str | None) -> ssl.SSLContext:
    """A client context; building one loads the trust store, so callers build it once and reuse it.

    `HealthChecker` builds one per (verify, ca_file) when it is created and hands it to the probes
    in `ProbeTarget.ssl_context`; a new checker (a reload) reads the CA file again. A target
    without one gets a fresh context per probe, which suits one-off probes only.
    """
    if verify:
        return ssl.create_default_context(cafile=ca_file)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _ms_since(start: float) -> float:
    return (trio.current_time() - start) * 1000
