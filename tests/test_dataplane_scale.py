"""The data plane at scale: chunked walks, counts without a walk, removals without a walk, the
quarantine of indexes until their stale flows are swept, apply from a worker thread, and a
full 1,048,576-entry flow table (bpf tier: BPF_PROG_TEST_RUN and the maps, no interfaces)."""
from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Iterator

import pytest
from scapy.all import IP, TCP, Ether, Raw  # type: ignore[attr-defined]

from bpf.dataplane import BackendSpec, DataPlane, ServiceSpec
from bpf.flowtable import KEY_SIZE, FlowChunk, delete_keys, synthetic_flows
from bpf.loader import Limits
from bpf.structs import IPPROTO_TCP, FlowKey, Stat, addr16
from bpf.testrun import XdpAction, run_xdp

pytestmark = pytest.mark.bpf

ip = ipaddress.ip_address
OUR_MAC = "02:00:00:00:00:01"
VIP_A, VIP_B = ip("10.0.0.100"), ip("10.0.0.101")


def backend(n: int) -> BackendSpec:
    return BackendSpec(ip(f"10.1.{n >> 8}.{n & 255}"), f"02:00:00:00:{n >> 8:02x}:{n & 255:02x}")


def service(vip: ipaddress.IPv4Address, backends: range, port: int = 80) -> ServiceSpec:
    return ServiceSpec(vip, port, IPPROTO_TCP, tuple(backend(n) for n in backends))


def fill(dp: DataPlane, spec: ServiceSpec, first: int, n: int, chunk: int = 65536, *, backend_n: int = 0) -> None:
    """n flows of `spec` pinned to its backend `backend_n`, written in chunks as flow sync does."""
    s = dp.service_index(*spec.key)
    b = dp.backend_index(*spec.key, spec.backends[backend_n].address)
    assert s is not None and b is not None
    for start in range(first, first + n, chunk):
        c = synthetic_flows(start, min(chunk, first + n - start), addr16(spec.vip), spec.port, spec.proto, b, s)
        assert dp.write_flows_packed(c.keys, c.values) == len(c)


def ack(vip: object, client: str, sport: int = 40000) -> bytes:
    return bytes(Ether(dst=OUR_MAC) / IP(src=client, dst=str(vip)) / TCP(sport=sport, dport=80, flags="A") / Raw(b"x"))


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def until_pass(dp: DataPlane, max_steps: int = 10_000) -> None:
    for _ in range(max_steps):
        if dp.maintain():
            return
    raise AssertionError("maintenance pass did not complete")


@pytest.fixture(scope="module")
def compiled() -> Iterator[DataPlane]:
    dp = DataPlane(Limits(max_services=4, max_backends=16, flow_table_size=65536))
    dp.set_config(OUR_MAC)
    try:
        yield dp
    finally:
        dp.close()


@pytest.fixture
def dp(compiled: DataPlane) -> DataPlane:
    compiled.apply([])
    compiled.sweep()
    compiled.delete_flows([k for k, _ in compiled.flows()])
    until_pass(compiled)
    return compiled


def test_cursor_returns_every_flow_once_in_bounded_chunks(dp: DataPlane) -> None:
    spec = service(VIP_A, range(2))
    dp.apply([spec])
    fill(dp, spec, 0, 10_000, chunk=3000)
    cursor = dp.flow_chunks(chunk_entries=1024)
    keys: set[bytes] = set()
    chunks = 0
    for chunk in cursor:
        assert 0 < len(chunk) <= 1024
        chunks += 1
        rows = chunk.key_rows()
        keys.update(bytes(r) for r in rows)
        assert set(chunk.flows()["service"].tolist()) == {dp.service_index(*spec.key)}
    assert len(keys) == 10_000 and cursor.seen == 10_000 and chunks >= 10
    assert cursor.next() is None, "a finished cursor stays finished"
    # The convenience list and the packed chunks agree.
    assert {bytes(k) for k, _ in dp.flows()} == keys


def test_delete_keys_skips_flows_already_gone(dp: DataPlane) -> None:
    spec = service(VIP_A, range(1))
    dp.apply([spec])
    fill(dp, spec, 0, 100)
    chunk = synthetic_flows(50, 100, addr16(VIP_A), 80, IPPROTO_TCP, 0, 0)  # 50 present, 50 never were
    fd = int(dp._map("flows").map_fd)
    assert delete_keys(fd, chunk.keys) == 50
    assert len(dp.flows()) == 50
    assert delete_keys(fd, chunk.keys[: 10 * KEY_SIZE]) == 0


