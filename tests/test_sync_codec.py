"""Flow-sync datagram codec: golden bytes, round trips, forgery and malformed input, fuzz."""
from __future__ import annotations

import hashlib
import hmac

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bpf.structs import FlowKey, addr16
from cluster.sync import codec as g

pytestmark = pytest.mark.unit

SECRET = b"k" * 32
KEY = g.Keyring(SECRET)
KEY_ID = "8d83760b"  # SHA-256("lbnode sync key id" NUL SECRET)[:4]
NEXT = b"n" * 32  # the next key of a rotation (its id: f565c6ed)
FLOW_KEY = bytes(FlowKey.make("192.0.2.7", 40000, "10.0.0.100", 80, 6))
BACKEND = addr16("10.0.0.11")

# FLOWS from node 10.0.0.5 (0x0a000005), incarnation 1700000000, seq 7, one NEW record.
GOLDEN_FLOWS = bytes.fromhex(
    "4c424653" "03" "01" "0001" "8d83760b" "0a000005" "6553f100" "0000000000000007"  # header (version 3, key id)
    "00000000000000000000ffffc0000207"  # src 192.0.2.7 (v4-mapped)
    "00000000000000000000ffff0a000064"  # dst 10.0.0.100
    "9c40" "0050" "06"  # sport 40000, dport 80 (network order), proto TCP
    "01" "0000"  # op NEW, zero
    "00000000000000000000ffff0a00000b"  # backend 10.0.0.11
)
GOLDEN_HEARTBEAT = bytes.fromhex(
    "4c424653" "03" "02" "0001" "8d83760b" "00000001" "00000002" "0000000000000003"
    "000102030405060708090a0b0c0d0e0f" "00000005" "0001" "0000"
    "0000000000000002"  # oldest resendable stream number
)
# RESYNC_REQUEST for one peer (10.0.0.6): request id 42, target 0x0a000006, control number 9.
GOLDEN_RESYNC_REQUEST = bytes.fromhex(
    "4c424653" "03" "04" "0000" "8d83760b" "0a000005" "6553f100" "0000000000000009" "0000002a" "0a000006"
)

# RESYNC_CHUNK to 10.0.0.6, request 42, chunk index 3 flagged LAST (the end of a streamed
# answer), control number 12, one REFRESH record.
GOLDEN_RESYNC_CHUNK = bytes.fromhex(
    "4c424653" "03" "05" "0001" "8d83760b" "0a000005" "6553f100" "000000000000000c"
    "0a000006" "0000002a" "00000003" "0001" "0000"  # target, request id, index, flags LAST, reserved
    "00000000000000000000ffffc0000207" "00000000000000000000ffff0a000064" "9c40" "0050" "06"
    "02" "0000" "00000000000000000000ffff0a00000b"
)


def sealed(body: bytes, key: bytes = SECRET) -> bytes:
    return body + hmac.new(key, body, hashlib.sha256).digest()[:16]


def test_flows_golden_bytes() -> None:
    rec = g.flow_wire(FLOW_KEY, BACKEND, g.FlowOp.NEW)
    assert g.encode_flows(KEY, 0x0A000005, 1700000000, 7, [rec]) == sealed(GOLDEN_FLOWS)
    msg = g.decode(KEY, sealed(GOLDEN_FLOWS))
    assert msg.header == g.Header(g.MsgType.FLOWS, 0x0A000005, 1700000000, 7, 1)
    assert msg.body == g.Flows((g.FlowRecord(FLOW_KEY, BACKEND, g.FlowOp.NEW),))


def test_heartbeat_golden_bytes() -> None:
    hb = g.Heartbeat(bytes(range(16)), 5, True, 2)
    assert g.encode_heartbeat(KEY, 1, 2, 3, hb) == sealed(GOLDEN_HEARTBEAT)
    assert g.decode(KEY, sealed(GOLDEN_HEARTBEAT)).body == hb


def test_targeted_resync_request_golden_bytes() -> None:
    assert g.encode_resync_request(KEY, 0x0A000005, 1700000000, 9, 42, 0x0A000006) == sealed(GOLDEN_RESYNC_REQUEST)
    assert g.decode(KEY, sealed(GOLDEN_RESYNC_REQUEST)).body == g.ResyncRequest(42, 0x0A000006)


