"""The load lab's processes: a simulated backend with a real queue, and an open-loop client.

    python -m examples.lab.loadsim serve --name b1 --capacity 4 --stats-socket /tmp/x/b1.stats \\
        [--slots-per-unit 4] [--service-ms 80] [--port 80] [--agent-port 9777] [--agent-style idle]
    python -m examples.lab.loadsim client HOST [--port 80] --rate 150 [--bytes 200] [--max-s 600]

`serve` is a small HTTP/1.1 server on `--port` (wildcard, so also on the VIP held on
loopback); every connection carries one request and is closed after the answer.

- `GET /work?id=N&bytes=M` waits for one of `capacity * slots_per_unit` slots (a FIFO queue,
  trio.CapacityLimiter), holds it for the fixed service time, then answers 200 with `M` bytes
  derived from `N` (`payload`) and `X-Backend: <name>`.
- Any other path (the node's http check, `/load`) answers at once: 200 with `X-Load` (mean
  requests in service or waiting over the last `--agent-window-ms`, in capacity units: what the
  node's controller divides by the configured `capacity`), `X-Utilisation` and a JSON body of
  both. A connection that closes without a request (a TCP check) takes no slot.

The agent port writes one HAProxy agent-check line about the same window (examples/lab/
loadstats.py: agent_reply) and closes. The stats socket (a unix socket, so the lab's sampler
reads it from the root namespace) writes one JSON line of the raw integrals. Prints "ready"
once all three listen; stops on SIGTERM.

`client` starts a new TCP connection every 1/rate seconds (open loop: a slow backend does not
slow the arrivals), each from a fresh ephemeral port so the node's hash spreads them, sends one
`/work` request and checks the answer byte for byte. Commands on stdin, answered with one JSON
line of the counters so far: "report", "stop" (no new requests; waits for those in flight,
answers, exits). `broken` counts every request that failed to connect, timed out, was reset or
returned a wrong status or wrong bytes.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import signal
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

import trio

from examples.lab.loadstats import AgentStyle, Occupancy, Window, agent_reply

MAX_HEAD_BYTES = 4096
MAX_BODY_BYTES = 1 << 20
MAX_IN_FLIGHT = 4000  # the client's bound: beyond this a request is counted broken, not started


def payload(ident: int, nbytes: int) -> bytes:
    """The bytes request `ident` must get back: a SHA-256 chain, so a swapped or truncated
    answer never matches by accident."""
    out = bytearray()
    block = hashlib.sha256(str(ident).encode()).digest()
    while len(out) < nbytes:
        out += block
        block = hashlib.sha256(block).digest()
    return bytes(out[:nbytes])


def response(status: str, headers: dict[str, str], body: bytes) -> bytes:
    head = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", "Connection: close",
            *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def parse_work(target: str) -> tuple[int, int] | None:
    """(id, bytes) of a `/work?id=N&bytes=M` target; None for any other path; ValueError if
    the query is malformed."""
    url = urlsplit(target)
    if url.path != "/work":
        return None
    query = parse_qs(url.query)
    ident, nbytes = int(query["id"][0]), int(query["bytes"][0])
    if not 0 <= nbytes <= MAX_BODY_BYTES:
        raise ValueError(f"bytes={nbytes}")
    return ident, nbytes


# ---- the backend ------------------------------------------------------------------------------


@dataclass
class Backend:
    name: str
    capacity: int  # capacity units (CPUs); slots = capacity * slots_per_unit
    slots_per_unit: int
    service_s: float
    window_s: float  # what X-Load and the agent average over
    busy: Occupancy = field(default_factory=Occupancy)  # requests in service
    load: Occupancy = field(default_factory=Occupancy)  # in service or waiting
    served: int = 0
    refused: int = 0  # malformed requests
    load_reads: int = 0
    agent_reads: int = 0

    def __post_init__(self) -> None:
        now = time.monotonic()
        self.busy.since_s = self.load.since_s = now
        self.slots = trio.CapacityLimiter(self.capacity * self.slots_per_unit)
        tick_s = 0.05
        self.busy_window = Window(self.window_s, tick_s)
        self.load_window = Window(self.window_s, tick_s)

    @property
    def total_slots(self) -> int:
        return self.capacity * self.slots_per_unit

    def recent(self) -> tuple[float, float]:
        """(utilisation 0..1, load in capacity units) over the trailing window."""
        now = time.monotonic()
        return (self.busy_window.mean(now, self.busy) / self.total_slots,
                self.load_window.mean(now, self.load) / self.slots_per_unit)

    async def snapshots(self) -> None:
        while True:
            now = time.monotonic()
            self.busy_window.snapshot(now, self.busy)
            self.load_window.snapshot(now, self.load)
            await trio.sleep(self.busy_window.tick_s)

    async def handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                with trio.fail_after(10):
                    target = await _read_request_target(stream)
                if target is None:
                    return  # a TCP check: connected and went away
                try:
                    work = parse_work(target)
                except (ValueError, KeyError, IndexError):
                    self.refused += 1
                    await stream.send_all(response("400 Bad Request", {}, b""))
                    return
                if work is None:
                    await stream.send_all(self._load_response())
                    return
                ident, nbytes = work
                await self._serve(ident)
                await stream.send_all(response("200 OK", {"X-Backend": self.name}, payload(ident, nbytes)))
                self.served += 1
            except (trio.BrokenResourceError, trio.TooSlowError, OSError):
                pass  # the client went away: its problem, counted on its side

    async def _serve(self, ident: int) -> None:
        self.load.set(time.monotonic(), self.load.value + 1)
        try:
            async with self.slots:
                self.busy.set(time.monotonic(), self.busy.value + 1)
                try:
                    await trio.sleep(self.service_s)
                finally:
                    self.busy.set(time.monotonic(), self.busy.value - 1)
        finally:
            self.load.set(time.monotonic(), self.load.value - 1)

    def _load_response(self) -> bytes:
        self.load_reads += 1
        utilisation, load = self.recent()
        body = json.dumps({"load": round(load, 4), "utilisation": round(utilisation, 4)}).encode()
        return response("200 OK", {"Content-Type": "application/json", "X-Load": f"{load:.4f}",
                                   "X-Utilisation": f"{utilisation:.4f}", "X-Backend": self.name}, body)

    def stats(self) -> dict[str, object]:
        now = time.monotonic()
        return {"name": self.name, "capacity": self.capacity, "slots": self.total_slots, "t": now,
                "busy_s": self.busy.integral_at(now), "load_s": self.load.integral_at(now),
                "in_service": self.busy.value, "waiting": self.load.value - self.busy.value,
                "served": self.served, "refused": self.refused, "load_reads": self.load_reads,
                "agent_reads": self.agent_reads}


async def _read_request_target(stream: trio.SocketStream) -> str | None:
    """The request-target of the request line once the whole head is in; None on EOF before
    a request. Never raises for a garbage head: it yields a target that parse_work refuses."""
    buf = bytearray()
    while b"\r\n\r\n" not in buf and b"\n\n" not in buf:
        data = await stream.receive_some(MAX_HEAD_BYTES)
        if not data:
            if not buf:
                return None
            break
        buf += data
        if len(buf) > MAX_HEAD_BYTES:
            break
    words = bytes(buf).split(b"\r\n", 1)[0].split()
    return words[1].decode(errors="replace") if len(words) == 3 else "/work?garbage"


async def _send_and_close(stream: trio.SocketStream, data: bytes) -> None:
    async with stream:
        try:
            with trio.move_on_after(2):
                await stream.send_all(data)
        except (trio.BrokenResourceError, OSError):
            pass


def read_stats(path: str, timeout_s: float) -> dict[str, object]:
    """A backend's stats (blocking, for the lab's sampler): its socket sends one JSON line and
    closes, whatever is asked. Not lbnode's control protocol: these servers are not nodes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        sock.connect(path)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    stats = json.loads(b"".join(chunks))
    if not isinstance(stats, dict):
        raise ValueError(f"{path}: not a stats document")
    return stats


