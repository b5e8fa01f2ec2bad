"""A small, strict HTTP/1.1 request builder and response parser for health checks (sans-IO).

Theory of operation
-------------------
A check sends one request with ``Connection: close`` and reads one response (RFC 9112):

    status-line = HTTP-version SP status-code SP [ reason-phrase ] CRLF     (§4)
    field-line  = field-name ":" OWS field-value OWS CRLF                   (§5)
    then CRLF, then a body framed by Transfer-Encoding: chunked (§7.1),
    Content-Length (§6.3) or the connection closing.

`ResponseParser.feed(data)` takes bytes as they arrive and returns a `Response` once it has
enough: right after the header block when the body is not wanted, else when the body is complete
or `body_cap` bytes of it have been read (a check only searches a prefix). `eof()` finishes a
close-delimited body. Anything that is not HTTP/1.x raises `HttpParseError` whose text starts
with "garbage response" and is used as the check's failure reason. Strictness: CRLF line ends,
no whitespace before the colon, no obs-fold, one Content-Length, head at most `head_cap` bytes.
1xx interim responses are skipped (§15.2).
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from healthcheck.errors import HttpParseError

HEAD_CAP = 16 * 1024
BODY_CAP = 64 * 1024
USER_AGENT = "lbnode-healthcheck/0.1"

# Always used with fullmatch: `$` would also match before a trailing "\n".
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: ([\t\x20-\x7e\x80-\xff]*))?")
_FIELD = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([\t\x20-\x7e\x80-\xff]*?)[ \t]*")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,8})(?:[ \t]*;[\t\x20-\x7e]*)?")
# ASCII digits only: str.isdigit() is also true for "²" and other Unicode digits.
_CONTENT_LENGTH = re.compile(r"[0-9]{1,18}")


@functools.lru_cache(maxsize=4096)
def build_request(method: str, path: str, host: str) -> bytes:
    """The request line and headers; inputs are validated by the config (no CR/LF possible)."""
    return (f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {USER_AGENT}\r\n"
            f"Accept: */*\r\nConnection: close\r\n\r\n").encode("ascii")


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]  # names lower-cased
    body: bytes  # at most body_cap bytes; empty if the body was not wanted
    body_truncated: bool


class ResponseParser:
    """Feed bytes in, get one `Response` out (or `HttpParseError`)."""

    def __init__(self, *, want_body: bool, head_request: bool = False, head_cap: int = HEAD_CAP,
                 body_cap: int = BODY_CAP) -> None:
        self._buf = bytearray()
        self._want_body = want_body
        self._head_request = head_request
        self._head_cap = head_cap
        self._body_cap = body_cap
        self._head: tuple[int, str, tuple[tuple[str, str], ...]] | None = None
        self._framing: str = ""  # "length" | "chunked" | "close"
        self._remaining = 0  # length: body bytes left; chunked: bytes left in the current chunk
        self._body = bytearray()
        self._chunk_state = "size"  # size | data | data-crlf | trailers
        self.done: Response | None = None

    def feed(self, data: bytes | bytearray) -> Response | None:
        if self.done is not None:
            return self.done
        self._buf += data
        if self._head is None:
            if not self._parse_head():
                return None
        self._parse_body()
        return self.done

    def eof(self) -> Response:
        """The peer closed the connection; return the response or raise."""
        if self.done is not None:
            return self.done
        if self._head is None:
            if not self._buf:
                raise HttpParseError("garbage response: connection closed without a response")
            raise HttpParseError(f"garbage response: connection closed inside the header block {_excerpt(self._buf)}")
        if self._framing == "close":
            return self._finish(truncated=False)
        raise HttpParseError(f"garbage response: connection closed inside the {self._framing} body")

    # -- head ------------------------------------------------------------------------------------

    def _parse_head(self) -> bool:
        while True:
            if not self._buf.startswith(b"HTTP/"[: len(self._buf)]):
                raise HttpParseError(f"garbage response: {_excerpt(self._buf)}")
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > self._head_cap:
                    raise HttpParseError(f"garbage response: header block over {self._head_cap} bytes")
                return False
            if end + 4 > self._head_cap:
                raise HttpParseError(f"garbage response: header block over {self._head_cap} bytes")
            head = bytes(self._buf[:end])
            del self._buf[: end + 4]
            lines = head.split(b"\r\n")
            m = _STATUS_LINE.fullmatch(lines[0])
            if m is None:
                raise HttpParseError(f"garbage response: bad status line {_excerpt(lines[0])}")
            status = int(m.group(2))
            if status < 100 or status > 599:
                raise HttpParseError(f"garbage response: status {status} out of range")
            headers = []
            for line in lines[1:]:
                if b"\n" in line or b"\r" in line:
                    raise HttpParseError(f"garbage response: bare CR or LF in header {_excerpt(line)}")
                f = _FIELD.fullmatch(line)
                if f is None:
                    raise HttpParseError(f"garbage response: bad header line {_excerpt(line)}")
                headers.append((f.group(1).decode("ascii").lower(), f.group(2).decode("latin-1")))
            if 100 <= status < 200:
                continue  # interim response: the real one follows
            reason = (m.group(3) or b"").decode("latin-1")
            self._head = (status, reason, tuple(headers))
            self._choose_framing(status, headers)
            return True

    def _choose_framing(self, status: int, headers: list[tuple[str, str]]) -> None:
        if not self._want_body or self._head_request or status in (204, 304):
            self._framing = "none"
            return
        te = [v for k, v in headers if k == "transfer-encoding"]
        cl = {v for k, v in headers if k == "content-length"}
        if te:
            codings = [c.strip().lower() for v in te for c in v.split(",")]
            if codings[-1] != "chunked":
                raise HttpParseError(f"garbage response: unsupported transfer-encoding {', '.join(te)!r}")
            self._framing = "chunked"
        elif cl:
            if len(cl) != 1 or _CONTENT_LENGTH.fullmatch(next(iter(cl))) is None:
                raise HttpParseError(f"garbage response: bad content-length {sorted(cl)!r}")
            self._framing = "length"
            self._remaining = int(next(iter(cl)))
        else:
            self._framing = "close"

    # -- body ------------------------------------------------------------------------------------

    def _parse_body(self) -> None:
        if self._framing == "none":
            self._finish(truncated=False)
        elif self._framing == "length":
            take = min(self._remaining, len(self._buf))
            self._append(self._buf[:take])
            del self._buf[:take]
            self._remaining -= take
            if self._remaining == 0:
                self._finish(truncated=False)
        elif self._framing == "close":
            self._append(self._buf)
            self._buf.clear()
        else:
            self._parse_chunked()
        if self.done is None and len(self._body) >= self._body_cap:
            self._finish(truncated=True)

    def _parse_chunked(self) -> None:
        while self.done is None and len(self._body) < self._body_cap:
            if self._chunk_state == "size":
                end = self._buf.find(b"\r\n")
                if end < 0:
                    if len(self._buf) > 1024:
                        raise HttpParseError("garbage response: chunk size line too long")
                    return
                m = _CHUNK_SIZE.fullmatch(bytes(self._buf[:end]))
                if m is None:
                    raise HttpParseError(f"garbage response: bad chunk size {_excerpt(self._buf[:end])}")
                del self._buf[: end + 2]
                self._remaining = int(m.group(1), 16)
                self._chunk_state = "data" if self._remaining else "trailers"
            elif self._chunk_state == "data":
                take = min(self._remaining, len(self._buf))
                if take == 0:
                    return
                self._append(self._buf[:take])
                del self._buf[:take]
                self._remaining -= take
                if self._remaining == 0:
                    self._chunk_state = "data-crlf"
            elif self._chunk_state == "data-crlf":
                if len(self._buf) < 2:
                    return
                if self._buf[:2] != b"\r\n":
                    raise HttpParseError("garbage response: chunk not followed by CRLF")
                del self._buf[:2]
                self._chunk_state = "size"
            else:  # trailers: lines until an empty one
                end = self._buf.find(b"\r\n")
                if end < 0:
                    if len(self._buf) > self._head_cap:
                        raise HttpParseError("garbage response: trailers too long")
                    return
                line = bytes(self._buf[:end])
                del self._buf[: end + 2]
                if not line:
                    self._finish(truncated=False)
                elif _FIELD.fullmatch(line) is None:
                    raise HttpParseError(f"garbage response: bad trailer line {_excerpt(line)}")

    def _append(self, data: bytes | bytearray) -> None:
        room = self._body_cap - len(self._body)
        self._body += data[:room]

    def _finish(self, *, truncated: bool) -> Response:
        assert self._head is not None
        status, reason, headers = self._head
        self.done = Response(status, reason, headers, bytes(self._body), truncated)
        return self.done


def _excerpt(data: bytes | bytearray, limit: int = 40) -> str:
    """A short, printable rendering of bad input for reason strings."""
    shown = bytes(data[:limit])
    return repr(shown) + ("..." if len(data) > limit else "")
