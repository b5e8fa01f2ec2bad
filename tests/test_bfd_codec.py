"""BFD control packet codec (RFC 5880 §4.1, §6.8.6): golden vectors, scapy cross-check, malformed packets."""
from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.contrib.bfd import BFD

from bgp.bfd.codec import ControlPacket, Diag, DropReason, Malformed, State, decode, encode
from bgp.errors import BgpError

pytestmark = pytest.mark.unit

UP = ControlPacket(State.UP, 0x11223344, 0x55667788, 100_000, 100_000, 3)
DOWN_POLL = ControlPacket(State.DOWN, 1, 0, 1_000_000, 300_000, 5, diag=Diag.CONTROL_DETECTION_TIME_EXPIRED,
                          poll=True)
INIT_FINAL_C = ControlPacket(State.INIT, 0xFFFFFFFF, 7, 0, 0, 255, diag=Diag.ADMINISTRATIVELY_DOWN, final=True,
                             control_plane_independent=True, required_min_echo_rx_us=50_000)
ADMIN_DOWN = ControlPacket(State.ADMIN_DOWN, 9, 0, 1_000_000, 0, 1, diag=Diag.ADMINISTRATIVELY_DOWN)

GOLDEN = [
    # (packet, bytes): byte 0 = version<<5 | diag, byte 1 = state<<6 | P F C A D M
    (UP, "20c00318" "11223344" "55667788" "000186a0" "000186a0" "00000000"),
    (DOWN_POLL, "21600518" "00000001" "00000000" "000f4240" "000493e0" "00000000"),
    (INIT_FINAL_C, "2798ff18" "ffffffff" "00000007" "00000000" "00000000" "0000c350"),
    (ADMIN_DOWN, "27000118" "00000009" "00000000" "000f4240" "00000000" "00000000"),
]


@pytest.mark.parametrize(("packet", "hexbytes"), GOLDEN)
def test_golden_vectors(packet: ControlPacket, hexbytes: str) -> None:
    assert encode(packet).hex() == hexbytes
    assert decode(bytes.fromhex(hexbytes)) == packet


@pytest.mark.parametrize(("packet", "hexbytes"), GOLDEN)
def test_scapy_reads_the_same_fields(packet: ControlPacket, hexbytes: str) -> None:
    s = BFD(encode(packet))
    assert (s.version, s.diag, s.sta, s.detect_mult, s.len) == (1, packet.diag, packet.state, packet.detect_mult, 24)
    assert (s.my_discriminator, s.your_discriminator) == (packet.my_discriminator, packet.your_discriminator)
    assert (s.min_tx_interval, s.min_rx_interval, s.echo_rx_interval) == (
        packet.desired_min_tx_us, packet.required_min_rx_us, packet.required_min_echo_rx_us)
    assert (bool(s.flags.P), bool(s.flags.F), bool(s.flags.C)) == (
        packet.poll, packet.final, packet.control_plane_independent)


def test_scapy_built_packet_decodes() -> None:
    raw = bytes(BFD(sta=3, flags="P", detect_mult=3, my_discriminator=5, your_discriminator=6,
                    min_tx_interval=100_000, min_rx_interval=200_000, echo_rx_interval=0))
    assert decode(raw) == ControlPacket(State.UP, 5, 6, 100_000, 200_000, 3, poll=True)


def test_trailing_bytes_beyond_length_are_ignored() -> None:
    assert decode(encode(UP) + b"\0" * 8) == UP


def _mutate(data: bytes, offset: int, value: int) -> bytes:
    b = bytearray(data)
    b[offset] = value
    return bytes(b)


def _field(data: bytes, offset: int, value: int) -> bytes:
    return data[:offset] + struct.pack("!I", value) + data[offset + 4:]


GOOD = encode(UP)
MALFORMED = [
    ("empty", b"", DropReason.SHORT),
    ("23 bytes", GOOD[:23], DropReason.SHORT),
    ("version 0", _mutate(GOOD, 0, 0x00), DropReason.VERSION),
    ("version 2", _mutate(GOOD, 0, 0x40), DropReason.VERSION),
    ("version 7", _mutate(GOOD, 0, 0xE0), DropReason.VERSION),
    ("Length 23", _mutate(GOOD, 3, 23), DropReason.LENGTH),
    ("Length 0", _mutate(GOOD, 3, 0), DropReason.LENGTH),
    ("Length beyond datagram", _mutate(GOOD, 3, 28), DropReason.LENGTH),
    ("A set, Length 24 < 26", _mutate(GOOD, 1, 0xC4), DropReason.LENGTH),
    ("detect mult 0", _mutate(GOOD, 2, 0), DropReason.DETECT_MULT_ZERO),
    ("multipoint", _mutate(GOOD, 1, 0xC1), DropReason.MULTIPOINT),
    ("my discriminator 0", _field(GOOD, 4, 0), DropReason.MY_DISCRIMINATOR_ZERO),
    ("your discriminator 0 while Up", _field(GOOD, 8, 0), DropReason.YOUR_DISCRIMINATOR_ZERO),
    ("your discriminator 0 while Init", _mutate(_field(GOOD, 8, 0), 1, 0x80), DropReason.YOUR_DISCRIMINATOR_ZERO),
    ("authentication", _mutate(_mutate(GOOD, 1, 0xC4), 3, 26) + b"\x01\x02", DropReason.AUTHENTICATION),
    ("poll and final", _mutate(GOOD, 1, 0xF0), DropReason.POLL_AND_FINAL),
]


@pytest.mark.parametrize(("what", "data", "reason"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_packets_raise_with_reason(what: str, data: bytes, reason: DropReason) -> None:
    with pytest.raises(Malformed) as info:
        decode(data)
    assert info.value.reason is reason


def test_your_discriminator_zero_is_fine_from_down_and_admin_down() -> None:
    assert decode(encode(DOWN_POLL)).your_discriminator == 0
    assert decode(encode(ADMIN_DOWN)).state is State.ADMIN_DOWN


def test_encode_refuses_what_it_cannot_send() -> None:
    with pytest.raises(BgpError):
        encode(ControlPacket(State.UP, 1, 1, 1, 1, 3, authentication=True))
    with pytest.raises(BgpError):
        encode(ControlPacket(State.UP, 1, 1, 1, 1, 0))


@settings(max_examples=2000, derandomize=True)
@given(st.binary(max_size=40))
def test_any_bytes_decode_or_raise_malformed(data: bytes) -> None:
    try:
        p = decode(data)
    except Malformed:
        return
    assert decode(encode(p)) == p


PACKETS = st.builds(
    ControlPacket, state=st.sampled_from(State), my_discriminator=st.integers(1, 2**32 - 1),
    your_discriminator=st.integers(1, 2**32 - 1), desired_min_tx_us=st.integers(0, 2**32 - 1),
    required_min_rx_us=st.integers(0, 2**32 - 1), detect_mult=st.integers(1, 255), diag=st.integers(0, 31),
    poll=st.booleans(), control_plane_independent=st.booleans(), demand=st.booleans(),
    required_min_echo_rx_us=st.integers(0, 2**32 - 1))


@settings(max_examples=500, derandomize=True)
@given(PACKETS)
def test_round_trip(p: ControlPacket) -> None:
    assert decode(encode(p)) == p
