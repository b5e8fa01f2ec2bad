"""Flow-sync datagram codec (pure: bytes in, frozen dataclasses out, and back).

Theory of operation. Every datagram is one header, a type-specific body of fixed-size records,
and an HMAC-SHA256 tag (truncated to 16 bytes, RFC 2104 / RFC 4868 §2.3 style truncation) over
everything before it, keyed with the cluster's shared key. A datagram never exceeds
`MAX_DATAGRAM` (1400 bytes) so it crosses any sane path without fragmenting.

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                        magic "LBFS"                           |
    +---------------+---------------+-------------------------------+
    |   version=1   |     type      |        record count           |
    +---------------+---------------+-------------------------------+
    |                        sender node id                         |
    +---------------------------------------------------------------+
    |                 sender incarnation (start time, s)            |
    +---------------------------------------------------------------+
    |                  sequence number (64 bits)                    |
    +---------------------------------------------------------------+
    |     body: [type preamble] count x fixed-size record           |
    +---------------------------------------------------------------+
    |                 HMAC-SHA256(key, all above)[:16]              |
    +---------------------------------------------------------------+

Every datagram a node sends takes the next number of one sequence space per (node id,
incarnation), so a receiver can drop replays and see gaps in any kind of message; a resent
datagram is the original bytes (same sequence number, same tag). Types:

- FLOWS: records of 56 bytes, `struct flow_key` as the kernel has it with the op (NEW, REFRESH,
  CLOSE) in the first pad byte, then the backend's 16-byte address (indexes are per node, so
  peers translate (VIP, port, proto, backend address) into their own).
- HEARTBEAT: one record: the sender's 16-byte view digest, its flow count and flags (READY).
- RESEND: records (node id, incarnation, first, last): "resend me these sequence numbers".
- RESYNC_REQUEST: no records: "send me your whole flow table" (request id in the preamble).
- RESYNC_CHUNK: preamble (target node, request id, chunk index, flags LAST), then flow records.

Decoding raises `DecodeError` with a reason; it never raises anything else on any input.
"""
from __future__ import annotations

import enum
import hashlib
import hmac
import struct
from collections.abc import Sequence
from dataclasses import dataclass

MAGIC = b"LBFS"
VERSION = 1
MAX_DATAGRAM = 1400
TAG_BYTES = 16
DIGEST_BYTES = 16

HEADER = struct.Struct("!4sBBHIIQ")  # magic, version, type, count, node id, incarnation, seq
FLOW_RECORD_BYTES = 56
FLOW_KEY_BYTES = 40  # struct flow_key: src[16] dst[16] sport dport proto pad[3]
HEARTBEAT = struct.Struct("!16sIHH")  # digest, flow count, flags, reserved
RESEND = struct.Struct("!IIQQ")  # node id, incarnation, first seq, last seq (inclusive)
RESYNC_REQUEST = struct.Struct("!II")  # request id, reserved
CHUNK_PREAMBLE = struct.Struct("!IIIHH")  # target node, request id, chunk index, flags, reserved

BODY_BYTES = MAX_DATAGRAM - HEADER.size - TAG_BYTES
MAX_FLOWS = BODY_BYTES // FLOW_RECORD_BYTES  # 24
MAX_CHUNK_FLOWS = (BODY_BYTES - CHUNK_PREAMBLE.size) // FLOW_RECORD_BYTES  # 23
MAX_RESENDS = BODY_BYTES // RESEND.size

HEARTBEAT_F_READY = 0x1
CHUNK_F_LAST = 0x1


class MsgType(enum.IntEnum):
    FLOWS = 1
    HEARTBEAT = 2
    RESEND = 3
    RESYNC_REQUEST = 4
    RESYNC_CHUNK = 5


class FlowOp(enum.IntEnum):
    NEW = 1
    REFRESH = 2
    CLOSE = 3


class GossipError(Exception):
    """Base of flow-sync protocol errors."""


