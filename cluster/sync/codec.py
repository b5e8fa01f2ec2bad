"""Flow-sync datagram codec (pure: bytes in, frozen dataclasses out, and back).

Theory of operation. Every datagram is one header, a type-specific body of fixed-size records,
and an HMAC-SHA256 tag (truncated to 16 bytes, RFC 2104 / RFC 4868 §2.3 style truncation) over
everything before it, keyed with one of the cluster's shared keys. A datagram never exceeds
`MAX_DATAGRAM` (1400 bytes) so it crosses any sane path without fragmenting.

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                        magic "LBFS"                           |
    +---------------+---------------+-------------------------------+
    |   version=3   |     type      |        record count           |
    +---------------+---------------+-------------------------------+
    |        key id (32 bits): names the key the tag is made with   |
    +---------------------------------------------------------------+
    |                        sender node id                         |
    +---------------------------------------------------------------+
    |                 sender incarnation (start time, s)            |
    +---------------------------------------------------------------+
    |      number (64 bits): stream sequence number (FLOWS,         |
    |      HEARTBEAT) or control number (RESEND, RESYNC_*)          |
    +---------------------------------------------------------------+
    |     body: [type preamble] count x fixed-size record           |
    +---------------------------------------------------------------+
    |          HMAC-SHA256(key with that id, all above)[:16]        |
    +---------------------------------------------------------------+

Keys (`Keyring`). A node signs with its current key and accepts its current and, during a
rotation, a second ("next") key. The key id in the header names the key the tag was made with,
so a receiver checks one tag, never tries both; an id it does not hold is refused as "key" (a
rotation step missing on one side), a wrong tag as "forged". The id is a hash of the key, so it
reveals nothing of it and two nodes agree on it without configuring it. Version 2 had no key id.

Two number spaces per (node id, incarnation), both counting up from 1:

- The *stream* (`SEQUENCED` types: FLOWS, HEARTBEAT) holds exactly the datagrams that go to
  every peer (the multicast group, or each unicast peer). Every peer receives every number, so
  a missing number at any peer is a real loss. A repair is the original datagram resent
  byte for byte (same number, same tag) by unicast to the peer that asked: it never takes a
  new number, so it can never open a gap anywhere else.
- The *control* space (RESEND, RESYNC_REQUEST, RESYNC_CHUNK) numbers datagrams that go to one
  peer. Nobody tracks gaps in it: its only use is replay protection (a sliding window,
  RFC 4303 §3.4.3 style, in policy.ReplayWindow). Version 1 put RESEND requests in the stream
  and sent them to one peer, so every third node saw a gap and asked for it: a storm at N >= 3.

Types:

- FLOWS: records of 56 bytes, `struct flow_key` as the kernel has it with the op (NEW, REFRESH,
  CLOSE) in the first pad byte, then the backend's 16-byte address (indexes are per node, so
  peers translate (VIP, port, proto, backend address) into their own).
- HEARTBEAT: one record: the sender's 16-byte view digest, its flow count, flags (READY) and
  the oldest stream number it can still resend (its retransmit buffer's tail): a receiver
  missing an older number knows at once that only a resync of that peer can repair it.

        +-------------------------------------------------------+
        |               view digest (16 bytes)                  |
        +-------------------------------+-----------+-----------+
        |          flow count           |   flags   | reserved  |
        +-------------------------------+-----------+-----------+
        |          oldest resendable stream number (64)         |
        +-------------------------------------------------------+

- RESEND: records (node id, incarnation, first, last): "resend me these stream numbers".
- RESYNC_REQUEST: preamble (request id, target node): "send me your whole flow table". Target 0
  asks every peer that hears it (start-up); a node id asks that one peer (a peer resync, after
  a gap its retransmit buffer cannot repair).
- RESYNC_CHUNK: preamble (target node, request id, chunk index, flags LAST), then flow records.
  An answer's chunks are numbered 0, 1, ... in the order they are sent; the one with LAST (it
  may carry no records) ends it, so an answer is complete once chunks 0..LAST's index have all
  arrived. The answerer streams its table (it never knows the count in advance): it holds back
  the last few records of each walk chunk until it knows whether more follow.

- LOAD (cluster/loadshare.py): load-aware weighting, a control datagram sent to every peer
  (a periodic report that the next one supersedes: a loss is not repaired, so it is outside the
  stream). Preamble (kind, part, parts, the service's backend count, service id, epoch), then
  records (backend address, value, multiplier, weight, state). Kind OBSERVE: what the sender's
  probes read (value: the load, an agent's percentage / 100, or its active connections); kind
  WEIGHTS: the leader's weights for one service, `parts` datagrams under one epoch.

        +---------------+---------------+---------------+---------------+
        |     kind      |     part      |     parts     |   reserved    |
        +---------------+---------------+---------------+---------------+
        |                backends in the service (32)                   |
        +---------------------------------------------------------------+
        |          service id (8 bytes: BLAKE2b-64 of its name)         |
        +---------------------------------------------------------------+
        |                          epoch (64)                           |
        +---------------------------------------------------------------+
        record: backend address16 | value (f64) | multiplier (f32) | weight (16) | state (8) | 0

  Version 3 gained this type compatibly: a node without it refuses the datagram as an unknown
  type (counted as malformed), and as a control datagram it opens no gap in any stream.

Decoding raises `DecodeError` with a reason; it never raises anything else on any input.
"""
from __future__ import annotations

