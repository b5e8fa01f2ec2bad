"""The XDP program on scapy-built frames via BPF_PROG_TEST_RUN (katran-style tables).

Maps are filled through DataPlane, the same API production uses; one compiled program serves
the module and each test starts from an empty flow table.
"""
from __future__ import annotations

import ipaddress
import os
import random
from collections import Counter
from collections.abc import Iterator
from functools import partial

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.all import ARP, ICMP, IP, TCP, UDP, Ether, IPv6, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop, Raw  # type: ignore[attr-defined]
from scapy.layers.inet6 import ICMPv6EchoRequest, ICMPv6PacketTooBig

from bpf.counters import ActiveTally
from bpf.dataplane import BackendSpec, DataPlane, MapError, ServiceSpec, monotonic_ns
from bpf.flowhash import flow_hash
from bpf.loader import Limits
from bpf.ringbuf import RingReader
from bpf.structs import (
    EVENT_FLOW_CLOSE,
    EVENT_FLOW_NEW,
    FLOW_F_CLOSING,
    FLOW_F_SYNCED,
    IPPROTO_TCP,
    IPPROTO_UDP,
    NEW_PIN_WINDOW_NS,
    Flow,
    FlowEvent,
    FlowKey,
    Stat,
)
from bpf.testrun import XdpAction, run_xdp

pytestmark = pytest.mark.bpf

ip = ipaddress.ip_address
OUR_MAC = "02:00:00:00:00:01"
ROUTER_MAC = "02:00:00:00:00:fe"
VIP4, VIP6, VIP_EMPTY = ip("10.0.0.100"), ip("2001:db8::100"), ip("10.0.0.101")
CLIENT4, CLIENT6 = "192.0.2.7", "2001:db8:c::7"
B1 = BackendSpec(ip("10.0.0.11"), "02:00:00:00:0b:01")
B2 = BackendSpec(ip("10.0.0.12"), "02:00:00:00:0b:02")
B3 = BackendSpec(ip("10.0.0.13"), "02:00:00:00:0b:03")
B6 = BackendSpec(ip("2001:db8::11"), "02:00:00:00:0b:61")
VIP_ADDRESSES = {str(VIP4), str(VIP6), str(VIP_EMPTY)}

BASE_SERVICES = [
    ServiceSpec(VIP4, 80, IPPROTO_TCP, (B1,)),
    ServiceSpec(VIP4, 53, IPPROTO_UDP, (B2,)),
    ServiceSpec(VIP6, 443, IPPROTO_TCP, (B6,)),
    ServiceSpec(VIP_EMPTY, 80, IPPROTO_TCP, (BackendSpec(ip("10.0.0.14"), "02:00:00:00:0b:04", in_hash=False),)),
]


@pytest.fixture(scope="module")
def compiled() -> Iterator[DataPlane]:
    dp = DataPlane()
    dp.set_config(OUR_MAC, refresh_s=1.0)
    try:
        yield dp
    finally:
        dp.close()


@pytest.fixture
def dp(compiled: DataPlane) -> DataPlane:
    compiled.apply(BASE_SERVICES)
    compiled.delete_flows([k for k, _ in compiled.flows()])
    return compiled


class Events(list[FlowEvent]):
    """Flow events read so far from the data plane's ring, through the reader flow sync uses."""

    def __init__(self, reader: RingReader) -> None:
        super().__init__()
        self.reader = reader

    def poll(self) -> None:
        """Append every event waiting in the ring (never blocks)."""
        self.extend(FlowEvent.from_buffer_copy(raw) for raw in self.reader.read())


@pytest.fixture
def events(dp: DataPlane) -> Iterator[Events]:
    received = Events(dp.flow_event_reader())
    received.reader.read()  # drop what earlier tests left
    try:
        yield received
    finally:
        received.reader.close()


def eth() -> Ether:
    return Ether(dst=OUR_MAC, src=ROUTER_MAC)


def tcp4(flags: str = "A", sport: int = 40000, dport: int = 80, dst: object = VIP4, src: str = CLIENT4) -> bytes:
    return bytes(eth() / IP(src=src, dst=str(dst)) / TCP(sport=sport, dport=dport, flags=flags) / Raw(b"x" * 20))


def forwarded(frame: bytes, backend: BackendSpec) -> bytes:
    assert backend.mac is not None
    return bytes.fromhex(backend.mac.replace(":", "") + OUR_MAC.replace(":", "")) + frame[12:]


def stat_delta(dp: DataPlane, before: dict[Stat, int]) -> dict[Stat, int]:
    return {k: v - before[k] for k, v in dp.stats().items() if v != before[k]}


def too_big4(quoted_sport: int = 80, quoted_dst: str = CLIENT4, quote: bytes | None = None) -> bytes:
    if quote is None:
        quote = bytes(IP(src=str(VIP4), dst=quoted_dst) / TCP(sport=quoted_sport, dport=40000, flags="PA"))[:28]
    return bytes(eth() / IP(src="198.51.100.1", dst=str(VIP4)) / ICMP(type=3, code=4, nexthopmtu=1400) / quote)


def too_big6(quote: bytes | None = None) -> bytes:
    if quote is None:
        quote = bytes(IPv6(src=str(VIP6), dst=CLIENT6) / TCP(sport=443, dport=40000, flags="PA") / Raw(b"y" * 40))
    return bytes(eth() / IPv6(src="2001:db8:ff::1", dst=str(VIP6)) / ICMPv6PacketTooBig(mtu=1280) / quote)


def with_ip_len(frame: bytes, length: int) -> bytes:
    """`frame` with its IPv4 total length, or IPv6 payload length, set to `length` (nothing else changes)."""
    offset = 16 if frame[12:14] == b"\x08\x00" else 18
    return frame[:offset] + length.to_bytes(2, "big") + frame[offset + 2:]


def with_byte(frame: bytes, offset: int, value: int) -> bytes:
    return frame[:offset] + bytes([value]) + frame[offset + 1:]


