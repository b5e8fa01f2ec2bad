"""`make bench-xdp`: per-packet cost of the lbnode XDP program against a bare forwarder.

BPF_PROG_TEST_RUN runs each program REPEAT times on one frame and reports the mean ns per run
(the kernel's own measurement, so the syscall's fixed set-up is not counted). Five rounds,
interleaved so that machine noise hits every program alike; the median per program is compared
with the baseline (bench/baseline.c: parse Ethernet+IPv4, swap MACs, XDP_TX) of the same run.

- established: a TCP ACK of a flow already pinned (the hot path: one LRU hit).
- new: the benchmark build (-DLB_BENCH_NEW_FLOW) makes every run a new client address, so each
  packet misses, indexes the hash table, inserts into the LRU (evicting once it is full) and
  writes a ring-buffer event (the ring fills early on, after which the event is counted lost).
- pass: UDP to an address that is no VIP (flow miss + service miss, XDP_PASS).
The new-flow case is repeated for other flow-table sizes: its cost is dominated by cache misses
in the LRU table, so it grows with the table.
Last line: established=<ratio>x new=<ratio>x pass=<ratio>x
"""
from __future__ import annotations

import ipaddress
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scapy.all import IP, TCP, UDP, Ether  # type: ignore[attr-defined]  # noqa: E402

from bpf.dataplane import BackendSpec, DataPlane, ServiceSpec  # noqa: E402
from bpf.loader import Limits, compile_program  # noqa: E402
from bpf.structs import IPPROTO_TCP, Stat  # noqa: E402
from bpf.testrun import XdpAction, run_xdp  # noqa: E402

REPEAT = 1_000_000
ROUNDS = 5
SIZE_SWEEP = (16384, 65536, 1048576)
OUR_MAC = "02:00:00:00:00:01"
VIP = ipaddress.ip_address("10.0.0.100")


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


def main() -> int:
    base_bpf, base_fn = compile_program(Path(__file__).with_name("baseline.c"), "xdp_baseline")
    lb, lb_new = dataplane([]), dataplane(["-DLB_BENCH_NEW_FLOW"])
    ack = frame(str(VIP), TCP(sport=40000, dport=80, flags="A"))
    other = frame("10.0.0.5", UDP(sport=40000, dport=53))
    assert run_xdp(lb.fd, ack).action == XdpAction.TX and len(lb.flows()) == 1  # pinned: now established
    assert run_xdp(lb.fd, other).action == XdpAction.PASS
    before = lb.stats()[Stat.TX]
    run_xdp(lb.fd, ack, repeat=1000)
    assert lb.stats()[Stat.TX] - before == 1000, "every repetition must take the forwarding path"

    cases = {
        "baseline": (base_fn.fd, ack),
        "established": (lb.fd, ack),
        "new": (lb_new.fd, ack),
        "pass": (lb.fd, other),
    }
    samples: dict[str, list[int]] = {name: [] for name in cases}
    for _ in range(ROUNDS):
        for name, (fd, pkt) in cases.items():
            samples[name].append(run_xdp(fd, pkt, repeat=REPEAT).duration_ns)
    median = {name: statistics.median(values) for name, values in samples.items()}
    new_stats = lb_new.stats()
    print(f"BPF_PROG_TEST_RUN, {len(ack)}-byte frames, repeat={REPEAT}, {ROUNDS} interleaved rounds")
    print(f"{'case':12} {'median ns':>9}  {'ratio':>6}  samples")
    for name, values in samples.items():
        print(f"{name:12} {median[name]:9.0f}  {median[name] / median['baseline']:5.2f}x  {values}")
    print(f"new-flow build: {new_stats[Stat.NEW_FLOW]} flows pinned, {len(lb_new.flows())} in the LRU "
          f"(size {lb_new.limits.flow_table_size}), {new_stats[Stat.EVENT_LOST]} ring-buffer events lost (no reader)")
    for dp in (lb, lb_new):
        dp.close()
    # The new-flow cost is mostly the LRU insert touching cold memory: show how it scales.
    print("new-flow cost by flow-table size (same baseline fd, 3 rounds):")
    for size in SIZE_SWEEP:
        sized = dataplane(["-DLB_BENCH_NEW_FLOW"], Limits(flow_table_size=size))
        runs = [(run_xdp(sized.fd, ack, repeat=REPEAT).duration_ns, run_xdp(base_fn.fd, ack, repeat=REPEAT).duration_ns)
                for _ in range(3)]
        sized.close()
        ns = statistics.median(r for r, _ in runs)
        print(f"  {size:>8} entries: {ns:6.0f} ns  {ns / statistics.median(b for _, b in runs):5.2f}x")
    base_bpf.cleanup()
    ratio = {name: median[name] / median["baseline"] for name in ("established", "new", "pass")}
    print(f"established={ratio['established']:.2f}x new={ratio['new']:.2f}x pass={ratio['pass']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