import ctypes
import enum
import hashlib
import hmac
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from bpf.structs import FlowEvent, FlowKey

MAGIC = b"LBFS"
VERSION = 3
MAX_DATAGRAM = 1400
TAG_BYTES = 16
DIGEST_BYTES = 16

HEADER = struct.Struct("!4sBBHIIIQ")  # magic, version, type, count, key id, node id, incarnation, seq
HEARTBEAT = struct.Struct("!16sIHHQ")  # digest, flow count, flags, reserved, oldest resendable seq
RESEND = struct.Struct("!IIQQ")  # node id, incarnation, first seq, last seq (inclusive)
RESYNC_REQUEST = struct.Struct("!II")  # request id, target node (0: every peer)
CHUNK_PREAMBLE = struct.Struct("!IIIHH")  # target node, request id, chunk index, flags, reserved
LOAD_PREAMBLE = struct.Struct("!BBBBI8sQ")  # kind, part, parts, reserved, backends in the service, service id, epoch
LOAD_RECORD = struct.Struct("!16sdfHBB")  # backend address16, value, multiplier, weight, state, reserved
MAX_LOAD_WEIGHT = 1000  # cluster.weights.MAX_WEIGHT
# Readings and multipliers beyond this are refused (healthcheck.loadprobe.MAX_LOAD_VALUE): the
# leader sums up to MAX_NODES of them, and a sum of values near 1e308 overflows.
MAX_LOAD_VALUE = 1e9



def _span(struct_type: type[ctypes.Structure], name: str) -> tuple[int, int]:
    """(offset, end) of one field of a ctypes mirror."""
    f = getattr(struct_type, name)
    return int(f.offset), int(f.offset + f.size)


# A flow record is laid out like the head of the kernel's `struct flow_event` (its mirror in
# bpf/structs.py), so flow sync cuts records straight out of ring-buffer events: the flow key's
# addresses, ports and protocol (its pad is not sent), the op and two zero bytes in the pad's
# place, then the event's backend address. Every offset here is the mirror's (v3: 37, 40, 56).
FLOW_KEY_BYTES = ctypes.sizeof(FlowKey)  # 40: src[16] dst[16] sport dport proto pad[3]
KEY_WIRE_BYTES = _span(FlowKey, "pad")[0]  # 37: the key as sent; the op follows
OP_OFFSET = KEY_WIRE_BYTES
KEY_PAD = bytes(FLOW_KEY_BYTES - KEY_WIRE_BYTES)
KEY_DST = _span(FlowKey, "dst")  # (16, 32): the VIP
KEY_DPORT_PROTO = (_span(FlowKey, "dport")[0], _span(FlowKey, "proto")[1])  # (34, 37): port, protocol
BACKEND_ADDR_OFFSET, FLOW_RECORD_BYTES = _span(FlowEvent, "backend_addr")  # 40, 56
BACKEND_ADDR_BYTES = FLOW_RECORD_BYTES - BACKEND_ADDR_OFFSET  # 16
EVENT_KIND_OFFSET = _span(FlowEvent, "kind")[0]  # 72
EVENT_KEY = _span(FlowEvent, "key")  # (0, 40): tests/test_bpf_layout.py checks the event starts with it