TRAILER = b"\x00" * 6  # what a NIC pads a 54-byte bare ACK with to the 60-byte minimum
TCP4 = tcp4("A")  # 14 + 20 + 20 + 20 bytes of payload: IPv4 total length 60
UDP4 = bytes(eth() / IP(src=CLIENT4, dst=str(VIP4)) / UDP(sport=5353, dport=53) / Raw(b"q" * 8))  # total 36
# payload 30
TCP6 = bytes(eth() / IPv6(src=CLIENT6, dst=str(VIP6)) / TCP(sport=1234, dport=443, flags="A") / Raw(b"x" * 10))
HBH6 = bytes(eth() / IPv6(src=CLIENT6, dst=str(VIP6)) / IPv6ExtHdrHopByHop() / TCP(sport=1234, dport=443, flags="A"))
# 20 bytes: data offset 10
TCP_OPTIONS = [("MSS", 1460), ("NOP", None), ("WScale", 7), ("SAckOK", b""), ("Timestamp", (1, 2))]
OPT4 = bytes(eth() / IP(src=CLIENT4, dst=str(VIP4)) / TCP(sport=2, dport=80, flags="A", options=TCP_OPTIONS))
OPT6 = bytes(eth() / IPv6(src=CLIENT6, dst=str(VIP6)) / TCP(sport=2, dport=443, flags="A", options=TCP_OPTIONS))
OPT4_CUT, OPT6_CUT = OPT4[:-4], OPT6[:-4]  # the last 4 option bytes are missing
# A quote of a later fragment (offset 1480) of a backend's reply: its first payload bytes happen
# to read like ports 80 -> 40000, but they are the middle of the flow's data, not a header.
QUOTED_LATER_FRAGMENT4 = bytes(IP(src=str(VIP4), dst=CLIENT4, proto=6, frag=185)) + b"\x00\x50\x9c\x40" + b"d" * 4
QUOTED_FIRST_FRAGMENT4 = bytes(IP(src=str(VIP4), dst=CLIENT4, flags="MF") / TCP(sport=80, dport=40000, flags="PA"))[:28]
QUOTED_LATER_FRAGMENT6 = bytes(IPv6(src=str(VIP6), dst=CLIENT6) / IPv6ExtHdrFragment(nh=6, offset=185)
                               / Raw(b"\x01\xbb\x9c\x40" + b"d" * 40))


