"""`lbnode status`: the running node serves a JSON snapshot on a local unix socket.

A client connects and reads until EOF: one JSON document, then the server closes. The same
data renders as text for people (`render`) or goes out as is (`lbnode status --json`).
"""
from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import trio

log = logging.getLogger(__name__)

RUN_DIR = "/run/lbnode"


def default_socket(ifname: str) -> str:
    """One status socket per interface, like the interface lock: a node on another interface
    never replaces this one's."""
    return f"{RUN_DIR}/{ifname}.sock"


def find_socket() -> str:
    """`lbnode status` without --if or --socket: the one node running on this host."""
    sockets = sorted(p for p in os.listdir(RUN_DIR) if p.endswith(".sock")) if os.path.isdir(RUN_DIR) else []
    if len(sockets) != 1:
        raise OSError(f"{len(sockets)} status sockets in {RUN_DIR}: name one with --if or --socket")
    return f"{RUN_DIR}/{sockets[0]}"


async def serve(path: str, document: Callable[[], Awaitable[bytes]], *,
                task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED) -> None:
    """Send `await document()` (one JSON line) to every connection on the unix socket `path`
    (replacing a stale one)."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    # The mode comes from the umask at bind time: a chmod afterwards would follow a symlink put
    # at `path` in between. (The umask is process-wide; nothing else creates files meanwhile.)
    old_umask = os.umask(0o117)
    try:
        await sock.bind(path)
    finally:
        os.umask(old_umask)
    sock.listen(16)
    listener = trio.SocketListener(sock)

    async def handle(stream: trio.SocketStream) -> None:
        # A client that hangs up early, or a snapshot that fails, must never take the node down.
        try:
            async with stream:
                with trio.move_on_after(5):
                    await stream.send_all(await document())
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.debug("status client went away: %s", exc)
        except Exception:
            log.exception("status snapshot failed")

    try:
        await trio.serve_listeners(handle, [listener], task_status=task_status)
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def query(path: str, timeout_s: float = 5.0) -> dict[str, Any]:
    """Read one snapshot from a running node (blocking; for the CLI)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        sock.connect(path)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return json.loads(b"".join(chunks))  # type: ignore[no-any-return]


def render(status: dict[str, Any]) -> str:
    process = status.get("process") or {}
    lines = [f"node {status['node']['ip']} on {status['node']['interface']} ({status['node']['xdp']}): "
             f"{status['node']['state']}  rss={process.get('rss_bytes', 0) / 2**20:.0f} MB"]
    pins = status["node"].get("pins")
    if pins:
        lines.append(f"pins: {pins['dir']}  adopted {pins['adopted_flows']} flows"
                     + (f"  ({pins['note']})" if pins.get("note") else ""))
    lines.append("services:")
    for svc in status["services"]:
        lines.append(f"  {svc['name']:32} {'UP' if svc['up'] else 'DOWN':4} {svc['usable']}/{svc['need']} needed"
                     f"  packets={svc['packets']} bytes={svc['bytes']} new_flows={svc['new_flows']}"
                     f" drops={svc['drops']}")
        for b in svc["backends"]:
            state = (("in hash" if b["in_hash"] else "no mac") if b["usable"]
                     else ("drained" if b["disabled"] else "down"))
            lines.append(f"    {b['backend']:28} {state:7} weight={b['weight']} mac={b['mac'] or '?'}"
                         f"  packets={b['packets']} new_flows={b['new_flows']}  {b['last_error'] or ''}")
    bgp = status.get("bgp")
    if bgp:
        lines.append("bgp:")
        for peer in bgp["peers"]:
            bfd = peer.get("bfd")
            bfd_text = f"  bfd {bfd.get('state', '?')}" if isinstance(bfd, dict) else ""
            error = f"  last error: {peer['last_error']}" if peer.get("last_error") else ""
            lines.append(f"  peer {peer['address']:24} {peer['state']}{bfd_text}{error}")
        lines.append(f"  announced: {', '.join(bgp['announced']) or '(none)'}")
    sync = status.get("sync")
    if sync:
        lines.append(f"sync: {json.dumps(sync, default=str)}")
    flows = status["flows"]
    lines.append(f"flows: {flows['entries']} of {flows['table_size']} entries")
    lines.append("counters: " + " ".join(f"{k}={v}" for k, v in status["counters"].items()))
    return "\n".join(lines)


class DocumentCache:
    """One status document for many requests: requests that arrive while one is built share it,
    and a result is reused for `reuse_s`, so a monitor polling a node with thousands of
    backends costs one build. `prepare()` runs on the loop (copies) and returns the build,
    which runs on a worker thread."""

    def __init__(self, prepare: Callable[[], Callable[[], bytes]], reuse_s: float) -> None:
        self._prepare = prepare
        self._reuse_s = reuse_s
        self._cache: tuple[float, bytes] | None = None
        self._building: trio.Event | None = None

    async def get(self) -> bytes:
        cached = self._cache
        if cached is not None and trio.current_time() - cached[0] < self._reuse_s:
            return cached[1]
        building = self._building
        if building is not None:
            await building.wait()
            if self._cache is None:
                raise RuntimeError("the status document could not be built")
            return self._cache[1]
        building = self._building = trio.Event()
        try:
            body = await trio.to_thread.run_sync(self._prepare())
            self._cache = (trio.current_time(), body)
            return body
        finally:
            self._building = None
            building.set()