def test_flow_count_needs_no_walk_and_is_exact_after_a_pass(dp: DataPlane) -> None:
    spec = service(VIP_A, range(2))
    dp.apply([spec])
    base = dp.flow_count()
    assert base.entries == 0 and base.walked == 0
    fill(dp, spec, 0, 5000)
    assert dp.flow_count().entries == 5000, "writes count at once"
    for sport in range(1000, 1010):  # ten pins by the program
        assert run_xdp(dp.fd, ack(VIP_A, "192.0.2.1", sport)).action == XdpAction.TX
    assert dp.flow_count().entries == 5010
    dp.delete_flows([FlowKey.from_buffer_copy(synthetic_flows(0, 1, addr16(VIP_A), 80, IPPROTO_TCP, 0, 0).keys)])
    assert dp.flow_count().entries == 5009
    fill(dp, spec, 0, 100)  # replacing writes over-count until the next pass...
    assert dp.flow_count().entries == 5109
    until_pass(dp)
    count = dp.flow_count()
    assert (count.entries, count.walked) == (5010, 5010) and count.walk_age_s < 60  # ...which corrects it


def test_removing_a_service_is_immediate_and_its_flows_are_swept_in_chunks(dp: DataPlane) -> None:
    a, b = service(VIP_A, range(0, 2)), service(VIP_B, range(2, 4))
    dp.apply([a, b])
    fill(dp, a, 0, 20_000)
    fill(dp, b, 20_000, 5_000)
    gone_index = dp.service_index(*a.key)
    old_backends = {dp.backend_index(*a.key, x.address) for x in a.backends}
    dp.apply([b])
    assert dp.service_index(*a.key) is None
    assert len(dp.flows()) == 25_000, "apply walked nothing"
    client = str(ip("10.0.0.0") + 7)
    assert run_xdp(dp.fd, ack(VIP_A, client)).action == XdpAction.PASS, "a stale pin of a removed service is ignored"
    steps = 0
    while not dp.maintain(max_entries=4096):
        steps += 1
    assert steps >= 3, "the sweep went in chunks"
    assert not dp.sweep_pending
    flows = dp.flows()
    assert len(flows) == 5_000 and {f.service for _, f in flows} == {dp.service_index(*b.key)}
    assert dp.flow_count().entries == 5_000
    # The swept indexes are free again; a new service may get them and no old pin follows.
    c = service(VIP_A, range(4, 6), port=81)
    dp.apply([b, c])
    assert dp.service_index(*c.key) is not None
    assert gone_index is not None and old_backends


def test_removed_backend_flows_are_re_chosen_then_swept_and_its_index_reused_clean(dp: DataPlane) -> None:
    spec = service(VIP_A, range(0, 2))
    dp.apply([spec])
    fill(dp, spec, 0, 1000, backend_n=0)
    gone = dp.backend_index(*spec.key, spec.backends[0].address)
    kept = service(VIP_A, range(1, 2))
    before = dp.stats()
    dp.apply([kept])
    out = run_xdp(dp.fd, ack(VIP_A, str(ip("10.0.0.0") + 3)))
    assert out.action == XdpAction.TX and Ether(out.packet).dst == kept.backends[0].mac
    assert dp.stats()[Stat.FLOW_REPINNED] - before[Stat.FLOW_REPINNED] == 1
    dp.sweep()
    assert all(f.backend != gone for _, f in dp.flows())
    assert len(dp.flows()) == 1, "only the re-chosen flow remains"


def test_a_full_pool_purges_the_quarantine_inside_apply(dp: DataPlane) -> None:
    """16 backend indexes: once all are used or quarantined, apply sweeps before reusing one."""
    first = service(VIP_A, range(0, 16))
    dp.apply([first])
    fill(dp, first, 0, 2000, backend_n=12)
    dp.apply([service(VIP_A, range(0, 8))])  # 8 quarantined, with the 2000 flows of backend 12
    assert dp.sweep_pending and len(dp.flows()) == 2000
    second = service(VIP_A, range(0, 8))
    dp.apply([second, service(VIP_B, range(100, 108))])  # needs 8 more indexes: only the quarantine has them
    assert not dp.sweep_pending and dp.flows() == []
    new_indexes = {dp.backend_index(VIP_B, 80, IPPROTO_TCP, backend(n).address) for n in range(100, 108)}
    assert len(new_indexes) == 8 and None not in new_indexes