async def serve(args: argparse.Namespace) -> None:
    backend = Backend(args.name, args.capacity, args.slots_per_unit, args.service_ms / 1000,
                      args.agent_window_ms / 1000)
    style = AgentStyle(args.agent_style)

    async def agent(stream: trio.SocketStream) -> None:
        backend.agent_reads += 1
        utilisation, load = backend.recent()
        line = agent_reply(style, utilisation=utilisation, load=load, capacity=backend.capacity)
        await _send_and_close(stream, line.encode())

    async def stats(stream: trio.SocketStream) -> None:
        await _send_and_close(stream, json.dumps(backend.stats()).encode() + b"\n")

    requests = await trio.open_tcp_listeners(args.port, backlog=4096)
    agents = await trio.open_tcp_listeners(args.agent_port, backlog=256)
    unix = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.unlink(args.stats_socket)
    except FileNotFoundError:
        pass
    await unix.bind(args.stats_socket)
    unix.listen(64)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(backend.snapshots)
        nursery.start_soon(trio.serve_listeners, backend.handle, requests)
        nursery.start_soon(trio.serve_listeners, agent, agents)
        nursery.start_soon(trio.serve_listeners, stats, [trio.SocketListener(unix)])
        print("ready", flush=True)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                break
        nursery.cancel_scope.cancel()


# ---- the client -------------------------------------------------------------------------------


