"""BGP codec: golden byte vectors (assembled by hand from the RFC diagrams), round trips, errors."""
from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest

from bgp.attrs import AS_SEQUENCE, GRACEFUL_SHUTDOWN, AsPathSegment, MpReach, MpUnreach, PathAttributes, RawAttribute
from bgp.codec import (
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

M = "ff" * 16  # marker
NH = IPv4Address("10.0.0.1")
VIP = IPv4Network("192.0.2.10/32")


def h(*parts: str) -> bytes:
    return bytes.fromhex("".join(parts).replace(" ", ""))


GOLDEN = [
    ("keepalive", Keepalive(), h(M, "0013 04")),
    ("notification cease/admin shutdown", Notification(6, 2), h(M, "0015 03", "06 02")),
    ("notification with data", Notification(2, 1, b"\x00\x04"), h(M, "0017 03", "02 01 0004")),
    ("route refresh ipv4 unicast", RouteRefresh(1, 1), h(M, "0017 05", "0001 00 01")),
    ("open, 4-octet AS behind AS_TRANS",
     Open(23456, 3, NH,
          (MultiprotocolCap(1, 1), MultiprotocolCap(2, 1), RouteRefreshCap(), FourOctetAsCap(4200000001))),
     h(M, "0033 01", "04 5ba0 0003 0a000001 16",
       "02 14", "01 04 0001 00 01", "01 04 0002 00 01", "02 00", "41 04 fa56ea01")),
    ("open without capabilities", Open(65001, 90, NH), h(M, "001d 01", "04 fde9 005a 0a000001 00")),
    ("update ibgp ipv4",
     Update(attributes=PathAttributes(origin=0, as_path=(), next_hop=NH, local_pref=100), nlri=(VIP,)),
     h(M, "0031 02", "0000", "0015", "40 01 01 00", "40 02 00", "40 03 04 0a000001", "40 05 04 00000064",
       "20 c000020a")),
    ("update ebgp 4-octet as_path, med, communities",
     Update(attributes=PathAttributes(origin=0, as_path=(AsPathSegment(AS_SEQUENCE, (4200000001,)),), next_hop=NH,
                                      med=10, communities=(GRACEFUL_SHUTDOWN,), large_communities=((1, 2, 3),)),
            nlri=(VIP,)),
     h(M, "004d 02", "0000", "0031", "40 01 01 00", "40 02 06 02 01 fa56ea01", "40 03 04 0a000001",
       "80 04 04 0000000a", "c0 08 04 ffff0000", "c0 20 0c 00000001 00000002 00000003", "20 c000020a")),
    ("update withdraw ipv4", Update(withdrawn=(VIP,)), h(M, "001c 02", "0005 20 c000020a", "0000")),
    ("end-of-rib ipv4", Update(), h(M, "0017 02", "0000 0000")),
    ("update ipv6 mp_reach",
     Update(attributes=PathAttributes(origin=0, as_path=(), local_pref=100, mp_reach=MpReach(
         2, 1, (IPv6Address("2001:db8::1"),), (IPv6Network("2001:db8:f::10/128"),)))),
     h(M, "004e 02", "0000 0037", "40 01 01 00", "40 02 00", "40 05 04 00000064",
       "80 0e 26 0002 01 10 20010db8000000000000000000000001 00 80 20010db8000f00000000000000000010")),
    ("update ipv6 withdraw",
     Update(attributes=PathAttributes(mp_unreach=MpUnreach(2, 1, (IPv6Network("2001:db8:f::/48"),)))),
     h(M, "0024 02", "0000 000d", "80 0f 0a 0002 01 30 20010db8000f")),
    ("end-of-rib ipv6", Update(attributes=PathAttributes(mp_unreach=MpUnreach(2, 1, ()))),
     h(M, "001d 02", "0000 0006", "80 0f 03 0002 01")),
]


@pytest.mark.parametrize("msg,wire", [(m, w) for _, m, w in GOLDEN], ids=[n for n, _, _ in GOLDEN])
def test_golden_vectors_encode_and_decode(msg: object, wire: bytes) -> None:
    assert encode(msg) == wire  # type: ignore[arg-type]
    assert decode(wire) == msg


def test_end_of_rib_detection() -> None:
    assert Update().is_end_of_rib
    assert Update(attributes=PathAttributes(mp_unreach=MpUnreach(2, 1, ()))).is_end_of_rib
    assert not Update(withdrawn=(VIP,)).is_end_of_rib


def test_two_octet_session_sends_as_trans_and_as4_path() -> None:
    u = Update(attributes=PathAttributes(origin=0, as_path=(AsPathSegment(AS_SEQUENCE, (4200000001,)),),
                                         next_hop=NH), nlri=(VIP,))
    wire = encode(u, four_octet_as=False)
    assert h("40 02 04 02 01 5ba0") in wire and h("c0 11 06 02 01 fa56ea01") in wire
    back = decode(wire, four_octet_as=False)
    assert isinstance(back, Update) and back.attributes.as_path == (AsPathSegment(AS_SEQUENCE, (23456,)),)
    assert back.attributes.other == (RawAttribute(0xC0, 17, h("02 01 fa56ea01")),)


def test_unknown_capability_and_optional_transitive_attribute_are_tolerated() -> None:
    o = Open(65001, 90, NH, (UnknownCap(64, b"\x00\x78"), MultiprotocolCap(1, 1)))
    assert decode(encode(o)) == o
    wire = h(M, "0031 02", "0000", "0015", "40 01 01 00", "40 02 00", "40 03 04 0a000001", "e0 63 04 deadbeef",
             "20 c000020a")
    u = decode(wire)
    assert isinstance(u, Update) and not u.errors
    assert u.attributes.other == (RawAttribute(0xE0, 99, h("deadbeef")),)


def test_framer_splits_a_stream_at_any_boundary() -> None:
    stream = b"".join(w for _, _, w in GOLDEN)
    for step in (1, 7, 19, 64, len(stream)):
        framer = Framer(four_octet_as=True)
        got = []
        for i in range(0, len(stream), step):
            framer.feed(stream[i: i + step])
            got.extend(framer.messages())
        assert got == [m for _, m, _ in GOLDEN]


def test_framer_rejects_bad_header_before_the_body_arrives() -> None:
    framer = Framer()
    framer.feed(h("ff" * 15, "fe", "0013 04"))
    with pytest.raises(DecodeError) as e:
        list(framer.messages())
    assert (e.value.code, e.value.subcode) == (1, 1)
    framer = Framer()
    framer.feed(h(M, "2000 02"))  # length 8192 > 4096, body not here yet
    with pytest.raises(DecodeError) as e:
        list(framer.messages())
    assert (e.value.code, e.value.subcode, e.value.data) == (1, 2, h("2000"))


# Malformed input -> (code, subcode[, data]) per RFC 4271 §6 / RFC 7606.
SESSION_RESET = [
    ("bad marker", h("00" * 16, "0013 04"), 1, 1, b""),
    ("bad type", h(M, "0013 09"), 1, 3, b"\x09"),
    ("keepalive too long", h(M, "0014 04 00"), 1, 2, h("0014")),
    ("open too short", h(M, "001c 01", "04 fde9 005a 0a000001"), 1, 2, h("001c")),
    ("open version 3", h(M, "001d 01", "03 fde9 005a 0a000001 00"), 2, 1, h("0004")),
    ("open hold 2", h(M, "001d 01", "04 fde9 0002 0a000001 00"), 2, 6, b""),
    ("open bgp id 0", h(M, "001d 01", "04 fde9 005a 00000000 00"), 2, 3, b""),
    ("open unsupported param", h(M, "001f 01", "04 fde9 005a 0a000001 02 01 00"), 2, 4, b""),
    ("open truncated capability", h(M, "0021 01", "04 fde9 005a 0a000001 04 02 02 41 04"), 2, 0, b""),
    ("update withdrawn overrun", h(M, "0017 02", "0005 0000"), 3, 1, b""),
    ("update attr length overrun", h(M, "0017 02", "0000 0005"), 3, 1, b""),
    ("update attribute overruns list", h(M, "001b 02", "0000 0004 40 01 05 00"), 3, 1, b""),
    ("update nlri /33", h(M, "001c 02", "0000 0000 21 c0000200"), 3, 10, b""),
    ("update nlri truncated", h(M, "001a 02", "0000 0000 20 c000"), 3, 10, b""),
    ("unrecognized well-known attribute", h(M, "001b 02", "0000 0004 40 63 01 00"), 3, 2, h("40 63 01 00")),
    ("mp_reach bad next hop length", h(M, "0025 02", "0000 000e 80 0e 0b 0002 01 05 0000000000 00 00"), 3, 9, b""),
    ("mp_reach with wrong flags", h(M, "001f 02", "0000 0008 40 0f 05 0002 01 00 00"), 3, 4,
     h("40 0f 05 0002 01 00 00")),
    ("route refresh too long", h(M, "0018 05", "0001 00 01 00"), 7, 1, h(M, "0018 05", "0001 00 01 00")),
]


@pytest.mark.parametrize("wire,code,subcode,data", [c[1:] for c in SESSION_RESET], ids=[c[0] for c in SESSION_RESET])
def test_malformed_messages_raise_the_rfc_notification(wire: bytes, code: int, subcode: int, data: bytes) -> None:
    with pytest.raises(DecodeError) as e:
        decode(wire)
    assert (e.value.code, e.value.subcode, e.value.data) == (code, subcode, data)


BASE_ATTRS = "40 01 01 00" "40 02 00" "40 03 04 0a000001"
TREAT_AS_WITHDRAW = [
    ("origin 3", "40 01 01 03 40 02 00 40 03 04 0a000001", (3, 6)),
    ("origin length 2", "40 01 02 0000 40 02 00 40 03 04 0a000001", (3, 5)),
    ("as_path count overrun", "40 01 01 00 40 02 04 02 05 0001 40 03 04 0a000001", (3, 11)),
    ("next hop 0.0.0.0", "40 01 01 00 40 02 00 40 03 04 00000000", (3, 8)),
    ("med length 3", BASE_ATTRS + "80 04 03 000001", (3, 5)),
    ("communities length 3", BASE_ATTRS + "c0 08 03 000001", (3, 5)),
    ("large communities length 8", BASE_ATTRS + "c0 20 08 0000000100000002", (3, 5)),
    ("origin flagged optional", "c0 01 01 00 40 02 00 40 03 04 0a000001", (3, 4)),
    ("next hop missing", "40 01 01 00 40 02 00", (3, 3)),
]


@pytest.mark.parametrize("attrs,error", [c[1:] for c in TREAT_AS_WITHDRAW], ids=[c[0] for c in TREAT_AS_WITHDRAW])
def test_attribute_errors_are_treat_as_withdraw(attrs: str, error: tuple[int, int]) -> None:
    body = h("0000", f"{len(h(attrs)):04x}", attrs, "20 c000020a")
    u = decode(h(M, f"{19 + len(body):04x} 02") + body)
    assert isinstance(u, Update) and u.nlri == (VIP,)
    assert error in u.errors


def test_malformed_aggregator_is_discarded_and_duplicates_keep_the_first() -> None:
    attrs = BASE_ATTRS + "c0 07 03 000001" + "40 01 01 02"
    body = h("0000", f"{len(h(attrs)):04x}", attrs, "20 c000020a")
    u = decode(h(M, f"{19 + len(body):04x} 02") + body)
    assert isinstance(u, Update) and not u.errors and u.attributes.origin == 0 and u.attributes.other == ()
