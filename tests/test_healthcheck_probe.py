"""Probes against real servers on loopback: every fault gives a failed check with a clear reason.

Unprivileged and loopback only (127.0.0.1, port 0), hence the `unit` tier. Servers run in the
test's own trio nursery; certificates are made once per session with the `openssl` CLI.
"""
from __future__ import annotations

import socket
import ssl
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from healthcheck.config import CheckConfig, ServiceHealthConfig
from healthcheck.errors import HealthCheckError
from healthcheck.probe import ProbeResult, ProbeTarget
from healthcheck.runner import HealthChecker, check_once
from healthcheck.state import BackendChanged
from tests.healthcheck_yaml import service_from_dict

pytestmark = pytest.mark.unit


@dataclass
class Certs:
    ca: Path
    good: tuple[Path, Path]  # signed by ca, SAN backend.test + 127.0.0.1
    expired: tuple[Path, Path]
    self_signed: tuple[Path, Path]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Certs]:
    d = tmp_path_factory.mktemp("healthcheck-certs")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    san = "subjectAltName=DNS:backend.test,IP:127.0.0.1"
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "30", "-subj", "/CN=lbnode test CA",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign", cwd=d)
    _openssl("req", *ec, "-keyout", "leaf.key", "-out", "leaf.csr", "-subj", "/CN=backend.test", cwd=d)
    (d / "ext.cnf").write_text(san + "\n")
    for name, days in (("good", "30"), ("expired", "-1")):
        _openssl("x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", days, "-extfile", "ext.cnf", cwd=d)
    _openssl("req", "-x509", *ec, "-keyout", "self.key", "-out", "self.pem", "-days", "30", "-subj", "/CN=backend.test",
             "-addext", san, cwd=d)
    yield Certs(d / "ca.pem", (d / "good.pem", d / "leaf.key"), (d / "expired.pem", d / "leaf.key"),
                (d / "self.pem", d / "self.key"))