def check_answer(data: bytes, ident: int, nbytes: int) -> str | None:
    """The answering backend's name if `data` is the right answer to request `ident`, else None."""
    head, sep, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    if not sep or not lines[0].startswith(b"HTTP/1.1 200 ") or body != payload(ident, nbytes):
        return None
    headers = dict(line.split(b": ", 1) for line in lines[1:] if b": " in line)
    if headers.get(b"Content-Length") != str(nbytes).encode():
        return None
    return headers.get(b"X-Backend", b"?").decode(errors="replace")


@dataclass
class ClientFigures:
    started: int = 0
    ok: int = 0
    broken: int = 0
    in_flight: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    by_backend: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)  # since the last report

    def report(self) -> dict[str, object]:
        lat = sorted(self.latencies_ms)
        self.latencies_ms = []

        def pct(p: float) -> float | None:
            return round(lat[min(len(lat) - 1, math.ceil(p * len(lat)) - 1)], 1) if lat else None

        return {"t": time.monotonic(), "started": self.started, "ok": self.ok, "broken": self.broken,
                "in_flight": self.in_flight, "errors": dict(self.errors), "by_backend": dict(self.by_backend),
                "p50_ms": pct(0.5), "p99_ms": pct(0.99)}


async def one_request(figures: ClientFigures, host: str, port: int, ident: int, nbytes: int,
                      timeout_s: float) -> None:
    figures.in_flight += 1
    t0 = time.monotonic()
    try:
        with trio.fail_after(timeout_s):
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                await stream.send_all(f"GET /work?id={ident}&bytes={nbytes} HTTP/1.1\r\nHost: {host}\r\n"
                                      "Connection: close\r\n\r\n".encode())
                data = bytearray()
                while chunk := await stream.receive_some(65536):
                    data += chunk
                    if len(data) > nbytes + MAX_HEAD_BYTES:
                        break
        backend = check_answer(bytes(data), ident, nbytes)
        if backend is None:
            figures.broken += 1
            figures.errors["wrong answer"] += 1
            return
        figures.by_backend[backend] += 1
        figures.ok += 1
        figures.latencies_ms.append(1000 * (time.monotonic() - t0))
    except (trio.TooSlowError, OSError, trio.BrokenResourceError) as exc:
        figures.broken += 1
        figures.errors[type(exc).__name__] += 1
    finally:
        figures.in_flight -= 1


async def client(args: argparse.Namespace) -> None:
    figures = ClientFigures()
    stdin = trio.lowlevel.FdStream(sys.stdin.fileno())

    arrivals_scope = trio.CancelScope()
    drained = trio.Event()

    async def arrivals() -> None:
        async with trio.open_nursery() as requests:
            with arrivals_scope:
                next_at = trio.current_time()
                while True:
                    figures.started += 1
                    if figures.in_flight >= MAX_IN_FLIGHT:
                        figures.broken += 1
                        figures.errors["client overloaded"] += 1
                    else:
                        requests.start_soon(one_request, figures, args.host, args.port, figures.started,
                                            args.bytes, args.timeout_s)
                    next_at += 1 / args.rate
                    await trio.sleep_until(next_at)
        drained.set()  # every request started has ended (each bounded by its timeout)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(arrivals)
        print("ready", flush=True)
        with trio.move_on_after(args.max_s):
            buf = b""
            while data := await stdin.receive_some(1024):
                buf += data
                while b"\n" in buf:
                    line, _, buf = buf.partition(b"\n")
                    command = line.decode().strip()
                    if not command:
                        continue
                    if command == "stop":
                        # No new arrivals; the requests in flight finish (bounded by their
                        # timeout) before the final figures, so stopping never counts as breakage.
                        arrivals_scope.cancel()
                        with trio.move_on_after(args.timeout_s + 1):
                            await drained.wait()
                    print(json.dumps(figures.report()), flush=True)
                    if command == "stop":
                        nursery.cancel_scope.cancel()
                        return
        nursery.cancel_scope.cancel()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--name", required=True)
    s.add_argument("--capacity", type=int, required=True, help="capacity units (CPUs)")
    s.add_argument("--slots-per-unit", type=int, default=4, help="requests one capacity unit serves at once")
    s.add_argument("--service-ms", type=float, default=80.0)
    s.add_argument("--port", type=int, default=80)
    s.add_argument("--agent-port", type=int, default=9777)
    s.add_argument("--agent-style", choices=[a.value for a in AgentStyle], default=AgentStyle.IDLE_CAPACITY.value)
    s.add_argument("--agent-window-ms", type=int, default=1000)
    s.add_argument("--stats-socket", required=True)
    c = sub.add_parser("client")
    c.add_argument("host")
    c.add_argument("--port", type=int, default=80)
    c.add_argument("--rate", type=float, default=150.0, help="new connections per second")
    c.add_argument("--bytes", type=int, default=200)
    c.add_argument("--timeout-s", type=float, default=5.0)
    c.add_argument("--max-s", type=float, default=600.0)
    args = parser.parse_args()
    trio.run(serve if args.command == "serve" else client, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