def test_only_data_stream_types_are_sequenced() -> None:
    assert g.SEQUENCED == {g.MsgType.FLOWS, g.MsgType.HEARTBEAT}


def test_flow_record_from_raw_event_matches() -> None:
    event = FLOW_KEY + BACKEND + bytes(24)
    assert g.flow_wire_from_event(event, g.FlowOp.CLOSE) == g.flow_wire(FLOW_KEY, BACKEND, g.FlowOp.CLOSE)


def test_full_datagrams_fit_the_mtu() -> None:
    rec = g.flow_wire(FLOW_KEY, BACKEND, g.FlowOp.NEW)
    assert len(g.encode_flows(KEY, 1, 1, 1, [rec] * g.MAX_FLOWS)) <= g.MAX_DATAGRAM
    assert len(g.encode_resync_chunk(KEY, 1, 1, 1, 2, 3, 4, True, [rec] * g.MAX_CHUNK_FLOWS)) <= g.MAX_DATAGRAM
    ranges = [g.ResendRange(1, 2, 3, 4)] * g.MAX_RESENDS
    assert len(g.encode_resend(KEY, 1, 1, 1, ranges)) <= g.MAX_DATAGRAM
    with pytest.raises(g.EncodeError):
        g.encode_flows(KEY, 1, 1, 1, [rec] * (g.MAX_FLOWS + 1))


@pytest.mark.parametrize("body", [
    g.Resend((g.ResendRange(7, 8, 100, 120), g.ResendRange(9, 1, 5, 5))),
    g.ResyncRequest(42),
    g.ResyncRequest(42, 0x0A000006),
    g.ResyncChunk(7, 42, 3, True, (g.FlowRecord(FLOW_KEY, BACKEND, g.FlowOp.REFRESH),)),
    g.ResyncChunk(7, 42, 0, False, ()),
    g.Heartbeat(b"\xff" * 16, 0, False),
    g.Heartbeat(b"\x01" * 16, 7, True, 2**63),
])
def test_round_trip(body: g.Body) -> None:
    if isinstance(body, g.Resend):
        data = g.encode_resend(KEY, 5, 6, 99, body.ranges)
    elif isinstance(body, g.ResyncRequest):
        data = g.encode_resync_request(KEY, 5, 6, 99, body.request_id, body.target)
    elif isinstance(body, g.ResyncChunk):
        data = g.encode_resync_chunk(KEY, 5, 6, 99, body.target, body.request_id, body.index, body.last,
                                     [r.wire() for r in body.records])
    else:
        assert isinstance(body, g.Heartbeat)
        data = g.encode_heartbeat(KEY, 5, 6, 99, body)
    msg = g.decode(KEY, data)
    assert msg.body == body
    assert (msg.header.node_id, msg.header.incarnation, msg.header.seq) == (5, 6, 99)


def _flows_datagram() -> bytes:
    return g.encode_flows(KEY, 1, 1, 1, [g.flow_wire(FLOW_KEY, BACKEND, g.FlowOp.NEW)] * 3)


@pytest.mark.parametrize("mutate, reason", [
    (lambda d: d[:20], "short"),
    (lambda d: d + bytes(2000), "length"),
    (lambda d: b"XBFS" + d[4:], "magic"),
    (lambda d: d[:4] + b"\x01" + d[5:], "version"),  # version 1 (one number space) is not spoken
    (lambda d: d[:4] + b"\x02" + d[5:], "version"),  # version 2 (no key id) is not spoken
    (lambda d: d[:4] + b"\x04" + d[5:], "version"),
    (lambda d: d[:8] + bytes([d[8] ^ 1]) + d[9:], "key"),  # a key id we do not hold
    (lambda d: d[:-1] + bytes([d[-1] ^ 1]), "forged"),  # tag bit flip
    (lambda d: d[:30] + bytes([d[30] ^ 1]) + d[31:], "forged"),  # body bit flip
    (lambda d: d[:8] + g.key_id(b"x" * 32).to_bytes(4, "big") + d[12:], "key"),  # another cluster's key
    (lambda d: sealed(bytes(d[:-16]), b"x" * 32), "forged"),  # our key id, another key's tag
    (lambda d: sealed(d[:5] + b"\x09" + d[6:-16]), "type"),
    (lambda d: sealed(d[:6] + b"\x00\x04" + d[8:-16]), "length"),  # count says 4, body has 3
    (lambda d: sealed(d[:-16 - 56 + 37] + b"\x07" + d[-16 - 56 + 38:-16]), "record"),  # op 7
])
def test_bad_datagrams_raise_typed_errors(mutate, reason) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(g.DecodeError) as err:
        g.decode(KEY, mutate(_flows_datagram()))
    assert err.value.reason == reason