class DecodeError(GossipError):
    """A datagram that is not a valid, authentic flow-sync message; `reason` is a short metric-friendly word."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason  # "short", "magic", "version", "forged", "type", "length", "record"
        self.detail = detail


class EncodeError(GossipError):
    """A message that cannot be put on the wire (too many records, bad field)."""


@dataclass(frozen=True, slots=True)
class Header:
    type: MsgType
    node_id: int
    incarnation: int
    seq: int
    count: int


@dataclass(frozen=True, slots=True)
class FlowRecord:
    """One flow: the kernel's 40-byte flow key (pad zero), the op and the backend's address16."""

    key: bytes
    backend_addr: bytes
    op: FlowOp

    def __post_init__(self) -> None:
        if len(self.key) != FLOW_KEY_BYTES or len(self.backend_addr) != 16:
            raise EncodeError(f"flow record needs a 40-byte key and 16-byte address, got {len(self.key)}/{len(self.backend_addr)}")

    def wire(self) -> bytes:
        return flow_wire(self.key, self.backend_addr, self.op)


@dataclass(frozen=True, slots=True)
class Flows:
    records: tuple[FlowRecord, ...]


@dataclass(frozen=True, slots=True)
class Heartbeat:
    digest: bytes
    flow_count: int
    ready: bool


@dataclass(frozen=True, slots=True)
class ResendRange:
    node_id: int
    incarnation: int
    first: int
    last: int


@dataclass(frozen=True, slots=True)
class Resend:
    ranges: tuple[ResendRange, ...]


@dataclass(frozen=True, slots=True)
class ResyncRequest:
    request_id: int


@dataclass(frozen=True, slots=True)
class ResyncChunk:
    target: int
    request_id: int
    index: int
    last: bool
    records: tuple[FlowRecord, ...]


Body = Flows | Heartbeat | Resend | ResyncRequest | ResyncChunk


@dataclass(frozen=True, slots=True)
class Message:
    header: Header
    body: Body


def flow_wire(key: bytes, backend_addr: bytes, op: int) -> bytes:
    """The 56-byte record: key[0:37] (addresses, ports, proto), op, two zero bytes, backend address."""
    return key[:37] + bytes((op, 0, 0)) + backend_addr


def flow_wire_from_event(event: bytes, op: int) -> bytes:
    """The record straight from a raw `struct flow_event` (key at 0, backend_addr at 40)."""
    return event[:37] + bytes((op, 0, 0)) + event[40:56]


def tag(key: bytes, data: bytes) -> bytes:
    return hmac.digest(key, data, hashlib.sha256)[:TAG_BYTES]


def encode(key: bytes, header: Header, body_bytes: bytes) -> bytes:
    """Seal `body_bytes` (already-encoded records) under `header`."""
    data = HEADER.pack(MAGIC, VERSION, header.type, header.count, header.node_id, header.incarnation, header.seq) + body_bytes
    if len(data) + TAG_BYTES > MAX_DATAGRAM:
        raise EncodeError(f"datagram of {len(data) + TAG_BYTES} bytes exceeds {MAX_DATAGRAM}")
    return data + tag(key, data)


def _header(msg_type: MsgType, node_id: int, incarnation: int, seq: int, count: int) -> Header:
    if not (0 <= node_id < 2**32 and 0 <= incarnation < 2**32 and 0 <= seq < 2**64 and 0 <= count < 2**16):
        raise EncodeError(f"header field out of range: node {node_id} inc {incarnation} seq {seq} count {count}")
    return Header(msg_type, node_id, incarnation, seq, count)


def encode_flows(key: bytes, node_id: int, incarnation: int, seq: int, records: Sequence[bytes]) -> bytes:
    """A FLOWS datagram of up to MAX_FLOWS already-wired 56-byte records (see `flow_wire`)."""
    if len(records) > MAX_FLOWS:
        raise EncodeError(f"{len(records)} flow records exceed {MAX_FLOWS}")
    return encode(key, _header(MsgType.FLOWS, node_id, incarnation, seq, len(records)), b"".join(records))


def encode_heartbeat(key: bytes, node_id: int, incarnation: int, seq: int, hb: Heartbeat) -> bytes:
    if len(hb.digest) != DIGEST_BYTES:
        raise EncodeError(f"digest must be {DIGEST_BYTES} bytes, got {len(hb.digest)}")
    body = HEARTBEAT.pack(hb.digest, min(hb.flow_count, 2**32 - 1), HEARTBEAT_F_READY if hb.ready else 0, 0)
    return encode(key, _header(MsgType.HEARTBEAT, node_id, incarnation, seq, 1), body)


def encode_resend(key: bytes, node_id: int, incarnation: int, seq: int, ranges: Sequence[ResendRange]) -> bytes:
    if len(ranges) > MAX_RESENDS:
        raise EncodeError(f"{len(ranges)} resend ranges exceed {MAX_RESENDS}")
    body = b"".join(RESEND.pack(r.node_id, r.incarnation, r.first, r.last) for r in ranges)
    return encode(key, _header(MsgType.RESEND, node_id, incarnation, seq, len(ranges)), body)


def encode_resync_request(key: bytes, node_id: int, incarnation: int, seq: int, request_id: int) -> bytes:
    return encode(key, _header(MsgType.RESYNC_REQUEST, node_id, incarnation, seq, 0), RESYNC_REQUEST.pack(request_id, 0))


def encode_resync_chunk(key: bytes, node_id: int, incarnation: int, seq: int, target: int, request_id: int,
                        index: int, last: bool, records: Sequence[bytes]) -> bytes:
    if len(records) > MAX_CHUNK_FLOWS:
        raise EncodeError(f"{len(records)} flow records exceed {MAX_CHUNK_FLOWS}")
    pre = CHUNK_PREAMBLE.pack(target, request_id, index, CHUNK_F_LAST if last else 0, 0)
    return encode(key, _header(MsgType.RESYNC_CHUNK, node_id, incarnation, seq, len(records)), pre + b"".join(records))


# ---- decoding ---------------------------------------------------------------------------------

_FIXED = {
    MsgType.FLOWS: (0, FLOW_RECORD_BYTES),
    MsgType.HEARTBEAT: (0, HEARTBEAT.size),
    MsgType.RESEND: (0, RESEND.size),
    MsgType.RESYNC_REQUEST: (RESYNC_REQUEST.size, 0),
    MsgType.RESYNC_CHUNK: (CHUNK_PREAMBLE.size, FLOW_RECORD_BYTES),
}


def decode_header(key: bytes, data: bytes) -> tuple[Header, memoryview]:
    """Check size, magic, version, tag, type and length; return the header and the body's bytes."""
    if len(data) < HEADER.size + TAG_BYTES:
        raise DecodeError("short", f"{len(data)} bytes")
    if len(data) > MAX_DATAGRAM:
        raise DecodeError("length", f"{len(data)} bytes exceeds {MAX_DATAGRAM}")
    magic, version, raw_type, count, node_id, incarnation, seq = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise DecodeError("magic", repr(magic))
    if version != VERSION:
        raise DecodeError("version", f"version {version}, we speak {VERSION}")
    end = len(data) - TAG_BYTES
    if not hmac.compare_digest(tag(key, data[:end]), data[end:]):
        raise DecodeError("forged", f"bad tag from node {node_id:#x}")
    try:
        msg_type = MsgType(raw_type)
    except ValueError:
        raise DecodeError("type", f"unknown message type {raw_type}") from None
    pre, rec = _FIXED[msg_type]
    if end - HEADER.size != pre + count * rec or (msg_type is MsgType.HEARTBEAT and count != 1):
        raise DecodeError("length", f"{msg_type.name} with {count} records in {end - HEADER.size} body bytes")
    return Header(msg_type, node_id, incarnation, seq, count), memoryview(data)[HEADER.size:end]