# {description, frame, expected verdict, expected output (None: unchanged), expected counter}
CASES = [
    ("TCP SYN to VIP:80", tcp4("S"), XdpAction.TX, B1, Stat.TX),
    ("TCP mid-flow ACK to VIP:80", tcp4("A"), XdpAction.TX, B1, Stat.TX),
    ("TCP PSH/ACK with options in the IPv4 header (IHL 6)",
     bytes(eth() / IP(src=CLIENT4, dst=str(VIP4), options=b"\x01\x01\x01\x00") / TCP(sport=1, dport=80, flags="PA")),
     XdpAction.TX, B1, Stat.TX),
    ("UDP to VIP:53", bytes(eth() / IP(src=CLIENT4, dst=str(VIP4)) / UDP(sport=5353, dport=53) / Raw(b"q")),
     XdpAction.TX, B2, Stat.TX),
    ("IPv6 TCP to VIP6:443", bytes(eth() / IPv6(src=CLIENT6, dst=str(VIP6)) / TCP(sport=1234, dport=443, flags="A")),
     XdpAction.TX, B6, Stat.TX),
    ("IPv6 hop-by-hop header, then TCP to VIP6:443",
     bytes(eth() / IPv6(src=CLIENT6, dst=str(VIP6)) / IPv6ExtHdrHopByHop() / TCP(sport=1234, dport=443, flags="A")),
     XdpAction.TX, B6, Stat.TX),
    ("ICMP frag-needed quoting a VIP:80 flow", too_big4(), XdpAction.TX, B1, Stat.TX),
    ("ICMPv6 packet-too-big quoting a VIP6:443 flow", too_big6(), XdpAction.TX, B6, Stat.TX),
    ("TCP to a non-VIP address", tcp4(dst="10.0.0.5"), XdpAction.PASS, None, Stat.PASS),
    ("TCP to the VIP on a port without a service", tcp4(dport=8080), XdpAction.PASS, None, Stat.PASS),
    ("UDP to the VIP's TCP-only port", bytes(eth() / IP(src=CLIENT4, dst=str(VIP4)) / UDP(sport=1, dport=80)),
     XdpAction.PASS, None, Stat.PASS),
    ("ICMP echo to the VIP", bytes(eth() / IP(src=CLIENT4, dst=str(VIP4)) / ICMP()), XdpAction.PASS, None, Stat.PASS),
    ("ICMPv6 echo to VIP6", bytes(eth() / IPv6(src=CLIENT6, dst=str(VIP6)) / ICMPv6EchoRequest()),
     XdpAction.PASS, None, Stat.PASS),
    ("ICMP frag-needed quoting a non-service port", too_big4(quoted_sport=22), XdpAction.PASS, None, Stat.PASS),
    ("ARP (broadcast)", bytes(Ether(dst="ff:ff:ff:ff:ff:ff", src=ROUTER_MAC) / ARP(pdst=str(VIP4))),
     XdpAction.PASS, None, Stat.PASS_NOT_OURS),
    ("VIP TCP to another node's MAC (flooded by a switch)",
     bytes(Ether(dst="02:00:00:00:00:02", src=ROUTER_MAC) / IP(src=CLIENT4, dst=str(VIP4))
           / TCP(sport=2, dport=80, flags="A")),
     XdpAction.PASS, None, Stat.PASS_NOT_OURS),
    ("service with no usable backend", tcp4(dst=VIP_EMPTY), XdpAction.DROP, None, Stat.DROP_NO_BACKEND),
    ("first IPv4 fragment to the VIP (MF)",
     bytes(eth() / IP(src=CLIENT4, dst=str(VIP4), flags="MF") / TCP(sport=1, dport=80)),
     XdpAction.DROP, None, Stat.DROP_FRAGMENT),
    ("later IPv4 fragment to the VIP (offset)",
     bytes(eth() / IP(src=CLIENT4, dst=str(VIP4), frag=100, proto=6) / Raw(b"z" * 30)),
     XdpAction.DROP, None, Stat.DROP_FRAGMENT),
    ("IPv4 fragment to a non-VIP", bytes(eth() / IP(src=CLIENT4, dst="10.0.0.5", frag=100, proto=6) / Raw(b"z" * 30)),
     XdpAction.PASS, None, Stat.PASS),
    ("IPv6 fragment to VIP6",
     bytes(eth() / IPv6(src=CLIENT6, dst=str(VIP6)) / IPv6ExtHdrFragment(m=1) / TCP(sport=1, dport=443)),
     XdpAction.DROP, None, Stat.DROP_FRAGMENT),
    ("Ethernet header only, IPv4 type", bytes(eth() / IP())[:14], XdpAction.PASS, None, Stat.PASS_UNPARSED),
    ("IPv4 header cut short", tcp4()[:14 + 12], XdpAction.PASS, None, Stat.PASS_UNPARSED),
    ("TCP header cut short", tcp4()[:14 + 20 + 10], XdpAction.PASS, None, Stat.PASS_UNPARSED),
    ("IPv4 IHL below 5", tcp4()[:14] + bytes([0x44]) + tcp4()[15:], XdpAction.PASS, None, Stat.PASS_UNPARSED),
    ("IHL pointing past the frame", tcp4()[:14] + bytes([0x4F]) + tcp4()[15:14 + 40],
     XdpAction.PASS, None, Stat.PASS_UNPARSED),
    ("IPv6 header cut short", bytes(eth() / IPv6(dst=str(VIP6)))[:14 + 30], XdpAction.PASS, None, Stat.PASS_UNPARSED),
    # Length fields against the frame and each other: a datagram that does not fit its own
    # lengths is never forwarded; bytes after a consistent datagram are an Ethernet trailer.
    ("IPv4 total length larger than the frame", with_ip_len(TCP4, 1500), XdpAction.PASS, None, Stat.PASS_UNPARSED),
    ("IPv4 total length one byte too large", with_ip_len(TCP4, 61), XdpAction.PASS, None, Stat.PASS_UNPARSED),
    ("IPv4 total length smaller than the IP header", with_ip_len(TCP4, 19), XdpAction.PASS, None, Stat.PASS_UNPARSED),
    ("IPv4 total length zero", with_ip_len(TCP4, 0), XdpAction.PASS, None, Stat.PASS_UNPARSED),
    ("IPv4 total length ending inside the IP options (IHL 6)",
     with_ip_len(bytes(eth() / IP(src=CLIENT4, dst=str(VIP4), options=b"\x01\x01\x01\x00")
                       / TCP(sport=1, dport=80, flags="PA")), 22),
     XdpAction.PASS, None, Stat.PASS_UNPARSED),
    ("IPv4 total length ending inside the TCP header", with_ip_len(TCP4, 20 + 19),
     XdpAction.PASS, None, Stat.PASS_UNPARSED),
    ("IPv4 total length ending inside the UDP header", with_ip_len(UDP4, 20 + 7),
     XdpAction.PASS, None, Stat.PASS_UNPARSED),
    ("IPv4 total length ending inside the TCP options", with_ip_len(OPT4, 20 + 36),
     XdpAction.PASS, None, Stat.PASS_UNPARSED),
    ("IPv4 total length ending inside an ICMP error's quote", with_ip_len(too_big4(), 20 + 8 + 20 + 3),
     XdpAction.PASS, None, Stat.PASS_UNPARSED),
    ("IPv6 payload length larger than the frame", with_ip_len(TCP6, 1400), XdpAction.PASS, None, Stat.PASS_UNPARSED),
    ("IPv6 payload length one byte too large", with_ip_len(TCP6, 31), XdpAction.PASS, None, Stat.PASS_UNPARSED),
    ("IPv6 payload length ending inside the TCP header", with_ip_len(TCP6, 19),
     XdpAction.PASS, None, Stat.PASS_UNPARSED),
    ("IPv6 payload length ending inside a hop-by-hop header", with_ip_len(HBH6, 4),
     XdpAction.PASS, None, Stat.PASS_UNPARSED),
    ("IPv6 payload length ending inside an ICMPv6 error's quote", with_ip_len(too_big6(), 8 + 40 + 3),
     XdpAction.PASS, None, Stat.PASS_UNPARSED),
    ("TCP options cut off by the end of the frame (IPv4 length says so too)", with_ip_len(OPT4_CUT, len(OPT4_CUT) - 14),
     XdpAction.PASS, None, Stat.PASS_UNPARSED),
    ("TCP options cut off by the end of the frame (IPv4 length says they are there)", OPT4_CUT,
     XdpAction.PASS, None, Stat.PASS_UNPARSED),
    ("TCP options cut off by the end of the frame (IPv6 length says so too)", with_ip_len(OPT6_CUT, len(OPT6_CUT) - 54),
     XdpAction.PASS, None, Stat.PASS_UNPARSED),
    ("TCP data offset below 5", with_byte(TCP4, 14 + 20 + 12, 0x40), XdpAction.PASS, None, Stat.PASS_UNPARSED),
    ("UDP length larger than the IP payload", with_byte(UDP4, 14 + 20 + 5, 17),
     XdpAction.PASS, None, Stat.PASS_UNPARSED),
    ("UDP length below the UDP header", with_byte(UDP4, 14 + 20 + 5, 7), XdpAction.PASS, None, Stat.PASS_UNPARSED),
    ("IPv4 TCP with an Ethernet trailer", TCP4 + TRAILER, XdpAction.TX, B1, Stat.TX),
    ("IPv4 total length ending right after the TCP header (the payload becomes trailer)", with_ip_len(TCP4, 40),
     XdpAction.TX, B1, Stat.TX),
    ("IPv4 UDP with an Ethernet trailer", UDP4 + TRAILER, XdpAction.TX, B2, Stat.TX),
    ("UDP length shorter than the IP payload (the rest is IP padding)", with_byte(UDP4, 14 + 20 + 5, 8),
     XdpAction.TX, B2, Stat.TX),
    ("IPv6 TCP with an Ethernet trailer", TCP6 + TRAILER, XdpAction.TX, B6, Stat.TX),
    ("IPv4 TCP with complete options", OPT4, XdpAction.TX, B1, Stat.TX),
    ("IPv6 TCP with complete options", OPT6, XdpAction.TX, B6, Stat.TX),
    ("ICMP frag-needed with an Ethernet trailer", too_big4() + TRAILER, XdpAction.TX, B1, Stat.TX),
    # An ICMP error quoting a fragment: only the first one holds the L4 header.
    ("ICMP frag-needed quoting a first fragment (MF, offset 0)", too_big4(quote=QUOTED_FIRST_FRAGMENT4),
     XdpAction.TX, B1, Stat.TX),
    ("ICMP frag-needed quoting a later fragment: its payload is not ports", too_big4(quote=QUOTED_LATER_FRAGMENT4),
     XdpAction.PASS, None, Stat.PASS),
    ("ICMPv6 packet-too-big quoting a later fragment: its payload is not ports", too_big6(quote=QUOTED_LATER_FRAGMENT6),
     XdpAction.PASS, None, Stat.PASS),
]