BODY_BYTES = MAX_DATAGRAM - HEADER.size - TAG_BYTES
MAX_FLOWS = BODY_BYTES // FLOW_RECORD_BYTES  # 24
MAX_CHUNK_FLOWS = (BODY_BYTES - CHUNK_PREAMBLE.size) // FLOW_RECORD_BYTES  # 23
MAX_RESENDS = BODY_BYTES // RESEND.size
MAX_LOAD_RECORDS = (BODY_BYTES - LOAD_PREAMBLE.size) // LOAD_RECORD.size  # 41

HEARTBEAT_F_READY = 0x1
CHUNK_F_LAST = 0x1


class MsgType(enum.IntEnum):
    FLOWS = 1
    HEARTBEAT = 2
    RESEND = 3
    RESYNC_REQUEST = 4
    RESYNC_CHUNK = 5
    LOAD = 6


SEQUENCED = frozenset({MsgType.FLOWS, MsgType.HEARTBEAT})  # numbered in the stream, sent to every peer


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
        self.reason = reason  # "short", "magic", "version", "key", "forged", "type", "length", "record"
        self.detail = detail


class EncodeError(GossipError):
    """A message that cannot be put on the wire (too many records, bad field)."""


_KEY_ID_CONTEXT = b"lbnode sync key id\0"


def key_id(secret: bytes) -> int:
    """The 32-bit id of a key, as the header carries it: the first 4 bytes of
    SHA-256("lbnode sync key id" NUL key)."""
    return int.from_bytes(hashlib.sha256(_KEY_ID_CONTEXT + secret).digest()[:4], "big")


@dataclass(frozen=True, slots=True)
class Keyring:
    """The key this node signs with (`current`) and, during a rotation, a second one it also
    accepts (`next`). Equal when the key bytes are; its repr shows key ids, never keys."""

    current: bytes = field(repr=False)
    next: bytes | None = field(default=None, repr=False)
    current_id: int = field(init=False, compare=False)
    next_id: int | None = field(init=False, compare=False)

    def __post_init__(self) -> None:
        if not self.current:
            raise ValueError("a keyring needs a current key")
        object.__setattr__(self, "current_id", key_id(self.current))
        object.__setattr__(self, "next_id", None if self.next is None else key_id(self.next))
        if self.next is not None and self.next_id == self.current_id:
            raise ValueError("the current and the next key are the same key" if self.next == self.current
                             else "the current and the next key have the same key id")

    def secret(self, kid: int) -> bytes | None:
        """The key with this id, if we hold it."""
        if kid == self.current_id:
            return self.current
        return self.next if kid == self.next_id and self.next is not None else None

    def ids(self) -> str:
        """For logs and status: "current 1a2b3c4d, next 5e6f7a8b"."""
        return f"current {self.current_id:08x}" + ("" if self.next_id is None else f", next {self.next_id:08x}")

    def __repr__(self) -> str:
        return f"Keyring({self.ids()})"


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
        if len(self.key) != FLOW_KEY_BYTES or len(self.backend_addr) != BACKEND_ADDR_BYTES:
            raise EncodeError("flow record needs a 40-byte key and 16-byte address, got "
                              f"{len(self.key)}/{len(self.backend_addr)}")

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
    oldest_seq: int = 0  # the oldest stream number the sender can resend (0: none)


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
    target: int = 0  # 0: every peer that hears it; else only that node answers


@dataclass(frozen=True, slots=True)
class ResyncChunk:
    target: int
    request_id: int
    index: int
    last: bool
    records: tuple[FlowRecord, ...]


