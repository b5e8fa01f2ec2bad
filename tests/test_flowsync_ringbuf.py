"""The mmap ring-buffer reader (bpf/ringbuf.py) against the real program's flow events."""
from __future__ import annotations

import ipaddress
from collections.abc import Iterator

import pytest
from scapy.all import IP, TCP, Ether  # type: ignore[attr-defined]

from bpf.dataplane import BackendSpec, DataPlane, ServiceSpec
from bpf.loader import Limits
from bpf.structs import EVENT_FLOW_NEW, IPPROTO_TCP, FlowEvent, Stat
from bpf.testrun import run_xdp

pytestmark = pytest.mark.bpf

VIP = ipaddress.ip_address("10.0.0.100")
# At our own MAC: a repeated test run reuses one buffer, and the program forwards only frames
# addressed to us, so a backend MAC would end the flow path after the first repetition.
B1 = BackendSpec(ipaddress.ip_address("10.0.0.11"), "02:00:00:00:00:01")
ACK = bytes(Ether(dst="02:00:00:00:00:01", src="02:00:00:00:00:fe") / IP(src="192.0.2.7", dst=str(VIP))
            / TCP(sport=40000, dport=80, flags="A"))


@pytest.fixture(scope="module")
def bench_dp() -> Iterator[DataPlane]:
    """Every test-run repetition is a new client; a 4-page ring (~180 events) to force wrap-around."""
    dp = DataPlane(Limits(event_ring_pages=4), extra_cflags=["-DLB_BENCH_NEW_FLOW"])
    dp.set_config("02:00:00:00:00:01")
    dp.apply([ServiceSpec(VIP, 80, IPPROTO_TCP, (B1,))])
    try:
        yield dp
    finally:
        dp.close()


def test_reader_returns_each_event_once_across_wrap_around(bench_dp: DataPlane) -> None:
    reader = bench_dp.flow_event_reader()
    try:
        reader.read()
        seen: list[FlowEvent] = []
        for _ in range(10):  # 10 x 100 events through a ring of ~180: wraps several times
            # The client counter is per CPU, so a run on the other CPU repeats clients: start empty.
            bench_dp.delete_flows([k for k, _ in bench_dp.flows()])
            run_xdp(bench_dp.fd, ACK, repeat=100)
            assert reader.pending_bytes() > 0
            raw = reader.read()
            assert len(raw) == 100
            batch = [FlowEvent.from_buffer_copy(r) for r in raw]
            assert len({bytes(e.key) for e in batch}) == 100  # each client once
            seen.extend(batch)
        assert reader.read() == [] and reader.pending_bytes() == 0
        assert all(e.kind == EVENT_FLOW_NEW and e.backend_ip == B1.address for e in seen)
        assert all(e.key.dst_ip == VIP and e.key.dst_port == 80 for e in seen)
    finally:
        reader.close()


def test_full_ring_loses_events_and_counts_them(bench_dp: DataPlane) -> None:
    reader = bench_dp.flow_event_reader()
    try:
        reader.read()
        bench_dp.delete_flows([k for k, _ in bench_dp.flows()])
        lost_before = bench_dp.stats()[Stat.EVENT_LOST]
        run_xdp(bench_dp.fd, ACK, repeat=500)
        got = len(reader.read(max_records=50)) + len(reader.read())
        lost = bench_dp.stats()[Stat.EVENT_LOST] - lost_before
        assert got + lost == 500 and lost > 0
    finally:
        reader.close()