@pytest.mark.parametrize("description,frame,action,backend,stat", CASES, ids=[c[0] for c in CASES])
def test_verdict_table(dp: DataPlane, description: str, frame: bytes, action: XdpAction,
                       backend: BackendSpec | None, stat: Stat) -> None:
    before = dp.stats()
    result = run_xdp(dp.fd, frame)
    assert result.action == action
    assert result.packet == (forwarded(frame, backend) if backend else frame)
    delta = stat_delta(dp, before)
    verdicts = {s: n for s, n in delta.items() if s <= Stat.DROP_FRAGMENT}
    assert verdicts == {stat: 1}, "exactly one verdict counter moves"


def test_pinning_policy_tcp_pins_at_first_non_syn_packet(dp: DataPlane, events: Events) -> None:
    before = dp.stats()
    for sport in range(20000, 22000):  # a SYN flood: forwarded, never pinned, never reported
        assert run_xdp(dp.fd, tcp4("S", sport=sport)).action == XdpAction.TX
    events.poll()
    assert dp.flows() == [] and events == []
    assert stat_delta(dp, before)[Stat.SYN_UNPINNED] == 2000
    assert run_xdp(dp.fd, tcp4("R", sport=30000)).action == XdpAction.TX  # RST of an unknown flow
    assert dp.flows() == []

    run_xdp(dp.fd, tcp4("A", sport=20001))  # the handshake's ACK pins
    events.poll()
    [(key, flow)] = dp.flows()
    assert (str(key.src_ip), key.src_port, key.dst_ip, key.dst_port, key.proto) == \
        (CLIENT4, 20001, VIP4, 80, IPPROTO_TCP)
    assert flow.backend == dp.backend_index(VIP4, 80, IPPROTO_TCP, B1.address)
    assert flow.service == dp.service_index(VIP4, 80, IPPROTO_TCP)
    [event] = events
    assert event.kind == EVENT_FLOW_NEW and event.backend_ip == B1.address and bytes(event.key) == bytes(key)


def test_syn_flood_cannot_evict_established_flows(dp: DataPlane) -> None:
    established = [tcp4("A", sport=p) for p in range(1000, 1010)]
    for frame in established:
        run_xdp(dp.fd, frame)
    for sport in range(40000, 45000):
        run_xdp(dp.fd, tcp4("S", sport=sport, src="198.51.100.9"))
    assert len(dp.flows()) == len(established)


def test_udp_pins_at_first_packet(dp: DataPlane, events: Events) -> None:
    run_xdp(dp.fd, bytes(eth() / IP(src=CLIENT4, dst=str(VIP4)) / UDP(sport=5000, dport=53)))
    events.poll()
    assert len(dp.flows()) == 1 and [e.kind for e in events] == [EVENT_FLOW_NEW]


def test_flow_stays_pinned_after_its_backend_leaves_the_hash(dp: DataPlane) -> None:
    service = ServiceSpec(VIP4, 80, IPPROTO_TCP, (B1, B2, B3))
    dp.apply([service])
    frames = [tcp4("A", sport=p) for p in range(3000, 3060)]
    first = {f: Ether(run_xdp(dp.fd, f).packet).dst for f in frames}
    assert set(first.values()) == {B1.mac, B2.mac, B3.mac}
    # B1 leaves the hash (unhealthy) and B2 gets most weight: slots are reassigned.
    dp.apply([ServiceSpec(VIP4, 80, IPPROTO_TCP, (BackendSpec(B1.address, B1.mac, in_hash=False),
                                                  BackendSpec(B2.address, B2.mac, weight=10), B3))])
    assert dp.backend_index(VIP4, 80, IPPROTO_TCP, B1.address) not in dp.table(VIP4, 80, IPPROTO_TCP)
    for frame, mac in first.items():
        assert Ether(run_xdp(dp.fd, frame).packet).dst == mac
    new = Ether(run_xdp(dp.fd, tcp4("A", sport=3999)).packet).dst
    assert new != B1.mac, "a new flow may not go to a backend outside the hash"


def test_flows_of_a_removed_backend_are_re_chosen(dp: DataPlane) -> None:
    dp.apply([ServiceSpec(VIP4, 80, IPPROTO_TCP, (B1, B2))])
    frames = [tcp4("A", sport=p) for p in range(5000, 5040)]
    on_b1 = [f for f in frames if Ether(run_xdp(dp.fd, f).packet).dst == B1.mac]
    assert on_b1
    before = dp.stats()
    dp.apply([ServiceSpec(VIP4, 80, IPPROTO_TCP, (B2,))])  # B1 deleted from the config
    for frame in on_b1:
        assert Ether(run_xdp(dp.fd, frame).packet).dst == B2.mac
    assert stat_delta(dp, before)[Stat.FLOW_REPINNED] == len(on_b1)


def test_flows_pinned_to_a_backend_without_a_mac_are_held_not_re_chosen(dp: DataPlane) -> None:
    """A node back from a partition learns flows pinned to a backend it has no MAC for yet: their
    packets are dropped (TCP retransmits) until the MAC is known, never sent to another backend."""
    b4 = BackendSpec(ip("10.0.0.14"), None)
    dp.apply([ServiceSpec(VIP4, 80, IPPROTO_TCP, (B1, b4))])
    b4_index = dp.backend_index(VIP4, 80, IPPROTO_TCP, b4.address)
    service = dp.service_index(VIP4, 80, IPPROTO_TCP)
    assert b4_index is not None and service is not None
    assert b4_index not in dp.table(VIP4, 80, IPPROTO_TCP), "no new flows without a MAC"
    frame = tcp4("A", sport=7100)
    dp.write_flows([(FlowKey.make(CLIENT4, 7100, VIP4, 80, IPPROTO_TCP), Flow(b4_index, service, 0, 0))])
    before = dp.stats()
    for _ in range(3):
        assert run_xdp(dp.fd, frame).action == XdpAction.DROP
    assert stat_delta(dp, before) == {Stat.DROP_UNRESOLVED: 3}
    dp.apply([ServiceSpec(VIP4, 80, IPPROTO_TCP, (B1, BackendSpec(b4.address, "02:00:00:00:0b:04")))])
    assert Ether(run_xdp(dp.fd, frame).packet).dst == "02:00:00:00:0b:04"


