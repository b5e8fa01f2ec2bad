"""Log line formats for `lbnode --log-format text|json`. Only the CLI installs them (`configure`).

Both carry the node's identity on every line, first: its interface and address, so the lines of
several nodes merged by a log shipper (or a lab's logs side by side) still say whose they are.

    text: 2026-12-01 20:15:02,123 INFO eth0/10.0.0.1 cluster.node: ready: serving 1 services
    json: {"ts": "2026-12-01T20:15:02.123Z", "level": "INFO", "interface": "eth0", "ip": "10.0.0.1",
           "logger": "cluster.node", "msg": "ready: serving 1 services"}

A JSON line is one object: `ts` (UTC, ISO 8601, milliseconds), `level`, the identity fields,
`logger`, `msg` (the formatted message, identity-first as in the text format), then any
structured fields a call passed with `extra=`, and `exc` (the traceback) / `stack` when there is
one. Values that are not JSON become their str().
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(identity)s %(name)s: %(message)s"
# What every LogRecord has: anything else on a record came from `extra=` and is logged as a field.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "identity"}


class IdentityFilter(logging.Filter):
    """Puts the node's identity on every record (`record.identity`, and one attribute per field)."""

    def __init__(self, identity: Mapping[str, str]) -> None:
        super().__init__()
        self.identity = dict(identity)
        self.text = "/".join(self.identity.values()) or "-"

    def filter(self, record: logging.LogRecord) -> bool:
        record.identity = self.text
        return True


class JsonFormatter(logging.Formatter):
    def __init__(self, identity: Mapping[str, str]) -> None:
        super().__init__()
        self.identity = dict(identity)

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            **self.identity,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in out:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def handler(fmt: str, identity: Mapping[str, str], stream: Any = None) -> logging.Handler:
    """A stream handler (stderr by default) writing `fmt` lines with `identity` on each."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out = logging.StreamHandler(stream)
    out.addFilter(IdentityFilter(identity))
    out.setFormatter(JsonFormatter(identity) if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    return out


def configure(fmt: str, level: int, identity: Mapping[str, str]) -> None:
    """The process's logging: one handler on the root logger (replacing any)."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler(fmt, identity))
    root.setLevel(level)
