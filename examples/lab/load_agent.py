"""A lab HAProxy agent (agent-check text protocol): every connection gets one line and a close.

    python -m examples.lab.load_agent --port 9777 --cycle 25,50,100,200,400 [--period-s 1] [--offset 0]

The reply is `N%`, N taken from the cycle by the wall clock (one step per period, shifted by
`offset`), so the weights of a load-aware service change every period; `--line TEXT` answers
TEXT instead (e.g. `drain`). Prints "ready" once it listens; stops on SIGTERM.
"""
from __future__ import annotations

import argparse
import signal
import socket
import sys
import time

import trio


async def serve(port: int, cycle: list[int], period_s: float, offset: int, line: str | None) -> None:
    listeners = await trio.open_tcp_listeners(port, host="0.0.0.0")

    async def reply(stream: trio.SocketStream) -> None:
        async with stream:
            text = line if line is not None else f"{cycle[(int(time.time() / period_s) + offset) % len(cycle)]}%"
            try:
                await stream.send_all(text.encode() + b"\n")
            except trio.BrokenResourceError:
                pass

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, reply, listeners)
        print("ready", flush=True)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9777)
    parser.add_argument("--cycle", default="100", help="comma-separated percentages")
    parser.add_argument("--period-s", type=float, default=1.0)
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--line", default=None)
    args = parser.parse_args()
    socket.setdefaulttimeout(5)
    trio.run(serve, args.port, [int(x) for x in args.cycle.split(",")], args.period_s, args.offset, args.line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