def test_removed_service_passes_and_forgets_its_flows(dp: DataPlane) -> None:
    run_xdp(dp.fd, tcp4("A", sport=7000))
    assert dp.flows()
    dp.apply([s for s in BASE_SERVICES if s.port != 80])
    # apply does not walk the table: the pin stays until a maintenance pass, but is ignored.
    assert run_xdp(dp.fd, tcp4("A", sport=7000)).action == XdpAction.PASS
    assert dp.sweep_pending
    dp.sweep()
    assert dp.flows() == [] and not dp.sweep_pending
    assert run_xdp(dp.fd, tcp4("A", sport=7000)).action == XdpAction.PASS


def test_close_is_reported_once_and_a_reused_tuple_starts_afresh(dp: DataPlane, events: Events) -> None:
    dp.apply([ServiceSpec(VIP4, 80, IPPROTO_TCP, (B1, B2, B3))])
    run_xdp(dp.fd, tcp4("A", sport=8000))
    run_xdp(dp.fd, tcp4("FA", sport=8000))
    run_xdp(dp.fd, tcp4("FA", sport=8000))
    events.poll()
    assert [e.kind for e in events] == [EVENT_FLOW_NEW, EVENT_FLOW_CLOSE]
    [(key, flow)] = dp.flows()
    assert flow.flags & FLOW_F_CLOSING
    # Pin the closed flow to B3 from user space, then reuse the tuple with a SYN: the table decides.
    dp.write_flows([(key, Flow(dp.backend_index(VIP4, 80, IPPROTO_TCP, B3.address), flow.service, FLOW_F_CLOSING, 0))])
    chosen = dp.table(VIP4, 80, IPPROTO_TCP)[flow_hash(key) & 4095]
    out = Ether(run_xdp(dp.fd, tcp4("S", sport=8000)).packet).dst
    assert out == {dp.backend_index(VIP4, 80, IPPROTO_TCP, b.address): b.mac for b in (B1, B2, B3)}[chosen]
    assert dp.flows() == []


def test_flows_written_from_user_space_are_followed(dp: DataPlane) -> None:
    """The peer side of flow sync: a batch of flows learned elsewhere overrides the table."""
    dp.apply([ServiceSpec(VIP4, 80, IPPROTO_TCP, (B1, B2))])
    b2 = dp.backend_index(VIP4, 80, IPPROTO_TCP, B2.address)
    service = dp.service_index(VIP4, 80, IPPROTO_TCP)
    assert b2 is not None and service is not None
    keys = [FlowKey.make(CLIENT4, p, VIP4, 80, IPPROTO_TCP) for p in range(9000, 9200)]
    dp.write_flows([(k, Flow(b2, service, 0, 0)) for k in keys])
    assert len(dp.flows()) == 200
    for port in range(9000, 9200, 17):
        assert Ether(run_xdp(dp.fd, tcp4("A", sport=port)).packet).dst == B2.mac


def test_icmp_too_big_follows_the_pinned_backend(dp: DataPlane) -> None:
    dp.apply([ServiceSpec(VIP4, 80, IPPROTO_TCP, (B1, B2, B3))])
    key = FlowKey.make(CLIENT4, 40000, VIP4, 80, IPPROTO_TCP)
    for backend in (B1, B2, B3):
        index = dp.backend_index(VIP4, 80, IPPROTO_TCP, backend.address)
        dp.write_flows([(key, Flow(index, dp.service_index(VIP4, 80, IPPROTO_TCP), 0, 0))])
        frame = too_big4()
        assert run_xdp(dp.fd, frame).packet == forwarded(frame, backend)


def test_counters_per_service_and_backend(dp: DataPlane) -> None:
    service = dp.service_index(VIP4, 80, IPPROTO_TCP)
    backend = dp.backend_index(VIP4, 80, IPPROTO_TCP, B1.address)
    assert service is not None and backend is not None
    s0, b0 = dp.service_stats(service), dp.backend_stats(backend)
    frame = tcp4("A", sport=12345)
    for _ in range(5):
        run_xdp(dp.fd, frame)
    s1, b1 = dp.service_stats(service), dp.backend_stats(backend)
    assert (s1.packets - s0.packets, s1.bytes - s0.bytes, s1.new_flows - s0.new_flows) == (5, 5 * len(frame), 1)
    assert (b1.packets - b0.packets, b1.bytes - b0.bytes, b1.new_flows - b0.new_flows) == (5, 5 * len(frame), 1)
    empty = dp.service_index(VIP_EMPTY, 80, IPPROTO_TCP)
    assert empty is not None
    d0 = dp.service_stats(empty).drops
    run_xdp(dp.fd, tcp4(dst=VIP_EMPTY))
    assert dp.service_stats(empty).drops == d0 + 1


def test_active_connections_count_opened_minus_closed_once_per_flow(dp: DataPlane) -> None:
    """weighting: leastconn reads new_flows - closed per backend (BackendStats.active): a FIN or
    RST is counted once per pinned flow, a flow pinned at its FIN is opened and closed at once,
    and a tuple reused after a close counts as a new connection."""
    backend = dp.backend_index(VIP4, 80, IPPROTO_TCP, B1.address)
    assert backend is not None
    a0 = dp.backend_stats(backend).active
    for sport in range(7000, 7010):  # ten connections: pinned at the handshake's ACK
        run_xdp(dp.fd, tcp4("S", sport=sport))
        run_xdp(dp.fd, tcp4("A", sport=sport))
    assert dp.backend_stats(backend).active - a0 == 10
    for flags, sport in (("FA", 7000), ("FA", 7000), ("A", 7000), ("R", 7001), ("FA", 7001), ("RA", 7002)):
        run_xdp(dp.fd, tcp4(flags, sport=sport))  # repeats and a FIN after the RST count nothing more
    assert dp.backend_stats(backend).active - a0 == 7
    run_xdp(dp.fd, tcp4("FA", sport=7100))  # a flow whose first packet here is its FIN
    assert dp.backend_stats(backend).active - a0 == 7
    run_xdp(dp.fd, tcp4("S", sport=7000))  # the tuple reused: a new connection
    run_xdp(dp.fd, tcp4("A", sport=7000))
    stats = dp.backend_stats(backend)
    assert stats.active - a0 == 8 and stats.closed >= 4


def _walk(dp: DataPlane) -> None:
    while not dp.maintain():
        pass


