"""BGP-4 message codec: bytes <-> frozen dataclasses, and a framing buffer. No I/O.

Theory of operation
-------------------
Every message starts with the 19-byte header of RFC 4271 §4.1 (marker, length, type). `Framer`
buffers a TCP byte stream (`feed(data)`), checks each header as soon as it is complete, and
yields decoded messages (`messages()`). Decoding is strict and total: any malformed input raises
`DecodeError` carrying the NOTIFICATION code/subcode/data that RFC 4271 §6 prescribes, and nothing
else escapes.

UPDATE errors follow RFC 7606: errors that cannot be localised (framing of the attribute list,
NLRI, MP_REACH/MP_UNREACH) raise `DecodeError` (session reset); a malformed ORIGIN, AS_PATH,
NEXT_HOP, MED, LOCAL_PREF, COMMUNITIES or LARGE_COMMUNITIES, or a missing mandatory attribute,
yields an `Update` whose `errors` lists the (code, subcode) found: treat-as-withdraw. Malformed
ATOMIC_AGGREGATE/AGGREGATOR are discarded. Unknown optional attributes are kept verbatim.

AS numbers are 4 octets on the wire (RFC 6793) when both sides sent the capability; the
`four_octet_as` switch of the encoder/decoder selects that. On a 2-octet session an AS above
65535 is sent as AS_TRANS (23456) plus an AS4_PATH attribute.
"""
from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Union

from bgp.errors import DecodeError

MARKER = b"\xff" * 16
HEADER_LEN = 19
MAX_MESSAGE_LEN = 4096
BGP_VERSION = 4
AS_TRANS = 23456

# Message types (RFC 4271 §4.1, RFC 2918).
OPEN, UPDATE, NOTIFICATION, KEEPALIVE, ROUTE_REFRESH = 1, 2, 3, 4, 5

# Address families (IANA): AFI and SAFI.
AFI_IPV4, AFI_IPV6, SAFI_UNICAST = 1, 2, 1
IPV4_UNICAST = (AFI_IPV4, SAFI_UNICAST)
IPV6_UNICAST = (AFI_IPV6, SAFI_UNICAST)

# Capability codes (RFC 5492 and friends).
CAP_MULTIPROTOCOL, CAP_ROUTE_REFRESH, CAP_FOUR_OCTET_AS = 1, 2, 65

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

Prefix = Union[IPv4Network, IPv6Network]
Address = Union[IPv4Address, IPv6Address]


# --------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class MultiprotocolCap:
    """Capability 1 (RFC 4760): this AFI/SAFI may be exchanged."""

    afi: int
    safi: int


@dataclass(frozen=True, slots=True)
class RouteRefreshCap:
    """Capability 2 (RFC 2918)."""


@dataclass(frozen=True, slots=True)
class FourOctetAsCap:
    """Capability 65 (RFC 6793): the sender's real, 4-octet AS number."""

    asn: int


@dataclass(frozen=True, slots=True)
class UnknownCap:
    """Any other capability, kept verbatim (RFC 5492: unknown capabilities are ignored)."""

    code: int
    value: bytes = b""


Capability = Union[MultiprotocolCap, RouteRefreshCap, FourOctetAsCap, UnknownCap]


@dataclass(frozen=True, slots=True)
class Open:
    """OPEN (RFC 4271 §4.2). `my_as` is the 2-octet field; `asn` is the real AS."""

    my_as: int
    hold_time_s: int
    bgp_id: IPv4Address
    capabilities: tuple[Capability, ...] = ()
    version: int = BGP_VERSION

    @property
    def asn(self) -> int:
        for cap in self.capabilities:
            if isinstance(cap, FourOctetAsCap):
                return cap.asn
        return self.my_as

    @property
    def four_octet_as(self) -> bool:
        return any(isinstance(c, FourOctetAsCap) for c in self.capabilities)

    @property
    def route_refresh(self) -> bool:
        return any(isinstance(c, RouteRefreshCap) for c in self.capabilities)

    @property
    def families(self) -> frozenset[tuple[int, int]]:
        """AFI/SAFI pairs; without any multiprotocol capability, IPv4 unicast (RFC 4760 §8)."""
        fams = frozenset((c.afi, c.safi) for c in self.capabilities if isinstance(c, MultiprotocolCap))
        return fams or frozenset({IPV4_UNICAST})


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


