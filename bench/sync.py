"""Flow-sync benchmark: two real sync hosts (examples/lab/sync_runner.py) in namespaces on one bridge.

Node A runs the bench build of the XDP program (-DLB_BENCH_NEW_FLOW: every BPF_PROG_TEST_RUN
repetition is a new client), so flows take the real kernel path into A's ring buffer; A's
FlowSync multicasts them; B installs them into its own flow table (with its own indexes). A's
generator runs in a thread pinned to one CPU and its CPU time is subtracted from A's.

1. baseline: raw UDP throughput of a Python sender -> receiver pair between the namespaces
   (1384-byte datagrams, the size of a full FLOWS datagram), as flows/s if each carried 24 flows;
2. max rate: 300k new flows as fast as A's ring drains; rate = flows installed on B / (last
   install on B - first flow created on A);
3. latency: 10k new flows/s for 3 s; per flow, B's install time - A's creation time (one
   CLOCK_MONOTONIC across namespaces).

Last line: replicated=<flows/s> ratio=<replicated / the raw-UDP baseline's flows/s>x
installed=<flows on B>/<flows created on A, max-rate run> p99_ms=<ms at 10k/s>
cpu=<%, the busier node at 10k/s>%
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cluster.sync import codec as gossip  # noqa: E402
from examples.lab.sync_runner import HostProcess, SyncLab  # noqa: E402
from examples.lab.netns import Lab, read_line  # noqa: E402

MAX_FLOWS = 300_000
LATENCY_RATE = 10_000
LATENCY_SECONDS = 3
DATAGRAM = gossip.MAX_FLOWS * gossip.FLOW_RECORD_BYTES + gossip.HEADER.size + gossip.TAG_BYTES
PYTHON = sys.executable


def udp_send(dst: str, port: int, seconds: float) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    payload = os.urandom(DATAGRAM)
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        for _ in range(256):
            try:
                s.sendto(payload, (dst, port))
                n += 1
            except BlockingIOError:
                pass
    print(n, flush=True)


def udp_recv(port: int, seconds: float) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE
    s.bind(("0.0.0.0", port))
    s.settimeout(0.5)
    print("bound", flush=True)
    n, first, last = 0, 0.0, 0.0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            s.recv(2048)
        except TimeoutError:
            continue
        last = time.monotonic()
        first = first or last
        n += 1
    print(n, last - first, flush=True)


def baseline(net: SyncLab) -> float:
    import subprocess

    recv = net.lab.spawn(net.hosts["b"], PYTHON, __file__, "--udp-recv", "9999", "3", stdout=subprocess.PIPE)
    assert read_line(recv, timeout_s=20) == "bound"
    send = net.lab.spawn(net.hosts["a"], PYTHON, __file__, "--udp-send", net.ips["b"], "9999", "1.0",
                         stdout=subprocess.PIPE)
    sent = int(read_line(send, timeout_s=20))
    got, span = read_line(recv, timeout_s=20).split()
    rate = int(got) / max(float(span), 1e-3)
    print(f"baseline: Python UDP {DATAGRAM}-byte datagrams A->B: sent {sent}, received {got} "
          f"({rate:,.0f}/s = {rate * gossip.MAX_FLOWS:,.0f} flows/s at {gossip.MAX_FLOWS} per datagram)")
    return rate * gossip.MAX_FLOWS


def cpu(host: HostProcess) -> tuple[float, float, float]:
    r = host.call(cmd="cpu")
    return r["cpu_s"], r["gen_cpu_s"], r["mono"]


def cpu_percent(before: tuple[float, float, float], after: tuple[float, float, float]) -> float:
    busy = (after[0] - before[0]) - (after[1] - before[1])
    return 100 * busy / max(after[2] - before[2], 1e-3)


def installed(b: HostProcess) -> int:
    return int(b.call(cmd="snapshot")["counters"]["installed"])


def wait_installed(b: HostProcess, target: int, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    last, last_change = -1, time.monotonic()
    while time.monotonic() < deadline:
        n = installed(b)
        if n >= target:
            return n
        if n != last:
            last, last_change = n, time.monotonic()
        elif time.monotonic() - last_change > 3:
            return n  # stalled: some flows were lost
        time.sleep(0.05)
    return installed(b)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--udp-send", nargs=3, metavar=("DST", "PORT", "SECONDS"))
    p.add_argument("--udp-recv", nargs=2, metavar=("PORT", "SECONDS"))
    args = p.parse_args()
    if args.udp_send:
        udp_send(args.udp_send[0], int(args.udp_send[1]), float(args.udp_send[2]))
        return 0
    if args.udp_recv:
        udp_recv(int(args.udp_recv[0]), float(args.udp_recv[1]))
        return 0

    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp, Lab(prefix="lbbs") as lab:
        key_file = Path(tmp) / "sync.key"
        key_file.write_bytes(os.urandom(32).hex().encode())
        net = SyncLab(lab, str(key_file))
        net.add_node("a", 1)
        net.add_node("b", 2)
        flows_baseline = baseline(net)

        table = str(1 << 20)
        a = net.start("a", "--bench", "--ring-pages", "4096", "--flow-table", table, "--gen-cpu", "0")
        b = net.start("b", "--skew", "--flow-table", table)
        a.wait_ready(), b.wait_ready()
        ring_bytes = 4096 * 4096

        # --- max rate -------------------------------------------------------------------------------
        before_a, before_b = cpu(a), cpu(b)
        b.call(cmd="log_keys", on=False)
        batches = a.call(cmd="gen", total=MAX_FLOWS, rate=0, chunk=20000, ring_limit=ring_bytes // 2, timeout_s=60)["batches"]
        got = max_installed = wait_installed(b, MAX_FLOWS, 30)
        after_a, after_b = cpu(a), cpu(b)
        log = b.call(cmd="installs")["log"]
        first_ns = batches[0][0]
        last_ns = max(t for t, _ in log)
        replicated = got / ((last_ns - first_ns) / 1e9)
        gen_s = (batches[-1][0] - first_ns) / 1e9
        snap_a, snap_b = a.call(cmd="snapshot"), b.call(cmd="snapshot")
        span_s = (last_ns - first_ns) / 1e9  # CPU per second of replication (idle time around it is tiny)
        cpu_max_a = cpu_percent(before_a, (after_a[0], after_a[1], before_a[2] + span_s))
        cpu_max_b = cpu_percent(before_b, (after_b[0], after_b[1], before_b[2] + span_s))
        print(f"max rate: {MAX_FLOWS} flows created on A in {gen_s:.2f}s; {got} installed on B in "
              f"{(last_ns - first_ns) / 1e9:.2f}s = {replicated:,.0f} flows/s "
              f"({replicated / flows_baseline:.2f}x the raw-UDP baseline)")
        stats_a = a.call(cmd="stats")
        print(f"  A: {stats_a['new_flow']} flows pinned, {stats_a['event_lost']} events lost in the ring, "
              f"{snap_a['counters']['events']} read, {snap_a['counters']['sent']} datagrams; B: gaps {snap_b['counters']['gaps']}, "
              f"recovered {snap_b['counters']['recovered']}, lost {snap_b['counters']['lost']}")
        print(f"  control-plane CPU per second of replication (generator thread excluded): A {cpu_max_a:.0f}%, "
              f"B {cpu_max_b:.0f}% of one core")

        # --- latency at 10k/s -----------------------------------------------------------------------
        b.call(cmd="log_keys", on=True)
        base = installed(b)
        before_a, before_b = cpu(a), cpu(b)
        total = LATENCY_RATE * LATENCY_SECONDS
        batches = a.call(cmd="gen", total=total, rate=LATENCY_RATE, chunk=1, timeout_s=60)["batches"]
        got = wait_installed(b, base + total, 20) - base
        after_a, after_b = cpu(a), cpu(b)
        created = {n: t for t, n, _ in batches}
        latencies = sorted((t - created[n]) / 1e6 for t, ns in b.call(cmd="installs", keys=True)["keys"]
                           for n in ns if n in created)
        p50, p99 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99)]
        cpu_a, cpu_b = cpu_percent(before_a, after_a), cpu_percent(before_b, after_b)
        print(f"latency at {LATENCY_RATE}/s for {LATENCY_SECONDS}s: {got}/{total} flows installed on B; "
              f"creation on A -> entry on B p50 {p50:.2f} ms, p99 {p99:.2f} ms, max {latencies[-1]:.2f} ms")
        print(f"  control-plane CPU (generator thread excluded): A {cpu_a:.0f}%, B {cpu_b:.0f}% of one core")
        print(f"(bench took {time.monotonic() - t0:.0f}s)")
        print(f"replicated={replicated:.0f} ratio={replicated / flows_baseline:.2f}x installed={max_installed}/{MAX_FLOWS} "
              f"p99_ms={p99:.2f} cpu={max(cpu_a, cpu_b):.0f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
