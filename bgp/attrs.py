"""BGP-4 path attributes and NLRI prefixes: bytes <-> frozen dataclasses. No I/O.

Theory of operation
-------------------
An UPDATE's Path Attributes field (RFC 4271 §4.3, §5) is a run of (flags, type code, length,
value). `encode_attributes` writes them in type-code order with the flags each one must carry;
`decode_attributes` reads them back into `PathAttributes`. The message around them (header,
withdrawn routes, NLRI) is `bgp.codec`'s, as BIRD splits `packets.c` and `attrs.c`; the prefix
encoding (length in bits, then the fewest octets) is shared by both and lives here.

Errors follow RFC 7606: errors that cannot be localised (framing of the attribute list,
MP_REACH/MP_UNREACH) raise `DecodeError` (session reset); a malformed ORIGIN, AS_PATH, NEXT_HOP,
MED, LOCAL_PREF, COMMUNITIES or LARGE_COMMUNITIES is returned in the error list (code, subcode):
treat-as-withdraw. Malformed ATOMIC_AGGREGATE/AGGREGATOR are discarded. Unknown optional
attributes are kept verbatim.

AS numbers are 4 octets on the wire (RFC 6793) when both sides sent the capability; the
`four_octet_as` switch selects that. On a 2-octet session an AS above 65535 is sent as AS_TRANS
(23456) plus an AS4_PATH attribute.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import TypeVar

from bgp.errors import DecodeError

AS_TRANS = 23456

# Address families (IANA): AFI and SAFI.
AFI_IPV4, AFI_IPV6, SAFI_UNICAST = 1, 2, 1
IPV4_UNICAST = (AFI_IPV4, SAFI_UNICAST)
IPV6_UNICAST = (AFI_IPV6, SAFI_UNICAST)

# Path attribute type codes and flags (RFC 4271 §4.3, 4760, 1997, 6793, 8092).
ATTR_ORIGIN, ATTR_AS_PATH, ATTR_NEXT_HOP, ATTR_MED, ATTR_LOCAL_PREF = 1, 2, 3, 4, 5
ATTR_ATOMIC_AGGREGATE, ATTR_AGGREGATOR, ATTR_COMMUNITIES = 6, 7, 8
ATTR_MP_REACH, ATTR_MP_UNREACH, ATTR_AS4_PATH, ATTR_AS4_AGGREGATOR = 14, 15, 17, 18
ATTR_LARGE_COMMUNITIES = 32
FLAG_OPTIONAL, FLAG_TRANSITIVE, FLAG_PARTIAL, FLAG_EXTENDED = 0x80, 0x40, 0x20, 0x10

ORIGIN_IGP, ORIGIN_EGP, ORIGIN_INCOMPLETE = 0, 1, 2
AS_SET, AS_SEQUENCE, AS_CONFED_SEQUENCE, AS_CONFED_SET = 1, 2, 3, 4

# Well-known communities (RFC 1997, RFC 8326).
GRACEFUL_SHUTDOWN = 0xFFFF0000  # 65535:0

# Flags (optional, transitive bits) each known attribute must carry.
_EXPECTED_FLAGS = {
    ATTR_ORIGIN: FLAG_TRANSITIVE,
    ATTR_AS_PATH: FLAG_TRANSITIVE,
    ATTR_NEXT_HOP: FLAG_TRANSITIVE,
    ATTR_MED: FLAG_OPTIONAL,
    ATTR_LOCAL_PREF: FLAG_TRANSITIVE,
    ATTR_ATOMIC_AGGREGATE: FLAG_TRANSITIVE,
    ATTR_AGGREGATOR: FLAG_OPTIONAL | FLAG_TRANSITIVE,
    ATTR_COMMUNITIES: FLAG_OPTIONAL | FLAG_TRANSITIVE,
    ATTR_MP_REACH: FLAG_OPTIONAL,
    ATTR_MP_UNREACH: FLAG_OPTIONAL,
    ATTR_AS4_PATH: FLAG_OPTIONAL | FLAG_TRANSITIVE,
    ATTR_AS4_AGGREGATOR: FLAG_OPTIONAL | FLAG_TRANSITIVE,
    ATTR_LARGE_COMMUNITIES: FLAG_OPTIONAL | FLAG_TRANSITIVE,
}
_WELL_KNOWN = frozenset({ATTR_ORIGIN, ATTR_AS_PATH, ATTR_NEXT_HOP, ATTR_LOCAL_PREF, ATTR_ATOMIC_AGGREGATE})

Prefix = IPv4Network | IPv6Network
Address = IPv4Address | IPv6Address
_Net = TypeVar("_Net", IPv4Network, IPv6Network)


# --------------------------------------------------------------------------------------------
# Attributes
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class AsPathSegment:
    type: int  # AS_SET or AS_SEQUENCE (or the confederation types)
    asns: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class MpReach:
    """MP_REACH_NLRI (RFC 4760 §3): announced prefixes of another family and their next hop(s)."""

    afi: int
    safi: int
    next_hops: tuple[Address, ...]
    nlri: tuple[Prefix, ...]


@dataclass(frozen=True, slots=True)
class MpUnreach:
    """MP_UNREACH_NLRI (RFC 4760 §4). Empty `withdrawn` is that family's End-of-RIB."""

    afi: int
    safi: int
    withdrawn: tuple[Prefix, ...]


