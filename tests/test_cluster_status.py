"""The status server survives clients that hang up and snapshots that fail."""
from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import trio

from cluster import status

pytestmark = pytest.mark.unit


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