def test_active_connections_are_recounted_from_the_flow_table(dp: DataPlane) -> None:
    """The drift of new_flows - closed is corrected by each maintenance pass: connections that
    ended unseen (idle past the window: a vanished client or a server reset; evicted) stop
    counting, a peer's copy (FLOW_F_SYNCED) never counts until this node forwards a packet of it,
    closing flows never count, and pins and closes between passes show at once."""
    dp.tick()
    _walk(dp)  # the table is empty: the baseline
    backend, service = dp.backend_index(VIP4, 80, IPPROTO_TCP, B1.address), dp.service_index(VIP4, 80, IPPROTO_TCP)
    assert backend is not None and service is not None
    assert dp.counters().active(backend) == 0
    for sport in range(7000, 7010):  # ten connections pinned here
        run_xdp(dp.fd, tcp4("S", sport=sport))
        run_xdp(dp.fd, tcp4("A", sport=sport))
    run_xdp(dp.fd, tcp4("FA", sport=7009))  # one closed by its client
    assert dp.counters().active(backend) == 9  # between passes: the counters alone
    old_ns = monotonic_ns() - 60 * 10**9  # past the default window (30 s)
    key = partial(FlowKey.make, CLIENT4, dst=VIP4, dport=80, proto=IPPROTO_TCP)
    # 7000-7002 went silent a minute ago (client vanished, server reset); 7003 was evicted.
    dp.write_flows([(key(sport=p), Flow(backend, service, 0, old_ns)) for p in range(7000, 7003)])
    dp.delete_flows([key(sport=7003)])
    # Five connections a peer forwards (its copy here: synced, stamped old), one of which then
    # moves to this node (its next packet reaches us: the program clears FLOW_F_SYNCED).
    dp.write_flows([(key(sport=p), Flow(backend, service, FLOW_F_SYNCED, old_ns)) for p in range(7500, 7505)])
    assert dp.counters().active(backend) == 9  # drift: nothing told the counters
    run_xdp(dp.fd, tcp4("A", sport=7500))
    assert dp.lookup_flow(key(sport=7500)).flags == 0  # type: ignore[union-attr]
    assert dp.lookup_flow(key(sport=7501)).flags == FLOW_F_SYNCED  # type: ignore[union-attr]
    _walk(dp)
    assert dp.counters().active(backend) == 6  # 7004-7008 and 7500
    run_xdp(dp.fd, tcp4("RA", sport=7004))  # after the pass: counters again
    run_xdp(dp.fd, tcp4("S", sport=7600))
    run_xdp(dp.fd, tcp4("A", sport=7600))
    assert dp.counters().active(backend) == 6
    _walk(dp)
    assert dp.counters().active(backend) == 6
    # A window of its own for the service (at least 2 x refresh_s = 2 s): 10 s old is idle now.
    dp.write_flows([(key(sport=7005), Flow(backend, service, 0, monotonic_ns() - 10 * 10**9))])
    _walk(dp)
    assert dp.counters().active(backend) == 6
    dp.set_active_idle(VIP4, 80, IPPROTO_TCP, 5.0)
    _walk(dp)
    assert dp.counters().active(backend) == 5
    dp.set_active_idle(VIP4, 80, IPPROTO_TCP, 30.0)


def test_a_reused_backend_index_starts_with_no_active_connections() -> None:
    """A backend index taken anew has its counters zeroed: its active count starts from 0 (not
    minus what its previous owner had); also when that happens while a pass walks."""
    small = DataPlane(Limits(max_services=4, max_backends=2, flow_table_size=1024))
    try:
        small.set_config(OUR_MAC)
        small.apply([ServiceSpec(VIP4, 80, IPPROTO_TCP, (B1,))])
        index = small.backend_index(VIP4, 80, IPPROTO_TCP, B1.address)
        assert index is not None
        for sport in range(100, 104):
            run_xdp(small.fd, tcp4("A", sport=sport))
        _walk(small)
        assert small.counters().active(index) == 4
        small.apply([ServiceSpec(VIP4, 80, IPPROTO_TCP, (B2,))])  # B1 retired, its index quarantined
        small.apply([ServiceSpec(VIP4, 80, IPPROTO_TCP, (B3,))])  # B1's index purged and reused
        reused = small.backend_index(VIP4, 80, IPPROTO_TCP, B3.address)
        assert reused == index
        assert small.counters().active(index) == 0
        _walk(small)
        assert small.counters().active(index) == 0
        run_xdp(small.fd, tcp4("A", sport=200))
        assert small.counters().active(index) == 1
    finally:
        small.close()
    tally = ActiveTally(2, np.array([5, 5], dtype=np.int64))
    tally.pass_started()
    tally.reset(0)  # while the pass walks: what it read of index 0 is its previous owner's
    tally.pass_completed(np.array([4, 2], dtype=np.int64), np.array([5, 5], dtype=np.int64))
    assert list(tally.active(np.array([1, 6], dtype=np.int64))) == [1, 3]


def test_weight_changes_never_move_a_pinned_flow(dp: DataPlane) -> None:
    """Load-aware weights rebuild the table every interval; pinned flows keep their backend while
    new ones follow the new weights."""
    dp.apply([ServiceSpec(VIP4, 80, IPPROTO_TCP, (B1, B2, B3))])
    frames = [tcp4("A", sport=p) for p in range(8000, 8300)]
    first = {f: Ether(run_xdp(dp.fd, f).packet).dst for f in frames}
    rng = random.Random(13)
    for _ in range(10):
        weights = [rng.randint(1, 1000) for _ in range(3)]
        dp.apply([ServiceSpec(VIP4, 80, IPPROTO_TCP, tuple(BackendSpec(b.address, b.mac, weight=w)
                                                           for b, w in zip((B1, B2, B3), weights, strict=True)))])
        assert all(Ether(run_xdp(dp.fd, f).packet).dst == mac for f, mac in first.items())
    dp.apply([ServiceSpec(VIP4, 80, IPPROTO_TCP, (BackendSpec(B1.address, B1.mac, weight=1000),
                                                  BackendSpec(B2.address, B2.mac, weight=1),
                                                  BackendSpec(B3.address, B3.mac, weight=1)))])
    fresh = Counter(Ether(run_xdp(dp.fd, tcp4("A", sport=p)).packet).dst for p in range(9000, 9400))
    assert fresh[B1.mac] > 380, fresh  # new flows follow the new weights (1000:1:1)