def decode(key: bytes, data: bytes) -> Message:
    """A complete, typed message (records as dataclasses). The I/O path uses `decode_header` plus
    `flow_records` to skip building objects per flow."""
    header, body = decode_header(key, data)
    t = header.type
    if t is MsgType.FLOWS:
        return Message(header, Flows(tuple(_flow_record(r) for r in flow_records(body))))
    if t is MsgType.HEARTBEAT:
        digest, flow_count, flags, _ = HEARTBEAT.unpack(body)
        return Message(header, Heartbeat(bytes(digest), flow_count, bool(flags & HEARTBEAT_F_READY)))
    if t is MsgType.RESEND:
        ranges = []
        for node_id, incarnation, first, last in RESEND.iter_unpack(body):
            if first > last:
                raise DecodeError("record", f"resend range {first}..{last}")
            ranges.append(ResendRange(node_id, incarnation, first, last))
        return Message(header, Resend(tuple(ranges)))
    if t is MsgType.RESYNC_REQUEST:
        request_id, _ = RESYNC_REQUEST.unpack(body)
        return Message(header, ResyncRequest(request_id))
    target, request_id, index, flags, _ = CHUNK_PREAMBLE.unpack_from(body)
    records = tuple(_flow_record(r) for r in flow_records(body[CHUNK_PREAMBLE.size:]))
    return Message(header, ResyncChunk(target, request_id, index, bool(flags & CHUNK_F_LAST), records))


def chunk_preamble(body: memoryview) -> tuple[int, int, int, bool]:
    target, request_id, index, flags, _ = CHUNK_PREAMBLE.unpack_from(body)
    return target, request_id, index, bool(flags & CHUNK_F_LAST)


def flow_records(body: memoryview) -> list[tuple[bytes, bytes, int]]:
    """(40-byte flow key with zero pad, 16-byte backend address, op) per record; bad ops raise."""
    out = []
    raw = bytes(body)
    for off in range(0, len(raw), FLOW_RECORD_BYTES):
        op = raw[off + 37]
        if not 1 <= op <= 3 or raw[off + 38] or raw[off + 39]:
            raise DecodeError("record", f"flow record {off // FLOW_RECORD_BYTES}: op {op}")
        out.append((raw[off:off + 37] + b"\0\0\0", raw[off + 40:off + 56], op))
    return out


def _flow_record(r: tuple[bytes, bytes, int]) -> FlowRecord:
    return FlowRecord(r[0], r[1], FlowOp(r[2]))