class LoadKind(enum.IntEnum):
    OBSERVE = 1  # one node's probe readings
    WEIGHTS = 2  # the leader's weights


class LoadState(enum.IntEnum):
    """What a load source said of a backend besides its number (agent words, healthcheck/agent.py)."""

    NONE = 0  # no report: the source is dead or silent
    OK = 1
    DRAIN = 2  # agent `drain` or `0%`: no new flows, pinned ones go on
    DOWN = 3  # agent `down`, `stopped`, `fail`: like a failing check
    MAINT = 4  # agent `maint`: disabled


@dataclass(frozen=True, slots=True)
class LoadRecord:
    backend_addr: bytes  # 16 bytes (IPv4-mapped for IPv4)
    value: float  # finite
    state: LoadState = LoadState.OK
    multiplier: float = 1.0  # WEIGHTS: the controller's multiplier on the configured weight
    weight: int = 0  # WEIGHTS: the weight to hash with, 0..MAX_LOAD_WEIGHT


@dataclass(frozen=True, slots=True)
class Load:
    kind: LoadKind
    service_id: bytes  # 8 bytes
    epoch: int
    total: int  # backends in the service (all parts together)
    records: tuple[LoadRecord, ...]
    part: int = 0
    parts: int = 1


Body = Flows | Heartbeat | Resend | ResyncRequest | ResyncChunk | Load


@dataclass(frozen=True, slots=True)
class Message:
    header: Header
    body: Body


def flow_wire(key: bytes, backend_addr: bytes, op: int) -> bytes:
    """The 56-byte record: key[0:37] (addresses, ports, proto), op, two zero bytes, backend address."""
    return key[:KEY_WIRE_BYTES] + bytes((op, 0, 0)) + backend_addr


def flow_wire_from_event(event: bytes, op: int) -> bytes:
    """The record straight from a raw `struct flow_event` (key at 0, backend_addr at 40)."""
    return event[:KEY_WIRE_BYTES] + bytes((op, 0, 0)) + event[BACKEND_ADDR_OFFSET:FLOW_RECORD_BYTES]


def tag(key: bytes, data: bytes) -> bytes:
    return hmac.digest(key, data, hashlib.sha256)[:TAG_BYTES]


def encode(keys: Keyring, header: Header, body_bytes: bytes) -> bytes:
    """Seal `body_bytes` (already-encoded records) under `header`, signed with the current key."""
    data = HEADER.pack(MAGIC, VERSION, header.type, header.count, keys.current_id, header.node_id,
                       header.incarnation, header.seq) + body_bytes
    if len(data) + TAG_BYTES > MAX_DATAGRAM:
        raise EncodeError(f"datagram of {len(data) + TAG_BYTES} bytes exceeds {MAX_DATAGRAM}")
    return data + tag(keys.current, data)


def _header(msg_type: MsgType, node_id: int, incarnation: int, seq: int, count: int) -> Header:
    if not (0 <= node_id < 2**32 and 0 <= incarnation < 2**32 and 0 <= seq < 2**64 and 0 <= count < 2**16):
        raise EncodeError(f"header field out of range: node {node_id} inc {incarnation} seq {seq} count {count}")
    return Header(msg_type, node_id, incarnation, seq, count)


def encode_flows(keys: Keyring, node_id: int, incarnation: int, seq: int, records: Sequence[bytes]) -> bytes:
    """A FLOWS datagram of up to MAX_FLOWS already-wired 56-byte records (see `flow_wire`)."""
    if len(records) > MAX_FLOWS:
        raise EncodeError(f"{len(records)} flow records exceed {MAX_FLOWS}")
    return encode(keys, _header(MsgType.FLOWS, node_id, incarnation, seq, len(records)), b"".join(records))


def _count(packed: bytes, limit: int) -> int:
    n, rest = divmod(len(packed), FLOW_RECORD_BYTES)
    if rest or n > limit:
        raise EncodeError(f"{len(packed)} bytes of packed flow records: not whole records, or more than {limit}")
    return n


