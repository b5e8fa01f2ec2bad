"""`make bench-xdp`: per-packet cost of the lbnode XDP program against a bare forwarder.

BPF_PROG_TEST_RUN runs a program `repeat` times on one frame and reports the mean ns per run
(the kernel's own measurement, so the syscall's fixed set-up is not counted). Five rounds,
interleaved so that machine noise hits every program alike; the median per case is compared
with the baseline (bench/baseline.c: parse Ethernet+IPv4, swap MACs, XDP_TX) of the same run.

- established: a TCP ACK of a pinned flow, on a flow table filled to its default size (262,144
  entries). The benchmark build -DLB_BENCH_SPREAD_BITS=18 makes the n-th repetition one of those
  262,144 clients, visited in an order spread over the table, so lookups miss the caches as they
  do on a busy node. "established-hot" is the same build with one client (SPREAD_BITS=0): the
  cache-hot figure a one-entry table gives, for comparison only.
- new: the build -DLB_BENCH_NEW_FLOW makes every repetition a new client, so each packet misses,
  indexes the hash table, inserts into the LRU (full beforehand: every insert evicts) and writes a
  ring-buffer event. Runs are chunks the ring can hold; between chunks a thread on the other CPU
  empties the ring with the reader flow sync uses (bpf/ringbuf.py), so no event takes the
  ring-full path and the ring's pages move between CPUs as they do in production.
- pass: UDP to an address that is no VIP (flow miss + service miss, XDP_PASS), one 5-tuple (a
  node's own traffic has few), on the one-client build: the spread build would vary its key.

- hash: the flow hash alone (bpf/flowhash.h, XXH32) against the alternative it replaced (murmur3_32),
  from bench/flowhash.c: a chain of HASH_ROUNDS dependent hashes per run, minus the same chain
  with a trivial step, divided by HASH_ROUNDS: the latency one new flow (or SYN) pays.

Every round checks the program's per-CPU counters: each repetition took the path its case claims
(tx / new_flow / pass deltas equal the repetitions, no repins, no lost events; the drain thread
read one event per new flow). The new-flow case is repeated for other flow-table sizes: its cost
is dominated by cache misses in the LRU table, so it grows with the table.
Last line: established=<ratio>x new=<ratio>x pass=<ratio>x

`bench/xdp.py --profile` instead samples the established-hot and new cases with `perf record`
on the benchmark's CPU (bpftool's `prog profile` is not installed here) and prints, per case,
the kernel symbols' shares of the samples taken inside the test run: the program itself
(bpf_prog_*_xdp_main) against the map code it calls.
"""
from __future__ import annotations

import functools
import ipaddress
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scapy.all import IP, TCP, UDP, Ether  # type: ignore[attr-defined]  # noqa: E402

from bpf.dataplane import BackendSpec, DataPlane, ServiceSpec  # noqa: E402
from bpf.loader import Limits, compile_program  # noqa: E402
from bpf.structs import IPPROTO_TCP, Flow, FlowKey, Stat  # noqa: E402
from bpf.testrun import XdpAction, run_xdp  # noqa: E402

REPEAT = 1_000_000  # per round: baseline, established, pass
NEW_REPEAT = 262_144  # per round: new flows, in chunks of NEW_CHUNK
NEW_CHUNK = 8192  # events the ring holds with room to spare (256 pages / 72-byte records ~ 14.5k)
ROUNDS = 5
SPREAD_BITS = 18  # 2^18 = 262,144 = Limits().flow_table_size
SIZE_SWEEP = (16384, 65536, 1048576)
HASH_ROUNDS = 64  # bench/flowhash.c's default
HASH_REPEAT = 200_000
OUR_MAC = "02:00:00:00:00:01"
VIP = ipaddress.ip_address("10.0.0.100")
BENCH_CPU, DRAIN_CPU = 0, 1


def frame(dst: str, l4: object) -> bytes:
    return bytes(Ether(dst=OUR_MAC, src="02:00:00:00:00:fe") / IP(src="192.0.2.7", dst=dst) / l4 / (b"x" * 6))