@dataclass(frozen=True, slots=True)
class Update:
    """UPDATE (RFC 4271 §4.3). Non-empty `errors` means treat-as-withdraw (RFC 7606)."""

    withdrawn: tuple[IPv4Network, ...] = ()
    attributes: PathAttributes = field(default_factory=PathAttributes)
    nlri: tuple[IPv4Network, ...] = ()
    errors: tuple[tuple[int, int], ...] = ()

    @property
    def is_end_of_rib(self) -> bool:
        """End-of-RIB (RFC 4724 §2): IPv4 is an empty UPDATE; others an empty MP_UNREACH only."""
        a = self.attributes
        if self.withdrawn or self.nlri:
            return False
        if a == PathAttributes():
            return True
        return a == PathAttributes(mp_unreach=a.mp_unreach) and a.mp_unreach is not None and not a.mp_unreach.withdrawn


@dataclass(frozen=True, slots=True)
class Keepalive:
    """KEEPALIVE (RFC 4271 §4.4): the header alone."""


@dataclass(frozen=True, slots=True)
class Notification:
    """NOTIFICATION (RFC 4271 §4.5)."""

    code: int
    subcode: int
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class RouteRefresh:
    """ROUTE-REFRESH (RFC 2918 §3)."""

    afi: int
    safi: int


Message = Union[Open, Update, Keepalive, Notification, RouteRefresh]


# --------------------------------------------------------------------------------------------
# Encoders
# --------------------------------------------------------------------------------------------

#  0                   1                   2                   3
#  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# |                                                               |
# +                         Marker (16 x 0xff)                    +
# |                                                               |
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# |          Length               |      Type     |
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
def _frame(msg_type: int, body: bytes) -> bytes:
    length = HEADER_LEN + len(body)
    if length > MAX_MESSAGE_LEN:
        raise ValueError(f"message of {length} bytes exceeds {MAX_MESSAGE_LEN}")
    return MARKER + struct.pack("!HB", length, msg_type) + body


def encode(msg: Message, *, four_octet_as: bool = True) -> bytes:
    """Serialise one message, header included."""
    if isinstance(msg, Open):
        return _frame(OPEN, _encode_open(msg))
    if isinstance(msg, Update):
        return _frame(UPDATE, _encode_update(msg, four_octet_as))
    if isinstance(msg, Keepalive):
        return _frame(KEEPALIVE, b"")
    if isinstance(msg, Notification):
        return _frame(NOTIFICATION, _encode_notification(msg))
    if isinstance(msg, RouteRefresh):
        return _frame(ROUTE_REFRESH, _encode_route_refresh(msg))
    raise TypeError(f"not a BGP message: {msg!r}")


#  0                   1                   2                   3
#  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
# +-+-+-+-+-+-+-+-+
# |    Version    |
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# |     My Autonomous System      |
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# |           Hold Time           |
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# |                         BGP Identifier                        |
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# | Opt Parm Len  |
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# |             Optional Parameters (Variable)                    |
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# All capabilities go into one Capabilities parameter (type 2), each as code, length, value.
def _encode_open(msg: Open) -> bytes:
    caps = b"".join(_encode_capability(c) for c in msg.capabilities)
    params = struct.pack("!BB", 2, len(caps)) + caps if caps else b""
    return struct.pack("!BHH4sB", msg.version, msg.my_as, msg.hold_time_s, msg.bgp_id.packed, len(params)) + params


def _encode_capability(cap: Capability) -> bytes:
    if isinstance(cap, MultiprotocolCap):
        code, value = CAP_MULTIPROTOCOL, struct.pack("!HBB", cap.afi, 0, cap.safi)
    elif isinstance(cap, RouteRefreshCap):
        code, value = CAP_ROUTE_REFRESH, b""
    elif isinstance(cap, FourOctetAsCap):
        code, value = CAP_FOUR_OCTET_AS, struct.pack("!I", cap.asn)
    else:
        code, value = cap.code, cap.value
    return struct.pack("!BB", code, len(value)) + value


# +-----------------------------------------------------+
# |   Withdrawn Routes Length (2 octets)                |
# +-----------------------------------------------------+
# |   Withdrawn Routes (variable)                       |
# +-----------------------------------------------------+
# |   Total Path Attribute Length (2 octets)            |
# +-----------------------------------------------------+
# |   Path Attributes (variable)                        |
# +-----------------------------------------------------+
# |   Network Layer Reachability Information (variable) |
# +-----------------------------------------------------+
# Each prefix is (length in bits, 1 octet) followed by the fewest octets that hold it.
def _encode_update(msg: Update, four_octet_as: bool) -> bytes:
    withdrawn = b"".join(encode_prefix(p) for p in msg.withdrawn)
    attrs = encode_attributes(msg.attributes, four_octet_as=four_octet_as)
    nlri = b"".join(encode_prefix(p) for p in msg.nlri)
    return struct.pack("!H", len(withdrawn)) + withdrawn + struct.pack("!H", len(attrs)) + attrs + nlri


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


# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# | Error code    | Error subcode |   Data (variable)             |
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
def _encode_notification(msg: Notification) -> bytes:
    return struct.pack("!BB", msg.code, msg.subcode) + msg.data


#  0       7      15      23      31
# +-------+-------+-------+-------+
# |      AFI      |  Res. | SAFI  |
# +-------+-------+-------+-------+
def _encode_route_refresh(msg: RouteRefresh) -> bytes:
    return struct.pack("!HBB", msg.afi, 0, msg.safi)


# --------------------------------------------------------------------------------------------
# Decoders
# --------------------------------------------------------------------------------------------

def check_header(header: bytes) -> tuple[int, int]:
    """Validate a 19-byte header; returns (length, type) or raises (RFC 4271 §6.1)."""
    if header[:16] != MARKER:
        raise DecodeError(1, 1, b"", "connection not synchronized (bad marker)")
    length, msg_type = struct.unpack("!HB", header[16:19])
    minimum = {OPEN: 29, UPDATE: 23, NOTIFICATION: 21, KEEPALIVE: 19, ROUTE_REFRESH: 23}.get(msg_type)
    if minimum is None:
        raise DecodeError(1, 3, bytes([msg_type]), f"bad message type {msg_type}")
    if length < minimum or length > MAX_MESSAGE_LEN or (msg_type == KEEPALIVE and length != HEADER_LEN):
        raise DecodeError(1, 2, struct.pack("!H", length), f"bad length {length} for type {msg_type}")
    return length, msg_type


def decode(data: bytes, *, four_octet_as: bool = True) -> Message:
    """Decode exactly one whole message (header included)."""
    if len(data) < HEADER_LEN:
        raise DecodeError(1, 2, struct.pack("!H", len(data)), "shorter than a header")
    length, msg_type = check_header(data[:HEADER_LEN])
    if length != len(data):
        raise DecodeError(1, 2, struct.pack("!H", length), f"length field {length} but {len(data)} bytes")
    body = data[HEADER_LEN:]
    if msg_type == OPEN:
        return _decode_open(body)
    if msg_type == UPDATE:
        return _decode_update(body, four_octet_as)
    if msg_type == NOTIFICATION:
        return Notification(body[0], body[1], bytes(body[2:]))
    if msg_type == KEEPALIVE:
        return Keepalive()
    if len(body) != 4:
        raise DecodeError(7, 1, bytes(data), "ROUTE-REFRESH must be 23 bytes")
    afi, _reserved, safi = struct.unpack("!HBB", body)
    return RouteRefresh(afi, safi)


def _decode_open(body: bytes) -> Open:
    version, my_as, hold, bgp_id, opt_len = struct.unpack("!BHH4sB", body[:10])
    if version != BGP_VERSION:
        raise DecodeError(2, 1, struct.pack("!H", BGP_VERSION), f"unsupported version {version}")
    if 10 + opt_len != len(body):
        raise DecodeError(1, 2, struct.pack("!H", HEADER_LEN + len(body)), "optional parameters length mismatch")
    if hold in (1, 2):
        raise DecodeError(2, 6, b"", f"unacceptable hold time {hold}")
    if bgp_id == b"\x00\x00\x00\x00":
        raise DecodeError(2, 3, b"", "BGP identifier 0")
    caps: list[Capability] = []
    params = body[10:]
    i = 0
    while i < len(params):
        if i + 2 > len(params) or i + 2 + params[i + 1] > len(params):
            raise DecodeError(2, 0, b"", "truncated optional parameter")
        ptype, plen = params[i], params[i + 1]
        value = params[i + 2: i + 2 + plen]
        i += 2 + plen
        if ptype != 2:
            raise DecodeError(2, 4, b"", f"unsupported optional parameter {ptype}")
        caps.extend(_decode_capabilities(value))
    return Open(my_as, hold, IPv4Address(bgp_id), tuple(caps), version)


