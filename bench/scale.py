"""make bench-scale: one node with 1,048,576 flows and 64 services x 64 backends; how long its
trio loop stalls while it answers status, serves a second node's resync of the whole table,
flaps 10% of its backends, reloads every weight, removes a service holding 100k pinned flows and
runs a flow-sync refresh cycle.

In-process, no interfaces: a real DataPlane (compiled with flows.table_size 1048576) driven by
the real `cluster.node.Node` code paths — its apply task (`DataPlane.apply` on a worker thread),
its maintenance task (sweep and recount), `reconcile()`, `reload()` from a YAML file and
`snapshot()` (what `lbnode status` returns) — on a trio loop watched by
`cluster.loopwatch.LoopWatch` (longest task step and heartbeat lateness). Health checks,
neighbour discovery and BGP are not run: the bench sets what they would report (every backend
usable, every MAC known) and flips health by hand as the checker's events would.

Flow sync is the real `cluster.sync.flowsync.FlowSync` over real UDP sockets on loopback
(unicast mode, 127.0.0.1 <-> 127.0.0.2): this process's FlowSync serves the table; the second
node is a second process (`--resync-peer`: its own DataPlane with the same services, its own
FlowSync) that calls `resync()` and reports how long it took and how many flows it installed, so
its receive work is not on this loop. The refresh phase is FlowSync's own refresh pass (every
flow is "seen recently": the bench's refresh window is long), sent to that peer's address.

Last line: stall_ms=<longest stall over the phases> resync_s=<the second node's resync() of the
whole table> apply_s=<full reload, every weight changed> rss_mb=<RSS with the tables applied,
before the flows: the node's idle size> rss_growth_mb=<peak RSS minus that> flows=<entries>.
The node's DataPlane is the pinned one (compiled in a child, bpf/pinned.py), so RSS is the
node's own, without bcc; the pins go when it closes.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import ipaddress
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bpf.dataplane import BackendSpec, DataPlane, ServiceSpec, monotonic_ns  # noqa: E402
from bpf.flowtable import synthetic_flows  # noqa: E402
from bpf.loader import Limits  # noqa: E402
from bpf.pinned import PinDir, bpffs_root  # noqa: E402
from bpf.structs import IPPROTO_TCP, addr16  # noqa: E402
from cluster.config import load_file  # noqa: E402
from cluster.desired import backend_key  # noqa: E402
from cluster.loopwatch import LoopWatch, heartbeat  # noqa: E402
from cluster.node import STATUS_REUSE_S, Node, NodeArgs  # noqa: E402
from cluster.sync.config import SyncConfig  # noqa: E402
from cluster.sync.flowsync import FlowSync  # noqa: E402

NODE_IP = ipaddress.ip_address("10.250.0.5")
NODE_MAC = "02:00:00:00:00:05"
SERVICES, BACKENDS = 64, 64
REMOVED_PINNED = 100_000  # flows pinned to the service the bench removes
SYNC_A, SYNC_B = ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("127.0.0.2")
RESYNC_TIMEOUT_S = 60.0


def vip(s: int) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(f"10.200.{s}.1")


def backend_ip(s: int, b: int) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(f"10.{201 + s // 64}.{s % 64}.{b + 1}")


def config_yaml(services: range, weight: Callable[[int, int], int], table_size: int) -> str:
    lines = [f"flows: {{table_size: {table_size}, refresh_s: 1}}", "services:"]
    for s in services:
        lines += [f"  - name: svc{s}", f"    vips: [{vip(s)}]", "    ports: [80]", "    need: 1", "    backends:"]
        lines += [f"      - {{address: {backend_ip(s, b)}, weight: {weight(s, b)}}}" for b in range(BACKENDS)]
    return "\n".join(lines) + "\n"


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


class RssPeak:
    """Samples this process's RSS every few ms on a thread (the loop is not involved)."""

    def __init__(self) -> None:
        self.peak = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_mb())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, rss_mb())


