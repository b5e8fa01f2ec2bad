"""HAProxy's agent-check: a pure reply parser and a trio probe, read by load-aware weighting
(`weighting: {mode: agent}`, healthcheck/loadprobe.py and cluster/loadfeed.py), not by the
health checker: an agent's verdict reaches the view through the cluster's published weights.

Theory of operation (HAProxy's `agent-check`, configuration manual section 5.2, and
`tcpcheck_agent_expect_reply` in its src/tcpcheck.c). The checker opens a TCP connection to the
agent port and reads; the agent writes one ASCII line and closes. The line ends at the first CR
or LF; a reply that reaches EOF without one is ignored ("incomplete line from agent"). The line
is words separated by spaces, tabs or commas, in any order, matched without regard to case:

    75%                     weight: this percentage of the configured weight (0% drains)
    up | down | stopped | fail   health; the last three all mark the server down
    ready | drain | maint   administrative state; ready cancels drain and maint
    maxconn:N               a connection limit (parsed, lbnode has no use for it yet)
    # text                  a word starting with '#' begins a free-text description; the rest
                            of the line is not parsed

If a category appears more than once, the last word wins. A word that is none of these is not an
error: HAProxy ignores it (it only quotes the first one in the check status), and so does this
parser, keeping the ignored words in `AgentReport.ignored`. A weight word that starts with a digit
and has a '%' but is not a plain `N%` ("7x%") is ignored the same way, with a warning. HAProxy
caps the scaled weight at its maximum (256); `scaled_weight` caps it at lbnode's (1000).

The mapping onto lbnode's states (cluster/desired.py): down/stopped/fail -> out of the hash like
a failing check (until `up`), drain or 0% -> drained (until `ready` or a percentage above 0),
maint -> disabled (until `ready`); healthcheck/loadprobe.py keeps each word until changed.
"""
from __future__ import annotations

import enum
import math
import re
import socket as stdsocket
from dataclasses import dataclass

import trio

from healthcheck.probe import SocketFactory, failure_reason, plain_socket

MAX_WEIGHT = 1000
MAX_PERCENT = 100_000  # a bigger percentage means the same: the scaled weight is capped at MAX_WEIGHT
MAX_REPLY_BYTES = 1024  # an agent line is a few words; more than this is a broken agent
_SEPARATORS = re.compile(r"[ \t,]+")
_PERCENT = re.compile(r"[0-9]+%")
_MAXCONN = re.compile(r"maxconn:([0-9]+)", re.IGNORECASE)


class AgentHealth(enum.Enum):
    UP = "up"
    DOWN = "down"
    STOPPED = "stopped"
    FAIL = "fail"


class AgentAdmin(enum.Enum):
    READY = "ready"
    DRAIN = "drain"
    MAINT = "maint"


@dataclass(frozen=True, slots=True)
class AgentReport:
    """What one agent reply said; None means the reply did not mention that category."""

    health: AgentHealth | None = None
    admin: AgentAdmin | None = None
    weight_pct: int | None = None
    maxconn: int | None = None
    description: str = ""
    ignored: tuple[str, ...] = ()  # unknown words, in order
    warnings: tuple[str, ...] = ()  # malformed known words ("7x%", "maxconn:x")

    @property
    def healthy(self) -> bool | None:
        """The health word's verdict: True for up, False for down/stopped/fail, None if absent."""
        return None if self.health is None else self.health is AgentHealth.UP

    def scaled_weight(self, configured_weight: int) -> int | None:
        """The configured weight scaled by the reported percentage (None without one), 0..MAX_WEIGHT."""
        if self.weight_pct is None:
            return None
        return min(MAX_WEIGHT, configured_weight * self.weight_pct // 100)


@dataclass(frozen=True, slots=True)
class AgentFailure:
    """The probe got no usable reply; `reason` says why."""

    reason: str


def parse_agent_reply(text: str) -> AgentReport:
    """Parse the agent's line: everything up to the first CR or LF (all of `text` if there is none)."""
    line = re.split(r"[\r\n]", text, maxsplit=1)[0]
    health: AgentHealth | None = None
    admin: AgentAdmin | None = None
    weight_pct: int | None = None
    maxconn: int | None = None
    description = ""
    ignored: list[str] = []
    warnings: list[str] = []
    rest = line
    while rest:
        rest = rest.lstrip(" \t,")
        if not rest:
            break
        if rest.startswith("#"):
            description = rest[1:].strip(" \t")
            break
        parts = _SEPARATORS.split(rest, maxsplit=1)
        word, rest = parts[0], (parts[1] if len(parts) > 1 else "")
        lower = word.lower()
        if lower in _HEALTH_WORDS:
            health = _HEALTH_WORDS[lower]
        elif lower in _ADMIN_WORDS:
            admin = _ADMIN_WORDS[lower]
        elif word[0].isdigit() and "%" in word:
            if _PERCENT.fullmatch(word):
                weight_pct = min(int(word[:-1]), MAX_PERCENT)  # so weight_pct / 100 stays a float
            else:
                warnings.append(f"bad weight {word!r}")
        elif lower.startswith("maxconn:"):
            if m := _MAXCONN.fullmatch(word):
                maxconn = int(m.group(1))
            else:
                warnings.append(f"bad maxconn {word!r}")
        else:
            ignored.append(word)
    return AgentReport(health, admin, weight_pct, maxconn, description, tuple(ignored), tuple(warnings))


_HEALTH_WORDS = {h.value: h for h in AgentHealth}
_ADMIN_WORDS = {a.value: a for a in AgentAdmin}


async def agent_probe(address: str, port: int, timeout_s: float, open_socket: SocketFactory = plain_socket,
                      max_reply_bytes: int = MAX_REPLY_BYTES) -> AgentReport | AgentFailure:
    """Connect, read one line (until a line end, EOF or `max_reply_bytes`), parse it.

    Never raises for anything the network or the agent does: a refused connection, a timeout,
    a reply without a line end or an oversized one come back as `AgentFailure`.
    """
    family = stdsocket.AF_INET6 if ":" in address else stdsocket.AF_INET
    phase = "while connecting"
    received = bytearray()
    try:
        with trio.move_on_after(timeout_s) as scope:
            with trio.socket.from_stdlib_socket(open_socket(family)) as sock:
                await sock.connect((address, port))
                phase = "waiting for reply"
                while True:
                    data = await sock.recv(max_reply_bytes + 1 - len(received))
                    if not data:
                        break
                    received += data
                    if b"\n" in received or b"\r" in received:
                        break
                    if len(received) > max_reply_bytes:
                        return AgentFailure(f"reply longer than {max_reply_bytes} bytes without a line end")
    except OSError as exc:
        return AgentFailure(failure_reason(exc))
    if scope.cancelled_caught:
        return AgentFailure(f"timeout after {_ms(timeout_s)} ms {phase}")
    if not received:
        return AgentFailure("closed without a reply")
    end = min((i for i in (received.find(b"\n"), received.find(b"\r")) if i >= 0), default=-1)
    if end < 0:
        return AgentFailure(f"incomplete line from agent ({len(received)} bytes, no line end before EOF)")
    return parse_agent_reply(bytes(received[:end]).decode("ascii", errors="replace"))


def _ms(seconds: float) -> int:
    return math.floor(seconds * 1000 + 0.5)