def encode_flows_packed(keys: Keyring, node_id: int, incarnation: int, seq: int, packed: bytes) -> bytes:
    """`encode_flows` for records already concatenated (n x 56 bytes, n <= MAX_FLOWS)."""
    return encode(keys, _header(MsgType.FLOWS, node_id, incarnation, seq, _count(packed, MAX_FLOWS)), packed)


def encode_heartbeat(keys: Keyring, node_id: int, incarnation: int, seq: int, hb: Heartbeat) -> bytes:
    if len(hb.digest) != DIGEST_BYTES:
        raise EncodeError(f"digest must be {DIGEST_BYTES} bytes, got {len(hb.digest)}")
    if not 0 <= hb.oldest_seq < 2**64:
        raise EncodeError(f"oldest_seq out of range: {hb.oldest_seq}")
    body = HEARTBEAT.pack(hb.digest, min(hb.flow_count, 2**32 - 1), HEARTBEAT_F_READY if hb.ready else 0, 0,
                          hb.oldest_seq)
    return encode(keys, _header(MsgType.HEARTBEAT, node_id, incarnation, seq, 1), body)


def encode_resend(keys: Keyring, node_id: int, incarnation: int, seq: int, ranges: Sequence[ResendRange]) -> bytes:
    if len(ranges) > MAX_RESENDS:
        raise EncodeError(f"{len(ranges)} resend ranges exceed {MAX_RESENDS}")
    body = b"".join(RESEND.pack(r.node_id, r.incarnation, r.first, r.last) for r in ranges)
    return encode(keys, _header(MsgType.RESEND, node_id, incarnation, seq, len(ranges)), body)


def encode_resync_request(keys: Keyring, node_id: int, incarnation: int, seq: int, request_id: int,
                          target: int = 0) -> bytes:
    if not (0 <= request_id < 2**32 and 0 <= target < 2**32):
        raise EncodeError(f"resync request field out of range: id {request_id} target {target}")
    return encode(keys, _header(MsgType.RESYNC_REQUEST, node_id, incarnation, seq, 0),
                  RESYNC_REQUEST.pack(request_id, target))


def encode_resync_chunk(keys: Keyring, node_id: int, incarnation: int, seq: int, target: int, request_id: int,
                        index: int, last: bool, records: Sequence[bytes]) -> bytes:
    if len(records) > MAX_CHUNK_FLOWS:
        raise EncodeError(f"{len(records)} flow records exceed {MAX_CHUNK_FLOWS}")
    return encode_resync_chunk_packed(keys, node_id, incarnation, seq, target, request_id, index, last,
                                      b"".join(records))


def encode_resync_chunk_packed(keys: Keyring, node_id: int, incarnation: int, seq: int, target: int, request_id: int,
                               index: int, last: bool, packed: bytes) -> bytes:
    """`encode_resync_chunk` for records already concatenated (n x 56 bytes, n <= MAX_CHUNK_FLOWS)."""
    n = _count(packed, MAX_CHUNK_FLOWS)
    if not (0 <= target < 2**32 and 0 <= request_id < 2**32 and 0 <= index < 2**32):
        raise EncodeError(f"resync chunk field out of range: target {target} id {request_id} index {index}")
    pre = CHUNK_PREAMBLE.pack(target, request_id, index, CHUNK_F_LAST if last else 0, 0)
    return encode(keys, _header(MsgType.RESYNC_CHUNK, node_id, incarnation, seq, n), pre + packed)


