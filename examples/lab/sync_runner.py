"""A lab host for flow sync: one DataPlane (not attached) plus FlowSync, driven over stdin/stdout.

Used by the netns tests and `make bench-sync`; not part of the node. Flows are pinned by running
the real XDP program on frames (BPF_PROG_TEST_RUN), so they take the real kernel path and ring
buffer. The host serves one service, 10.0.0.100:80/tcp -> 10.0.0.11, 10.0.0.12 (with --skew, a
dummy service takes the first indexes so peers' indexes differ).

    ip netns exec A python -m examples.lab.sync_runner --ip 10.9.0.1 --if eth0 --key-file k [--resync]

It prints one JSON line {"event": "ready", ...} once the socket is bound (and, with --resync,
after the resync), then answers one JSON command per stdin line with one JSON line:

    {"cmd": "pin", "sports": [1000, 1001], "flags": "A"}   run frames from 192.0.2.7:<sport>
    {"cmd": "flows"}                                      {"count", "synced", "closing", "by_sport"}
    {"cmd": "snapshot"}                                   FlowSync.snapshot()
    {"cmd": "burst", "n": 5000}                           (--bench) n new clients in one test run
    {"cmd": "gen", ...}                                   (--bench) see bench/sync.py
    {"cmd": "installs"} / {"cmd": "cpu"}                  install log and CPU (bench)
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import resource
import sys
import time
from typing import Any

import trio

from bpf.dataplane import BackendSpec, DataPlane, ServiceSpec
from bpf.loader import Limits
from bpf.structs import FLOW_F_CLOSING, FLOW_F_SYNCED, IPPROTO_TCP
from bpf.testrun import run_xdp
from cluster.sync.config import SyncConfig
from cluster.sync.flowsync import FlowSync

ip = ipaddress.ip_address
MAC = "02:00:00:00:00:01"
VIP = ip("10.0.0.100")
CLIENT = "192.0.2.7"
CLIENT_WORD = bytes(ipaddress.ip_address(CLIENT).packed)
# Backends at our own MAC: `burst` repeats one test-run buffer, and the program forwards only
# frames addressed to us (sync translates backends by address, never by MAC).
WEB = ServiceSpec(VIP, 80, IPPROTO_TCP, (BackendSpec(ip("10.0.0.11"), MAC), BackendSpec(ip("10.0.0.12"), MAC)))
DUMMY = ServiceSpec(ip("10.0.0.200"), 443, IPPROTO_TCP, (BackendSpec(ip("10.0.0.21"), MAC),))


def frame(sport: int, flags: str = "A") -> bytes:
    from scapy.all import IP, TCP, Ether  # type: ignore[attr-defined]

    return bytes(Ether(dst=MAC, src="02:00:00:00:00:fe") / IP(src=CLIENT, dst=str(VIP))
                 / TCP(sport=sport, dport=80, flags=flags))


def client_number(key: bytes) -> int:
    """The bench build's client counter n from a flow key (src[3] ^= n, as a host-order u32)."""
    return int.from_bytes(bytes(a ^ b for a, b in zip(key[12:16], CLIENT_WORD, strict=True)), "little")