class Phases:
    def __init__(self, watch: LoopWatch) -> None:
        self.watch = watch
        self.rows: list[tuple[str, float, float]] = []

    async def run(self, name: str, phase: Callable[[], Awaitable[Any]]) -> Any:
        self.watch.reset()
        await trio.sleep(0.05)  # let the heartbeat start a fresh measurement
        self.watch.reset()
        start = time.perf_counter()
        result = await phase()
        seconds = time.perf_counter() - start
        await trio.sleep(0.05)
        stall = self.watch.max_stall_ms
        self.rows.append((name, seconds, stall))
        print(f"  {name:<44} {seconds:8.3f} s   max loop stall {stall:7.1f} ms   "
              f"(worst step: {self.watch.snapshot()['max_step_task'] or '-'})", flush=True)
        return result

    @property
    def stall_ms(self) -> float:
        return max(stall for _, _, stall in self.rows)


async def fill(node: Node, dp: DataPlane, table_size: int) -> int:
    """1M flows written in batches on a worker thread, as flow sync installs them: 100k on
    service 0 (the one removed later), the rest spread over the others."""
    now = monotonic_ns()
    plan = [(0, REMOVED_PINNED)]
    rest = table_size - REMOVED_PINNED
    plan += [(s, rest // (SERVICES - 1) + (1 if s - 1 < rest % (SERVICES - 1) else 0)) for s in range(1, SERVICES)]
    first = 0
    for s, n in plan:
        service = dp.service_index(vip(s), 80, IPPROTO_TCP)
        assert service is not None
        for start in range(0, n, 65536):
            count = min(65536, n - start)
            b = dp.backend_index(vip(s), 80, IPPROTO_TCP, backend_ip(s, (start // 65536) % BACKENDS))
            assert b is not None
            chunk = synthetic_flows(first, count, addr16(vip(s)), 80, IPPROTO_TCP, b, service, last_seen_ns=now)
            await trio.to_thread.run_sync(dp.write_flows_packed, chunk.keys, chunk.values)
            first += count
    return first


def sync_config(workdir: Path, port: int) -> SyncConfig:
    key_file = workdir / "sync.key"
    if not key_file.exists():
        key_file.write_bytes(os.urandom(32).hex().encode())
        key_file.chmod(0o600)
    # refresh_s long: the refresh phase runs one pass by hand, and every loaded flow is "recent"
    return SyncConfig.from_dict({"key_file": str(key_file), "peers": [str(SYNC_A), str(SYNC_B)], "port": port,
                                 "refresh_s": 3600, "heartbeat_s": 1, "resync_timeout_s": RESYNC_TIMEOUT_S})


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((str(SYNC_A), 0))
        return int(s.getsockname()[1])


async def resync_peer(args: argparse.Namespace) -> None:
    """The second node (a child process): the same services, an empty table of the same size;
    `FlowSync.resync()` from the first node; one JSON line with the result."""
    dp = await trio.to_thread.run_sync(DataPlane, Limits(flow_table_size=args.flows))
    try:
        dp.set_config(NODE_MAC)
        specs = [ServiceSpec(vip(s), 80, IPPROTO_TCP,
                             tuple(BackendSpec(backend_ip(s, b), f"02:00:00:{s:02x}:00:{b:02x}")
                                   for b in range(BACKENDS)))
                 for s in range(SERVICES)]
        await trio.to_thread.run_sync(dp.apply, specs)
        sync = FlowSync(sync_config(Path(args.workdir), args.port), dp, SYNC_B)
        async with trio.open_nursery() as nursery:
            await nursery.start(sync.run)
            print("ready", flush=True)
            await trio.to_thread.run_sync(sys.stdin.readline)  # "go"
            t0 = time.perf_counter()
            ok = await sync.resync(RESYNC_TIMEOUT_S)
            seconds = time.perf_counter() - t0
            print(json.dumps({"ok": ok, "resync_s": seconds, "installed": sync.counters["installed"],
                              "chunks": sync.counters["resync_chunks"], "rss_mb": rss_mb()}), flush=True)
            nursery.cancel_scope.cancel()
    finally:
        dp.close()


class ResyncPeer:
    """The child process running `resync_peer`, driven over its stdin/stdout."""

    def __init__(self, workdir: Path, port: int, flows: int) -> None:
        self.argv = [sys.executable, str(Path(__file__).resolve()), "--resync-peer", "--workdir", str(workdir),
                     "--port", str(port), "--flows", str(flows)]
        self.proc: trio.Process | None = None
        self._buf = b""

    async def start(self) -> None:
        self.proc = await trio.lowlevel.open_process(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        line = await self.line()
        assert line == "ready", line

    async def line(self) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        while b"\n" not in self._buf:
            data = await self.proc.stdout.receive_some(4096)
            if not data:
                raise RuntimeError(f"resync peer exited ({self.proc.returncode}) before a line: {self._buf!r}")
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode().strip()

    async def resync(self) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        await self.proc.stdin.send_all(b"go\n")
        return dict(json.loads(await self.line()))

    async def stop(self) -> None:
        if self.proc is not None:
            with trio.move_on_after(10):
                await self.proc.wait()
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()


async def bench(args: argparse.Namespace, workdir: Path) -> str:
    watch = LoopWatch(window_s=60)
    trio.lowlevel.add_instrument(watch)
    config_path = workdir / "node.yaml"
    config_path.write_text(config_yaml(range(SERVICES), lambda s, b: 1 + b % 4, args.flows))
    config = load_file(config_path, NODE_IP, check_files=False)
    node = Node(NodeArgs(NODE_IP, "lo", NODE_MAC, str(config_path), str(workdir / "status.sock")), config)
    print(f"compiling (flow table {args.flows} entries, {SERVICES} x {BACKENDS} backends)...", flush=True)
    # As the node does: compiled in a child and pinned (a bench directory: no interface is
    # attached), so this process's RSS is the node's, without bcc's LLVM.
    pins = PinDir(bpffs_root() / "lbnode-bench" / f"scale-{os.getpid()}", "lo")
    dp = await trio.to_thread.run_sync(partial(DataPlane, Limits(flow_table_size=args.flows), pins=pins))
    dp.set_config(NODE_MAC)
    # What neighbour discovery and health checks would report: every MAC known, every backend usable.
    node._macs.update({backend_ip(s, b): f"02:00:00:{s:02x}:00:{b:02x}"
                      for s in range(SERVICES) for b in range(BACKENDS)})
    node._healthy = {svc.health_name(v, 80): frozenset(backend_key(b.address, 80) for b in svc.backends)
                    for svc in config.services for v in svc.vips}
    node._ready, node.state = True, "serving"

    async def no_health_checks(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()  # a reload restarts health checking; here the bench plays the checker
        await trio.sleep_forever()
    node._run_health = no_health_checks  # type: ignore[method-assign]
    node._dp = dp
    phases = Phases(watch)
    try:
        async with trio.open_nursery() as nursery:
            node._nursery = nursery
            nursery.start_soon(heartbeat, watch, 0.005)
            async def first_apply() -> None:
                await nursery.start(node._applier.run, dp)
                await node.applied()
            await phases.run("first apply, 64 x 64 tables", first_apply)
            gc.freeze()  # as Node._serve does once it is ready
            nursery.start_soon(node._maintain_flows)
            rss_before = rss_mb()  # the node's idle RSS, tables applied, no flows yet
            peak = RssPeak()
            await phases.run(f"load {args.flows} flows (batches on a thread)", lambda: fill(node, dp, args.flows))

            async def count_pass() -> None:  # what the maintenance task does every 5 s
                for _ in range(2):  # finish the pass that began during the load, then one whole pass
                    while not await trio.to_thread.run_sync(dp.maintain):
                        pass
            await phases.run("maintenance pass (count, in chunks)", count_pass)
            flows = dp.flow_count().walked  # the LRU may have evicted a few while it filled up

            async def statuses() -> None:
                for _ in range(5):
                    await node.status()
                    await trio.sleep(STATUS_REUSE_S)  # past the reuse time: each one is a full build
            await phases.run("status x5 (Node.status, as the socket serves it)", statuses)

            # Flow sync: this node's real FlowSync answers a second node's resync of the whole table.
            port = free_port()
            sync = FlowSync(sync_config(workdir, port), dp, SYNC_A)
            await nursery.start(sync.run)
            peer = ResyncPeer(workdir, port, args.flows)
            print("  (second node: compiling its data plane in another process...)", flush=True)
            await peer.start()
            try:
                result = await phases.run(f"serve a resync of {flows} flows (2nd process)", peer.resync)
            finally:
                await peer.stop()
            print(f"    second node: {result}; first node sent {sync.counters['resync_chunks_sent']} chunks, "
                  f"{sync.counters['send_waits']} full-buffer waits", flush=True)
            assert result["ok"] and result["installed"] >= flows, (result, flows)
            resync_s = float(result["resync_s"])

            all_usable = dict(node._healthy)

            async def flap() -> None:
                down = {f"{backend_ip(s, b)}:80" for s in range(SERVICES) for b in range(BACKENDS)
                        if (s * BACKENDS + b) % 10 == 0}
                node._healthy = {name: keys - down for name, keys in all_usable.items()}
                node.reconcile()
                await node.applied()
                node._healthy = all_usable
                node.reconcile()
                await node.applied()
            await phases.run("health flap: 10% of backends down and up", flap)

            config_path.write_text(config_yaml(range(SERVICES), lambda s, b: 1 + (b + 1) % 7, args.flows))

            async def reload() -> None:
                await node.reload()
                assert node.reloads["ok"] == 1, node.last_reload_error
            await phases.run("reload: every weight changed", reload)
            apply_s = phases.rows[-1][1]

            config_path.write_text(config_yaml(range(1, SERVICES), lambda s, b: 1 + (b + 1) % 7, args.flows))

            async def remove() -> None:
                await node.reload()
                assert node.reloads["ok"] == 2, node.last_reload_error
            await phases.run(f"reload: remove a service holding {REMOVED_PINNED // 1000}k pins", remove)

            async def swept() -> None:
                # The sweep runs in the data plane's own thread and sets no trio.Event: poll its flag.
                while dp.sweep_pending:  # noqa: ASYNC110
                    await trio.sleep(0.02)
            await phases.run("background sweep of its flows", swept)
            count = dp.flow_count()
            assert flows - REMOVED_PINNED <= count.entries < flows, (flows, count)
            await phases.run("flow-sync refresh pass (chunked walk, paced sends)", sync._refresh)
            refreshed = sync.counters["refreshed"]
            assert refreshed == count.walked, (refreshed, count)
            nursery.cancel_scope.cancel()
    finally:
        node._dp = None
        dp.close()  # removes the pins
        with contextlib.suppress(OSError):
            pins.path.parent.rmdir()
    rss_growth = peak.stop() - rss_before
    return (f"stall_ms={phases.stall_ms:.1f} resync_s={resync_s:.2f} apply_s={apply_s:.2f} "
            f"rss_mb={rss_before:.0f} rss_growth_mb={rss_growth:.0f} flows={flows}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flows", type=int, default=1 << 20, help="flow table size, filled completely")
    parser.add_argument("--resync-peer", action="store_true", help=argparse.SUPPRESS)  # the second node
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench-scale needs root (bcc)")
    if args.resync_peer:
        trio.run(resync_peer, args)
        return
    with tempfile.TemporaryDirectory(prefix="lbnode-scale-") as tmp:
        print(trio.run(bench, args, Path(tmp)))


if __name__ == "__main__":
    main()
