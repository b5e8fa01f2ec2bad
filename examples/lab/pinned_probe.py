"""Echo connections from chosen source ports, driven line by line: with a policy rule that routes
those ports through one node, a test can hold a flow pinned on that node and open new ones there.

    python -m examples.lab.pinned_probe HOST PORT

Commands on stdin, each answered with one JSON line:
  "open SPORT"  connect from SPORT, read the backend's greeting: {"ok": true, "backend": "b1"}
                or {"ok": false, "error": "..."} (no answer within --timeout-s: not forwarded)
  "echo SPORT"  one line through that connection, checked byte by byte: {"ok": true} or an error
  "quit"
"""
from __future__ import annotations

import argparse
import io
import json
import socket
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--timeout-s", type=float, default=2.0)
    args = parser.parse_args()
    conns: dict[int, tuple[socket.socket, io.BufferedReader]] = {}
    seq = 0
    print(json.dumps({"ok": True, "ready": True}), flush=True)
    for line in sys.stdin:
        command, *params = line.split()
        if command == "quit":
            break
        sport = int(params[0])
        reply: dict[str, object]
        try:
            if command == "open":
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.settimeout(args.timeout_s)
                sock.bind(("0.0.0.0", sport))
                try:
                    sock.connect((args.host, args.port))
                    reader = sock.makefile("rb")
                    greeting = reader.readline().decode().strip()
                except OSError:
                    sock.close()
                    raise
                conns[sport] = (sock, reader)
                reply = {"ok": bool(greeting), "backend": greeting}
            elif command == "echo":
                sock, reader = conns[sport]
                seq += 1
                payload = f"{sport}:{seq}:{'x' * 32}\n".encode()
                sock.sendall(payload)
                echo = reader.readline()
                reply = {"ok": True} if echo == payload else {"ok": False, "error": f"got {echo!r}"}
            else:
                reply = {"ok": False, "error": f"unknown command {command!r}"}
        except (OSError, KeyError) as exc:
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(reply), flush=True)
    for sock, _ in conns.values():
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