@settings(max_examples=300, derandomize=True)
@given(st.binary(max_size=1500))
def test_fuzz_random_bytes_only_raise_decode_error(data: bytes) -> None:
    with pytest.raises(g.DecodeError):
        g.decode(KEY, data)


@settings(max_examples=300, derandomize=True)
@given(st.integers(1, 6), st.integers(0, 60), st.binary(max_size=1400 - 40))
def test_fuzz_authentic_garbage_bodies_never_crash(msg_type: int, count: int, body: bytes) -> None:
    """Even a peer holding the key cannot crash a receiver with a malformed body."""
    data = sealed(g.HEADER.pack(g.MAGIC, g.VERSION, msg_type, count, KEY.current_id, 1, 1, 1) + body)
    try:
        g.decode(KEY, data)
    except g.DecodeError:
        pass


def test_resync_chunk_golden_bytes_and_the_packed_encoders_agree() -> None:
    rec = g.flow_wire(FLOW_KEY, BACKEND, g.FlowOp.REFRESH)
    args = (KEY, 0x0A000005, 1700000000, 12, 0x0A000006, 42, 3, True)
    assert g.encode_resync_chunk(*args, [rec]) == g.encode_resync_chunk_packed(*args, rec) == \
        sealed(GOLDEN_RESYNC_CHUNK)
    body = g.decode(KEY, sealed(GOLDEN_RESYNC_CHUNK)).body
    assert body == g.ResyncChunk(0x0A000006, 42, 3, True, (g.FlowRecord(FLOW_KEY, BACKEND, g.FlowOp.REFRESH),))
    assert g.encode_flows_packed(KEY, 0x0A000005, 1700000000, 7, g.flow_wire(FLOW_KEY, BACKEND, g.FlowOp.NEW)) \
        == sealed(GOLDEN_FLOWS)
    for bad in (rec[:-1], rec * (g.MAX_CHUNK_FLOWS + 1)):
        with pytest.raises(g.EncodeError):
            g.encode_resync_chunk_packed(*args, bad)


def test_key_id_is_a_hash_of_the_key_and_the_header_carries_the_signing_one() -> None:
    assert f"{g.key_id(SECRET):08x}" == KEY_ID == GOLDEN_FLOWS[8:12].hex()
    assert g.HEADER.size == 28 and GOLDEN_FLOWS[4] == g.VERSION == 3


def test_a_receiver_accepts_current_and_next_keys_and_a_sender_signs_with_its_current() -> None:
    """A rotation: old = SECRET, new = NEXT. Nodes that added the new key as next accept what a
    node already switched to it signs, and the other way round, with no datagram refused."""
    rec = g.flow_wire(FLOW_KEY, BACKEND, g.FlowOp.NEW)
    added = g.Keyring(SECRET, NEXT)  # step 1: new key added everywhere, still signing with the old
    switched = g.Keyring(NEXT, SECRET)  # step 2: signing with the new, still accepting the old
    done = g.Keyring(NEXT)  # step 3: old key removed
    from_added = g.encode_flows(added, 1, 1, 1, [rec])
    from_switched = g.encode_flows(switched, 2, 1, 1, [rec])
    assert from_added[8:12] == bytes.fromhex(KEY_ID) and from_switched[8:12] == g.key_id(NEXT).to_bytes(4, "big")
    assert from_added == g.encode_flows(KEY, 1, 1, 1, [rec])  # the same bytes as before the rotation began
    for receiver in (KEY, added, switched):
        assert g.decode(receiver, from_added).header.node_id == 1
    for receiver in (added, switched, done):
        assert g.decode(receiver, from_switched).header.node_id == 2
    for receiver, data in ((KEY, from_switched), (done, from_added)):  # a step skipped on one side
        with pytest.raises(g.DecodeError) as err:
            g.decode(receiver, data)
        assert err.value.reason == "key"
    assert "8d83760b" in repr(added) and "f565c6ed" in repr(added) and "k" * 16 not in repr(added)
    assert g.Keyring(SECRET, NEXT) == added != switched
    with pytest.raises(ValueError, match="same key"):
        g.Keyring(SECRET, SECRET)