class Backend:
    """A loopback server whose behaviour the test switches at run time."""

    def __init__(self) -> None:
        self.mode = "http"  # http | hang | garbage | reset | slow
        self.status = 200
        self.body = b"all good"
        self.slow_s = 2.0
        self.port = 0
        self.tls: ssl.SSLContext | None = None
        self.sni_seen: list[str | None] = []

    async def serve(self, nursery: trio.Nursery) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        await nursery.start(trio.serve_listeners, self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            await self._respond(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the checker gave up or rejected our certificate
        finally:
            await trio.aclose_forcefully(stream)

    async def _respond(self, stream: trio.SocketStream) -> None:
        mode = self.mode
        if mode == "hang":
            await trio.sleep_forever()
        if mode == "garbage":
            await stream.send_all(b"SSH-2.0-OpenSSH_9.2\r\n")
            return
        io: trio.abc.Stream = stream
        if self.tls is not None:
            io = trio.SSLStream(stream, self.tls, server_side=True)
            await io.do_handshake()
        request = b""
        while b"\r\n\r\n" not in request:
            data = await io.receive_some(4096)
            if not data:
                return
            request += data
        if mode == "reset":
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            stream.socket.close()
            return
        if mode == "slow":
            await trio.sleep(self.slow_s)
        await io.send_all(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                          % (self.status, len(self.body), self.body))


@pytest.fixture
async def backend(nursery: trio.Nursery) -> Backend:
    b = Backend()
    await b.serve(nursery)
    return b


def _check(kind: str = "http", **opts: Any) -> CheckConfig:
    return CheckConfig.from_dict({"kind": kind, "interval_ms": 1000, "timeout_ms": 500, **opts}, "check")


def _target(port: int) -> ProbeTarget:
    return ProbeTarget("127.0.0.1", port, "127.0.0.1")


async def _once(check: CheckConfig, port: int) -> ProbeResult:
    with trio.fail_after(10):
        return await check_once(check, _target(port))


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


async def test_tcp_pass_and_refused(backend: Backend) -> None:
    ok = await _once(_check("tcp"), backend.port)
    assert ok.ok and ok.error is None and 0 <= ok.latency_ms < 500
    refused = await _once(_check("tcp"), _closed_port())
    assert (refused.ok, refused.error) == (False, "refused")


async def test_tcp_check_passes_on_accept_then_hang_but_http_times_out(backend: Backend) -> None:
    backend.mode = "hang"
    assert (await _once(_check("tcp"), backend.port)).ok
    r = await _once(_check("http"), backend.port)
    assert (r.ok, r.error) == (False, "timeout after 500 ms waiting for response")
    # The real clock on a loaded machine can only make it later: it waited for the timeout (not an
    # early failure), and _once's fail_after(10) bounds it from above.
    assert 500 - 1e-6 <= r.latency_ms < 10_000


@pytest.mark.parametrize(("mode", "status", "opts", "error"), [
    ("http", 200, {}, None),
    ("http", 500, {}, "bad status 500 (expected 200-299)"),
    ("http", 503, {"expect_status": [200, "500-502"]}, "bad status 503 (expected 200,500-502)"),
    ("http", 200, {"body_contains": "good"}, None),
    ("http", 200, {"body_contains": "healthy"}, "body mismatch: 'healthy' not in the first 8 bytes"),
    ("garbage", 200, {}, "garbage response: b'SSH-2.0-OpenSSH_9.2\\r\\n'"),
    ("reset", 200, {}, "reset"),
    ("slow", 200, {}, "timeout after 500 ms waiting for response"),
])
async def test_http_faults(backend: Backend, mode: str, status: int, opts: dict[str, Any], error: str | None) -> None:
    backend.mode, backend.status = mode, status
    r = await _once(_check("http", **opts), backend.port)
    assert (r.ok, r.error) == (error is None, error)
    if mode == "http":
        assert r.status == status


async def test_https_verification(nursery: trio.Nursery, certs: Certs) -> None:
    async def server(cert: tuple[Path, Path]) -> Backend:
        b = Backend()
        b.tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        b.tls.load_cert_chain(*cert)

        def record_sni(sock: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
            b.sni_seen.append(name)

        b.tls.sni_callback = record_sni
        await b.serve(nursery)
        return b

    good, expired, self_signed = await server(certs.good), await server(certs.expired), await server(certs.self_signed)
    ca = str(certs.ca)
    cases: list[tuple[Backend, dict[str, Any], str | None]] = [
        (good, {"ca_file": ca, "sni": "backend.test"}, None),
        (good, {"ca_file": ca}, None),  # no SNI: the certificate's IP SAN matches 127.0.0.1
        (good, {"ca_file": ca, "sni": "other.test"},
         "TLS verify failed: Hostname mismatch, certificate is not valid for 'other.test'."),
        (expired, {"ca_file": ca, "sni": "backend.test"}, "TLS verify failed: certificate has expired"),
        (self_signed, {"sni": "backend.test"}, "TLS verify failed: self-signed certificate"),
        (self_signed, {"verify": False}, None),
    ]
    for b, opts, error in cases:
        r = await _once(_check("https", **opts), b.port)
        assert (r.ok, r.error) == (error is None, error), opts
    assert good.sni_seen[:3] == ["backend.test", None, "other.test"]
    good.status = 500
    r = await _once(_check("https", ca_file=ca, host="backend.test"), good.port)
    assert (r.ok, r.error, good.sni_seen[-1]) == (False, "bad status 500 (expected 200-299)", "backend.test")


async def test_tls_context_is_built_once_per_checker_so_a_new_checker_rereads_the_ca(
        nursery: trio.Nursery, certs: Certs, tmp_path: Path) -> None:
    """The context is made when the checker is: a reload (a new checker) sees a replaced CA file,
    a file gone later does not fail the running checker's probes, and one gone before start fails
    the start rather than every probe."""
    b = Backend()
    b.tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    b.tls.load_cert_chain(*certs.good)
    await b.serve(nursery)
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(certs.self_signed[0].read_bytes())  # the wrong CA for b's certificate

    def service() -> ServiceHealthConfig:
        return service_from_dict({
            "name": "tls", "vip": "192.0.2.10", "port": b.port, "through_vip": False,
            "checks": [{"kind": "https", "interval_ms": 1000, "timeout_ms": 900, "rise": 1, "fall": 1,
                        "ca_file": str(ca_file), "sni": "backend.test"}],
            "backends": [{"address": "127.0.0.1", "port": b.port}],
        }, "services[0]")

    async def run_until(checker: HealthChecker, runs: int) -> tuple[bool | None, str | None]:
        with trio.fail_after(20):
            async with trio.open_nursery() as n:
                await n.start(checker.run)
                # noqa below: the checker's snapshot has no event to wait on; bounded by fail_after(20).
                while (c := checker.snapshot()[0].backends[0].checks[0]).runs < runs:  # noqa: ASYNC110
                    await trio.sleep(0.05)
                n.cancel_scope.cancel()
        return c.last_ok, c.last_error

    assert await run_until(HealthChecker([service()]), 1) == \
        (False, "TLS verify failed: unable to get local issuer certificate")
    ca_file.write_bytes(certs.ca.read_bytes())
    checker = HealthChecker([service()])
    ca_file.unlink()
    assert await run_until(checker, 2) == (True, None)
    ca_file.write_bytes(certs.ca.read_bytes())
    svc = service()  # config load checks the file ...
    ca_file.unlink()  # ... which goes before the checker starts
    with pytest.raises(HealthCheckError, match=r"^service tls: checks\[0\]\.ca_file: cannot load '.*ca\.pem'"):
        HealthChecker([svc])


async def test_checker_follows_a_backend_toggling_200_500(backend: Backend) -> None:
    """The whole path: real server, real probes, rise/fall, events and snapshot.

    Real clock: a loaded machine may turn a probe into a timeout. That can delay a rise (rise=2
    needs two passes in a row) but not fake one; and a fall may then be reported as the timeout.
    """
    svc = service_from_dict({
        "name": "web", "vip": "192.0.2.10", "port": backend.port, "through_vip": False,
        "checks": [{"kind": "http", "interval_ms": 400, "timeout_ms": 350, "rise": 2, "fall": 2}],
        "backends": [{"address": "127.0.0.1", "port": backend.port}, {"address": "127.0.0.1", "port": _closed_port()}],
    }, "services[0]")
    down_reasons = ("bad status 500 (expected 200-299)", "timeout after 350 ms waiting for response")
    checker = HealthChecker([svc])
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(checker.run)
            for expect_up in (True, False, True):
                backend.status = 200 if expect_up else 500
                while True:
                    ev = await checker.events.receive()
                    if isinstance(ev, BackendChanged):
                        break
                assert ev.backend == f"127.0.0.1:{backend.port}" and ev.usable is expect_up
                assert (ev.reason == "passed") if expect_up else (ev.reason in down_reasons)
                assert (await checker.events.receive()).up is expect_up  # type: ignore[union-attr]
            snap = checker.snapshot()[0]
            good, dead = snap.backends
            assert good.usable and good.checks[0].last_error in down_reasons
            assert not dead.usable and dead.checks[0].last_error == "refused" and dead.checks[0].runs >= 4
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(("mode", "error"), [
    ("hang", "timeout after 500 ms in TLS handshake"),
    ("garbage", "TLS error: WRONG_VERSION_NUMBER"),
])
async def test_https_against_a_server_that_does_not_speak_tls(backend: Backend, mode: str, error: str) -> None:
    backend.mode = mode
    r = await _once(_check("https", verify=False), backend.port)
    assert (r.ok, r.error) == (False, error)