class Host:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        cflags = ["-DLB_BENCH_NEW_FLOW"] if args.bench else []
        self.dp = DataPlane(Limits(flow_table_size=args.flow_table, event_ring_pages=args.ring_pages), cflags)
        self.dp.set_config(MAC)
        self.dp.apply([DUMMY, WEB] if args.skew else [WEB])
        raw: dict[str, Any] = {"key_file": args.key_file, "port": args.port, "batch_ms": args.batch_ms,
                               "heartbeat_s": args.heartbeat_s, "refresh_s": args.refresh_s}
        if args.peers:
            raw["peers"] = args.peers.split(",")
        self.config = SyncConfig.from_dict(raw)
        self.install_log: list[tuple[int, int]] = []  # (monotonic ns, count) per installed batch
        self.install_keys: list[tuple[int, bytes]] = []  # (monotonic ns, keys) when logging keys
        self.log_keys = False
        self.sync = FlowSync(self.config, self.dp, args.ip, ifname=args.ifname, on_install=self._installed)
        self.gen_n = 0  # clients created by this process's test runs (one CPU: the counter is per CPU)
        self.gen_cpu_s = 0.0

    def _installed(self, keys: bytes) -> None:
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        self.install_log.append((now, len(keys) // 40))
        if self.log_keys:
            self.install_keys.append((now, keys))

    # ---- bench generator (runs in a thread pinned to one CPU) ---------------------------------------

    def _generate(self, total: int, rate: float, chunk: int, ring_limit: int) -> list[tuple[int, int, int]]:
        """Create `total` clients at `rate`/s (0: as fast as the ring drains); returns (t_ns, first n, count)."""
        os.sched_setaffinity(0, {self.args.gen_cpu})
        reader_pending = self.sync.ring_pending_bytes
        ack = frame(40000)
        out = []
        t_cpu = time.thread_time()
        start = time.monotonic()
        made = 0
        while made < total:
            n = min(chunk, total - made)
            if rate:
                due = start + made / rate
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            else:
                while reader_pending() > ring_limit:
                    time.sleep(0.0005)
            t = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            run_xdp(self.dp.fd, ack, repeat=n)
            out.append((t, self.gen_n + 1, n))
            self.gen_n += n
            made += n
        self.gen_cpu_s += time.thread_time() - t_cpu
        return out

    # ---- commands ----------------------------------------------------------------------------------

    async def command(self, req: dict[str, Any]) -> Any:
        cmd = req.get("cmd")
        if cmd == "pin":
            for sport in req["sports"]:
                run_xdp(self.dp.fd, frame(int(sport), req.get("flags", "A")))
            return {"ok": True}
        if cmd == "flows":
            flows = await trio.to_thread.run_sync(self.dp.flows)
            addresses = self.dp.backend_addresses()
            by_sport = {str(k.src_port): str(addresses.get(f.backend)) for k, f in flows
                        if k.dst_ip == VIP and str(k.src_ip) == CLIENT} if req.get("detail", True) else {}
            return {"count": len(flows), "synced": sum(1 for _, f in flows if f.flags & FLOW_F_SYNCED),
                    "closing": sorted(int(k.src_port) for k, f in flows if f.flags & FLOW_F_CLOSING)[:1000],
                    "by_sport": by_sport}
        if cmd == "stats":
            return {stat.name.lower(): n for stat, n in self.dp.stats().items()}
        if cmd == "snapshot":
            return self.sync.snapshot()
        if cmd == "burst":
            run_xdp(self.dp.fd, frame(40000), repeat=int(req["n"]))
            self.gen_n += int(req["n"])
            return {"ok": True}
        if cmd == "gen":
            batches = await trio.to_thread.run_sync(self._generate, int(req["total"]), float(req.get("rate", 0)),
                                                    int(req.get("chunk", 1)), int(req.get("ring_limit", 1 << 30)))
            return {"batches": batches}
        if cmd == "log_keys":
            self.log_keys = bool(req["on"])
            self.install_log.clear()
            self.install_keys.clear()
            return {"ok": True}
        if cmd == "installs":
            out: dict[str, Any] = {"log": self.install_log[-200000:]}
            if req.get("keys"):
                out["keys"] = [(t, [client_number(keys[i:i + 40]) for i in range(0, len(keys), 40)])
                               for t, keys in self.install_keys]
            return out
        if cmd == "cpu":
            ru = resource.getrusage(resource.RUSAGE_SELF)
            return {"cpu_s": ru.ru_utime + ru.ru_stime, "gen_cpu_s": self.gen_cpu_s, "mono": time.monotonic()}
        return {"error": f"unknown command {cmd!r}"}

    async def _tick(self) -> None:
        """Publish the clock that stamps flows, as the node does (bpf/dataplane.py)."""
        while True:
            self.dp.tick()
            await trio.sleep(0.5)

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.sync.run)
            nursery.start_soon(self._tick)
            resynced = await self.sync.resync(self.args.resync_timeout) if self.args.resync else None
            self.sync.set_digest(b"lab view")
            _emit({"event": "ready", "resync": resynced, "node_id": self.sync.node_id,
                   "installed": self.sync.counters["installed"]})
            stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
            buf = b""
            while True:
                data = await stdin.receive_some(65536)
                if not data:
                    break
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        try:
                            _emit(await self.command(json.loads(line)))
                        except Exception as exc:  # report and keep serving: the test sees the error
                            _emit({"error": f"{type(exc).__name__}: {exc}"})
            nursery.cancel_scope.cancel()


def _emit(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m examples.lab.sync_runner", description=__doc__.splitlines()[0])
    p.add_argument("--ip", required=True)
    p.add_argument("--if", dest="ifname", default=None)
    p.add_argument("--key-file", required=True)
    p.add_argument("--port", type=int, default=7946)
    p.add_argument("--peers", default="", help="comma-separated unicast peers (default: multicast)")
    p.add_argument("--batch-ms", type=int, default=2)
    p.add_argument("--heartbeat-s", type=float, default=0.2)
    p.add_argument("--refresh-s", type=float, default=30.0)
    p.add_argument("--resync", action="store_true", help="resync from peers before reporting ready")
    p.add_argument("--resync-timeout", type=float, default=5.0)
    p.add_argument("--skew", action="store_true", help="a dummy service first, so indexes differ from peers'")
    p.add_argument("--bench", action="store_true", help="bench build: every test-run repetition is a new client")
    p.add_argument("--flow-table", type=int, default=262144)
    p.add_argument("--ring-pages", type=int, default=256)
    p.add_argument("--gen-cpu", type=int, default=0)
    p.add_argument("--log-level", default="WARNING")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    trio.run(Host(args).run)
    return 0


if __name__ == "__main__":
    sys.exit(main())


# ---- driving hosts from a test or the bench -------------------------------------------------------

class HostProcess:
    """A `python -m examples.lab.sync_runner` child: one JSON command in, one JSON line out."""

    def __init__(self, proc: Any, name: str) -> None:
        self.proc = proc
        self.name = name
        self.ready: dict[str, Any] = {}

    def wait_ready(self, timeout_s: float = 60.0) -> dict[str, Any]:
        from examples.lab.netns import read_line

        self.ready = json.loads(read_line(self.proc, timeout_s=timeout_s))
        assert self.ready.get("event") == "ready", f"{self.name}: {self.ready}"
        return self.ready

    def call(self, timeout_s: float = 30.0, **req: Any) -> Any:
        from examples.lab.netns import read_line

        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(req) + "\n").encode())
        self.proc.stdin.flush()
        reply = json.loads(read_line(self.proc, timeout_s=timeout_s))
        if isinstance(reply, dict) and "error" in reply:
            raise RuntimeError(f"{self.name}: {req.get('cmd')}: {reply['error']}")
        return reply


