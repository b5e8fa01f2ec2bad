"""The strict HTTP/1.1 response parser: golden cases, split feeding, caps, garbage."""
from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from healthcheck.errors import HttpParseError
from healthcheck.http import Response, ResponseParser, build_request

pytestmark = pytest.mark.unit


def test_build_request() -> None:
    assert build_request("GET", "/healthz?x=1", "www.example.com") == (
        b"GET /healthz?x=1 HTTP/1.1\r\nHost: www.example.com\r\nUser-Agent: lbnode-healthcheck/0.1\r\n"
        b"Accept: */*\r\nConnection: close\r\n\r\n")


# (description, response bytes, want_body, expected (status, reason, body, truncated))
GOLDEN = [
    ("status only", b"HTTP/1.1 200 OK\r\n\r\n", False, (200, "OK", b"", False)),
    ("no reason phrase", b"HTTP/1.1 204\r\n\r\n", False, (204, "", b"", False)),
    ("empty reason phrase", b"HTTP/1.1 500 \r\n\r\n", False, (500, "", b"", False)),
    ("HTTP/1.0", b"HTTP/1.0 503 Service Unavailable\r\nServer: x\r\n\r\n", False,
     (503, "Service Unavailable", b"", False)),
    ("body ignored when unwanted", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", False, (200, "OK", b"", False)),
    ("content-length body", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", True, (200, "OK", b"hello", False)),
    ("zero length body", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", True, (200, "OK", b"", False)),
    ("chunked body with extension and trailer",
     b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\n",
     True, (200, "OK", b"hello world", False)),
    ("1xx skipped", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok", True,
     (201, "Created", b"ok", False)),
    ("204 has no body", b"HTTP/1.1 204 No Content\r\nContent-Length: 9\r\n\r\n", True, (204, "No Content", b"", False)),
    ("header whitespace", b"HTTP/1.1 200 OK\r\nContent-Length:   2  \r\n\r\nok", True, (200, "OK", b"ok", False)),
]


@pytest.mark.parametrize(("desc", "raw", "want_body", "expected"), GOLDEN, ids=[g[0] for g in GOLDEN])
def test_golden_whole_and_byte_by_byte(desc: str, raw: bytes, want_body: bool,
                                       expected: tuple[int, str, bytes, bool]) -> None:
    whole = ResponseParser(want_body=want_body).feed(raw)
    assert whole is not None
    assert (whole.status, whole.reason, whole.body, whole.body_truncated) == expected
    p = ResponseParser(want_body=want_body)
    result: Response | None = None
    for i in range(len(raw)):
        result = p.feed(raw[i:i + 1])
        if result is not None:
            break
    assert result == whole


def test_close_delimited_body_needs_eof() -> None:
    p = ResponseParser(want_body=True)
    assert p.feed(b"HTTP/1.0 200 OK\r\n\r\npart one ") is None
    assert p.feed(b"part two") is None
    r = p.eof()
    assert r.body == b"part one part two" and not r.body_truncated


def test_headers_are_lowercased_and_kept() -> None:
    r = ResponseParser(want_body=False).feed(b"HTTP/1.1 200 OK\r\nX-Thing: A b\r\nServer: s\r\n\r\n")
    assert r is not None and r.headers == (("x-thing", "A b"), ("server", "s"))


def test_body_cap_truncates_and_finishes_early() -> None:
    p = ResponseParser(want_body=True, body_cap=8)
    r = p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n0123456789")
    assert r is not None and r.body == b"01234567" and r.body_truncated
    p = ResponseParser(want_body=True, body_cap=4)
    r = p.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n3\r\ndef\r\n")
    assert r is not None and r.body == b"abcd" and r.body_truncated


def test_head_request_has_no_body() -> None:
    r = ResponseParser(want_body=True, head_request=True).feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
    assert r is not None and r.body == b""


GARBAGE = [
    ("not http", b"SSH-2.0-OpenSSH_9.2\r\n", "garbage response: b'SSH-2.0-OpenSSH_9.2\\r\\n'"),
    ("http/2 preface", b"HTTP/2 200\r\n\r\n", "garbage response: bad status line b'HTTP/2 200'"),
    ("two digit status", b"HTTP/1.1 20 OK\r\n\r\n", "garbage response: bad status line"),
    ("status 600", b"HTTP/1.1 600 X\r\n\r\n", "garbage response: status 600 out of range"),
    ("status 099", b"HTTP/1.1 099 X\r\n\r\n", "garbage response: status 99 out of range"),
    ("lowercase http", b"http/1.1 200 OK\r\n\r\n", "garbage response: b'http/1.1"),
    ("space before colon", b"HTTP/1.1 200 OK\r\nServer : x\r\n\r\n", "garbage response: bad header line b'Server : x'"),
    ("obs-fold", b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n", "garbage response: bad header line b' b'"),
    ("bare LF in header", b"HTTP/1.1 200 OK\r\nX: a\nY: b\r\n\r\n", "garbage response: bare CR or LF"),
    ("two content lengths", b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
     "garbage response: bad content-length"),
    ("negative content length", b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
     "garbage response: bad content-length"),
    ("gzip transfer coding", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
     "garbage response: unsupported transfer-encoding"),
    ("bad chunk size", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
     "garbage response: bad chunk size"),
    ("chunk without crlf", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXY",
     "garbage response: chunk not followed by CRLF"),
    # Regressions: str.isdigit() accepts "\xb2" (superscript two), and `$` matched before a trailing LF.
    ("superscript content length", b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\n",
     "garbage response: bad content-length ['\xb2']"),
    ("status line ending in LF", b"HTTP/1.1 200 OK\n\r\n\r\n",
     "garbage response: bad status line b'HTTP/1.1 200 OK\\n'"),
    ("chunk size ending in LF", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\n\r\nab\r\n",
     "garbage response: bad chunk size b'2\\n'"),
    ("trailer ending in LF", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX: 1\n\r\n\r\n",
     "garbage response: bad trailer line b'X: 1\\n'"),
]


@pytest.mark.parametrize(("desc", "raw", "message"), GARBAGE, ids=[g[0] for g in GARBAGE])
def test_garbage_is_rejected_with_a_reason(desc: str, raw: bytes, message: str) -> None:
    with pytest.raises(HttpParseError) as info:
        ResponseParser(want_body=True).feed(raw)
    assert str(info.value).startswith(message)


def test_head_cap() -> None:
    p = ResponseParser(want_body=False, head_cap=64)
    with pytest.raises(HttpParseError, match="header block over 64 bytes"):
        p.feed(b"HTTP/1.1 200 OK\r\nX: " + b"a" * 100)


EOF_CASES = [
    (b"", "garbage response: connection closed without a response"),
    (b"HTTP/1.1 200 OK\r\nServ", "garbage response: connection closed inside the header block"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", "garbage response: connection closed inside the length body"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nab",
     "garbage response: connection closed inside the chunked body"),
]


@pytest.mark.parametrize(("raw", "message"), EOF_CASES)
def test_early_eof(raw: bytes, message: str) -> None:
    p = ResponseParser(want_body=True)
    assert p.feed(raw) is None
    with pytest.raises(HttpParseError) as info:
        p.eof()
    assert str(info.value).startswith(message)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.booleans())
def test_fuzz_never_raises_anything_but_parse_errors(data: bytes, want_body: bool) -> None:
    p = ResponseParser(want_body=want_body, head_cap=128, body_cap=64)
    try:
        r = p.feed(data)
        if r is None:
            r = p.eof()
    except HttpParseError as exc:
        assert str(exc).startswith("garbage response")
    else:
        assert 100 <= r.status <= 599 and len(r.body) <= 64


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=24))
@example(b"\xb2")
@example(b"\xb9\xb3")
@example(b"+1")
@example(b"1_000")
def test_fuzz_content_length_values(value: bytes) -> None:
    """Any Content-Length value gives a response or an HttpParseError, never another exception."""
    p = ResponseParser(want_body=True)
    try:
        r = p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: " + value + b"\r\n\r\nabc")
        if r is None:
            r = p.eof()
    except HttpParseError as exc:
        assert str(exc).startswith("garbage response")
    else:
        assert value.strip(b" \t").isdigit() and value.strip(b" \t").isascii()


@settings(max_examples=200, deadline=None)
@given(st.integers(200, 599), st.binary(max_size=200), st.lists(st.integers(1, 50), min_size=1, max_size=20))
def test_fuzz_split_points_do_not_matter(status: int, body: bytes, cuts: list[int]) -> None:
    raw = b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body)
    expected = ResponseParser(want_body=True).feed(raw)
    p, pos, got, i = ResponseParser(want_body=True), 0, None, 0
    while got is None and pos < len(raw):
        cut = cuts[i % len(cuts)]
        got = p.feed(raw[pos:pos + cut])
        pos, i = pos + cut, i + 1
    assert got == expected