def test_weighted_distribution_of_10k_flows_matches_the_table(dp: DataPlane) -> None:
    weights = {B1: 1, B2: 2, B3: 3}
    dp.apply([ServiceSpec(VIP4, 80, IPPROTO_TCP, tuple(BackendSpec(b.address, b.mac, w) for b, w in weights.items()))])
    table = dp.table(VIP4, 80, IPPROTO_TCP)
    mac_of = {dp.backend_index(VIP4, 80, IPPROTO_TCP, b.address): b.mac for b in weights}
    rng = random.Random(7)
    seen: Counter[str] = Counter()
    for _ in range(10_000):
        src, sport = f"198.18.{rng.randrange(256)}.{rng.randrange(256)}", rng.randrange(1024, 65536)
        out = Ether(run_xdp(dp.fd, tcp4("S", sport=sport, src=src)).packet).dst
        predicted = table[flow_hash(FlowKey.make(src, sport, VIP4, 80, IPPROTO_TCP)) & 4095]
        assert out == mac_of[predicted], "the kernel indexes the table where user space expects"
        seen[out] += 1
    total = sum(weights.values())
    for backend, weight in weights.items():
        assert backend.mac is not None
        assert abs(seen[backend.mac] / 10_000 - weight / total) <= 0.03, seen


def _ip_destination(frame: bytes) -> str | None:
    if len(frame) >= 34 and frame[12:14] == b"\x08\x00":
        return str(ipaddress.IPv4Address(frame[30:34]))
    if len(frame) >= 54 and frame[12:14] == b"\x86\xdd":
        return str(ipaddress.IPv6Address(frame[38:54]))
    return None


def _check_verdict_rules(dp: DataPlane, frame: bytes) -> None:
    result = run_xdp(dp.fd, frame)
    assert result.action in (XdpAction.PASS, XdpAction.TX, XdpAction.DROP)
    if _ip_destination(frame) not in VIP_ADDRESSES or frame[:6] != bytes.fromhex(OUR_MAC.replace(":", "")):
        assert result.action == XdpAction.PASS and result.packet == frame, "never touch a non-VIP frame"
    if result.action == XdpAction.TX:
        assert result.packet[6:12] == bytes.fromhex(OUR_MAC.replace(":", ""))
        assert result.packet[12:] == frame[12:], "only the MACs change"
    else:
        assert result.packet == frame


VALID_FRAMES = [c[1] for c in CASES if len(c[1]) > 40]


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.booleans(), st.binary(min_size=14, max_size=200))
def test_fuzz_random_frames(dp: DataPlane, to_us: bool, frame: bytes) -> None:
    if to_us:  # half the frames get past the MAC check
        frame = bytes.fromhex(OUR_MAC.replace(":", "")) + frame[6:]
    _check_verdict_rules(dp, frame)


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(VALID_FRAMES), st.integers(14, 200),
       st.lists(st.tuples(st.integers(0, 199), st.integers(0, 255)), max_size=4))
def test_fuzz_truncated_and_mutated_frames(dp: DataPlane, frame: bytes, cut: int, flips: list[tuple[int, int]]) -> None:
    mutated = bytearray(frame[:cut])
    for position, value in flips:
        if 12 <= position < len(mutated):  # keep the MACs; anything after is fair game
            mutated[position] = value
    _check_verdict_rules(dp, bytes(mutated))


def test_last_seen_follows_the_control_plane_clock_only_when_stale(dp: DataPlane) -> None:
    """Established packets write the flow entry at most once per refresh interval (1 s here)."""
    frame = tcp4("A", sport=13000)
    dp.tick(now_ns=100_000_000_000)
    run_xdp(dp.fd, frame)
    [(key, flow)] = dp.flows()
    assert flow.last_seen_ns == 100_000_000_000
    dp.tick(now_ns=100_900_000_000)  # younger than refresh: left alone
    run_xdp(dp.fd, frame)
    assert dp.lookup_flow(key).last_seen_ns == 100_000_000_000  # type: ignore[union-attr]
    dp.tick(now_ns=101_500_000_000)  # stale: refreshed
    run_xdp(dp.fd, frame)
    assert dp.lookup_flow(key).last_seen_ns == 101_500_000_000  # type: ignore[union-attr]
    dp.tick()


def test_flow_events_fd_is_readable_while_events_wait(dp: DataPlane, events: Events) -> None:
    import select

    assert select.select([dp.flow_events_fd], [], [], 0)[0] == []
    run_xdp(dp.fd, tcp4("A", sport=14000))
    assert select.select([dp.flow_events_fd], [], [], 1.0)[0] == [dp.flow_events_fd]
    events.poll()
    assert len(events) == 1
    assert select.select([dp.flow_events_fd], [], [], 0)[0] == []


def test_a_reused_backend_index_does_not_inherit_old_pins() -> None:
    """With every index used, a new backend reuses a freed one; flows pinned to the backend that
    had it must not follow it to the new owner (which may even serve another service)."""
    from bpf.loader import Limits

    dp = DataPlane(Limits(max_backends=3))
    dp.set_config(OUR_MAC)
    try:
        dp.apply([ServiceSpec(VIP4, 80, IPPROTO_TCP, (B1, B2, B3))])
        run_xdp(dp.fd, tcp4("A", sport=15000))
        [(key, flow)] = dp.flows()
        old = {b.address: dp.backend_index(VIP4, 80, IPPROTO_TCP, b.address) for b in (B1, B2, B3)}
        pinned = next(a for a, i in old.items() if i == flow.backend)
        newcomer = BackendSpec(ip("10.0.0.99"), "02:00:00:00:0b:99")
        dp.apply([ServiceSpec(VIP4, 80, IPPROTO_TCP,
                              tuple(b for b in (B1, B2, B3) if b.address != pinned) + (newcomer,))])
        assert dp.backend_index(VIP4, 80, IPPROTO_TCP, newcomer.address) == flow.backend  # the freed index
        assert dp.lookup_flow(key) is None, "the old pin was purged before the index got a new owner"
    finally:
        dp.close()


