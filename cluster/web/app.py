"""The ASGI application: a handful of read-only routes over two async callables.

    GET /                 the console (console.html; console.js and console.css beside it)
    GET /api/v1/status    the status document, byte for byte what `lbnode status --json` reads
    GET /metrics          Prometheus text exposition format
    GET /healthz          "ok": the listener and the node's loop answer

Nothing here builds anything: `status()` and `metrics()` are the node's cached builders, which
copy on the loop and build on a worker thread (cluster.status.DocumentCache), so a request costs
the loop a few microseconds however large the node is. The console's files are package data,
read once at start-up (no CDN: the console works on a management network without Internet).
Only GET and HEAD exist; every response says `no-store`, and the console's page allows scripts,
styles and requests from itself only (Content-Security-Policy).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from importlib import resources
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST

from bpf.loglimit import LogLimiter

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Builder = Callable[[], Awaitable[bytes]]

STATIC = {  # path -> (package file, content type)
    "/": ("console.html", "text/html; charset=utf-8"),
    "/console.js": ("console.js", "text/javascript; charset=utf-8"),
    "/console.css": ("console.css", "text/css; charset=utf-8"),
}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
FAILURE_LOG_PERIOD_S = 60.0  # a build that keeps failing, polled every second, logs once a minute
COMMON_HEADERS = [(b"cache-control", b"no-store"), (b"x-content-type-options", b"nosniff"),
                  (b"referrer-policy", b"no-referrer")]


def load_static() -> dict[str, tuple[bytes, str]]:
    files = resources.files("cluster.web")
    return {path: (files.joinpath(name).read_bytes(), ctype) for path, (name, ctype) in STATIC.items()}


class App:
    def __init__(self, status: Builder, metrics: Builder) -> None:
        self._status = status
        self._metrics = metrics
        self._static = load_static()
        self._failure_log = LogLimiter(FAILURE_LOG_PERIOD_S)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            status, ctype, body, extra = await self._route(scope["method"], scope["path"])
            headers = [(b"content-type", ctype.encode()), (b"content-length", str(len(body)).encode()),
                       *COMMON_HEADERS, *extra]
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})
        # websocket: not served; returning without accepting makes the server refuse it

    async def _route(self, method: str, path: str) -> tuple[int, str, bytes, list[tuple[bytes, bytes]]]:
        if method not in ("GET", "HEAD"):
            return 405, "text/plain; charset=utf-8", b"read-only: GET or HEAD\n", [(b"allow", b"GET, HEAD")]
        try:
            if path == "/api/v1/status":
                return 200, "application/json", await self._status(), []
            if path == "/metrics":
                return 200, CONTENT_TYPE_LATEST, await self._metrics(), []
        except Exception as exc:  # a failed build must cost one response, never the listener or the node
            held = self._failure_log.allow(time.monotonic())
            if held is not None:
                log.error("%s: building the response failed%s", path, f" ({held} more since)" if held else "",
                          exc_info=True)
            return 503, "text/plain; charset=utf-8", f"unavailable: {exc}\n".encode(), []
        if path == "/healthz":
            return 200, "text/plain; charset=utf-8", b"ok\n", []
        static = self._static.get(path)
        if static is not None:
            extra = [(b"content-security-policy", CSP.encode())] if path == "/" else []
            return 200, static[1], static[0], extra
        return 404, "text/plain; charset=utf-8", b"not found\n", []

    @staticmethod
    async def _lifespan(receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