def encode_load(keys: Keyring, node_id: int, incarnation: int, seq: int, load: Load) -> bytes:
    """A LOAD datagram (a control number: `seq`) of up to MAX_LOAD_RECORDS records."""
    if len(load.records) > MAX_LOAD_RECORDS:
        raise EncodeError(f"{len(load.records)} load records exceed {MAX_LOAD_RECORDS}")
    if len(load.service_id) != 8 or not (0 <= load.part < load.parts <= 255 and 0 <= load.total < 2**32
                                         and 0 <= load.epoch < 2**64):
        raise EncodeError(f"load preamble out of range: {load.kind!r} part {load.part}/{load.parts} "
                          f"total {load.total} epoch {load.epoch}")
    body = [LOAD_PREAMBLE.pack(load.kind, load.part, load.parts, 0, load.total, load.service_id, load.epoch)]
    for r in load.records:
        if len(r.backend_addr) != 16 or not _load_values_ok(r.value, r.multiplier, r.weight):
            raise EncodeError(f"bad load record {r!r}")
        body.append(LOAD_RECORD.pack(r.backend_addr, r.value, r.multiplier, r.weight, r.state, 0))
    return encode(keys, _header(MsgType.LOAD, node_id, incarnation, seq, len(load.records)), b"".join(body))


def _load_values_ok(value: float, multiplier: float, weight: int) -> bool:
    # A value may be negative: a node's active-connection count is the flows it pinned minus
    # those it saw close, and a flow pinned on one node may close on another (only the sum is >= 0).
    return (math.isfinite(value) and abs(value) <= MAX_LOAD_VALUE and math.isfinite(multiplier)
            and 0 <= multiplier <= MAX_LOAD_VALUE and 0 <= weight <= MAX_LOAD_WEIGHT)


def load(body: memoryview | bytes) -> Load:
    """A LOAD's body (as `decode_header` returned it); a bad kind, part or record raises."""
    kind, part, parts, reserved, total, service_id, epoch = LOAD_PREAMBLE.unpack_from(body)
    if kind not in (LoadKind.OBSERVE, LoadKind.WEIGHTS) or not part < parts or reserved:
        raise DecodeError("record", f"load preamble: kind {kind} part {part}/{parts}")
    records = []
    for addr, value, multiplier, weight, state, pad in LOAD_RECORD.iter_unpack(body[LOAD_PREAMBLE.size:]):
        if pad or state > max(LoadState) or not _load_values_ok(value, multiplier, weight):
            raise DecodeError("record", f"load record: value {value} multiplier {multiplier} weight {weight} "
                                        f"state {state}")
        records.append(LoadRecord(bytes(addr), value, LoadState(state), multiplier, weight))
    return Load(LoadKind(kind), bytes(service_id), epoch, total, tuple(records), part, parts)


# ---- decoding ---------------------------------------------------------------------------------

_FIXED = {
    MsgType.FLOWS: (0, FLOW_RECORD_BYTES),
    MsgType.HEARTBEAT: (0, HEARTBEAT.size),
    MsgType.RESEND: (0, RESEND.size),
    MsgType.RESYNC_REQUEST: (RESYNC_REQUEST.size, 0),
    MsgType.RESYNC_CHUNK: (CHUNK_PREAMBLE.size, FLOW_RECORD_BYTES),
    MsgType.LOAD: (LOAD_PREAMBLE.size, LOAD_RECORD.size),
}


def decode_header(keys: Keyring, data: bytes) -> tuple[Header, memoryview]:
    """Check size, magic, version, key id, tag, type and length; return the header and the body's bytes."""
    if len(data) < HEADER.size + TAG_BYTES:
        raise DecodeError("short", f"{len(data)} bytes")
    if len(data) > MAX_DATAGRAM:
        raise DecodeError("length", f"{len(data)} bytes exceeds {MAX_DATAGRAM}")
    magic, version, raw_type, count, kid, node_id, incarnation, seq = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise DecodeError("magic", repr(magic))
    if version != VERSION:
        raise DecodeError("version", f"version {version}, we speak {VERSION}")
    secret = keys.secret(kid)
    if secret is None:
        raise DecodeError("key", f"node {node_id:#x} signs with key id {kid:08x}, we hold {keys.ids()}")
    end = len(data) - TAG_BYTES
    if not hmac.compare_digest(tag(secret, data[:end]), data[end:]):
        raise DecodeError("forged", f"bad tag from node {node_id:#x} (key id {kid:08x})")
    try:
        msg_type = MsgType(raw_type)
    except ValueError:
        raise DecodeError("type", f"unknown message type {raw_type}") from None
    pre, rec = _FIXED[msg_type]
    if end - HEADER.size != pre + count * rec or (msg_type is MsgType.HEARTBEAT and count != 1):
        raise DecodeError("length", f"{msg_type.name} with {count} records in {end - HEADER.size} body bytes")
    return Header(msg_type, node_id, incarnation, seq, count), memoryview(data)[HEADER.size:end]


