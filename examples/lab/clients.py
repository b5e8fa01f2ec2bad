"""Lab clients, run inside the client namespace.

    python -m examples.lab.clients http URL --count N
        N sequential GETs, each on a new TCP connection; prints one JSON line:
        {"ok": n, "failed": n, "backends": {"b1": n, ...}, "errors": [...]}
    python -m examples.lab.clients echo HOST PORT
        Holds one TCP connection to an echo service. Prints "connected <backend>"; then for every line
        read on stdin sends it, checks the echo, and prints "ok <line>" or "error <why>".
"""
from __future__ import annotations

import argparse
import collections
import http.client
import json
import socket
import sys
import urllib.parse


def http_spread(url: str, count: int, timeout_s: float) -> dict[str, object]:
    parsed = urllib.parse.urlsplit(url)
    backends: collections.Counter[str] = collections.Counter()
    errors: list[str] = []
    for _ in range(count):
        conn = http.client.HTTPConnection(parsed.hostname or "", parsed.port or 80, timeout=timeout_s)
        try:
            conn.request("GET", parsed.path or "/")
            response = conn.getresponse()
            body = response.read().decode().strip()
            if response.status == 200:
                backends[body] += 1
            else:
                errors.append(f"status {response.status}")
        except OSError as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            conn.close()
    return {"ok": sum(backends.values()), "failed": len(errors), "backends": dict(backends), "errors": errors[:5]}


def echo_session(host: str, port: int, timeout_s: float) -> int:
    sock = socket.create_connection((host, port), timeout=timeout_s)
    stream = sock.makefile("rwb")
    backend = stream.readline().decode().strip()
    print(f"connected {backend}", flush=True)
    for line in sys.stdin:
        payload = line.strip().encode() + b"\n"
        try:
            stream.write(payload)
            stream.flush()
            answer = stream.readline()
        except OSError as exc:
            print(f"error {type(exc).__name__}: {exc}", flush=True)
            return 1
        if answer != payload:
            print(f"error echoed {answer!r}", flush=True)
            return 1
        print(f"ok {line.strip()}", flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    h = sub.add_parser("http")
    h.add_argument("url")
    h.add_argument("--count", type=int, default=30)
    h.add_argument("--timeout", type=float, default=3.0)
    e = sub.add_parser("echo")
    e.add_argument("host")
    e.add_argument("port", type=int)
    e.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args()
    if args.command == "http":
        print(json.dumps(http_spread(args.url, args.count, args.timeout)), flush=True)
        return 0
    return echo_session(args.host, args.port, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