def dataplane(extra: list[str], limits: Limits = Limits()) -> DataPlane:
    dp = DataPlane(limits, extra_cflags=extra)
    dp.set_config(OUR_MAC)
    # The test run reuses one buffer: after the first run the frame carries the backend's MAC.
    # Backends "at" our own MAC keep every repetition addressed to us, so each one takes the full
    # path instead of the cheap not-ours exit; nothing else depends on the MAC's value.
    backends = tuple(BackendSpec(ipaddress.ip_address(f"10.0.0.{10 + i}"), OUR_MAC) for i in range(1, 4))
    dp.apply([ServiceSpec(VIP, 80, IPPROTO_TCP, backends)])
    return dp


def fill_spread(dp: DataPlane, ack: bytes, bits: int) -> int:
    """Pin `ack`'s flow, then write the 2^bits clients the SPREAD build visits (src[3] ^ index),
    through the batch write flow sync uses. Returns the entries in the table."""
    assert run_xdp(dp.fd, ack).action == XdpAction.TX
    ((key, flow),) = dp.flows()
    keys, values = bytearray(), bytearray()
    for index in range(1 << bits):
        k = FlowKey.from_buffer_copy(key)
        k.src[3] ^= index
        keys += bytes(k)
        values += bytes(Flow(flow.backend, flow.service, 0, flow.last_seen_ns))
        if len(keys) >= 65536 * len(bytes(k)) or index == (1 << bits) - 1:
            dp.write_flows_packed(bytes(keys), bytes(values))
            keys, values = bytearray(), bytearray()
    return len(dp.flows())


class RingDrain:
    """Empties the flow-event ring with flow sync's batch reader (bpf/ringbuf.py), from a thread
    on the other CPU, between test runs. Not during them: with a reader polling concurrently,
    this kernel (6.18) lost about one event in 20k although the ring never filled past 70%."""

    def __init__(self, dp: DataPlane) -> None:
        self.reader = dp.flow_event_reader()
        self.records = 0
        self._pool = ThreadPoolExecutor(1, initializer=os.sched_setaffinity, initargs=(0, {DRAIN_CPU}))

    def _read_all(self) -> None:
        while self.reader.pending_bytes():
            self.records += len(self.reader.read())

    def empty(self) -> None:
        self._pool.submit(self._read_all).result(timeout=30)

    def close(self) -> None:
        self._pool.shutdown()
        self.reader.close()


