"""The control socket's protocol: requests and replies as JSON lines. Pure: no sockets, no clock.

Theory of operation. The status socket (cluster.status does the I/O) carries one request and one
reply per connection, each one JSON object on one line (UTF-8, `\\n`-terminated, at most
MAX_REQUEST_BYTES for a request):

    -> {"v": 1, "cmd": "status"}
    <- {"v": 1, "ok": true, "status": {...the status document...}}
    -> {"v": 1, "cmd": "drain", "backend": "10.0.0.11", "service": "web"}
    <- {"v": 1, "ok": true, "changed": ["web/192.0.2.10:80 10.0.0.11"], ...}
    -> {"v": 1, "cmd": "frobnicate"}
    <- {"v": 1, "ok": false, "error": "unknown command 'frobnicate' (known: disable, drain, ...)"}

`v` is the protocol version. A request with another version is refused with an error that names
the versions this node speaks, so a newer client can fall back; a new field in a request or a
reply is not a new version (readers ignore fields they do not know), a changed meaning is.

Commands: `status`; `drain` / `undrain` (`backend` an address, optional `service` a config
service name); `disable` / `enable` (`vip` an address; `disable` takes an optional `grace_s`,
how long the node keeps taking new flows for the VIP after withdrawing its route). Every request
may carry `user`, the operator's name as the client knows it (recorded with the change; the
server adds the uid and pid it sees on the socket, which the client cannot forge).

A client that sends nothing (closes its side, or says nothing for cluster.status's LEGACY_WAIT_S)
gets the bare status document, as before the protocol was versioned:
`socat - UNIX-CONNECT:/run/lbnode/eth0.sock </dev/null` still works.

Who may do what: the socket is mode 0600, owned by root (only root can connect). Commands that
change state also need uid 0 on the socket's peer credentials, so a socket made readable to a
monitoring group (chgrp/chmod) lets that group read status and nothing else.
"""
from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from typing import Any

from bpf.structs import IPAddress

VERSION = 1
VERSIONS = (1,)  # the versions this node answers
MAX_REQUEST_BYTES = 4096
MAX_USER_CHARS = 64
MAX_GRACE_S = 300.0
DEFAULT_GRACE_S = 2.0  # the router moves traffic within a BGP UPDATE's round trip; BFD-speed routers sooner


class Refused(Exception):
    """A request this node does not carry out; the message goes back to the client as `error`."""


class ProtocolError(Refused):
    """A request this node cannot parse or does not know."""


@dataclass(frozen=True, slots=True)
class Status:
    user: str | None = None


@dataclass(frozen=True, slots=True)
class Drain:
    backend: IPAddress
    service: str | None = None  # None: every service that lists the backend
    user: str | None = None


@dataclass(frozen=True, slots=True)
class Undrain:
    backend: IPAddress
    service: str | None = None
    user: str | None = None


@dataclass(frozen=True, slots=True)
class Disable:
    vip: IPAddress
    grace_s: float = DEFAULT_GRACE_S
    user: str | None = None


@dataclass(frozen=True, slots=True)
class Enable:
    vip: IPAddress
    user: str | None = None


Request = Status | Drain | Undrain | Disable | Enable
COMMANDS: dict[str, type[Request]] = {"status": Status, "drain": Drain, "undrain": Undrain,
                                      "disable": Disable, "enable": Enable}
MUTATING = frozenset({Drain, Undrain, Disable, Enable})  # need uid 0 on the socket


def is_mutating(request: Request) -> bool:
    return type(request) in MUTATING


# -- requests ---------------------------------------------------------------------------------------

def encode_request(request: Request) -> bytes:
    body: dict[str, Any] = {"v": VERSION}
    body["cmd"] = next(name for name, cls in COMMANDS.items() if isinstance(request, cls))
    if isinstance(request, (Drain, Undrain)):
        body["backend"] = str(request.backend)
        if request.service is not None:
            body["service"] = request.service
    elif isinstance(request, (Disable, Enable)):
        body["vip"] = str(request.vip)
        if isinstance(request, Disable):
            body["grace_s"] = request.grace_s
    if request.user is not None:
        body["user"] = request.user
    return _line(body)