class SyncLab:
    """Two (or more) sync hosts on one bridge: namespaces <prefix>-sw, -a, -b, ... (10.9.0.0/24)."""

    def __init__(self, lab: Any, key_file: str, port: int = 7946) -> None:
        import subprocess

        self._subprocess = subprocess
        self.lab = lab
        self.key_file = key_file
        self.port = port
        self.sw = lab.netns("sw")
        self.hosts: dict[str, str] = {}  # role -> namespace
        self.ips: dict[str, str] = {}

    def add_node(self, role: str, index: int) -> str:
        ns: str = self.lab.netns(role)
        self.lab.veth(ns, "eth0", self.sw, f"p{role}")
        self.lab.addr(ns, "eth0", f"10.9.0.{index}/24")
        if len(self.hosts) == 0:
            self.lab.bridge(self.sw, "br0", [f"p{role}"])
            self.lab.ns_run(self.sw, "ip", "link", "set", "br0", "type", "bridge", "mcast_snooping", "0")
        else:
            self.lab.ns_run(self.sw, "ip", "link", "set", f"p{role}", "master", "br0")
        self.hosts[role] = ns
        self.ips[role] = f"10.9.0.{index}"
        return ns

    def start(self, role: str, *extra: str) -> HostProcess:
        ns = self.hosts[role]
        proc = self.lab.spawn(ns, sys.executable, "-m", "examples.lab.sync_runner",
                              "--ip", self.ips[role], "--if", "eth0",
                              "--key-file", self.key_file, "--port", str(self.port), *extra,
                              stdin=self._subprocess.PIPE, stdout=self._subprocess.PIPE)
        return HostProcess(proc, role)

    def drop_percent(self, role: str, percent: int) -> None:
        """Drop `percent`% of sync datagrams arriving in `role`'s namespace (nftables numgen)."""
        ns = self.hosts[role]
        self.lab.ns_run(ns, "nft", "add", "table", "inet", "lbloss")
        self.lab.ns_run(ns, "nft", "add", "chain", "inet", "lbloss", "in",
                        "{ type filter hook input priority 0 ; policy accept ; }")
        self.lab.ns_run(ns, "nft", "add", "rule", "inet", "lbloss", "in", "udp", "dport", str(self.port),
                        "numgen", "random", "mod", "100", "<", str(percent), "counter", "drop")

    def dropped(self, role: str) -> int:
        out = self.lab.ns_run(self.hosts[role], "nft", "list", "table", "inet", "lbloss").stdout
        import re

        m = re.search(r"counter packets (\d+)", out)
        return int(m.group(1)) if m else 0