@dataclass(frozen=True, slots=True)
class RawAttribute:
    """An attribute this codec does not interpret, kept verbatim."""

    flags: int
    code: int
    value: bytes


@dataclass(frozen=True, slots=True)
class PathAttributes:
    origin: int | None = None
    as_path: tuple[AsPathSegment, ...] | None = None
    next_hop: IPv4Address | None = None
    med: int | None = None
    local_pref: int | None = None
    communities: tuple[int, ...] = ()
    large_communities: tuple[tuple[int, int, int], ...] = ()
    mp_reach: MpReach | None = None
    mp_unreach: MpUnreach | None = None
    other: tuple[RawAttribute, ...] = ()



# --------------------------------------------------------------------------------------------
# Encoders
# --------------------------------------------------------------------------------------------

# Each prefix is (length in bits, 1 octet) followed by the fewest octets that hold it (RFC 4271 §4.3).
def encode_prefix(prefix: Prefix) -> bytes:
    n = prefix.prefixlen
    return bytes([n]) + prefix.network_address.packed[: (n + 7) // 8]


#  0                   1
#  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# |  Attr. Flags  |Attr. Type Code|  then Attribute Length (1 octet, or 2 if Extended Length),
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+  then the value. Flags: Optional, Transitive, Partial, Extended.
def _attr(flags: int, code: int, value: bytes) -> bytes:
    if len(value) > 255:
        return struct.pack("!BBH", flags | FLAG_EXTENDED, code, len(value)) + value
    return struct.pack("!BBB", flags & ~FLAG_EXTENDED, code, len(value)) + value


def _encode_as_path(segments: tuple[AsPathSegment, ...], four: bool) -> bytes:
    out = b""
    for seg in segments:
        if four:
            out += struct.pack("!BB", seg.type, len(seg.asns)) + b"".join(struct.pack("!I", a) for a in seg.asns)
        else:
            out += struct.pack("!BB", seg.type, len(seg.asns)) + b"".join(
                struct.pack("!H", a if a <= 0xFFFF else AS_TRANS) for a in seg.asns)
    return out


def encode_attributes(a: PathAttributes, *, four_octet_as: bool = True) -> bytes:
    """Attributes in type-code order, each with the flags RFC 4271 §5 prescribes."""
    parts: list[tuple[int, bytes]] = []
    if a.origin is not None:
        parts.append((ATTR_ORIGIN, _attr(FLAG_TRANSITIVE, ATTR_ORIGIN, bytes([a.origin]))))
    if a.as_path is not None:
        parts.append((ATTR_AS_PATH, _attr(FLAG_TRANSITIVE, ATTR_AS_PATH, _encode_as_path(a.as_path, four_octet_as))))
        if not four_octet_as and any(x > 0xFFFF for s in a.as_path for x in s.asns):
            # RFC 6793 §4.2.2: a NEW speaker talking to an OLD one also sends the real path.
            value = _encode_as_path(a.as_path, True)
            parts.append((ATTR_AS4_PATH, _attr(FLAG_OPTIONAL | FLAG_TRANSITIVE, ATTR_AS4_PATH, value)))
    if a.next_hop is not None:
        parts.append((ATTR_NEXT_HOP, _attr(FLAG_TRANSITIVE, ATTR_NEXT_HOP, a.next_hop.packed)))
    if a.med is not None:
        parts.append((ATTR_MED, _attr(FLAG_OPTIONAL, ATTR_MED, struct.pack("!I", a.med))))
    if a.local_pref is not None:
        parts.append((ATTR_LOCAL_PREF, _attr(FLAG_TRANSITIVE, ATTR_LOCAL_PREF, struct.pack("!I", a.local_pref))))
    if a.communities:
        value = b"".join(struct.pack("!I", c) for c in a.communities)
        parts.append((ATTR_COMMUNITIES, _attr(FLAG_OPTIONAL | FLAG_TRANSITIVE, ATTR_COMMUNITIES, value)))
    if a.mp_reach is not None:
        parts.append((ATTR_MP_REACH, _attr(FLAG_OPTIONAL, ATTR_MP_REACH, _encode_mp_reach(a.mp_reach))))
    if a.mp_unreach is not None:
        m = a.mp_unreach
        value = struct.pack("!HB", m.afi, m.safi) + b"".join(encode_prefix(p) for p in m.withdrawn)
        parts.append((ATTR_MP_UNREACH, _attr(FLAG_OPTIONAL, ATTR_MP_UNREACH, value)))
    if a.large_communities:
        value = b"".join(struct.pack("!III", *c) for c in a.large_communities)
        parts.append((ATTR_LARGE_COMMUNITIES, _attr(FLAG_OPTIONAL | FLAG_TRANSITIVE, ATTR_LARGE_COMMUNITIES, value)))
    for raw in a.other:
        parts.append((raw.code, _attr(raw.flags, raw.code, raw.value)))
    parts.sort(key=lambda p: p[0])
    return b"".join(p[1] for p in parts)


# +---------------------------------------------------------+
# | Address Family Identifier (2 octets)                    |
# +---------------------------------------------------------+
# | Subsequent Address Family Identifier (1 octet)          |
# +---------------------------------------------------------+
# | Length of Next Hop Network Address (1 octet)            |
# +---------------------------------------------------------+
# | Network Address of Next Hop (variable)                  |
# +---------------------------------------------------------+
# | Reserved (1 octet)                                      |
# +---------------------------------------------------------+
# | Network Layer Reachability Information (variable)       |
# +---------------------------------------------------------+
def _encode_mp_reach(m: MpReach) -> bytes:
    nh = b"".join(a.packed for a in m.next_hops)
    return (struct.pack("!HBB", m.afi, m.safi, len(nh)) + nh + b"\x00"
            + b"".join(encode_prefix(p) for p in m.nlri))



# --------------------------------------------------------------------------------------------
# Decoders
# --------------------------------------------------------------------------------------------

def decode_prefixes(data: bytes, afi: int, err: tuple[int, int]) -> tuple[Prefix, ...]:
    """A run of (length, prefix) NLRI encodings; `err` is the (code, subcode) for malformed input."""
    if afi == AFI_IPV4:
        return decode_ipv4_prefixes(data, err)
    return _decode_prefixes(data, 128, IPv6Network, err)


def decode_ipv4_prefixes(data: bytes, err: tuple[int, int]) -> tuple[IPv4Network, ...]:
    """`decode_prefixes` for AFI_IPV4, typed for UPDATE's own withdrawn and NLRI fields."""
    return _decode_prefixes(data, 32, IPv4Network, err)


def _decode_prefixes(data: bytes, max_bits: int, network: type[_Net], err: tuple[int, int]) -> tuple[_Net, ...]:
    out: list[_Net] = []
    i = 0
    while i < len(data):
        bits = data[i]
        nbytes = (bits + 7) // 8
        if bits > max_bits or i + 1 + nbytes > len(data):
            raise DecodeError(err[0], err[1], b"", f"invalid prefix length {bits}")
        raw = bytes(data[i + 1: i + 1 + nbytes]).ljust(max_bits // 8, b"\x00")
        i += 1 + nbytes
        out.append(network((raw, bits), strict=False))
    return tuple(out)



def decode_attributes(data: bytes, four: bool) -> tuple[PathAttributes, list[tuple[int, int]]]:
    fields: dict[str, object] = {}
    other: list[RawAttribute] = []
    errors: list[tuple[int, int]] = []
    seen: set[int] = set()
    i = 0
    while i < len(data):
        if i + 3 > len(data):
            raise DecodeError(3, 1, b"", "truncated attribute header")
        flags, code = data[i], data[i + 1]
        if flags & FLAG_EXTENDED:
            if i + 4 > len(data):
                raise DecodeError(3, 1, b"", "truncated attribute header")
            alen, hlen = struct.unpack("!H", data[i + 2: i + 4])[0], 4
        else:
            alen, hlen = data[i + 2], 3
        if i + hlen + alen > len(data):
            raise DecodeError(3, 1, b"", f"attribute {code} overruns the attribute list")
        whole = bytes(data[i: i + hlen + alen])
        value = bytes(data[i + hlen: i + hlen + alen])
        i += hlen + alen
        if code in seen:
            if code in (ATTR_MP_REACH, ATTR_MP_UNREACH):
                raise DecodeError(3, 1, b"", f"repeated attribute {code}")
            continue  # RFC 7606 §3(g): keep the first, discard the rest
        seen.add(code)
        expected = _EXPECTED_FLAGS.get(code)
        if expected is None:
            if not flags & FLAG_OPTIONAL:
                raise DecodeError(3, 2, whole, f"unrecognized well-known attribute {code}")
            other.append(RawAttribute(flags, code, value))
            continue
        if flags & (FLAG_OPTIONAL | FLAG_TRANSITIVE) != expected:
            if code in (ATTR_MP_REACH, ATTR_MP_UNREACH):
                raise DecodeError(3, 4, whole, f"attribute flags error on {code}")
            if code in (ATTR_ATOMIC_AGGREGATE, ATTR_AGGREGATOR, ATTR_AS4_AGGREGATOR, ATTR_AS4_PATH):
                continue  # attribute discard
            errors.append((3, 4))
            continue
        try:
            _decode_known(code, flags, value, four, fields, other)
        except _TreatAsWithdraw as exc:
            errors.append((3, exc.subcode))
        except _Discard:
            pass
    return PathAttributes(other=tuple(other), **fields), errors  # type: ignore[arg-type]


class _TreatAsWithdraw(Exception):
    def __init__(self, subcode: int) -> None:
        self.subcode = subcode


class _Discard(Exception):
    pass


def _decode_as_path(value: bytes, four: bool) -> tuple[AsPathSegment, ...]:
    width = 4 if four else 2
    segs: list[AsPathSegment] = []
    i = 0
    while i < len(value):
        if i + 2 > len(value):
            raise _TreatAsWithdraw(11)
        stype, count = value[i], value[i + 1]
        end = i + 2 + count * width
        if stype not in (AS_SET, AS_SEQUENCE, AS_CONFED_SEQUENCE, AS_CONFED_SET) or count == 0 or end > len(value):
            raise _TreatAsWithdraw(11)
        fmt = f"!{count}{'I' if four else 'H'}"
        segs.append(AsPathSegment(stype, tuple(struct.unpack(fmt, value[i + 2: end]))))
        i = end
    return tuple(segs)


def _decode_known(code: int, flags: int, value: bytes, four: bool,
                  fields: dict[str, object], other: list[RawAttribute]) -> None:
    n = len(value)
    if code == ATTR_ORIGIN:
        if n != 1:
            raise _TreatAsWithdraw(5)
        if value[0] > ORIGIN_INCOMPLETE:
            raise _TreatAsWithdraw(6)
        fields["origin"] = value[0]
    elif code == ATTR_AS_PATH:
        fields["as_path"] = _decode_as_path(value, four)
    elif code == ATTR_NEXT_HOP:
        if n != 4:
            raise _TreatAsWithdraw(5)
        nh = IPv4Address(value)
        if nh.is_unspecified or nh.is_multicast or nh == IPv4Address("255.255.255.255"):
            raise _TreatAsWithdraw(8)
        fields["next_hop"] = nh
    elif code in (ATTR_MED, ATTR_LOCAL_PREF):
        if n != 4:
            raise _TreatAsWithdraw(5)
        fields["med" if code == ATTR_MED else "local_pref"] = struct.unpack("!I", value)[0]
    elif code == ATTR_COMMUNITIES:
        if n == 0 or n % 4:
            raise _TreatAsWithdraw(5)
        fields["communities"] = struct.unpack(f"!{n // 4}I", value)
    elif code == ATTR_LARGE_COMMUNITIES:
        if n == 0 or n % 12:
            raise _TreatAsWithdraw(5)
        vals = struct.unpack(f"!{n // 4}I", value)
        fields["large_communities"] = tuple(tuple(vals[k: k + 3]) for k in range(0, len(vals), 3))
    elif code == ATTR_MP_REACH:
        fields["mp_reach"] = _decode_mp_reach(value, flags, other)
    elif code == ATTR_MP_UNREACH:
        if n < 3:
            raise DecodeError(3, 9, b"", "MP_UNREACH_NLRI too short")
        afi, safi = struct.unpack("!HB", value[:3])
        if (afi, safi) in (IPV4_UNICAST, IPV6_UNICAST):
            fields["mp_unreach"] = MpUnreach(afi, safi, decode_prefixes(value[3:], afi, (3, 9)))
        else:
            other.append(RawAttribute(flags, code, value))  # a family we never negotiate: ignore
    elif code == ATTR_ATOMIC_AGGREGATE:
        if n != 0:
            raise _Discard()
        other.append(RawAttribute(flags, code, value))
    elif code in (ATTR_AGGREGATOR, ATTR_AS4_AGGREGATOR):
        if n != (8 if four or code == ATTR_AS4_AGGREGATOR else 6):
            raise _Discard()
        other.append(RawAttribute(flags, code, value))
    else:  # AS4_PATH: only meaningful on 2-octet sessions; validate, keep verbatim
        try:
            _decode_as_path(value, True)
        except _TreatAsWithdraw:
            raise _Discard() from None
        other.append(RawAttribute(flags, code, value))


def _decode_mp_reach(value: bytes, flags: int, other: list[RawAttribute]) -> MpReach | None:
    if len(value) < 5:
        raise DecodeError(3, 9, b"", "MP_REACH_NLRI too short")
    afi, safi, nhlen = struct.unpack("!HBB", value[:4])
    if (afi, safi) not in (IPV4_UNICAST, IPV6_UNICAST):
        other.append(RawAttribute(flags, ATTR_MP_REACH, value))
        return None
    if 4 + nhlen + 1 > len(value):
        raise DecodeError(3, 9, b"", "MP_REACH_NLRI next hop overruns")
    nh = value[4: 4 + nhlen]
    hops: tuple[Address, ...]
    if afi == AFI_IPV6 and nhlen in (16, 32):
        hops = tuple(IPv6Address(nh[k: k + 16]) for k in range(0, nhlen, 16))
    elif afi == AFI_IPV4 and nhlen == 4:
        hops = (IPv4Address(nh),)
    else:
        raise DecodeError(3, 9, b"", f"MP_REACH_NLRI next hop length {nhlen}")
    return MpReach(afi, safi, hops, decode_prefixes(value[5 + nhlen:], afi, (3, 9)))