def decode_request(line: bytes) -> Request:
    """One request line (with or without its newline) -> a Request, or ProtocolError saying why."""
    if len(line) > MAX_REQUEST_BYTES:
        raise ProtocolError(f"request longer than {MAX_REQUEST_BYTES} bytes")
    try:
        body = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"request is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ProtocolError(f"request must be a JSON object, got {type(body).__name__}")
    version = body.get("v")
    if version not in VERSIONS or isinstance(version, bool):
        raise ProtocolError(f"unsupported protocol version {version!r} (this node speaks "
                            f"{', '.join(str(v) for v in VERSIONS)})")
    cmd = body.get("cmd")
    if not isinstance(cmd, str):
        raise ProtocolError("'cmd' must be a string")
    cls = COMMANDS.get(cmd)
    if cls is None:
        raise ProtocolError(f"unknown command {cmd!r} (known: {', '.join(sorted(COMMANDS))})")
    user = _optional_str(body, "user", cmd, MAX_USER_CHARS)
    if cls is Status:
        return Status(user)
    if cls is Drain or cls is Undrain:
        return cls(_address(body, "backend", cmd), _optional_str(body, "service", cmd, 64), user)
    vip = _address(body, "vip", cmd)
    if cls is Enable:
        return Enable(vip, user)
    grace = body.get("grace_s", DEFAULT_GRACE_S)
    if isinstance(grace, bool) or not isinstance(grace, (int, float)) or not 0 <= grace <= MAX_GRACE_S:
        raise ProtocolError(f"{cmd}: 'grace_s' must be a number 0..{MAX_GRACE_S:g}, got {grace!r}")
    return Disable(vip, float(grace), user)


def _address(body: dict[str, Any], key: str, cmd: str) -> IPAddress:
    value = body.get(key)
    if not isinstance(value, str):
        raise ProtocolError(f"{cmd}: {key!r} is required (an IP address)")
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise ProtocolError(f"{cmd}: {key!r}: not an IP address: {value!r}") from None


def _optional_str(body: dict[str, Any], key: str, cmd: str, max_chars: int) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= max_chars or not value.isprintable():
        raise ProtocolError(f"{cmd}: {key!r} must be a printable string of 1..{max_chars} characters")
    return value


# -- replies ----------------------------------------------------------------------------------------

def encode_ok(fields: dict[str, Any]) -> bytes:
    return _line({"v": VERSION, "ok": True, **fields})


def encode_error(error: str) -> bytes:
    return _line({"v": VERSION, "ok": False, "error": error})


def encode_status_reply(document: bytes) -> bytes:
    """The status reply around an already encoded document (one JSON line, cached by the node):
    spliced, not parsed and dumped again, since a big node's document is megabytes."""
    return b'{"v": %d, "ok": true, "status": ' % VERSION + document.rstrip(b"\n") + b"}\n"


class ReplyError(Exception):
    """The node refused the request (`ok: false`); the message is the node's."""


def decode_reply(data: bytes, *, to_status: bool = False) -> dict[str, Any]:
    """A reply line -> its fields (ok replies), ReplyError (refusals), ValueError (not a reply).
    `to_status`: the answer to a status request, which a node from before this protocol gives as
    the bare document (it sends it at once, whatever the request): wrapped as a reply of version 0,
    so a new `lbnode status` still reads an old node during a rolling upgrade."""
    body = json.loads(data)
    if to_status and isinstance(body, dict) and "ok" not in body and "node" in body:
        return {"v": 0, "ok": True, "status": body}
    if not isinstance(body, dict) or "ok" not in body:
        raise ValueError("not a control reply")
    if body.get("v") != VERSION:
        raise ValueError(f"reply of protocol version {body.get('v')!r}, expected {VERSION}")
    if not body["ok"]:
        raise ReplyError(str(body.get("error", "refused")))
    return body


def _line(body: dict[str, Any]) -> bytes:
    return json.dumps(body, default=str).encode() + b"\n"
