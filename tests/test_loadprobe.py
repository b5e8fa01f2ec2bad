"""Load readings (healthcheck/loadprobe.py): the agent's sticky words, numbers from HTTP
responses, and both probes against real servers on localhost."""
from __future__ import annotations

from functools import partial

import pytest
import trio

from healthcheck.agent import MAX_PERCENT, parse_agent_reply
from healthcheck.config import CheckConfig
from healthcheck.http import Response
from healthcheck.loadprobe import AgentMemory, AgentReading, agent_reading, http_load, load_from_response

pytestmark = pytest.mark.unit


def test_agent_words_hold_until_changed_like_haproxy() -> None:
    memory = AgentMemory()
    steps = [("75%", AgentReading("ok", 0.75)), ("drain", AgentReading("drain", 0.75)),
             ("50%", AgentReading("drain", 0.5)), ("ready", AgentReading("ok", 0.5)),
             ("down", AgentReading("down", 0.5)), ("maint 10%", AgentReading("maint", 0.1)),
             ("up, ready", AgentReading("ok", 0.1)), ("0%", AgentReading("drain", 0.0)),
             ("200%", AgentReading("ok", 2.0)), ("#text only", AgentReading("ok", 2.0))]
    for line, expected in steps:
        assert memory.update(parse_agent_reply(line)) == expected, line


@pytest.mark.parametrize(("headers", "body", "header", "field", "expected"), [
    ((("x-load", "0.73"),), b"", "X-Load", None, 0.73),
    ((("x-load", " 12 "),), b"", "x-load", None, 12.0),
    ((("x-load", "lots"),), b"", "X-Load", None, None),
    ((("x-load", "-1"),), b"", "X-Load", None, None),
    ((("x-load", "nan"),), b"", "X-Load", None, None),
    ((), b"", "X-Load", None, None),
    ((), b'{"load": 3, "other": 1}', None, "load", 3.0),
    ((), b'{"load": "2.5"}', None, "load", 2.5),
    ((), b'{"load": true}', None, "load", None),
    ((), b'{"load": [1]}', None, "load", None),
    ((), b'[1, 2]', None, "load", None),
    ((), b'not json', None, "load", None),
    ((), b'{"load": 1e999}', None, "load", None),
    ((("x-load", "1e308"),), b"", "X-Load", None, None),  # finite, but the leader sums them
    ((), b'{"load": ' + b"9" * 400 + b"}", None, "load", None),  # an int too big for a float
])
def test_a_load_is_a_finite_number_at_least_zero(headers: tuple[tuple[str, str], ...], body: bytes,
                                                 header: str | None, field: str | None,
                                                 expected: float | None) -> None:
    assert load_from_response(Response(200, "OK", headers, body, False), header, field) == expected


def test_a_huge_agent_percentage_is_capped_not_an_overflow() -> None:
    reading = AgentMemory().update(parse_agent_reply("9" * 400 + "%"))
    assert reading == AgentReading("ok", MAX_PERCENT / 100)


async def test_probes_read_real_servers_and_fail_quietly() -> None:
    async def agent(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(b"drain 40%\n")

    async def http(stream: trio.SocketStream) -> None:
        async with stream:
            request = b""
            while b"\r\n\r\n" not in request:
                request += await stream.receive_some(4096)
            assert request.startswith(b"GET /load HTTP/1.1\r\n")
            await stream.send_all(b"HTTP/1.1 503 Busy\r\nX-Load: 0.9\r\nContent-Length: 12\r\n\r\n{\"load\": 7}\n")

    async def silent(stream: trio.SocketStream) -> None:
        async with stream:
            await trio.sleep(10)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            ports = []
            for handler in (agent, http, silent):
                [listener] = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
                ports.append(listener.socket.getsockname()[1])
            check = CheckConfig.from_dict({"kind": "http", "path": "/load"}, "c")
            assert await agent_reading(AgentMemory(), "127.0.0.1", ports[0], 2.0) == AgentReading("drain", 0.4)
            assert await agent_reading(AgentMemory(), "127.0.0.1", ports[2], 0.2) is None  # no reply in time
            assert await http_load(check, "127.0.0.1", ports[1], "X-Load", None, 2.0) == 0.9  # any status
            assert await http_load(check, "127.0.0.1", ports[1], None, "load", 2.0) == 7.0
            assert await http_load(check, "127.0.0.1", ports[2], "X-Load", None, 0.2) is None  # timeout
            nursery.cancel_scope.cancel()
    refused = CheckConfig.from_dict({"kind": "http", "port": 1}, "c")
    assert await http_load(refused, "127.0.0.1", 80, "X-Load", None, 1.0) is None