# LOAD WEIGHTS for service id 0102..08, epoch 5, one part of one, 2 backends in the service (one
# record here), control number 13: backend 10.0.0.11, observed 0.5, multiplier 1.25, weight 250, OK.
GOLDEN_LOAD = bytes.fromhex(
    "4c424653" "03" "06" "0001" "8d83760b" "0a000005" "6553f100" "000000000000000d"
    "02" "00" "01" "00" "00000002" "0102030405060708" "0000000000000005"  # kind, part, parts, 0, total, id, epoch
    "00000000000000000000ffff0a00000b" "3fe0000000000000" "3fa00000" "00fa" "01" "00"
)


def test_load_golden_bytes_round_trip() -> None:
    load = g.Load(g.LoadKind.WEIGHTS, bytes(range(1, 9)), 5, 2,
                  (g.LoadRecord(BACKEND, 0.5, g.LoadState.OK, 1.25, 250),))
    assert g.encode_load(KEY, 0x0A000005, 1700000000, 13, load) == sealed(GOLDEN_LOAD)
    msg = g.decode(KEY, sealed(GOLDEN_LOAD))
    assert msg.header == g.Header(g.MsgType.LOAD, 0x0A000005, 1700000000, 13, 1) and msg.body == load
    assert g.MsgType.LOAD not in g.SEQUENCED  # a control datagram: a loss opens no gap anywhere
    full = g.Load(g.LoadKind.OBSERVE, bytes(8), 1, g.MAX_LOAD_RECORDS,
                  tuple(g.LoadRecord(BACKEND, float(i)) for i in range(g.MAX_LOAD_RECORDS)))
    assert len(g.encode_load(KEY, 1, 1, 1, full)) <= g.MAX_DATAGRAM


@pytest.mark.parametrize(("offset", "value", "what"), [  # header 28 bytes, preamble 24, then the record
    (28, 3, "kind 3"),
    (29, 1, "part 1 of parts 1"),
    (31, 1, "reserved preamble byte"),
    (82, 5, "state 5"),
    (83, 1, "reserved record byte"),
    (80, 0x04, "weight 0x04fa > 1000"),
    (68, 0x7F, "value NaN (exponent all ones)"),
    (76, 0xBF, "negative multiplier"),
    (68, 0x7E, "value ~1e299 > MAX_LOAD_VALUE (the leader sums values)"),
])
def test_bad_load_records_are_refused(offset: int, value: int, what: str) -> None:
    raw = bytearray(GOLDEN_LOAD)
    raw[offset] = value
    if what.startswith("value NaN"):
        raw[offset + 1] = 0xF8
    with pytest.raises(g.DecodeError) as err:
        g.decode(KEY, sealed(bytes(raw)))
    assert err.value.reason == "record", what


def test_bad_loads_are_not_encoded() -> None:
    for load in (g.Load(g.LoadKind.OBSERVE, bytes(7), 1, 1, ()),
                 g.Load(g.LoadKind.OBSERVE, bytes(8), 1, 1, (g.LoadRecord(BACKEND, float("inf")),)),
                 g.Load(g.LoadKind.OBSERVE, bytes(8), 1, 1, (g.LoadRecord(BACKEND, 1e10),)),
                 g.Load(g.LoadKind.WEIGHTS, bytes(8), 1, 1, (g.LoadRecord(BACKEND, 1.0, weight=1001),)),
                 g.Load(g.LoadKind.OBSERVE, bytes(8), 1, 1, (), part=1, parts=1),
                 g.Load(g.LoadKind.OBSERVE, bytes(8), 1, 99, (g.LoadRecord(BACKEND, 0.0),) * 42)):
        with pytest.raises(g.EncodeError):
            g.encode_load(KEY, 1, 1, 1, load)
