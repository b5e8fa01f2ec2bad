"""A lab backend: an HTTP server that names itself, and a TCP echo service for long-lived
connections (it greets with its name, then echoes lines). It binds the wildcard address, so it
answers on the VIP held on loopback.

    python -m examples.lab.backend_server --name b1 [--http-port 80] [--echo-port 9000]

Prints "ready" once both sockets listen; stops on SIGTERM.
"""
from __future__ import annotations

import argparse
import signal
import socket
import socketserver
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class DualStackHTTPServer(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True
    request_queue_size = 1024  # socketserver's default of 5 resets bursts of connections

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


class EchoServer(socketserver.ThreadingTCPServer):
    address_family = socket.AF_INET6
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


class EchoHandler(socketserver.StreamRequestHandler):
    """Greets with the backend's name (so a client knows where it landed), then echoes lines."""

    name = "?"

    def handle(self) -> None:
        try:
            self.wfile.write(f"{self.name}\n".encode())
            for line in self.rfile:
                self.wfile.write(line)
        except ConnectionError:  # a client that goes away is not the server's problem
            pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", required=True)
    parser.add_argument("--http-port", type=int, default=80)
    parser.add_argument("--echo-port", type=int, default=9000)
    args = parser.parse_args()

    class NameHandler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            body = f"{args.name}\n".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *a: object) -> None:
            pass

    EchoHandler.name = args.name
    http = DualStackHTTPServer(("::", args.http_port), NameHandler)
    echo = EchoServer(("::", args.echo_port), EchoHandler)
    for server in (http, echo):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("ready", flush=True)
    stop.wait()
    http.shutdown()
    echo.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