def run_new(dp: DataPlane, drain: RingDrain, pkt: bytes, total: int) -> float:
    """Mean ns per new flow over `total` repetitions, in chunks with the ring drained between them."""
    means = []
    for _ in range(total // NEW_CHUNK):
        drain.empty()
        means.append(run_xdp(dp.fd, pkt, repeat=NEW_CHUNK).duration_ns)
    drain.empty()
    return statistics.fmean(means)


def checked(dp: DataPlane | None, measure: Callable[[], float], expect: dict[Stat, int],
            extra: Callable[[], None] = lambda: None) -> float:
    """Run `measure`, then assert the program's counters moved exactly as `expect` says."""
    before = dp.stats() if dp else {}
    ns = measure()
    if dp is not None:
        after = dp.stats()
        moved = {s: after[s] - before[s] for s in Stat if after[s] != before[s] or s in expect}
        assert moved == expect, f"counters {({s.name: n for s, n in moved.items()})}, expected " \
                                f"{({s.name: n for s, n in expect.items()})}"
    extra()
    return ns


PROFILE_SYMBOLS = 12  # the top kernel symbols per case


def perf_profile(name: str, run: Callable[[], object]) -> None:
    """Run `run` under `perf record -C BENCH_CPU`; print the top kernel symbols' shares."""
    with tempfile.TemporaryDirectory() as tmp:
        data = str(Path(tmp) / "perf.data")
        perf = subprocess.Popen(["perf", "record", "-q", "-C", str(BENCH_CPU), "-o", data],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while not Path(data).exists():  # perf writes its header once it samples
                if perf.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"perf record did not start (exit {perf.poll()})")
                time.sleep(0.05)
            run()
        finally:
            perf.send_signal(signal.SIGINT)
            perf.wait(timeout=60)
        report = subprocess.run(["perf", "report", "-i", data, "--stdio", "--no-children", "--sort", "symbol", "-q"],
                                capture_output=True, text=True, timeout=120, check=True).stdout
    rows = [(float(line.split("%")[0]), line.split("[k]")[1].split()[0]) for line in report.splitlines()
            if "%" in line and "[k]" in line]
    total = sum(share for share, _ in rows if not _.startswith(("pv_native_safe_halt", "native_safe_halt")))
    print(f"{name}: kernel symbols, % of the kernel samples (idle excluded), top {PROFILE_SYMBOLS}:")
    for share, symbol in [r for r in rows if "safe_halt" not in r[1]][:PROFILE_SYMBOLS]:
        print(f"  {100 * share / total:5.1f}%  {symbol}")


def profile() -> int:
    os.sched_setaffinity(0, {BENCH_CPU})
    hot = dataplane(["-DLB_BENCH_SPREAD_BITS=0"])
    lb_new = dataplane(["-DLB_BENCH_NEW_FLOW"])
    ack = frame(str(VIP), TCP(sport=40000, dport=80, flags="A"))
    assert fill_spread(hot, ack, 0) == 1
    run_xdp(lb_new.fd, ack, repeat=lb_new.limits.flow_table_size + NEW_CHUNK)
    drain = RingDrain(lb_new)
    drain.empty()
    perf_profile("established-hot", lambda: [run_xdp(hot.fd, ack, repeat=5 * REPEAT) for _ in range(4)])
    perf_profile("new", lambda: run_new(lb_new, drain, ack, 4 * NEW_REPEAT))
    drain.close()
    for dp in (hot, lb_new):
        dp.close()
    return 0


def main() -> int:
    if "--profile" in sys.argv[1:]:
        return profile()
    os.sched_setaffinity(0, {BENCH_CPU})  # the bench counter is per CPU: keep every run on one
    base_bpf, base_fn = compile_program(Path(__file__).with_name("baseline.c"), "xdp_baseline")
    spread = dataplane([f"-DLB_BENCH_SPREAD_BITS={SPREAD_BITS}"])
    hot = dataplane(["-DLB_BENCH_SPREAD_BITS=0"])
    lb_new = dataplane(["-DLB_BENCH_NEW_FLOW"])
    ack = frame(str(VIP), TCP(sport=40000, dport=80, flags="A"))
    other = frame("10.0.0.5", UDP(sport=40000, dport=53))

    size = spread.limits.flow_table_size
    entries = fill_spread(spread, ack, SPREAD_BITS)
    assert entries == size == 1 << SPREAD_BITS, f"{entries} entries after filling a {size}-entry table"
    assert fill_spread(hot, ack, 0) == 1
    # Warm-up (not measured): one visit of every client writes its last_seen once; and the
    # new-flow table is filled, so every measured insert evicts. The ring overflows here.
    run_xdp(spread.fd, ack, repeat=size)
    run_xdp(lb_new.fd, ack, repeat=lb_new.limits.flow_table_size + NEW_CHUNK)
    drain = RingDrain(lb_new)
    drain.empty()

    hash_fd = {name: compile_program(Path(__file__).with_name("flowhash.c"), "xdp_hash", flags)
               for name, flags in (("none", ["-DHASH_NONE"]), ("xxh32", []), ("murmur3", ["-DHASH_CHALLENGER"]))}
    fwd = {Stat.TX: REPEAT}
    cases: dict[str, Callable[[], float]] = {
        "baseline": lambda: checked(None, lambda: run_xdp(base_fn.fd, ack, repeat=REPEAT).duration_ns, {}),
        "established": lambda: checked(spread, lambda: run_xdp(spread.fd, ack, repeat=REPEAT).duration_ns,
                                       {**fwd, Stat.NEW_FLOW: 0, Stat.FLOW_REPINNED: 0}),
        "established-hot": lambda: checked(hot, lambda: run_xdp(hot.fd, ack, repeat=REPEAT).duration_ns,
                                           {**fwd, Stat.NEW_FLOW: 0, Stat.FLOW_REPINNED: 0}),
        "new": lambda: new_case(lb_new, drain, ack, NEW_REPEAT),
        "pass": lambda: checked(hot, lambda: run_xdp(hot.fd, other, repeat=REPEAT).duration_ns,
                                {Stat.PASS: REPEAT}),
    }
    for name, (_, fn) in hash_fd.items():
        cases[f"hash-{name}"] = functools.partial(hash_chain, fn.fd, other)
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(ROUNDS):
        for name, measure in cases.items():
            samples[name].append(measure())
    hash_ns = {name: (statistics.median(samples.pop(f"hash-{name}")) - statistics.median(samples["hash-none"]))
               / HASH_ROUNDS for name in ("xxh32", "murmur3")}
    del samples["hash-none"]
    median = {name: statistics.median(values) for name, values in samples.items()}
    assert len(spread.flows()) == size, "the established table lost entries"
    lost = lb_new.stats()[Stat.EVENT_LOST]
    print(f"BPF_PROG_TEST_RUN, {len(ack)}-byte frames, {ROUNDS} interleaved rounds; repeat={REPEAT} "
          f"(new flows: {NEW_REPEAT} in chunks of {NEW_CHUNK}, ring emptied between chunks by a reader thread)")
    print(f"{'case':16} {'median ns':>9}  {'ratio':>6}  samples")
    for name, values in samples.items():
        print(f"{name:16} {median[name]:9.0f}  {median[name] / median['baseline']:5.2f}x  {[round(v) for v in values]}")
    print(f"flow hash alone, ns a hash (chain of {HASH_ROUNDS}): xxh32 (lbnode's) {hash_ns['xxh32']:.1f}, "
          f"murmur3 (the alternative) {hash_ns['murmur3']:.1f}")
    print(f"established: {size} flows in the table, 2^{SPREAD_BITS} clients visited in spread order; "
          f"established-hot: one flow (reference only)")
    print(f"new-flow build: {lb_new.stats()[Stat.NEW_FLOW]} flows pinned, {len(lb_new.flows())} in the LRU "
          f"(size {lb_new.limits.flow_table_size}), {drain.records} events read by the drain thread, "
          f"{lost} lost (all in the undrained warm-up)")
    drain.close()
    for dp in (spread, hot, lb_new):
        dp.close()
    # The new-flow cost is mostly the LRU insert touching cold memory: show how it scales.
    print("new-flow cost by flow-table size (full table, ring drained, same baseline, 3 rounds):")
    for table in SIZE_SWEEP:
        sized = dataplane(["-DLB_BENCH_NEW_FLOW"], Limits(flow_table_size=table))
        run_xdp(sized.fd, ack, repeat=table + NEW_CHUNK)
        sized_drain = RingDrain(sized)
        sized_drain.empty()
        runs = [(new_case(sized, sized_drain, ack, NEW_REPEAT // 2),
                 run_xdp(base_fn.fd, ack, repeat=REPEAT).duration_ns) for _ in range(3)]
        sized_drain.close()
        sized.close()
        ns = statistics.median(r for r, _ in runs)
        print(f"  {table:>8} entries: {ns:6.0f} ns  {ns / statistics.median(b for _, b in runs):5.2f}x")
    base_bpf.cleanup()
    for hash_bpf, _ in hash_fd.values():
        hash_bpf.cleanup()
    ratio = {name: median[name] / median["baseline"] for name in ("established", "new", "pass")}
    print(f"established={ratio['established']:.2f}x new={ratio['new']:.2f}x pass={ratio['pass']:.2f}x")
    return 0


def hash_chain(fd: int, pkt: bytes) -> float:
    return run_xdp(fd, pkt, repeat=HASH_REPEAT).duration_ns


def new_case(dp: DataPlane, drain: RingDrain, pkt: bytes, total: int) -> float:
    """New flows with the ring drained; every repetition pinned, forwarded and reported."""
    n = total // NEW_CHUNK * NEW_CHUNK
    read0 = drain.records

    def all_read() -> None:
        assert drain.records - read0 == n, f"drain thread read {drain.records - read0} events for {n} new flows"

    return checked(dp, lambda: run_new(dp, drain, pkt, total),
                   {Stat.TX: n, Stat.NEW_FLOW: n, Stat.EVENT_LOST: 0, Stat.FLOW_REPINNED: 0}, all_read)


if __name__ == "__main__":
    sys.exit(main())
