"""Load for the fault-injection lab: long-lived echo connections checked byte by byte, plus a
steady stream of new short HTTP connections. Runs inside the client namespace.

    python -m examples.lab.loadgen HOST --long 200 --interval-ms 100 --short-rate 20

Prints "ready" once every long connection is up (each knows its backend from the greeting),
then keeps going. Commands on stdin, each answered with one JSON line of the figures so far:
"report"; "open N" opens N more long connections and answers once they are up (or failed);
"mark" remembers every connection's echo count, so that the report's `min_echoed_since_mark`
says whether *each* surviving connection has echoed since; "stop" answers and exits. The run
also ends after --max-s seconds.

A long connection sends "<id>:<seq>:<payload>" every interval and expects the same line back
within --stuck-s seconds. It is *lost* on a reset, an EOF, a wrong echo (corruption) or no
answer in --stuck-s; a slow answer is only a *stall* (the gap between two good echoes,
reported as a maximum). Short connections are HTTP GETs with a timeout; failures are kept with
their time so the report shows when new connections stopped failing (convergence).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import trio

PAYLOAD = "x" * 64
CONNECT_TRIES = 3
CONNECT_RETRY_S = 0.5


@dataclass
class Long:
    ident: int
    backend: str = "?"
    sent: int = 0
    echoed: int = 0
    last_ok: float = 0.0
    max_stall_s: float = 0.0
    lost: str | None = None
    lost_at: float | None = None
    echoed_at_mark: int = 0
    connect_retries: int = 0


@dataclass
class Figures:
    started: float = field(default_factory=time.monotonic)
    longs: list[Long] = field(default_factory=list)
    short_ok: int = 0
    short_failed: int = 0
    short_fail_times: list[float] = field(default_factory=list)
    short_errors: Counter[str] = field(default_factory=Counter)

    def report(self) -> dict[str, object]:
        now = time.monotonic()
        alive = [c for c in self.longs if c.lost is None]
        since_mark = [c.echoed - c.echoed_at_mark for c in alive]
        stalls = sorted(max(c.max_stall_s, now - c.last_ok if c.lost is None else 0.0) for c in self.longs)
        return {
            "elapsed_s": round(now - self.started, 3),
            "long": {
                "total": len(self.longs), "alive": len(alive),
                "lost": dict(Counter(c.lost for c in self.longs if c.lost)),
                "lost_by_backend": dict(Counter(c.backend for c in self.longs if c.lost)),
                "by_backend": dict(Counter(c.backend for c in self.longs)),
                "echoed": sum(c.echoed for c in self.longs),
                "min_echoed_since_mark": min(since_mark, default=0),
                "connect_retries": sum(c.connect_retries for c in self.longs),
                "max_stall_ms": round(1000 * stalls[-1]) if stalls else 0,
                "current_stall_ms": round(1000 * max((now - c.last_ok for c in alive), default=0.0)),
                "p99_stall_ms": (round(1000 * stalls[min(len(stalls) - 1, math.ceil(0.99 * len(stalls)) - 1)])
                                 if stalls else 0),
                "lost_at_s": sorted(round(c.lost_at - self.started, 3) for c in self.longs if c.lost_at is not None),
            },
            "short": {
                "ok": self.short_ok, "failed": self.short_failed, "errors": dict(self.short_errors),
                "last_fail_s": round(self.short_fail_times[-1] - self.started, 3) if self.short_fail_times else None,
            },
        }


async def connect(conn: Long, host: str, port: int) -> trio.SocketStream:
    """A long connection is checked once it exists: a connect that fails at once (refused,
    unreachable) is tried again, as a client would, up to CONNECT_TRIES times; counted."""
    for _ in range(CONNECT_TRIES - 1):
        try:
            return await trio.open_tcp_stream(host, port)
        except OSError:
            conn.connect_retries += 1
            await trio.sleep(CONNECT_RETRY_S)
    return await trio.open_tcp_stream(host, port)


async def long_conn(conn: Long, host: str, port: int, interval_s: float, stuck_s: float,
                    connected: trio.Semaphore) -> None:
    try:
        with trio.fail_after(stuck_s):
            stream = await connect(conn, host, port)
    except (OSError, trio.TooSlowError) as exc:
        conn.lost, conn.lost_at = f"connect: {type(exc).__name__}", time.monotonic()
        connected.release()
        return
    buf = b""

    async def read_line() -> bytes:
        nonlocal buf
        while b"\n" not in buf:
            data = await stream.receive_some(4096)
            if not data:
                raise EOFError("eof")
            buf += data
        line, _, buf = buf.partition(b"\n")
        return line

    try:
        with trio.fail_after(stuck_s):
            conn.backend = (await read_line()).decode()
        conn.last_ok = time.monotonic()
        connected.release()
        while True:
            conn.sent += 1
            line = f"{conn.ident}:{conn.sent}:{PAYLOAD}".encode()
            await stream.send_all(line + b"\n")
            with trio.fail_after(stuck_s):
                echo = await read_line()
            if echo != line:
                conn.lost = "corrupt"
                break
            now = time.monotonic()
            conn.max_stall_s = max(conn.max_stall_s, now - conn.last_ok)
            conn.last_ok = now
            conn.echoed += 1
            await trio.sleep(interval_s)
    except trio.TooSlowError:
        conn.lost = "stuck"
    except EOFError:
        conn.lost = "eof"
    except (trio.BrokenResourceError, OSError) as exc:
        cause = exc.__cause__ or exc
        conn.lost = "reset" if isinstance(cause, ConnectionResetError) else type(cause).__name__
    finally:
        if conn.lost is not None:
            conn.lost_at = time.monotonic()
        await stream.aclose()


async def short_conns(figures: Figures, host: str, port: int, rate: float, timeout_s: float) -> None:
    async def one() -> None:
        try:
            with trio.fail_after(timeout_s):
                stream = await trio.open_tcp_stream(host, port)
                async with stream:
                    await stream.send_all(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
                    data = b""
                    while chunk := await stream.receive_some(4096):
                        data += chunk
            if not data.startswith(b"HTTP/1.1 200"):
                raise ValueError("bad response")
            figures.short_ok += 1
        except (trio.TooSlowError, OSError, trio.BrokenResourceError, ValueError) as exc:
            figures.short_failed += 1
            figures.short_errors[type(exc).__name__] += 1
            figures.short_fail_times.append(time.monotonic())

    async with trio.open_nursery() as nursery:
        next_at = trio.current_time()
        while True:
            nursery.start_soon(one)
            next_at += 1 / rate
            await trio.sleep_until(next_at)


async def open_longs(nursery: trio.Nursery, figures: Figures, args: argparse.Namespace, count: int) -> None:
    """Open `count` more long connections; return once each is echoing or has failed."""
    connected = trio.Semaphore(0, max_value=max(count, 1))
    for _ in range(count):
        conn = Long(len(figures.longs))
        figures.longs.append(conn)
        nursery.start_soon(long_conn, conn, args.host, args.echo_port, args.interval_ms / 1000, args.stuck_s, connected)
    with trio.fail_after(30):
        for _ in range(count):
            await connected.acquire()


async def main_async(args: argparse.Namespace) -> None:
    figures = Figures()
    stdin = trio.lowlevel.FdStream(sys.stdin.fileno())
    async with trio.open_nursery() as nursery:
        await open_longs(nursery, figures, args, args.long)
        if args.short_rate > 0:
            nursery.start_soon(short_conns, figures, args.host, args.http_port, args.short_rate, args.short_timeout_s)
        print("ready", flush=True)
        with trio.move_on_after(args.max_s):
            buf = b""
            while True:
                data = await stdin.receive_some(1024)
                if not data:
                    break
                buf += data
                while b"\n" in buf:
                    line, _, buf = buf.partition(b"\n")
                    if not line.strip():
                        continue
                    command, *params = line.decode().split()
                    if command == "open":
                        await open_longs(nursery, figures, args, int(params[0]))
                    elif command == "mark":
                        for conn in figures.longs:
                            conn.echoed_at_mark = conn.echoed
                    print(json.dumps(figures.report()), flush=True)
                    if command == "stop":
                        nursery.cancel_scope.cancel()
                        return
        print(json.dumps(figures.report()), flush=True)
        nursery.cancel_scope.cancel()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("host")
    parser.add_argument("--echo-port", type=int, default=9000)
    parser.add_argument("--http-port", type=int, default=80)
    parser.add_argument("--long", type=int, default=200)
    parser.add_argument("--interval-ms", type=int, default=100)
    parser.add_argument("--stuck-s", type=float, default=30.0)
    parser.add_argument("--short-rate", type=float, default=20.0, help="new short connections per second")
    parser.add_argument("--short-timeout-s", type=float, default=3.0)
    parser.add_argument("--max-s", type=float, default=300.0)
    args = parser.parse_args()
    trio.run(main_async, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
