"""The status server survives clients that hang up and snapshots that fail; it speaks the versioned control
protocol (cluster.control) and still answers old clients that send nothing."""
from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

from cluster import control, status
from tests.web_fixtures import admin_state, unit_document

pytestmark = pytest.mark.unit
T = TypeVar("T")


async def test_status_server_survives_early_hangups_and_failing_snapshots(tmp_path: Path) -> None:
    path = str(tmp_path / "status.sock")
    calls = 0

    async def snapshot() -> bytes:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("a bug while building the snapshot")
        # large: the send blocks
        return json.dumps({"node": {"state": "serving"}, "blob": "x" * 1_000_000}).encode() + b"\n"

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(status.serve, path, snapshot)
            for _ in range(3):  # connect and hang up at once, while the server writes a megabyte
                sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                await sock.connect(path)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                sock.close()
            answer = await trio.to_thread.run_sync(status.query, path)
            assert answer["node"]["state"] == "serving" and calls >= 4
            nursery.cancel_scope.cancel()


DOCUMENT = {"node": {"state": "serving"}, "services": []}


async def _document() -> bytes:
    return json.dumps(DOCUMENT).encode() + b"\n"


def _raw(path: str, send: bytes | None, *, shut: bool) -> bytes:
    """A client at the byte level: send `send` (or nothing), maybe half-close, read to EOF."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        if send:
            sock.sendall(send)
        if shut:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


async def test_the_control_protocol_and_the_old_clients_that_send_nothing(tmp_path: Path) -> None:
    path = str(tmp_path / "status.sock")
    seen: list[tuple[control.Request, status.Peer]] = []

    async def handler(request: control.Request, peer: status.Peer) -> dict[str, Any]:
        seen.append((request, peer))
        if isinstance(request, control.Enable):
            raise control.Refused("192.0.2.99 is not a VIP of this node's config")
        return {"changed": ["web 10.0.0.11"]}

    def run(fn: Callable[..., T], *args: Any, **kwargs: Any) -> Awaitable[T]:
        return trio.to_thread.run_sync(lambda: fn(*args, **kwargs))

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(status.serve, path, _document, handler)
            assert os.stat(path).st_mode & 0o777 == 0o600  # root only
            # Old clients: one that says nothing (and waits), one that half-closes at once.
            t0 = trio.current_time()
            assert json.loads(await run(_raw, path, None, shut=False)) == DOCUMENT
            assert trio.current_time() - t0 >= status.LEGACY_WAIT_S * 0.9
            assert json.loads(await run(_raw, path, None, shut=True)) == DOCUMENT
            # Versioned.
            assert await run(status.query, path) == DOCUMENT
            reply = await run(status.request, path, control.Drain(ipaddress.ip_address("10.0.0.11"), "web", "alice"))
            assert reply == {"v": 1, "ok": True, "changed": ["web 10.0.0.11"]}
            request, peer = seen[-1]
            assert request == control.Drain(ipaddress.ip_address("10.0.0.11"), "web", "alice")
            assert (peer.pid, peer.uid) == (os.getpid(), os.getuid())
            with pytest.raises(control.ReplyError, match="^192.0.2.99 is not a VIP of this node's config$"):
                await run(status.request, path, control.Enable(ipaddress.ip_address("192.0.2.99")))
            # Refusals, each one JSON line with the reason; the node keeps serving.
            for line, error in [
                (b'{"v":1,"cmd":"frobnicate"}\n', "unknown command 'frobnicate'"),
                (b'{"v":7,"cmd":"status"}\n', "unsupported protocol version 7"),
                (b'{"v":1,"cmd":"drain"}', "drain: 'backend' is required"),  # no newline, then EOF: still a line
                (b"x" * 10_000, "request longer than 4096 bytes"),
            ]:
                answer = await run(_raw, path, line, shut=True)
                assert answer.count(b"\n") == 1 and json.loads(answer)["v"] == 1, answer
                with pytest.raises(control.ReplyError, match=f"^{re.escape(error)}"):
                    control.decode_reply(answer)
            assert len(seen) == 2
            nursery.cancel_scope.cancel()


async def test_a_node_without_a_handler_refuses_commands_and_still_serves_status(tmp_path: Path) -> None:
    path = str(tmp_path / "status.sock")
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(status.serve, path, _document)
            with pytest.raises(control.ReplyError, match="this node takes no control commands"):
                await trio.to_thread.run_sync(status.request, path, control.Enable(ipaddress.ip_address("192.0.2.1")))
            assert await trio.to_thread.run_sync(status.query, path) == DOCUMENT
            nursery.cancel_scope.cancel()


async def test_a_new_client_reads_a_node_from_before_the_protocol(tmp_path: Path) -> None:
    """Such a node sends its document at once and closes, whatever the client sent (rolling upgrade)."""
    path = str(tmp_path / "old.sock")
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(path)
    listener.listen(4)

    async def old_node() -> None:
        for i in range(40):
            conn, _ = await listener.accept()
            with conn:
                await conn.send(json.dumps(DOCUMENT).encode() + b"\n")
                if i % 2:
                    await trio.sleep(0.05)  # the new client's request arrives, unread; else it may not

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(old_node)
            for _ in range(40):
                assert await trio.to_thread.run_sync(status.query, path) == DOCUMENT
            nursery.cancel_scope.cancel()
    listener.close()


def test_the_text_render_shows_the_http_listener_and_the_runtime_admin_state() -> None:
    doc = json.loads(json.dumps(unit_document(admin_state()), default=str))
    lines = status.render(doc).splitlines()
    assert lines[1] == "http: http://127.0.0.1:9473"
    rows = {line.split()[0]: line for line in lines if line.startswith("  ")}
    assert rows["10.0.0.12:80"].split()[1] == "drained"
    assert "drained by alice (uid 0, pid 4242) at 2026-12-01T20:15:02Z" in rows["10.0.0.12:80"]
    assert rows["10.0.0.13:80"].split()[1] == "disabled"  # in the config: no who or when
    assert " by " not in rows["10.0.0.13:80"]
    assert rows["10.0.0.11:80"].split()[1:3] == ["in", "hash"]
    assert rows["dns/[2001:db8::53]:53"].endswith(
        "DISABLED (withdrawn) by bob (uid 0, pid 4343) at 2026-12-01T20:16:40Z")
    assert "DISABLED" not in rows["web/192.0.2.10:80"]
    doc["node"]["http"] = []
    assert status.render(doc).splitlines()[1] == "http: off"
    del doc["node"]["http"]  # a node from before the listener
    assert status.render(doc).splitlines()[1] == "services:"
