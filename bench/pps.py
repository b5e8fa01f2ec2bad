"""`make bench-pps`: packets/s through lbnode's XDP program on a veth, against a bare forwarder.

Two namespaces joined by one veth pair with two queues: `gen` (g0) and `node` (n0). In `gen`, a
generator process (this file, `--generator`, started with `ip netns exec` so that every interface
index it uses is resolved in the namespace that owns the device) runs bench/pps_gen.c by
BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES: each repetition writes both MACs of a
60-byte UDP frame (64 bytes on the wire with the FCS) and redirects it out of g0, so it arrives
on n0, where the device under test runs in native XDP mode:

- limit: bench/sink.c (count, XDP_DROP): what the generator and the veth pair move alone;
- bare: bench/baseline.c (the bench-xdp baseline: parse Ethernet+IPv4, swap the MACs, XDP_TX);
- lbnode, lbnode_64k: the real program through `DataPlane` (one UDP service, one backend at g0's
  MAC), with one 5-tuple and with 65,536 (source ports visited in turn, all pinned during the
  warm-up, so the measured packets take the established path).

A forwarder's XDP_TX goes back out of n0 into g0, which carries bench/sink.c too (a veth delivers
XDP_TX only to a peer with an XDP program). Generator, veth and forwarder all run on the
generator's CPU: the test run sends a batch, and the veth's NAPI (its own and its peer's) runs
in the same thread's softirq before the next one. So the kernel's measured duration of the test
run covers the whole path, and the rate is the frames counted at the sink (for limit: on n0)
divided by it. That duration leaves out the time the thread was preempted (the kernel stops its
timer to reschedule) and each call's fixed set-up of ~25 ms, which wall time would count: on a
shared machine the rate of the path, not of the machine. Each round measures every case once,
interleaved, after a warm-up; the table shows the median of ROUNDS rounds. For lbnode cases
every round checks the program's counters: every measured frame was addressed to it and
forwarded (no pass, no not-ours: the generator's MAC restore works), and no flow was pinned or
re-chosen while measuring.

Scaling: the same cases with two generator threads, one per CPU (each sends on its own veth
queue, so each CPU runs its own NAPI): the sum of the threads' rates, and that over one core's.

Last line: lbnode_vs_bare=<1 flow> lbnode_vs_bare_64k=<r> bare_vs_limit=<r>, one generator
thread, each the median over rounds of the ratio of two cases measured in the same round.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bpf.loader import XdpMode, attach, compile_program, detach  # noqa: E402
from bpf.testrun import run_xdp_live  # noqa: E402
from examples.lab.netguard import RealNicGuard  # noqa: E402

BENCH = Path(__file__).resolve().parent
FRAME_BYTES = 60  # 64 on the wire with the FCS
SECONDS = 2.0  # measured per case and round
ROUNDS = 3
# Repetitions per BPF_PROG_TEST_RUN call: ~50-200 ms of sending. Each call also costs ~25 ms of
# set-up that is not sending; the rate is taken over the kernel-measured run time instead.
CHUNK = 1 << 21
MANY_FLOWS = 65536
IN_FLIGHT = 256  # frames a veth queue holds (its ring)
VIP = ipaddress.ip_address("10.77.0.100")
CLIENT = "10.77.0.1"
BACKEND = ipaddress.ip_address("10.77.0.2")
PORT = 9
GEN_IF, NODE_IF = "g0", "n0"


def udp_frame(dst_mac: str, src_mac: str) -> bytes:
    from scapy.all import IP, UDP, Ether  # type: ignore[attr-defined]

    head = Ether(dst=dst_mac, src=src_mac) / IP(src=CLIENT, dst=str(VIP)) / UDP(sport=1024, dport=PORT, chksum=0)
    return bytes(head / (b"x" * (FRAME_BYTES - len(head))))


def mac_c(mac: str) -> str:
    """A MAC as the C initialiser the bench programs take with -D: 0x02,0x00,..."""
    return ",".join(f"0x{b}" for b in mac.split(":"))


# ---- the generator (runs inside the `gen` namespace) --------------------------------------------

def generator(ifname: str, dst_mac: str) -> None:
    """Serve `warm FLOWS THREADS` (compile if new, warm up, reply "ready") and `go SECONDS`
    (send for SECONDS on each thread, reply {"frames", "seconds"}) lines on stdin until EOF."""
    ifindex = socket.if_nametoindex(ifname)  # this namespace's device: the process runs in `gen`
    src_mac = Path(f"/sys/class/net/{ifname}/address").read_text().strip()
    frame = udp_frame(dst_mac, src_mac)
    programs: dict[int, Any] = {}
    keep: list[Any] = []
    fd, threads = 0, 1
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "warm":
            flows, threads = int(args[0]), int(args[1])
            if flows not in programs:
                bpf, fn = compile_program(BENCH / "pps_gen.c", "xdp_gen", [
                    f"-DGEN_IFINDEX={ifindex}", f"-DGEN_DST_MAC={mac_c(dst_mac)}",
                    f"-DGEN_SRC_MAC={mac_c(src_mac)}", f"-DGEN_FLOWS={flows}"])
                keep.append(bpf)
                programs[flows] = fn
            fd = programs[flows].fd
            # Every flow at least twice on each CPU: all pinned before anything is measured.
            send(fd, frame, threads, 0.0, max(2 * flows, CHUNK))
            print("ready", flush=True)
        elif cmd == "go":
            print(json.dumps(send(fd, frame, threads, float(args[0]))), flush=True)
    for bpf in keep:
        bpf.cleanup()


def send(fd: int, frame: bytes, threads: int, seconds: float, at_least: int = 0) -> dict[str, list[int]]:
    """Send for `seconds` (and `at_least` frames) on each thread; per thread, the frames and the
    kernel-measured ns."""
    frames, busy_ns = [0] * threads, [0] * threads

    def one(i: int) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline or frames[i] < at_least:
            busy_ns[i] += run_xdp_live(fd, frame, CHUNK) * CHUNK
            frames[i] += CHUNK

    _on_threads(threads, one)
    return {"frames": frames, "busy_ns": busy_ns}


def _on_threads(n: int, work: Callable[[int], None]) -> None:
    """Run work(i) on n threads, thread i pinned to CPU i, and wait for all."""
    def body(i: int) -> None:
        os.sched_setaffinity(0, {i})
        work(i)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# ---- the benchmark --------------------------------------------------------------------------------

@dataclass
class Sink:
    """bench/sink.c loaded once; `frames()` sums its per-CPU counter."""

    bpf: Any
    fn: Any

    @classmethod
    def load(cls) -> Sink:
        return cls(*compile_program(BENCH / "sink.c", "xdp_sink"))

    def frames(self) -> int:
        table = self.bpf[b"sink_frames"]
        return int(sum(table.getvalue(table.Key(0))))


@dataclass(frozen=True)
class Case:
    name: str
    flows: int
    threads: int


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--generator", nargs=2, metavar=("IFNAME", "DST_MAC"), help=argparse.SUPPRESS)
    p.add_argument("--rounds", type=int, default=ROUNDS)
    p.add_argument("--seconds", type=float, default=SECONDS)
    args = p.parse_args()
    if args.generator:
        generator(*args.generator)
        return 0
    from examples.lab.netns import Lab, read_line

    with RealNicGuard(), Lab(prefix="lbpps") as lab:
        gen_ns, node_ns = lab.netns("gen"), lab.netns("node")
        for ns in (gen_ns, node_ns):  # no router solicitations or DAD frames among the counted ones
            lab.ns_run(ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
        lab.veth(gen_ns, GEN_IF, node_ns, NODE_IF, queues=2)
        gen_mac, node_mac = lab.mac(gen_ns, GEN_IF), lab.mac(node_ns, NODE_IF)
        rx, drop = Sink.load(), Sink.load()
        bare_bpf, bare = compile_program(BENCH / "baseline.c", "xdp_baseline")
        dp = lbnode_dataplane(node_mac, gen_mac)
        rx_at = attach(rx.fn.fd, GEN_IF, XdpMode.NATIVE, gen_ns)
        gen = lab.spawn(gen_ns, sys.executable, str(Path(__file__).resolve()), "--generator", GEN_IF, node_mac,
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        programs = {"limit": drop.fn.fd, "bare": bare.fd, "lbnode": dp.fd, "lbnode_64k": dp.fd}
        cases = [Case("limit", 1, 1), Case("bare", 1, 1), Case("lbnode", 1, 1), Case("lbnode_64k", MANY_FLOWS, 1),
                 Case("limit", 1, 2), Case("bare", 1, 2), Case("lbnode", 1, 2), Case("lbnode_64k", MANY_FLOWS, 2)]
        samples: dict[Case, list[float]] = {c: [] for c in cases}
        delivered: dict[Case, list[float]] = {c: [] for c in cases}
        try:
            for _ in range(args.rounds):
                for case in cases:
                    at = attach(programs[case.name], NODE_IF, XdpMode.NATIVE, node_ns)
                    try:
                        mpps, share = measure(case, gen, drop if case.name == "limit" else rx, dp, read_line,
                                              args.seconds)
                    finally:
                        detach(at)
                    samples[case].append(mpps)
                    delivered[case].append(share)
        finally:
            assert gen.stdin is not None
            gen.stdin.close()
            lab.stop(gen)
            detach(rx_at)
            dp.close()
            for sink in (rx, drop):
                sink.bpf.cleanup()
            bare_bpf.cleanup()
    return report(cases, samples, delivered, args.rounds, args.seconds)


def lbnode_dataplane(node_mac: str, backend_mac: str) -> Any:
    from bpf.dataplane import BackendSpec, DataPlane, ServiceSpec
    from bpf.structs import IPPROTO_UDP

    dp = DataPlane()
    dp.set_config(node_mac)
    dp.apply([ServiceSpec(VIP, PORT, IPPROTO_UDP, (BackendSpec(BACKEND, backend_mac),))])
    return dp


def measure(case: Case, gen: subprocess.Popen[bytes], sink: Sink, dp: Any, read_line: Any,
            seconds: float) -> tuple[float, float]:
    """One case once: warm up, then count what reaches the sink while the generator runs.
    Returns (Mpps, share of generated frames that arrived)."""
    from bpf.structs import Stat

    assert gen.stdin is not None
    gen.stdin.write(f"warm {case.flows} {case.threads}\n".encode())
    gen.stdin.flush()
    if (line := read_line(gen, timeout_s=120)) != "ready":
        raise RuntimeError(f"generator: {line}")
    before, stats0 = sink.frames(), dp.stats()
    gen.stdin.write(f"go {seconds}\n".encode())
    gen.stdin.flush()
    result = json.loads(read_line(gen, timeout_s=seconds + 60))
    arrived = sink.frames() - before
    frames = sum(result["frames"])
    if case.name.startswith("lbnode"):
        moved = {s: n - stats0[s] for s, n in dp.stats().items() if n != stats0[s]}
        # Every measured frame was ours and forwarded: no frame lost its MACs, none re-pinned.
        # TX may exceed the sink's count by frames the veth dropped (shown as the delivered share),
        # and fall short of it by the warm-up's last batch, still in flight when it was read.
        unexpected = {s.name: n for s, n in moved.items() if s not in (Stat.TX, Stat.EVENT_LOST)}
        if unexpected or moved.get(Stat.TX, 0) + IN_FLIGHT < arrived:
            raise RuntimeError(f"{case}: counters moved {unexpected}, tx {moved.get(Stat.TX, 0)}, arrived {arrived}")
    share = arrived / frames
    # Each thread's rate over its own busy time (summed: they ran side by side), times the share
    # of generated frames that arrived.
    rate = sum(f / (ns / 1e9) for f, ns in zip(result["frames"], result["busy_ns"], strict=True)) * share
    return rate / 1e6, share


def report(cases: list[Case], samples: dict[Case, list[float]], delivered: dict[Case, list[float]],
           rounds: int, seconds: float) -> int:
    median = {c: statistics.median(v) for c, v in samples.items()}
    by = {(c.name, c.threads): median[c] for c in cases}
    print(f"native XDP on a veth pair, {FRAME_BYTES}-byte UDP frames from a BPF_PROG_TEST_RUN live-frames generator; "
          f"{rounds} interleaved rounds of {seconds:.0f} s per case, median")
    for threads in (1, 2):
        print(f"{threads} generator thread{'s' if threads > 1 else ''} ({threads} CPU{'s' if threads > 1 else ''}):")
        print(f"  {'case':12} {'Mpps':>6}  {'vs bare':>7}  {'delivered':>9}  samples")
        for c in (c for c in cases if c.threads == threads):
            print(f"  {c.name:12} {median[c]:6.2f}  {median[c] / by[('bare', threads)]:7.2f}  "
                  f"{statistics.median(delivered[c]):9.3f}  {[round(v, 2) for v in samples[c]]}")
    print("scaling, 1 -> 2 cores (rate with 2 threads / rate with 1): " + ", ".join(
        f"{name} {by[(name, 2)] / by[(name, 1)]:.2f}x" for name in ("limit", "bare", "lbnode", "lbnode_64k")))
    # The last line's ratios are paired: the median over rounds of the ratio within a round.
    one = {c.name: samples[c] for c in cases if c.threads == 1}

    def paired(a: str, b: str) -> float:
        return float(statistics.median(x / y for x, y in zip(one[a], one[b], strict=True)))

    print(f"lbnode_vs_bare={paired('lbnode', 'bare'):.2f} lbnode_vs_bare_64k={paired('lbnode_64k', 'bare'):.2f} "
          f"bare_vs_limit={paired('bare', 'limit'):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
