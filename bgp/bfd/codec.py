"""BFD control packets (RFC 5880 §4.1): bytes <-> `ControlPacket`, with the §6.8.6 checks. No I/O.

Theory of operation
-------------------
`encode(packet)` builds the 24-byte mandatory section (no authentication: lbnode never sets A).
`decode(data)` returns a `ControlPacket` or raises `Malformed` carrying a `DropReason`: every
check of RFC 5880 §6.8.6 that needs only the packet itself (version, length, detect multiplier,
multipoint bit, discriminators, authentication). The checks that need more than the packet live
elsewhere: the TTL of 255 (RFC 5881 §5) and the session lookup are `bgp.bfd.fsm.Demux`'s, which counts
every drop by reason so that no packet from the network vanishes uncounted.
"""
from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from bgp.errors import BgpError

VERSION = 1
HEADER_LEN = 24
AUTH_MIN_LEN = 26  # mandatory section + Auth Type + Auth Len
_HEADER = struct.Struct("!BBBBIIIII")


class State(enum.IntEnum):
    """Session states as sent in the Sta field (RFC 5880 §4.1)."""

    ADMIN_DOWN = 0
    DOWN = 1
    INIT = 2
    UP = 3


class Diag(enum.IntEnum):
    """Diagnostic codes (RFC 5880 §4.1); 9-31 are reserved and decoded as plain ints."""

    NONE = 0
    CONTROL_DETECTION_TIME_EXPIRED = 1
    ECHO_FUNCTION_FAILED = 2
    NEIGHBOR_SIGNALED_SESSION_DOWN = 3
    FORWARDING_PLANE_RESET = 4
    PATH_DOWN = 5
    CONCATENATED_PATH_DOWN = 6
    ADMINISTRATIVELY_DOWN = 7
    REVERSE_CONCATENATED_PATH_DOWN = 8


class DropReason(enum.Enum):
    """Why a received datagram was discarded (counted per reason)."""

    SHORT = "short"  # fewer than 24 bytes (or 26 with A set)
    VERSION = "version"  # version is not 1
    LENGTH = "length"  # Length field below the minimum or beyond the datagram
    DETECT_MULT_ZERO = "detect_mult_zero"
    MULTIPOINT = "multipoint"  # M bit set
    MY_DISCRIMINATOR_ZERO = "my_discriminator_zero"
    YOUR_DISCRIMINATOR_ZERO = "your_discriminator_zero"  # zero while the sender is Init or Up
    AUTHENTICATION = "authentication"  # A set: no authentication is configured
    POLL_AND_FINAL = "poll_and_final"  # both P and F (RFC 5880 §6.5 forbids it)
    TTL = "ttl"  # IP TTL / hop limit not 255 (RFC 5881 §5), or not reported
    UNKNOWN_DISCRIMINATOR = "unknown_discriminator"  # Your Discriminator names no session of ours
    UNKNOWN_PEER = "unknown_peer"  # Your Discriminator zero and no session for the source address
    WRONG_SOURCE = "wrong_source"  # the discriminator's session belongs to another address
    WRONG_INTERFACE = "wrong_interface"  # not received on the interface of the route to the peer
    REMOTE_DISCRIMINATOR_CHANGED = "remote_discriminator_changed"  # My Discriminator is not the one learned while Up


class Malformed(BgpError):
    """A received BFD packet fails a check of RFC 5880 §6.8.6; it must be discarded."""

    def __init__(self, reason: DropReason, detail: str = "") -> None:
        self.reason = reason
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)


@dataclass(frozen=True, slots=True)
class ControlPacket:
    """The mandatory section of a BFD control packet. Intervals in microseconds, as on the wire."""

    state: State
    my_discriminator: int
    your_discriminator: int
    desired_min_tx_us: int
    required_min_rx_us: int
    detect_mult: int
    diag: int = Diag.NONE
    poll: bool = False
    final: bool = False
    control_plane_independent: bool = False
    authentication: bool = False
    demand: bool = False
    multipoint: bool = False
    required_min_echo_rx_us: int = 0
    version: int = VERSION


#  0                   1                   2                   3
#  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# |Vers |  Diag   |Sta|P|F|C|A|D|M|  Detect Mult  |    Length     |
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# |                       My Discriminator                        |
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# |                      Your Discriminator                       |
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# |                    Desired Min TX Interval                    |
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# |                   Required Min RX Interval                    |
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# |                 Required Min Echo RX Interval                 |
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
_P, _F, _C, _A, _D, _M = 0x20, 0x10, 0x08, 0x04, 0x02, 0x01


def encode(p: ControlPacket) -> bytes:
    """The packet's 24 bytes (RFC 5880 §4.1); the Length field is 24."""
    if p.authentication:
        raise BgpError("BFD authentication is not supported")
    if not 0 <= p.diag <= 31 or not 1 <= p.detect_mult <= 255 or not 0 <= p.version <= 7:
        raise BgpError(f"BFD field out of range: diag {p.diag}, detect mult {p.detect_mult}, version {p.version}")
    flags = (_P * p.poll | _F * p.final | _C * p.control_plane_independent | _D * p.demand | _M * p.multipoint)
    return _HEADER.pack(p.version << 5 | p.diag, int(p.state) << 6 | flags, p.detect_mult, HEADER_LEN,
                        p.my_discriminator, p.your_discriminator, p.desired_min_tx_us, p.required_min_rx_us,
                        p.required_min_echo_rx_us)


def decode(data: bytes) -> ControlPacket:
    """Parse and check one datagram's payload (RFC 5880 §6.8.6, packet-only checks, in its order)."""
    if len(data) < HEADER_LEN:
        raise Malformed(DropReason.SHORT, f"{len(data)} bytes")
    vd, sf, mult, length, my_d, your_d, tx, rx, echo = _HEADER.unpack_from(data)
    version = vd >> 5
    if version != VERSION:
        raise Malformed(DropReason.VERSION, f"version {version}")
    auth = bool(sf & _A)
    if length < (AUTH_MIN_LEN if auth else HEADER_LEN):
        raise Malformed(DropReason.LENGTH, f"Length field {length}")
    if length > len(data):
        raise Malformed(DropReason.LENGTH, f"Length field {length} > {len(data)} bytes received")
    if mult == 0:
        raise Malformed(DropReason.DETECT_MULT_ZERO)
    if sf & _M:
        raise Malformed(DropReason.MULTIPOINT)
    if my_d == 0:
        raise Malformed(DropReason.MY_DISCRIMINATOR_ZERO)
    state = State(sf >> 6)
    if your_d == 0 and state not in (State.DOWN, State.ADMIN_DOWN):
        raise Malformed(DropReason.YOUR_DISCRIMINATOR_ZERO, f"from a session in {state.name}")
    if auth:
        raise Malformed(DropReason.AUTHENTICATION, "A bit set, no authentication configured")
    if sf & _P and sf & _F:
        raise Malformed(DropReason.POLL_AND_FINAL)
    return ControlPacket(
        state=state, my_discriminator=my_d, your_discriminator=your_d, desired_min_tx_us=tx,
        required_min_rx_us=rx, detect_mult=mult, diag=vd & 0x1F, poll=bool(sf & _P), final=bool(sf & _F),
        control_plane_independent=bool(sf & _C), authentication=auth, demand=bool(sf & _D),
        multipoint=False, required_min_echo_rx_us=echo)
