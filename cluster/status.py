"""The node's local control socket: `lbnode status`, and `lbnode drain/undrain/disable/enable`.

One request and one reply per connection, each a JSON line; the protocol (versioned) is in
cluster.control, the I/O is here. A client that sends nothing gets the bare status document, as
before the protocol existed. The status document renders as text for people (`render`) or goes
out as is (`lbnode status --json`).

Access: the socket is created mode 0600 (root only: connecting needs write permission on it),
and a command that changes state also needs the peer's uid, read from SO_PEERCRED, to be 0.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from cluster import control

log = logging.getLogger(__name__)

RUN_DIR = "/run/lbnode"
LEGACY_WAIT_S = 0.5  # a client silent this long is an old one that only reads: it gets the document
REQUEST_TIMEOUT_S = 5.0  # to send a whole request line, and to take the reply


@dataclass(frozen=True, slots=True)
class Peer:
    """The client process, as the kernel reports it (SO_PEERCRED): it cannot lie about these."""

    pid: int
    uid: int
    gid: int


# Carries out a control request and returns the reply's fields; raises control.Refused.
ControlHandler = Callable[[control.Request, Peer], Awaitable[dict[str, Any]]]


def peer_of(sock: trio.socket.SocketType) -> Peer:
    ucred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return Peer(*struct.unpack("3i", ucred))


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


async def serve(path: str, document: Callable[[], Awaitable[bytes]], handler: ControlHandler | None = None, *,
                task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED) -> None:
    """Answer each connection on the unix socket `path` (replacing a stale one): a status request
    (or silence) with `await document()` (one JSON line), other commands through `handler`."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    # The mode comes from the umask at bind time: a chmod afterwards would follow a symlink put
    # at `path` in between. (The umask is process-wide; nothing else creates files meanwhile.)
    old_umask = os.umask(0o177)
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
                with trio.move_on_after(REQUEST_TIMEOUT_S):
                    line = await read_request(stream)
                    reply = await document() if line is None else await answer(line, peer_of(stream.socket))
                    await stream.send_all(reply)
                    await stream.send_eof()
                    await discard(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.debug("status client went away: %s", exc)
        except Exception:
            log.exception("status snapshot failed")

    async def answer(line: bytes, peer: Peer) -> bytes:
        try:
            request = control.decode_request(line)
            if isinstance(request, control.Status):
                return control.encode_status_reply(await document())
            if handler is None:
                raise control.Refused("this node takes no control commands")
            if control.is_mutating(request) and peer.uid != 0:
                log.warning("control: refused %s from uid %d (pid %d): not root", type(request).__name__.lower(),
                            peer.uid, peer.pid)
                raise control.Refused(f"not permitted: changing state needs uid 0 (you are uid {peer.uid})")
            return control.encode_ok(await handler(request, peer))
        except control.Refused as exc:
            return control.encode_error(str(exc))

    try:
        await trio.serve_listeners(handle, [listener], task_status=task_status)
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


async def read_request(stream: trio.SocketStream) -> bytes | None:
    """The client's request line, or None from a client that sends nothing (EOF or silence) and
    wants the bare document. A line longer than the limit comes back cut, for the codec to refuse."""
    data = b""
    with trio.move_on_after(LEGACY_WAIT_S):
        data = await stream.receive_some(control.MAX_REQUEST_BYTES + 1)
    if not data:
        return None
    while b"\n" not in data and len(data) <= control.MAX_REQUEST_BYTES:
        chunk = await stream.receive_some(control.MAX_REQUEST_BYTES + 1)
        if not chunk:
            break  # a last line without its newline counts
        data += chunk
    line, _, _ = data.partition(b"\n")
    return line if len(line) <= control.MAX_REQUEST_BYTES else data[:control.MAX_REQUEST_BYTES + 1]


async def discard(stream: trio.SocketStream, limit: int = 1 << 20) -> None:
    """Read what the client still sends (a request over the limit) until it closes: closing a unix
    socket with unread data resets it, and the client would lose the reply that says why."""
    while limit > 0 and (chunk := await stream.receive_some(65536)):
        limit -= len(chunk)


def request(path: str, req: control.Request, timeout_s: float = REQUEST_TIMEOUT_S) -> dict[str, Any]:
    """Send one request to a running node and return its reply's fields (blocking; for the CLI).
    OSError: no node there; control.ReplyError: the node refused (its message)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        sock.connect(path)
        chunks = []
        try:
            sock.sendall(control.encode_request(req))
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (ConnectionResetError, BrokenPipeError):
            # A node from before the protocol sends its document and closes without reading our
            # request: the send may fail, or the read end in a reset. Linux reports the reset of a
            # unix socket only once the data queued before it is read: read that, to the end.
            with contextlib.suppress(ConnectionResetError):
                while chunk := sock.recv(65536):
                    chunks.append(chunk)
    return control.decode_reply(b"".join(chunks), to_status=isinstance(req, control.Status))


def query(path: str, timeout_s: float = REQUEST_TIMEOUT_S) -> dict[str, Any]:
    """Read one status document from a running node (blocking; for the CLI, tests and the lab)."""
    document: dict[str, Any] = request(path, control.Status(), timeout_s)["status"]
    return document


def _weight(w: Any) -> str:
    """`2` (static), or configured/observed->effective for load-aware weights: `1/0.73->12`."""
    if not isinstance(w, dict):
        return str(w)
    if w.get("multiplier") is None:
        return str(w["effective"])
    observed = "-" if w["observed"] is None else f"{w['observed']:g}"
    agent = f" agent={w['agent']}" if w.get("agent") else ""
    return f"{w['configured']}/{observed}->{w['effective']}{agent}"


def render(status: dict[str, Any]) -> str:
    process = status.get("process") or {}
    lines = [f"node {status['node']['ip']} on {status['node']['interface']} ({status['node']['xdp']}): "
             f"{status['node']['state']}  rss={process.get('rss_bytes', 0) / 2**20:.0f} MB"]
    node = status["node"]
    if "http" in node:  # not from a node older than the listener
        lines.append(f"http: {', '.join(node['http']) or 'off'}")
    pins = status["node"].get("pins")
    if pins:
        lines.append(f"pins: {pins['dir']}  adopted {pins['adopted_flows']} flows"
                     + (f"  ({pins['note']})" if pins.get("note") else ""))
    lines.append("services:")
    for svc in status["services"]:
        disabled = (f"  DISABLED ({svc.get('admin_phase')}) by {svc.get('admin_by')} at {svc.get('admin_at')}"
                    if svc.get("admin") else "")
        lines.append(f"  {svc['name']:32} {'UP' if svc['up'] else 'DOWN':4} {svc['usable']}/{svc['need']} needed"
                     f"  packets={svc['packets']} bytes={svc['bytes']} new_flows={svc['new_flows']}"
                     f" drops={svc['drops']}{disabled}")
        for b in svc["backends"]:
            state = (("in hash" if b["in_hash"] else "no mac" if not b["mac"] else "weight 0" if not b["weight"]
                      else "no new") if b["usable"]
                     else "drained" if b.get("admin") else "disabled" if b["disabled"] else "down")
            admin = f"drained by {b.get('admin_by')} at {b.get('admin_at')}  " if b.get("admin") else ""
            lines.append(f"    {b['backend']:28} {state:8} weight={_weight(b['weight'])} mac={b['mac'] or '?'}"
                         f"  packets={b['packets']} new_flows={b['new_flows']}  {admin}{b['last_error'] or ''}")
    bgp = status.get("bgp")
    if bgp:
        lines.append("bgp:")
        for peer in bgp["peers"]:
            bfd = peer.get("bfd")
            bfd_text = f"  bfd {bfd.get('state', '?')}" if isinstance(bfd, dict) else ""
            error = f"  last error: {peer['last_error']}" if peer.get("last_error") else ""
            lines.append(f"  peer {peer['address']:24} {peer['state']}{bfd_text}{error}")
        lines.append(f"  announced: {', '.join(bgp['announced']) or '(none)'}")
    for name, share in (status.get("load") or {}).items():
        lines.append(f"load {name}: leader node {share['leader']:#x}, weights of node {share['published_by']:#x} "
                     f"epoch {share['epoch']}")
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
        self._cache: tuple[float, int, bytes] | None = None  # built at, from inputs of generation, body
        self._generation = 0
        self._building: trio.Event | None = None

    def invalidate(self) -> None:
        """After a change the asker will look for (`lbnode drain` then `lbnode status`): a document
        from inputs copied before it is not sent again."""
        self._generation += 1

    async def get(self) -> bytes:
        cached = self._cache
        if cached is not None and cached[1] == self._generation and trio.current_time() - cached[0] < self._reuse_s:
            return cached[2]
        building = self._building
        if building is not None:
            await building.wait()
            if self._cache is None:
                raise RuntimeError("the status document could not be built")
            return self._cache[2]
        building = self._building = trio.Event()
        try:
            generation = self._generation
            body = await trio.to_thread.run_sync(self._prepare())
            self._cache = (trio.current_time(), generation, body)
            return body
        finally:
            self._building = None
            building.set()
