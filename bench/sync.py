"""Flow-sync benchmark: two real lbnode nodes, then two lab sync hosts, in namespaces on a bridge.

Row 1, real nodes. Two `python -m cluster.cli` processes (nodes A 10.9.0.1 and B 10.9.0.2, XDP
attached natively to their eth0, an XDP_PASS program on the bridge side of each veth, flow sync
over multicast, no BGP), two DSR backends that pass the nodes' TCP health checks, and a client.
A generator in the client namespace (this file, `--gen`) sends TCP ACKs over an AF_PACKET socket
to A's MAC, for the VIP 10.9.0.100:9000, each from a new client (source 172.20.x.y:port, an
unrouted range): A's program pins each one and reports it on its ring buffer, A's FlowSync
multicasts it, B installs it. Measured on B only:

1. max rate: 300k new flows sent as fast as the generator can; rate = flows installed on B (its
   status socket's `sync.counters.installed`, polled every 20 ms) / (time of the last increase
   - the first frame sent);
2. latency: 10k new flows/s for 3 s; this process polls B's flow table (the `flows` map of the
   program attached to B's eth0, opened by id) for each sent flow's key; latency = first seen
   on B - sent by the generator (one CLOCK_MONOTONIC across namespaces; resolution is one
   polling pass, <= about 1 ms).

Row 2, lab sync hosts (examples/lab/sync_runner.py): the real DataPlane and FlowSync, but no
program attached and no lbnode process; flows are made on A by BPF_PROG_TEST_RUN of a bench
build (-DLB_BENCH_NEW_FLOW). Same two measurements, from the hosts' own install logs.

Baseline (measured once, between A's and B's namespaces before the nodes start): raw UDP
throughput of a Python sender -> receiver pair (1384-byte datagrams, the size of a full FLOWS
datagram), as flows/s if each carried 24 flows.

The generator, the veths, the bridge and A's program share one core, so the real nodes' max rate
is bounded by the frames/s that path carries (`offered`); B's lag after the last frame shows
whether sync kept up. Row 2 has no frame path and shows the sync path's own ceiling.

Last line: flows_per_s=<real nodes, max rate> ratio=<that / the baseline's flows/s>x
offered=<frames/s sent to A> installed=<on B>/<pinned on A, max-rate run> p50_ms= p99_ms=<real
nodes, at 10k/s> cpu=<%, the busier node process at 10k/s> host_flows_per_s= host_ratio=
host_installed= host_p99_ms= (row 2, the same definitions)
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cluster.sync import codec as gossip  # noqa: E402
from examples.lab.netns import Lab, read_line, wait_until  # noqa: E402
from examples.lab.sync_runner import HostProcess, SyncLab  # noqa: E402

MAX_FLOWS = 300_000
LATENCY_RATE = 10_000
LATENCY_SECONDS = 3
DATAGRAM = gossip.MAX_FLOWS * gossip.FLOW_RECORD_BYTES + gossip.HEADER.size + gossip.TAG_BYTES
PYTHON = sys.executable
REPO = Path(__file__).resolve().parent.parent

VIP, VIP_PORT = "10.9.0.100", 9000
CLIENT_BASE = 0xAC140000  # 172.20.0.0: client n is 172.20.0.0 + (n >> 10), port 1024 + (n & 1023)
FLOW_TABLE = 1 << 20


# ---- raw-UDP baseline ----------------------------------------------------------------------------

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


def baseline(lab: Lab, ns_a: str, ns_b: str, ip_b: str) -> float:
    recv = lab.spawn(ns_b, PYTHON, __file__, "--udp-recv", "9999", "3", stdout=subprocess.PIPE)
    assert read_line(recv, timeout_s=20) == "bound"
    send = lab.spawn(ns_a, PYTHON, __file__, "--udp-send", ip_b, "9999", "1.0", stdout=subprocess.PIPE)
    sent = int(read_line(send, timeout_s=20))
    got, span = read_line(recv, timeout_s=20).split()
    rate = int(got) / max(float(span), 1e-3)
    print(f"baseline: Python UDP {DATAGRAM}-byte datagrams A->B: sent {sent}, received {got} "
          f"({rate:,.0f}/s = {rate * gossip.MAX_FLOWS:,.0f} flows/s at {gossip.MAX_FLOWS} per datagram)")
    return rate * gossip.MAX_FLOWS


# ---- the client-namespace generator (`--gen`) -----------------------------------------------------

def client(n: int) -> tuple[str, int]:
    return socket.inet_ntoa(struct.pack("!I", CLIENT_BASE + (n >> 10))), 1024 + (n & 1023)


def _ip_checksum(header: bytes) -> int:
    total: int = sum(struct.unpack("!10H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ack_frames(dst_mac: str, src_mac: str, first: int, count: int) -> list[bytes]:
    """TCP ACKs to the VIP, one per client first..first+count-1 (TCP checksum left 0: the
    backends drop them, so they never answer the unrouted clients)."""
    eth = bytes.fromhex(dst_mac.replace(":", "")) + bytes.fromhex(src_mac.replace(":", "")) + b"\x08\x00"
    vip = socket.inet_aton(VIP)
    frames = []
    for n in range(first, first + count):
        src, sport = client(n)
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0x4000, 64, 6, 0, socket.inet_aton(src), vip)
        ip = ip[:10] + struct.pack("!H", _ip_checksum(ip)) + ip[12:]
        tcp = struct.pack("!HHIIBBHHH", sport, VIP_PORT, 1, 1, 5 << 4, 0x10, 65535, 0, 0)
        frames.append(eth + ip + tcp)
    return frames


def generate(ifname: str, dst_mac: str, first: int, count: int, rate: float, cpu: int) -> None:
    """Print "ready", wait for a line on stdin, send, print {"sent", "batches": [[t_ns, first, n]]}."""
    os.sched_setaffinity(0, {cpu})
    src_mac = Path(f"/sys/class/net/{ifname}/address").read_text().strip()  # this namespace's device
    frames = ack_frames(dst_mac, src_mac, first, count)
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    s.bind((ifname, 0))
    print("ready", flush=True)
    sys.stdin.readline()
    chunk = max(1, int(rate / 1000)) if rate else 1000
    batches, sent, errors = [], 0, 0
    start = time.monotonic()
    for i in range(0, count, chunk):
        if rate:
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        batches.append((time.clock_gettime_ns(time.CLOCK_MONOTONIC), first + i, min(chunk, count - i)))
        for f in frames[i:i + chunk]:
            try:
                s.send(f)
                sent += 1
            except OSError:
                errors += 1
    end_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    print(json.dumps({"sent": sent, "errors": errors, "batches": batches, "end_ns": end_ns}), flush=True)


# ---- B's flow table, opened by id --------------------------------------------------------------

_SYS_BPF = 321  # x86_64
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char]) -> int:
    r = int(_libc.syscall(_SYS_BPF, cmd, attr, len(attr)))
    if r < 0:
        raise OSError(ctypes.get_errno(), f"bpf cmd {cmd}: {os.strerror(ctypes.get_errno())}")
    return r


def _fd_by_id(cmd: int, obj_id: int) -> int:
    return _bpf(cmd, ctypes.create_string_buffer(struct.pack("=III", obj_id, 0, 0), 16))


def _info(fd: int, info: ctypes.Array[ctypes.c_char]) -> None:
    attr = struct.pack("=IIQ", fd, len(info), ctypes.addressof(info))
    _bpf(15, ctypes.create_string_buffer(attr, 16))  # OBJ_GET_INFO_BY_FD


class PeerFlowTable:
    """Read-only lookups in the `flows` map of the XDP program attached to `ifname` in `ns`."""

    def __init__(self, lab: Lab, ns: str, ifname: str) -> None:
        link = json.loads(lab.ns_run(ns, "ip", "-j", "-d", "link", "show", "dev", ifname).stdout)[0]
        xdp = link["xdp"]
        prog_id = int(xdp["prog"]["id"]) if "prog" in xdp else int(xdp["attached"][0]["prog"]["id"])
        prog_fd = _fd_by_id(13, prog_id)  # BPF_PROG_GET_FD_BY_ID
        try:
            map_ids = (ctypes.c_uint32 * 64)()
            info = ctypes.create_string_buffer(256)
            struct.pack_into("=IQ", info, 52, 64, ctypes.addressof(map_ids))  # nr_map_ids, map_ids
            _info(prog_fd, info)
            count = struct.unpack_from("=I", info, 52)[0]
        finally:
            os.close(prog_fd)
        self.fd = -1
        for map_id in list(map_ids)[:count]:
            fd = _fd_by_id(14, map_id)  # BPF_MAP_GET_FD_BY_ID
            minfo = ctypes.create_string_buffer(88)
            _info(fd, minfo)
            if minfo.raw[24:40].rstrip(b"\0") == b"flows":
                self.fd = fd
                break
            os.close(fd)
        if self.fd < 0:
            raise RuntimeError(f"{ns}: program {prog_id} has no flows map")
        self._value = ctypes.create_string_buffer(16)
        self._key = ctypes.create_string_buffer(40)
        self._attr = ctypes.create_string_buffer(32)

    def has(self, key: bytes) -> bool:
        ctypes.memmove(self._key, key, 40)
        struct.pack_into("=IIQQQ", self._attr, 0, self.fd, 0, ctypes.addressof(self._key),
                         ctypes.addressof(self._value), 0)
        return int(_libc.syscall(_SYS_BPF, 1, self._attr, 32)) == 0  # BPF_MAP_LOOKUP_ELEM

    def close(self) -> None:
        os.close(self.fd)


def flow_key(n: int) -> bytes:
    from bpf.structs import IPPROTO_TCP, FlowKey

    src, sport = client(n)
    return bytes(FlowKey.make(src, sport, VIP, VIP_PORT, IPPROTO_TCP))


# ---- row 1: two real lbnode nodes ------------------------------------------------------------------

def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RealNodes:
    """Bridge `sw` with nodes a, b, backends b1, b2 and a client; lbnode runs on a and b."""

    def __init__(self, lab: Lab, workdir: Path) -> None:
        from examples.lab.hosts import PeerPass, add_host, make_backend, make_client, start_backend_server

        self.lab, self.workdir = lab, workdir
        self.sw = lab.netns("sw")
        self.a = add_host(lab, self.sw, "a", "10.9.0.1", "2001:db8:9::1")
        self.b = add_host(lab, self.sw, "b", "10.9.0.2", "2001:db8:9::2")
        self.client = add_host(lab, self.sw, "client", "10.9.0.3", "2001:db8:9::3")
        self.backends = [add_host(lab, self.sw, f"b{i}", f"10.9.0.{10 + i}", f"2001:db8:9::{10 + i:x}") for i in (1, 2)]
        hosts = [self.a, self.b, self.client, *self.backends]
        lab.bridge(self.sw, "br0", [f"p-{h.name}" for h in hosts])
        lab.ns_run(self.sw, "ip", "link", "set", "br0", "type", "bridge", "mcast_snooping", "0")
        make_client(lab, self.client.ns)
        import ipaddress

        for h in self.backends:
            make_backend(lab, h, (ipaddress.ip_address(VIP),))
            start_backend_server(lab, h)
        self.peer_pass = PeerPass()
        for name in ("a", "b"):
            self.peer_pass.attach(self.sw, f"p-{name}")
        (workdir / "sync.key").write_bytes(os.urandom(32).hex().encode())
        (workdir / "sync.key").chmod(0o600)  # a key file others can read is refused
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def close(self) -> None:
        self.peer_pass.close()

    def config(self) -> dict[str, Any]:
        return {
            "xdp": "native", "drain_s": 0,
            "sync": {"enabled": True, "key_file": str(self.workdir / "sync.key"), "resync_timeout_s": 2},
            "flows": {"table_size": FLOW_TABLE},
            "services": [{"name": "bench", "vips": [VIP], "ports": [VIP_PORT], "protocol": "tcp", "need": 1,
                          "checks": [{"kind": "tcp", "interval_ms": 500, "timeout_ms": 300, "rise": 1, "fall": 2}],
                          "backends": [{"address": h.ip4} for h in self.backends]}],
        }

    def start(self, name: str) -> None:
        import yaml

        host = {"a": self.a, "b": self.b}[name]
        config = self.workdir / f"{name}.yaml"
        config.write_text(yaml.safe_dump(self.config()))
        log = open(self.workdir / f"{name}.log", "ab")
        self.procs[name] = self.lab.spawn(host.ns, PYTHON, "-m", "cluster.cli", "--ip", host.ip4, "--if", "eth0",
                                          "--config", str(config), "--status-socket", str(self.sock(name)),
                                          cwd=REPO, stdout=log, stderr=log)
        log.close()

    def sock(self, name: str) -> Path:
        return self.workdir / f"{name}.sock"

    def status(self, name: str) -> dict[str, Any]:
        from cluster import status

        return status.query(str(self.sock(name)))

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")[-3000:]

    def ready(self, name: str) -> bool:
        if self.procs[name].poll() is not None:
            raise RuntimeError(f"node {name} exited ({self.procs[name].returncode}):\n{self.log(name)}")
        try:
            st = self.status(name)
        except OSError:
            return False
        backends = st["services"][0]["backends"] if st["services"] else []
        peers = st.get("sync", {}).get("peers", [])
        return (len(backends) == 2 and all(b["in_hash"] and b["mac"] for b in backends)
                and any(p["alive"] for p in peers))

    def installed(self) -> int:
        return int(self.status("b")["sync"]["counters"]["installed"])

    def cpu(self) -> tuple[float, float, float]:
        return proc_cpu_s(self.procs["a"].pid), proc_cpu_s(self.procs["b"].pid), time.monotonic()

    def frame_drops(self) -> int:
        """Frames dropped on the way from the client to A: client tx, bridge port tx, A rx."""
        total = 0
        for ns, dev, field in ((self.client.ns, "eth0", "tx"), (self.sw, "p-client", "rx"), (self.sw, "p-a", "tx"),
                               (self.a.ns, "eth0", "rx")):
            link = json.loads(self.lab.ns_run(ns, "ip", "-s", "-j", "link", "show", "dev", dev).stdout)[0]
            total += int(link["stats64"][field]["dropped"])
        return total

    def generator(self, first: int, count: int, rate: float) -> subprocess.Popen[bytes]:
        gen = self.lab.spawn(self.client.ns, PYTHON, __file__, "--gen", "eth0", self.a.mac, str(first), str(count),
                             str(rate), "0", stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        if read_line(gen, timeout_s=60) != "ready":
            raise RuntimeError("generator did not start")
        return gen


def go(gen: subprocess.Popen[bytes]) -> None:
    assert gen.stdin is not None
    gen.stdin.write(b"go\n")
    gen.stdin.flush()


def real_rows(lab: Lab, workdir: Path) -> dict[str, Any]:
    net = RealNodes(lab, workdir)
    try:
        flows_baseline = baseline(lab, net.a.ns, net.b.ns, net.b.ip4)
        net.start("a")
        net.start("b")
        wait_until(lambda: net.ready("a") and net.ready("b"), timeout_s=90, interval_s=0.2,
                   what="both nodes: backends in the hash and the peer alive")
        table = PeerFlowTable(lab, net.b.ns, "eth0")
        try:
            return {"baseline": flows_baseline, **_real_max_rate(net), **_real_latency(net, table)}
        finally:
            table.close()
    finally:
        net.close()


def _real_max_rate(net: RealNodes) -> dict[str, Any]:
    before_a, before_b = net.status("a"), net.status("b")
    base = int(before_b["sync"]["counters"]["installed"])
    gen = net.generator(0, MAX_FLOWS, 0)
    cpu0 = net.cpu()
    go(gen)
    samples = [(time.monotonic(), 0)]
    deadline = time.monotonic() + 60
    last_change = time.monotonic()
    while time.monotonic() < deadline:
        n = net.installed() - base
        now = time.monotonic()
        if n != samples[-1][1]:
            samples.append((now, n))
            last_change = now
        if n >= MAX_FLOWS or (gen.poll() is not None and now - last_change > 3):
            break
        time.sleep(0.02)
    report = json.loads(read_line(gen, timeout_s=30))
    cpu1 = net.cpu()
    got = samples[-1][1]
    first_ns = report["batches"][0][0]
    last_s = samples[-1][0] - first_ns / 1e9
    send_s = (report["end_ns"] - first_ns) / 1e9
    rate = got / max(last_s, 1e-3)
    after_a, after_b = net.status("a"), net.status("b")
    ca, cb = after_a["counters"], after_b["counters"]
    sa, sb = after_a["sync"]["counters"], after_b["sync"]["counters"]
    pinned = ca["new_flow"] - before_a["counters"]["new_flow"]
    lost = ca["event_lost"] - before_a["counters"]["event_lost"]
    drops = net.frame_drops()
    lag_ms = 1000 * (samples[-1][0] - report["end_ns"] / 1e9)
    print(f"real nodes ({after_a['node']['xdp']} XDP), max rate: {report['sent']} frames sent to A in {send_s:.2f}s "
          f"({report['sent'] / send_s:,.0f}/s; {report['errors']} send errors, "
          f"{drops} dropped by the veths and the bridge before A's program); "
          f"A pinned {pinned}, lost {lost} events in its ring, sent "
          f"{sa['sent'] - before_a['sync']['counters']['sent']} datagrams")
    print(f"  B installed {got} of them in {last_s:.2f}s = {rate:,.0f} flows/s, "
          f"the last {lag_ms:.0f} ms after the last frame was sent; "
          f"gaps {sb['gaps'] - before_b['sync']['counters']['gaps']}, "
          f"recovered {sb['recovered'] - before_b['sync']['counters']['recovered']}, "
          f"lost {sb['lost'] - before_b['sync']['counters']['lost']}; "
          f"flows.entries {after_b['flows']['entries']}; B's program pinned {cb['new_flow']} itself")
    print(f"  CPU over the run: A {100 * (cpu1[0] - cpu0[0]) / last_s:.0f}%, "
          f"B {100 * (cpu1[1] - cpu0[1]) / last_s:.0f}% "
          f"of one core (node processes; the generator and the frame path run on CPU 0)")
    return {"rate": rate, "offered": report["sent"] / send_s, "installed": got, "total": pinned}


def _real_latency(net: RealNodes, table: PeerFlowTable) -> dict[str, Any]:
    first, total = MAX_FLOWS, LATENCY_RATE * LATENCY_SECONDS
    keys = [flow_key(n) for n in range(first, first + total)]
    gen = net.generator(first, total, LATENCY_RATE)
    cpu0 = net.cpu()
    seen: dict[int, int] = {}
    pending: list[int] = []
    added = 0
    t_go = time.monotonic()
    go(gen)
    deadline = t_go + LATENCY_SECONDS + 10
    done_at = None
    while time.monotonic() < deadline:
        now = time.monotonic()
        due = min(total, int((now - t_go) * LATENCY_RATE) + 100)
        pending.extend(range(added, due))
        added = due
        still = []
        for i in pending:
            if table.has(keys[i]):
                seen[i] = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            else:
                still.append(i)
        pending = still
        if added == total:
            done_at = done_at or now
            if not pending or now - done_at > 3:
                break
        time.sleep(0.0005)
    report = json.loads(read_line(gen, timeout_s=30))
    cpu1 = net.cpu()
    span = cpu1[2] - cpu0[2]
    sent_at = {}
    for t, n0, count in report["batches"]:
        for j in range(count):
            sent_at[n0 - first + j] = t
    latencies = sorted((t - sent_at[i]) / 1e6 for i, t in seen.items() if i in sent_at)
    p50, p99 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99)]
    cpu_a, cpu_b = 100 * (cpu1[0] - cpu0[0]) / span, 100 * (cpu1[1] - cpu0[1]) / span
    print(f"real nodes, latency at {LATENCY_RATE}/s for {LATENCY_SECONDS}s: {len(seen)}/{report['sent']} flows in B's "
          f"flow table; sent to A -> entry on B p50 {p50:.2f} ms, p99 {p99:.2f} ms, max {latencies[-1]:.2f} ms")
    print(f"  CPU: A {cpu_a:.0f}%, B {cpu_b:.0f}% of one core (node processes, over {span:.1f}s)")
    return {"p50": p50, "p99": p99, "cpu": max(cpu_a, cpu_b), "lat_seen": len(seen), "lat_total": report["sent"]}


# ---- row 2: two lab sync hosts -----------------------------------------------------------------------

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


def host_rows(lab: Lab, key_file: str, flows_baseline: float) -> dict[str, Any]:
    net = SyncLab(lab, key_file)
    net.add_node("a", 1)
    net.add_node("b", 2)
    table = str(FLOW_TABLE)
    a = net.start("a", "--bench", "--ring-pages", "4096", "--flow-table", table, "--gen-cpu", "0")
    b = net.start("b", "--skew", "--flow-table", table)
    a.wait_ready(), b.wait_ready()
    ring_bytes = 4096 * 4096

    # --- max rate -------------------------------------------------------------------------------
    before_a, before_b = cpu(a), cpu(b)
    b.call(cmd="log_keys", on=False)
    batches = a.call(cmd="gen", total=MAX_FLOWS, rate=0, chunk=20000, ring_limit=ring_bytes // 2,
                     timeout_s=60)["batches"]
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
    print(f"sync hosts, max rate: {MAX_FLOWS} flows created on A in {gen_s:.2f}s; {got} installed on B in "
          f"{(last_ns - first_ns) / 1e9:.2f}s = {replicated:,.0f} flows/s "
          f"({replicated / flows_baseline:.2f}x the raw-UDP baseline)")
    stats_a = a.call(cmd="stats")
    print(f"  A: {stats_a['new_flow']} flows pinned, {stats_a['event_lost']} events lost in the ring, "
          f"{snap_a['counters']['events']} read, {snap_a['counters']['sent']} datagrams; "
          f"B: gaps {snap_b['counters']['gaps']}, "
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
    print(f"sync hosts, latency at {LATENCY_RATE}/s for {LATENCY_SECONDS}s: {got}/{total} flows installed on B; "
          f"creation on A -> entry on B p50 {p50:.2f} ms, p99 {p99:.2f} ms, max {latencies[-1]:.2f} ms")
    print(f"  control-plane CPU (generator thread excluded): A {cpu_a:.0f}%, B {cpu_b:.0f}% of one core")
    return {"rate": replicated, "installed": max_installed, "total": MAX_FLOWS, "p99": p99}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--udp-send", nargs=3, metavar=("DST", "PORT", "SECONDS"))
    p.add_argument("--udp-recv", nargs=2, metavar=("PORT", "SECONDS"))
    p.add_argument("--gen", nargs=6, metavar=("IF", "DST_MAC", "FIRST", "COUNT", "RATE", "CPU"))
    p.add_argument("--real-only", action="store_true", help="skip row 2 (the lab sync hosts)")
    args = p.parse_args()
    if args.udp_send:
        udp_send(args.udp_send[0], int(args.udp_send[1]), float(args.udp_send[2]))
        return 0
    if args.udp_recv:
        udp_recv(int(args.udp_recv[0]), float(args.udp_recv[1]))
        return 0
    if args.gen:
        g = args.gen
        generate(g[0], g[1], int(g[2]), int(g[3]), float(g[4]), int(g[5]))
        return 0

    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        with Lab(prefix="lbbr") as lab:
            real = real_rows(lab, Path(tmp))
        host = None
        if not args.real_only:
            with Lab(prefix="lbbs") as lab:
                host = host_rows(lab, str(Path(tmp) / "sync.key"), real["baseline"])
    print(f"(bench took {time.monotonic() - t0:.0f}s)")
    line = (f"flows_per_s={real['rate']:.0f} ratio={real['rate'] / real['baseline']:.2f}x "
            f"offered={real['offered']:.0f} "
            f"installed={real['installed']}/{real['total']} p50_ms={real['p50']:.2f} p99_ms={real['p99']:.2f} "
            f"cpu={real['cpu']:.0f}%")
    if host is not None:
        line += (f" host_flows_per_s={host['rate']:.0f} host_ratio={host['rate'] / real['baseline']:.2f}x "
                 f"host_installed={host['installed']}/{host['total']} host_p99_ms={host['p99']:.2f}")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