def test_a_change_that_cannot_fit_is_refused_before_any_map_is_touched() -> None:
    """At the backend limit a reload may move backends between services (the one that gives an
    index back goes first), and one that needs more than there are changes nothing at all."""
    dp = DataPlane(Limits(max_backends=4))
    dp.set_config(OUR_MAC, refresh_s=1.0)
    try:
        four = [BackendSpec(ip(f"10.0.0.{20 + i}"), f"02:00:00:00:0c:0{i}") for i in range(4)]
        extra = [BackendSpec(ip(f"10.0.1.{20 + i}"), f"02:00:00:00:0d:0{i}") for i in range(2)]
        a = ServiceSpec(VIP4, 80, IPPROTO_TCP, tuple(four))
        dp.apply([a])
        a3 = ServiceSpec(VIP4, 80, IPPROTO_TCP, tuple(four[:3]))
        dp.apply([ServiceSpec(VIP4, 53, IPPROTO_UDP, tuple(extra[:1])), a3])  # B listed first, needs A's index
        assert dp.service_index(VIP4, 53, IPPROTO_UDP) is not None
        table = dp.table(VIP4, 80, IPPROTO_TCP)
        indexes = {b.address: dp.backend_index(VIP4, 80, IPPROTO_TCP, b.address) for b in four[:3]}
        with pytest.raises(MapError, match="needs 1 more backend indexes than it frees, 0 are free"):
            dp.apply([ServiceSpec(VIP4, 53, IPPROTO_UDP, tuple(extra)), a3])
        assert dp.table(VIP4, 80, IPPROTO_TCP) == table
        assert {b.address: dp.backend_index(VIP4, 80, IPPROTO_TCP, b.address) for b in four[:3]} == indexes
        assert dp.backend_index(VIP4, 53, IPPROTO_UDP, extra[1].address) is None
        assert Ether(run_xdp(dp.fd, tcp4("A", sport=7300)).packet).dst in {b.mac for b in four[:3]}
    finally:
        dp.close()


@pytest.fixture
def one_cpu() -> Iterator[None]:
    """The new-pin budget is per CPU: keep every test run of a test on one."""
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(allowed)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, allowed)


@pytest.fixture
def capped(dp: DataPlane, one_cpu: None) -> Iterator[DataPlane]:
    """`dp` with three backends; the test sets the cap. Restores the module's settings after."""
    dp.apply([ServiceSpec(VIP4, 80, IPPROTO_TCP, (B1, B2, B3)), *BASE_SERVICES[1:]])
    try:
        yield dp
    finally:
        dp.set_config(OUR_MAC, refresh_s=1.0)


def udp4(sport: int, src: str = "198.18.0.1") -> bytes:
    return bytes(eth() / IP(src=src, dst=str(VIP4)) / UDP(sport=sport, dport=53) / Raw(b"q"))


def test_new_pins_above_the_per_cpu_cap_follow_the_table_unpinned(capped: DataPlane, events: Events) -> None:
    """A flood of new flows (spoofed UDP, mid-flow ACKs): with a cap of N pins per window, a burst of
    M > N pins exactly N, reports exactly N, and forwards the rest by the table, counted."""
    dp, cap, burst, t0 = capped, 50, 180, 500 * NEW_PIN_WINDOW_NS
    dp.set_config(OUR_MAC, refresh_s=1.0, max_new_per_s_per_cpu=cap)
    dp.tick(now_ns=t0)
    table = dp.table(VIP4, 80, IPPROTO_TCP)
    mac_of = {dp.backend_index(VIP4, 80, IPPROTO_TCP, b.address): b.mac for b in (B1, B2, B3)}

    def flood(first_port: int) -> dict[Stat, int]:
        before = dp.stats()
        for sport in range(first_port, first_port + burst):
            frame = tcp4("A", sport=sport, src="198.18.0.1") if sport % 2 else udp4(sport)
            result = run_xdp(dp.fd, frame)
            assert result.action == XdpAction.TX
            if sport % 2:  # every flow, pinned or not, goes where the table says
                key = FlowKey.make("198.18.0.1", sport, VIP4, 80, IPPROTO_TCP)
                assert Ether(result.packet).dst == mac_of[table[flow_hash(key) & 4095]]
        return stat_delta(dp, before)

    delta = flood(20000)
    assert (delta[Stat.NEW_FLOW], delta[Stat.FLOOD_UNPINNED], delta[Stat.TX]) == (cap, burst - cap, burst)
    events.poll()
    pinned = {bytes(k) for k, _ in dp.flows()}
    assert len(pinned) == cap and len(events) == cap and {bytes(e.key) for e in events} == pinned

    # Pinned flows keep their pins during the flood, and do not spend the budget.
    before = dp.stats()
    pinned_tcp = next(k for k, _ in dp.flows() if k.proto == IPPROTO_TCP)
    for _ in range(10):
        assert run_xdp(dp.fd, tcp4("A", sport=pinned_tcp.src_port, src="198.18.0.1")).action == XdpAction.TX
    assert stat_delta(dp, before) == {Stat.TX: 10}

    dp.tick(now_ns=t0 + NEW_PIN_WINDOW_NS // 2)  # the same window: nothing left to pin
    delta = flood(30000)
    assert (delta.get(Stat.NEW_FLOW, 0), delta[Stat.FLOOD_UNPINNED]) == (0, burst)
    dp.tick(now_ns=t0 + NEW_PIN_WINDOW_NS)  # the next window: N more
    delta = flood(40000)
    assert (delta[Stat.NEW_FLOW], delta[Stat.FLOOD_UNPINNED]) == (cap, burst - cap)
    events.poll()
    assert len(dp.flows()) == len(events) == 2 * cap


def test_a_cap_of_zero_pins_every_new_flow(capped: DataPlane) -> None:
    with pytest.raises(ValueError, match="max_new_per_s_per_cpu"):
        capped.set_config(OUR_MAC, max_new_per_s_per_cpu=-1)
    capped.set_config(OUR_MAC, refresh_s=1.0, max_new_per_s_per_cpu=0)
    capped.tick(now_ns=700 * NEW_PIN_WINDOW_NS)
    before = capped.stats()
    for sport in range(20000, 22000):
        run_xdp(capped.fd, udp4(sport))
    assert stat_delta(capped, before) == {Stat.TX: 2000, Stat.NEW_FLOW: 2000}


def test_a_clock_that_goes_back_starts_a_new_window(capped: DataPlane) -> None:
    """The published clock is only ever set forward in production; tests and a restarted control
    plane may set it anywhere. A window never gets stuck."""
    capped.set_config(OUR_MAC, refresh_s=1.0, max_new_per_s_per_cpu=5)
    capped.tick(now_ns=900 * NEW_PIN_WINDOW_NS)
    before = capped.stats()
    for sport in range(20000, 20010):
        run_xdp(capped.fd, udp4(sport))
    capped.tick(now_ns=800 * NEW_PIN_WINDOW_NS)
    for sport in range(21000, 21010):
        run_xdp(capped.fd, udp4(sport))
    delta = stat_delta(capped, before)
    assert (delta[Stat.NEW_FLOW], delta[Stat.FLOOD_UNPINNED]) == (10, 10)