def _decode_capabilities(value: bytes) -> list[Capability]:
    caps: list[Capability] = []
    j = 0
    while j < len(value):
        if j + 2 > len(value) or j + 2 + value[j + 1] > len(value):
            raise DecodeError(2, 0, b"", "truncated capability")
        code, clen = value[j], value[j + 1]
        cval = bytes(value[j + 2: j + 2 + clen])
        j += 2 + clen
        if code == CAP_MULTIPROTOCOL:
            if clen != 4:
                raise DecodeError(2, 0, b"", "multiprotocol capability length must be 4")
            afi, _res, safi = struct.unpack("!HBB", cval)
            caps.append(MultiprotocolCap(afi, safi))
        elif code == CAP_ROUTE_REFRESH:
            if clen != 0:
                raise DecodeError(2, 0, b"", "route refresh capability length must be 0")
            caps.append(RouteRefreshCap())
        elif code == CAP_FOUR_OCTET_AS:
            if clen != 4:
                raise DecodeError(2, 0, b"", "4-octet AS capability length must be 4")
            caps.append(FourOctetAsCap(struct.unpack("!I", cval)[0]))
        else:
            caps.append(UnknownCap(code, cval))
    return caps


def decode_prefixes(data: bytes, afi: int, err: tuple[int, int]) -> tuple[Prefix, ...]:
    """A run of (length, prefix) NLRI encodings; `err` is the (code, subcode) for malformed input."""
    max_bits = 32 if afi == AFI_IPV4 else 128
    out: list[Prefix] = []
    i = 0
    while i < len(data):
        bits = data[i]
        nbytes = (bits + 7) // 8
        if bits > max_bits or i + 1 + nbytes > len(data):
            raise DecodeError(err[0], err[1], b"", f"invalid prefix length {bits}")
        raw = bytes(data[i + 1: i + 1 + nbytes]).ljust(max_bits // 8, b"\x00")
        i += 1 + nbytes
        if afi == AFI_IPV4:
            out.append(IPv4Network((raw, bits), strict=False))
        else:
            out.append(IPv6Network((raw, bits), strict=False))
    return tuple(out)


def _decode_update(body: bytes, four: bool) -> Update:
    n = len(body)
    wlen = struct.unpack("!H", body[:2])[0]
    if 2 + wlen + 2 > n:
        raise DecodeError(3, 1, b"", "withdrawn routes length overruns the message")
    withdrawn = decode_prefixes(body[2: 2 + wlen], AFI_IPV4, (3, 10))
    alen = struct.unpack("!H", body[2 + wlen: 4 + wlen])[0]
    astart = 4 + wlen
    if astart + alen > n:
        raise DecodeError(3, 1, b"", "total path attribute length overruns the message")
    nlri = decode_prefixes(body[astart + alen:], AFI_IPV4, (3, 10))
    attrs, errors = _decode_attributes(body[astart: astart + alen], four)
    has_nlri = bool(nlri) or (attrs.mp_reach is not None and bool(attrs.mp_reach.nlri))
    if has_nlri:
        # RFC 4271 §6.3 / RFC 7606 §3(d): missing well-known mandatory attributes.
        missing = [c for c, v in ((ATTR_ORIGIN, attrs.origin), (ATTR_AS_PATH, attrs.as_path)) if v is None]
        if nlri and attrs.next_hop is None:
            missing.append(ATTR_NEXT_HOP)
        if missing:
            errors.append((3, 3))
    return Update(withdrawn, attrs, nlri, tuple(dict.fromkeys(errors)))


def _decode_attributes(data: bytes, four: bool) -> tuple[PathAttributes, list[tuple[int, int]]]:
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
        fmt = "!%d%s" % (count, "I" if four else "H")
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
        fields["communities"] = struct.unpack("!%dI" % (n // 4), value)
    elif code == ATTR_LARGE_COMMUNITIES:
        if n == 0 or n % 12:
            raise _TreatAsWithdraw(5)
        vals = struct.unpack("!%dI" % (n // 4), value)
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


# --------------------------------------------------------------------------------------------
# Framing
# --------------------------------------------------------------------------------------------

class Framer:
    """Cuts a TCP byte stream into messages: `feed(data)`, then iterate `messages()`.

    `four_octet_as` applies to messages decoded after it is set (set it once the OPENs are
    exchanged); decoding is lazy, one message per iteration step.
    """

    def __init__(self, *, four_octet_as: bool = False) -> None:
        self._buf = bytearray()
        self.four_octet_as = four_octet_as

    def feed(self, data: bytes) -> None:
        self._buf += data

    def frames(self) -> Iterator[bytes]:
        """Whole messages as bytes, headers checked (for callers that decode with their own context)."""
        while len(self._buf) >= HEADER_LEN:
            length, _ = check_header(bytes(self._buf[:HEADER_LEN]))
            if len(self._buf) < length:
                return
            raw = bytes(self._buf[:length])
            del self._buf[:length]
            yield raw

    def messages(self) -> Iterator[Message]:
        for raw in self.frames():
            yield decode(raw, four_octet_as=self.four_octet_as)