def test_apply_from_a_worker_thread_while_lookups_and_maintenance_run(dp: DataPlane) -> None:
    specs = [[service(VIP_A, range(0, 4)), service(VIP_B, range(4, 8))], [service(VIP_A, range(8, 12))]]
    dp.apply(specs[0])
    fill(dp, specs[0][0], 0, 20_000)
    errors: list[BaseException] = []
    stop = threading.Event()

    def applier() -> None:
        try:
            for i in range(40):
                dp.apply(specs[i % 2])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            stop.set()

    def maintainer() -> None:
        try:
            while not stop.is_set():
                dp.maintain(max_entries=4096)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=applier), threading.Thread(target=maintainer)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while not stop.is_set() and time.monotonic() < deadline:
        dict(dp.backend_addresses())  # iterating a snapshot never races with apply
        dp.service_index(*specs[0][0].key)
        dp.flow_count()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    dp.sweep()
    assert {dp.service_index(*s.key) is not None for s in specs[1]} == {True}
    assert len(dp.flows()) == 0, "the removed services' flows were all swept"


EVICTION_SLACK = 4096  # entries a full LRU map may evict early (seen: 128 of 1M)


@pytest.mark.parametrize("table_size", [1 << 20])
def test_a_full_million_entry_table(table_size: int) -> None:
    """flows.table_size 1048576: fill, count, walk, remove a service holding 100k pins, with
    bounded memory in this process."""
    dp = DataPlane(Limits(flow_table_size=table_size))
    dp.set_config(OUR_MAC)
    try:
        big, small = service(VIP_A, range(0, 64)), service(VIP_B, range(64, 128))
        dp.apply([big, small])
        rss_before = rss_mb()
        fill(dp, small, 0, 100_000)
        fill(dp, big, 100_000, table_size - 100_000)
        assert dp.flow_count().entries == table_size
        started = time.monotonic()
        until_pass(dp)
        walk_s = time.monotonic() - started
        # A full LRU map may evict a few entries as it fills (a CPU's free list runs dry before
        # the map does); those are the oldest: the small service's first flows.
        filled = dp.flow_count().walked
        assert table_size - EVICTION_SLACK <= filled <= table_size
        small_index = dp.service_index(*small.key)
        small_count = sum(int((chunk.flows()["service"] == small_index).sum()) for chunk in dp.flow_chunks())
        assert 100_000 - (table_size - filled) <= small_count <= 100_000
        started = time.monotonic()
        dp.apply([big])  # the service holding ~100k pins goes
        apply_s = time.monotonic() - started
        assert apply_s < 0.5, f"removing a service took {apply_s:.2f}s"
        assert run_xdp(dp.fd, ack(VIP_B, "10.0.0.5")).action == XdpAction.PASS
        started = time.monotonic()
        dp.sweep()
        sweep_s = time.monotonic() - started
        count = dp.flow_count()
        assert count.walked == filled - small_count and count.entries == filled - small_count
        seen = 0
        for chunk in dp.flow_chunks():
            assert isinstance(chunk, FlowChunk)
            seen += len(chunk)
        assert seen == filled - small_count
        growth = rss_mb() - rss_before
        assert growth < 60, f"RSS grew {growth:.0f} MB"
        print(f"1M table: count walk {walk_s:.2f}s, remove {apply_s * 1e3:.1f} ms, sweep {sweep_s:.2f}s, "
              f"rss +{growth:.0f} MB")
    finally:
        dp.close()


def test_counters_in_one_batch_match_the_per_index_lookups(dp: DataPlane) -> None:
    spec = service(VIP_A, range(0, 3))
    dp.apply([spec])
    for sport in range(2000, 2050):
        run_xdp(dp.fd, ack(VIP_A, "192.0.2.9", sport))
    counters = dp.counters()
    s = dp.service_index(*spec.key)
    assert s is not None
    assert bytes(counters.service(s)) == bytes(dp.service_stats(s)) and counters.service(s).packets >= 50
    for b in spec.backends:
        i = dp.backend_index(*spec.key, b.address)
        assert i is not None
        assert bytes(counters.backend(i)) == bytes(dp.backend_stats(i))
    assert sum(counters.backend(i).new_flows for i in range(16)) >= 50
