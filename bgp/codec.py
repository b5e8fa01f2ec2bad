"""BGP-4 message codec: bytes <-> frozen dataclasses, and a framing buffer. No I/O.

Theory of operation
-------------------
Every message starts with the 19-byte header of RFC 4271 §4.1 (marker, length, type). `Framer`
buffers a TCP byte stream (`feed(data)`), checks each header as soon as it is complete, and
yields decoded messages (`messages()`). Decoding is strict and total: any malformed input raises
`DecodeError` carrying the NOTIFICATION code/subcode/data that RFC 4271 §6 prescribes, and nothing
else escapes.

The path attributes inside an UPDATE are `bgp.attrs`'s (RFC 7606 error handling included): an
UPDATE whose attributes must be treated as withdraw (RFC 7606) decodes to an `Update` whose
`errors` lists the (code, subcode) found; a missing mandatory attribute is checked here, since it
depends on the NLRI. The `four_octet_as` switch (RFC 6793) is passed down to the AS_PATH codec.
"""
from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from bgp.attrs import (
    ATTR_AS_PATH,
    ATTR_NEXT_HOP,
    ATTR_ORIGIN,
    IPV4_UNICAST,
    PathAttributes,
    decode_attributes,
    decode_ipv4_prefixes,
    encode_attributes,
    encode_prefix,
)
from bgp.errors import DecodeError

MARKER = b"\xff" * 16
HEADER_LEN = 19
MAX_MESSAGE_LEN = 4096
BGP_VERSION = 4

# Message types (RFC 4271 §4.1, RFC 2918).
OPEN, UPDATE, NOTIFICATION, KEEPALIVE, ROUTE_REFRESH = 1, 2, 3, 4, 5

# Capability codes (RFC 5492 and friends).
CAP_MULTIPROTOCOL, CAP_ROUTE_REFRESH, CAP_FOUR_OCTET_AS = 1, 2, 65


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


Capability = MultiprotocolCap | RouteRefreshCap | FourOctetAsCap | UnknownCap


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


Message = Open | Update | Keepalive | Notification | RouteRefresh


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



def _decode_update(body: bytes, four: bool) -> Update:
    n = len(body)
    wlen = struct.unpack("!H", body[:2])[0]
    if 2 + wlen + 2 > n:
        raise DecodeError(3, 1, b"", "withdrawn routes length overruns the message")
    withdrawn = decode_ipv4_prefixes(body[2: 2 + wlen], (3, 10))
    alen = struct.unpack("!H", body[2 + wlen: 4 + wlen])[0]
    astart = 4 + wlen
    if astart + alen > n:
        raise DecodeError(3, 1, b"", "total path attribute length overruns the message")
    nlri = decode_ipv4_prefixes(body[astart + alen:], (3, 10))
    attrs, errors = decode_attributes(body[astart: astart + alen], four)
    has_nlri = bool(nlri) or (attrs.mp_reach is not None and bool(attrs.mp_reach.nlri))
    if has_nlri:
        # RFC 4271 §6.3 / RFC 7606 §3(d): missing well-known mandatory attributes.
        missing = [c for c, v in ((ATTR_ORIGIN, attrs.origin), (ATTR_AS_PATH, attrs.as_path)) if v is None]
        if nlri and attrs.next_hop is None:
            missing.append(ATTR_NEXT_HOP)
        if missing:
            errors.append((3, 3))
    return Update(withdrawn, attrs, nlri, tuple(dict.fromkeys(errors)))



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

    def feed(self, data: bytes | bytearray) -> None:
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
