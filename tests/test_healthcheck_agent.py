"""HAProxy agent-check: the reply parser (table) and the probe against loopback servers.

Unprivileged, 127.0.0.1 and port 0 only, hence the `unit` tier.
"""
from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable

import pytest
import trio

from healthcheck.agent import AgentAdmin, AgentFailure, AgentHealth, AgentReport, agent_probe, parse_agent_reply

pytestmark = pytest.mark.unit

UP, DOWN, STOPPED, FAIL = AgentHealth.UP, AgentHealth.DOWN, AgentHealth.STOPPED, AgentHealth.FAIL
READY, DRAIN, MAINT = AgentAdmin.READY, AgentAdmin.DRAIN, AgentAdmin.MAINT

PARSE_CASES: list[tuple[str, AgentReport]] = [
    ("75%\n", AgentReport(weight_pct=75)),
    ("75%", AgentReport(weight_pct=75)),
    ("0%\r\n", AgentReport(weight_pct=0)),
    ("100%\n", AgentReport(weight_pct=100)),
    ("150%\n", AgentReport(weight_pct=150)),
    ("up\n", AgentReport(health=UP)),
    ("UP\n", AgentReport(health=UP)),
    ("down\n", AgentReport(health=DOWN)),
    ("stopped\n", AgentReport(health=STOPPED)),
    ("fail\n", AgentReport(health=FAIL)),
    ("drain\n", AgentReport(admin=DRAIN)),
    ("maint\n", AgentReport(admin=MAINT)),
    ("Ready\n", AgentReport(admin=READY)),
    ("up,75%\n", AgentReport(health=UP, weight_pct=75)),
    ("ready up 50%\n", AgentReport(health=UP, admin=READY, weight_pct=50)),
    ("  up ,\t 80% ,, drain \n", AgentReport(health=UP, admin=DRAIN, weight_pct=80)),
    ("75%,maxconn:30,maint,down\n", AgentReport(health=DOWN, admin=MAINT, weight_pct=75, maxconn=30)),
    ("up down\n", AgentReport(health=DOWN)),  # last word of a category wins
    ("10% 20%\n", AgentReport(weight_pct=20)),
    ("drain ready\n", AgentReport(admin=READY)),
    ("down #disk full\n", AgentReport(health=DOWN, description="disk full")),
    ("down#x\n", AgentReport(ignored=("down#x",))),  # '#' starts a description only at a word's start
    ("fail # out of memory , really\n", AgentReport(health=FAIL, description="out of memory , really")),
    ("# only a comment up\n", AgentReport(description="only a comment up")),
    ("up\nmaint\n", AgentReport(health=UP)),  # one line only
    ("up\rmaint\n", AgentReport(health=UP)),
    ("hello up world\n", AgentReport(health=UP, ignored=("hello", "world"))),
    ("7x% up\n", AgentReport(health=UP, warnings=("bad weight '7x%'",))),
    ("maxconn:lots\n", AgentReport(warnings=("bad maxconn 'maxconn:lots'",))),
    ("%75\n", AgentReport(ignored=("%75",))),
    ("-5%\n", AgentReport(ignored=("-5%",))),
    ("\n", AgentReport()),
    ("", AgentReport()),
]


@pytest.mark.parametrize(("text", "expected"), PARSE_CASES, ids=[repr(t) for t, _ in PARSE_CASES])
def test_parse(text: str, expected: AgentReport) -> None:
    assert parse_agent_reply(text) == expected


@pytest.mark.parametrize(("pct", "configured", "expected"), [(75, 100, 75), (0, 100, 0), (50, 3, 1), (100, 1000, 1000),
                                                              (150, 1000, 1000), (None, 100, None)])
def test_scaled_weight(pct: int | None, configured: int, expected: int | None) -> None:
    assert AgentReport(weight_pct=pct).scaled_weight(configured) == expected


def test_healthy() -> None:
    assert parse_agent_reply("up\n").healthy is True
    assert parse_agent_reply("stopped\n").healthy is False
    assert parse_agent_reply("75%\n").healthy is None


Handler = Callable[[trio.SocketStream], Awaitable[None]]


async def _serve(nursery: trio.Nursery, handler: Handler) -> int:
    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    port: int = listeners[0].socket.getsockname()[1]
    return port


async def _reply(data: bytes, *, delay_s: float = 0.0, chunks: int = 1) -> Handler:
    async def handler(stream: trio.SocketStream) -> None:
        step = max(1, len(data) // chunks)
        for i in range(0, len(data), step):
            await trio.sleep(delay_s)
            await stream.send_all(data[i:i + step])
        await stream.aclose()
    return handler


async def _hang(stream: trio.SocketStream) -> None:
    await trio.sleep_forever()


@pytest.mark.parametrize(("reply", "expected"), [
    (b"75%\n", AgentReport(weight_pct=75)),
    (b"up, drain # planned\r\n", AgentReport(health=UP, admin=DRAIN, description="planned")),
    (b"\xff\xfe\x00garbage\n", AgentReport(ignored=("\ufffd\ufffd\x00garbage",))),
    (b"up", AgentFailure("incomplete line from agent (2 bytes, no line end before EOF)")),
    (b"", AgentFailure("closed without a reply")),
])
async def test_probe_replies(reply: bytes, expected: AgentReport | AgentFailure) -> None:
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            port = await _serve(nursery, await _reply(reply))
            assert await agent_probe("127.0.0.1", port, 2.0) == expected
            nursery.cancel_scope.cancel()


async def test_probe_slow_reply_in_pieces() -> None:
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            port = await _serve(nursery, await _reply(b"ready up 40%\n", delay_s=0.05, chunks=5))
            assert await agent_probe("127.0.0.1", port, 2.0) == AgentReport(health=UP, admin=READY, weight_pct=40)
            nursery.cancel_scope.cancel()


async def test_probe_hang_times_out() -> None:
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            port = await _serve(nursery, _hang)
            start = trio.current_time()
            assert await agent_probe("127.0.0.1", port, 0.2) == AgentFailure("timeout after 200 ms waiting for reply")
            assert trio.current_time() - start < 1.0
            nursery.cancel_scope.cancel()


async def test_probe_too_slow_times_out() -> None:
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            port = await _serve(nursery, await _reply(b"up\n", delay_s=1.0))
            assert await agent_probe("127.0.0.1", port, 0.2) == AgentFailure("timeout after 200 ms waiting for reply")
            nursery.cancel_scope.cancel()


async def test_probe_oversized_reply() -> None:
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            port = await _serve(nursery, await _reply(b"x" * 5000 + b"\n"))
            result = await agent_probe("127.0.0.1", port, 2.0, max_reply_bytes=1024)
            assert result == AgentFailure("reply longer than 1024 bytes without a line end")
            nursery.cancel_scope.cancel()


async def test_probe_refused() -> None:
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            port = await _serve(nursery, _hang)
            nursery.cancel_scope.cancel()
        # The listener is closed now: nothing listens on that port.
        assert await agent_probe("127.0.0.1", port, 2.0) == AgentFailure("refused")
