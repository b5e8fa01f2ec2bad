"""The HTTP listener as a node component: hypercorn's trio worker inside the node's nursery.

Hypercorn runs on the node's own trio loop (no thread, no second process): its request
handling is small and non-blocking, and the expensive part, building the document and the
metrics, happens on worker threads behind the caches the app calls. `Listener.run` reports
started once the socket is bound (a bind error is raised then, naming `http.listen`), and the
node's Supervisor cancels it on shutdown or restarts it when a reload changes `http`.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from cluster.config import HttpConfig
from cluster.status import DocumentCache
from cluster.web.app import App, Builder

log = logging.getLogger(__name__)

METRICS_REUSE_S = 0.2  # like the status document: scrapers that arrive together share one build
KEEP_ALIVE_S = 5.0  # the console polls every second over one connection
GRACEFUL_S = 1.0  # on a reload that moves the listener, requests in flight get this long
MAX_REQUEST_BYTES = 16 * 1024  # a request line and headers; nothing here takes a body
READ_TIMEOUT_S = 10  # a client that sends nothing for this long is dropped (slow clients hold no socket)


class WebError(Exception):
    """The listener cannot run as configured (the address is taken, not local, ...)."""


class Listener:
    def __init__(self, status: Builder, metrics_build: Callable[[], Callable[[], bytes]]) -> None:
        """`status`: the status document as JSON (the node's cached builder); `metrics_build`:
        on the loop, copies what the metrics need and returns the build for a worker thread."""
        self._metrics = DocumentCache(metrics_build, METRICS_REUSE_S)
        self.app = App(status, self._metrics.get)
        self.urls: tuple[str, ...] = ()  # where it listens now (empty: not listening)

    def invalidate(self) -> None:
        """After a change a scraper will look for (`lbnode drain`): the next scrape is built anew."""
        self._metrics.invalidate()

    async def run(self, config: HttpConfig, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if not config.enabled:
            task_status.started()
            return
        hc = Config()
        hc.bind = [config.listen]
        hc.accesslog = None
        hc.errorlog = logging.getLogger("cluster.web.hypercorn")
        hc.keep_alive_timeout = KEEP_ALIVE_S
        hc.graceful_timeout = GRACEFUL_S
        hc.h11_max_incomplete_size = MAX_REQUEST_BYTES
        hc.read_timeout = READ_TIMEOUT_S
        hc.include_server_header = False
        hc.backlog = 64
        started = _Started(self, task_status)
        try:
            # hypercorn types the app against its TypedDict events; ours reads plain mappings.
            await serve(self.app, hc, task_status=started, mode="asgi")  # type: ignore[arg-type]
        except (OSError, BaseExceptionGroup) as exc:
            error = _os_error(exc)
            if started.done or error is None:
                raise
            raise WebError(f"http.listen: cannot listen on {config.listen}: {error.strerror or error}") from None
        finally:
            self.urls = ()


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError (a failed bind) in `exc`, which hypercorn's nurseries may have wrapped in groups."""
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (found := _os_error(inner)) is not None:
                return found
    return None


class _Started:
    """hypercorn's task_status, passed on: records the URLs and whether the socket is bound."""

    def __init__(self, listener: Listener, outer: trio.TaskStatus[None]) -> None:
        self.listener, self.outer, self.done = listener, outer, False

    def started(self, value: list[str] | None = None) -> None:
        self.done = True
        self.listener.urls = tuple(value or ())
        log.info("http: metrics, status API and console on %s", ", ".join(self.listener.urls))
        self.outer.started()
