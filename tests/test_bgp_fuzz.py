"""Fuzzing the BGP decoder: it returns a message or raises DecodeError, nothing else.

Inputs come from hypothesis (structured messages, their truncations and byte overwrites, random
bodies and attribute lists under a valid header, arbitrary streams through the framer) and from a
seeded mutator over real messages (flips, inserts, deletes, splices, with and without a header
length that matches). The same input reached twice counts once: every input is recorded by its
hash, and the end of the module asserts at least 100,000 *distinct* inputs per run.
"""
from __future__ import annotations

import hashlib
import os
import random
import struct
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bgp.attrs import AsPathSegment, MpReach, MpUnreach, PathAttributes, RawAttribute
from bgp.codec import (
    HEADER_LEN,
    MARKER,
    FourOctetAsCap,
    Framer,
    Keepalive,
    MultiprotocolCap,
    Notification,
    Open,
    RouteRefresh,
    RouteRefreshCap,
    UnknownCap,
    Update,
    decode,
    encode,
)
from bgp.errors import DecodeError

pytestmark = pytest.mark.unit

# Reproducible by default (a CI failure replays exactly); LBNODE_FUZZ_RANDOM=1 explores new inputs.
FUZZ = settings(max_examples=1500, deadline=None, database=None,
                derandomize=os.environ.get("LBNODE_FUZZ_RANDOM") != "1",
                suppress_health_check=[HealthCheck.too_slow])
SEEN: set[bytes] = set()  # 8-byte hashes of every distinct input the decoder (or framer) was given
RAN: set[str] = set()
MIN_DISTINCT_INPUTS = 100_000


def seen(data: bytes) -> None:
    SEEN.add(hashlib.blake2b(data, digest_size=8).digest())


def check(data: bytes, four: bool) -> None:
    seen(data)
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
    seen(wire)
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
        check(reframe(body[:n], 2), four)  # every truncation of the body, re-framed


@FUZZ
@given(stream=st.binary(max_size=200), step=st.integers(1, 50))
def test_framer_on_arbitrary_streams(stream: bytes, step: int) -> None:
    RAN.add("test_framer_on_arbitrary_streams")
    for data in (stream, MARKER + stream, MARKER + struct.pack("!H", 19 + len(stream) % 60) + stream):
        seen(b"framer:%d:" % step + data)  # one input: this stream in these chunks
        framer = Framer(four_octet_as=True)
        try:
            for i in range(0, len(data), step):
                framer.feed(data[i: i + step])
                for _ in framer.messages():
                    pass
        except DecodeError as exc:
            assert 1 <= exc.code <= 7


# Real messages as a speaker and a router exchange them: the seeded mutator's starting points.
CORPUS = [encode(m) for m in (
    Open(23456, 90, IPv4Address("10.0.0.1"), (MultiprotocolCap(1, 1), MultiprotocolCap(2, 1), RouteRefreshCap(),
                                               FourOctetAsCap(4200000001), UnknownCap(64, b"\x00\x78"))),
    Open(65000, 3, IPv4Address("10.0.0.254"), (MultiprotocolCap(1, 1), FourOctetAsCap(65000))),
    Update(nlri=(IPv4Network("192.0.2.10/32"), IPv4Network("198.51.100.0/24")),
           attributes=PathAttributes(origin=0, as_path=(AsPathSegment(2, (4200000001, 65000)),),
                                     next_hop=IPv4Address("10.0.0.1"), med=10, local_pref=100,
                                     communities=(0xFFFF0000, 65000 << 16 | 100), large_communities=((1, 2, 3),))),
    Update(withdrawn=(IPv4Network("192.0.2.10/32"),)),
    Update(attributes=PathAttributes(origin=0, as_path=(), local_pref=100, mp_reach=MpReach(
        2, 1, (IPv6Address("2001:db8::1"), IPv6Address("fe80::1")), (IPv6Network("2001:db8:f::10/128"),)))),
    Update(attributes=PathAttributes(mp_unreach=MpUnreach(2, 1, (IPv6Network("2001:db8:f::/48"),)))),
    Update(), Keepalive(), Notification(6, 2, b"shutting down"), Notification(3, 1), RouteRefresh(1, 1),
)]
MUTATIONS_PER_RUN = 60_000


def mutate(rng: random.Random, wire: bytes) -> bytes:
    """One to four random edits of a real message; the header length is fixed up half the time."""
    m = bytearray(wire)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        i = rng.randrange(len(m) + 1)
        if op == 0 and i < len(m):
            m[i] = rng.randrange(256)  # overwrite a byte
        elif op == 1 and i < len(m):
            m[i] ^= 1 << rng.randrange(8)  # flip a bit
        elif op == 2:
            m[i:i] = rng.randbytes(rng.randint(1, 8))  # insert
        elif op == 3:
            del m[i:i + rng.randint(1, 8)]  # delete
        elif op == 4:
            other = rng.choice(CORPUS)
            j = rng.randrange(len(other))
            m[i:] = other[j:]  # splice another message's tail
        else:
            m = m[:i]  # truncate
    if rng.random() < 0.5 and len(m) >= HEADER_LEN:
        m[16:18] = struct.pack("!H", len(m) & 0xFFFF)
    return bytes(m)


def test_seeded_mutations_of_real_messages() -> None:
    """Deterministic (seeded), so a failure replays; LBNODE_FUZZ_RANDOM=1 draws a new seed."""
    RAN.add("test_seeded_mutations_of_real_messages")
    seed = int.from_bytes(os.urandom(4), "big") if os.environ.get("LBNODE_FUZZ_RANDOM") == "1" else 19
    rng = random.Random(seed)
    for wire in CORPUS:
        assert encode(decode(wire)) == wire  # the corpus is real: each message round-trips
    for n in range(MUTATIONS_PER_RUN):
        data = mutate(rng, CORPUS[n % len(CORPUS)])
        try:
            check(data, four=rng.random() < 0.8)
        except Exception as exc:  # anything but DecodeError escaped, or a bad error code: say how to replay
            raise AssertionError(f"seed {seed}, mutation {n}: {exc!r} on {data.hex()}") from exc


def test_zz_fuzz_input_count() -> None:
    """Runs last in this module (file order): at least 100k distinct inputs."""
    if len(RAN) < 5:
        pytest.skip("not all fuzz tests ran in this session")
    print(f"\nBGP decoder fuzz: {len(SEEN)} distinct inputs this run")
    assert len(SEEN) >= MIN_DISTINCT_INPUTS, f"only {len(SEEN)} distinct inputs (need {MIN_DISTINCT_INPUTS})"