def decode(keys: Keyring, data: bytes) -> Message:
    """A complete, typed message (records as dataclasses). The I/O path uses `decode_header` plus
    `flow_records` to skip building objects per flow."""
    header, body = decode_header(keys, data)
    t = header.type
    if t is MsgType.FLOWS:
        return Message(header, Flows(tuple(_flow_record(r) for r in flow_records(body))))
    if t is MsgType.HEARTBEAT:
        return Message(header, heartbeat(body))
    if t is MsgType.RESEND:
        return Message(header, Resend(resend_ranges(body)))
    if t is MsgType.RESYNC_REQUEST:
        request_id, target = RESYNC_REQUEST.unpack(body)
        return Message(header, ResyncRequest(request_id, target))
    if t is MsgType.LOAD:
        return Message(header, load(body))
    target, request_id, index, flags, _ = CHUNK_PREAMBLE.unpack_from(body)
    records = tuple(_flow_record(r) for r in flow_records(body[CHUNK_PREAMBLE.size:]))
    return Message(header, ResyncChunk(target, request_id, index, bool(flags & CHUNK_F_LAST), records))


def heartbeat(body: memoryview | bytes) -> Heartbeat:
    """A HEARTBEAT's body (as `decode_header` returned it)."""
    digest, flow_count, flags, _, oldest_seq = HEARTBEAT.unpack(body)
    return Heartbeat(bytes(digest), flow_count, bool(flags & HEARTBEAT_F_READY), oldest_seq)


def resend_ranges(body: memoryview | bytes) -> tuple[ResendRange, ...]:
    """A RESEND's ranges; an inverted range raises."""
    ranges = []
    for node_id, incarnation, first, last in RESEND.iter_unpack(body):
        if first > last:
            raise DecodeError("record", f"resend range {first}..{last}")
        ranges.append(ResendRange(node_id, incarnation, first, last))
    return tuple(ranges)


def check_flow_records(body: memoryview | bytes) -> bytes:
    """The records' bytes after checking every op byte (1..3, then two zero bytes); raises on the
    first bad record, so a datagram is installed whole or not at all."""
    raw = bytes(body)
    for off in range(OP_OFFSET, len(raw), FLOW_RECORD_BYTES):
        if not 1 <= raw[off] <= 3 or raw[off + 1] or raw[off + 2]:
            raise DecodeError("record", f"flow record {off // FLOW_RECORD_BYTES}: op {raw[off]}")
    return raw


def chunk_preamble(body: memoryview) -> tuple[int, int, int, bool]:
    target, request_id, index, flags, _ = CHUNK_PREAMBLE.unpack_from(body)
    return target, request_id, index, bool(flags & CHUNK_F_LAST)


def flow_records(body: memoryview) -> list[tuple[bytes, bytes, int]]:
    """(40-byte flow key with zero pad, 16-byte backend address, op) per record; bad ops raise."""
    out = []
    raw = bytes(body)
    for off in range(0, len(raw), FLOW_RECORD_BYTES):
        op = raw[off + OP_OFFSET]
        if not 1 <= op <= 3 or raw[off + OP_OFFSET + 1] or raw[off + OP_OFFSET + 2]:
            raise DecodeError("record", f"flow record {off // FLOW_RECORD_BYTES}: op {op}")
        key, addr = raw[off:off + KEY_WIRE_BYTES] + KEY_PAD, raw[off + BACKEND_ADDR_OFFSET:off + FLOW_RECORD_BYTES]
        out.append((key, addr, op))
    return out


def _flow_record(r: tuple[bytes, bytes, int]) -> FlowRecord:
    return FlowRecord(r[0], r[1], FlowOp(r[2]))
