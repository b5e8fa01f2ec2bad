"""Load readings of one backend: the HAProxy agent and the HTTP load report. Pure parsing and
memory (`AgentMemory`, `load_from_response`) and two trio probes that never raise for anything
the network or the backend does (a failure is `None`: no report this interval).

Agent (healthcheck/agent.py parses the line). HAProxy keeps what an agent said until it says
otherwise: `drain` holds until `ready`, `down` until `up`, a percentage until the next one. An
agent may answer only `75%` and mean "still draining", so `AgentMemory` keeps the last word of
each category per backend, like HAProxy does, and turns it into one reading:

    maint                  -> MAINT  (disabled)
    down / stopped / fail  -> DOWN   (out of the hash, like a failing check)
    drain, or 0%           -> DRAIN  (no new flows; pinned ones go on)
    otherwise              -> OK, value = percentage / 100 (1.0 until one was sent)

HTTP. A GET of the service's first http(s) check (its path, host, port, TLS options) to the
backend: through the VIP like the health checks (`via_vip`: connect to the VIP with the socket
mark that healthcheck/vipnet.py steers to the backend's MAC, so a backend that serves only on
the VIP, as DSR backends may, is read too), or straight to its address; the load is a number in
one response header (`http_header`) or one
top-level JSON field of the body (`http_json_field`). Any status is accepted: passing or failing
is the health check's business, this only reads a number. A missing, non-numeric, negative or
non-finite value is no report.
"""
from __future__ import annotations

import json
import math
import socket as stdsocket
import ssl
from dataclasses import dataclass

import trio

from healthcheck.agent import AgentAdmin, AgentFailure, AgentHealth, AgentReport, agent_probe
from healthcheck.config import CheckConfig, CheckKind
from healthcheck.errors import HttpParseError
from healthcheck.http import BODY_CAP, Response, ResponseParser, build_request
from healthcheck.probe import make_ssl_context

__all__ = ["AgentMemory", "AgentReading", "agent_reading", "http_load", "load_from_response"]

RECV_SIZE = 16384
# A load above this is no load report (cluster.sync.codec.MAX_LOAD_VALUE refuses it on the wire too).
MAX_LOAD_VALUE = 1e9


@dataclass(frozen=True, slots=True)
class AgentReading:
    state: str  # "ok" | "drain" | "down" | "maint" (cluster.sync.codec.LoadState names)
    value: float  # the percentage / 100


@dataclass(slots=True)
class AgentMemory:
    """What one backend's agent said last, per category (HAProxy keeps each until changed)."""

    health: AgentHealth = AgentHealth.UP
    admin: AgentAdmin = AgentAdmin.READY
    weight_pct: int = 100

    def update(self, report: AgentReport) -> AgentReading:
        if report.health is not None:
            self.health = report.health
        if report.admin is not None:
            self.admin = report.admin
        if report.weight_pct is not None:
            self.weight_pct = report.weight_pct
        value = self.weight_pct / 100
        if self.admin is AgentAdmin.MAINT:
            return AgentReading("maint", value)
        if self.health is not AgentHealth.UP:
            return AgentReading("down", value)
        if self.admin is AgentAdmin.DRAIN or self.weight_pct == 0:
            return AgentReading("drain", value)
        return AgentReading("ok", value)


async def agent_reading(memory: AgentMemory, address: str, port: int, timeout_s: float) -> AgentReading | None:
    """Ask the agent once; None if it did not answer with a line."""
    report = await agent_probe(address, port, timeout_s)
    if isinstance(report, AgentFailure):
        return None
    return memory.update(report)


def load_from_response(response: Response, header: str | None, json_field: str | None) -> float | None:
    """The number in `header` (case-insensitive) or in the top-level JSON `json_field`."""
    raw: object = None
    if header is not None:
        wanted = header.lower()
        raw = next((v for k, v in response.headers if k == wanted), None)
    elif json_field is not None:
        try:
            doc = json.loads(response.body)
        except (ValueError, UnicodeDecodeError):
            return None
        raw = doc.get(json_field) if isinstance(doc, dict) else None
    if isinstance(raw, bool) or raw is None:
        return None
    try:
        value = float(raw) if isinstance(raw, (int, float, str)) else math.nan
    except (ValueError, OverflowError):  # OverflowError: an integer too big for a float
        return None
    return value if math.isfinite(value) and 0 <= value <= MAX_LOAD_VALUE else None


async def http_load(check: CheckConfig, address: str, port: int, header: str | None, json_field: str | None,
                    timeout_s: float, ssl_context: ssl.SSLContext | None = None,
                    via_vip: tuple[str, int] | None = None) -> float | None:
    """GET `check`'s path from `address:port` (the check's port if it has one) and read the load;
    with `via_vip` (VIP, mark), from VIP:port on a socket with that mark (the backend's route)."""
    assert check.http is not None
    opts = check.http
    target, mark = via_vip if via_vip is not None else (address, None)
    family = stdsocket.AF_INET6 if ":" in target else stdsocket.AF_INET
    host = opts.host or (f"[{target}]" if family == stdsocket.AF_INET6 else target)
    parser = ResponseParser(want_body=json_field is not None, body_cap=BODY_CAP)
    with trio.move_on_after(timeout_s):
        try:
            sock = trio.socket.socket(family, stdsocket.SOCK_STREAM)
            with sock:
                if mark is not None:
                    sock.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_MARK, mark)
                await sock.connect((target, check.port or port))
                stream: trio.abc.Stream = trio.SocketStream(sock)
                if check.kind is CheckKind.HTTPS:
                    ctx = ssl_context or make_ssl_context(opts.verify, opts.ca_file)
                    stream = trio.SSLStream(stream, ctx, server_hostname=opts.sni or opts.host or address,
                                            https_compatible=True)
                await stream.send_all(build_request("GET", opts.path, host))
                while True:
                    data = await stream.receive_some(RECV_SIZE)
                    response = parser.feed(data) if data else parser.eof()
                    if response is not None:
                        return load_from_response(response, header, json_field)
        except (OSError, ssl.SSLError, trio.BrokenResourceError, HttpParseError):
            return None
    return None

