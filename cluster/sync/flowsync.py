"""Flow sync: the one trio module that moves flows between nodes. It does I/O only: the socket,
the data plane's ring buffer and flow table, the clock. Everything the protocol decides is in
the sans-IO engine (engine.py: numbering, repair, peer resync, resync guards), over the codec
(codec.py) and the receive policy (policy.py).

Send side: new and closing flows come off the data plane's ring buffer (bpf/ringbuf.py, read in
batches), wait at most `batch_ms` for companions, and go out as FLOWS datagrams to the multicast
group (or to each unicast peer). Every `refresh_s` the flows seen recently here are sent again
(REFRESH) so peers' LRU tables keep them: a chunked walk of the table (cluster/flowwalk.py, one
chunk per worker-thread hop), each chunk's records built with numpy (records.RecordBuilder) and
sent before the next chunk is fetched, so memory stays at one chunk whatever the table's size.
Bulk sends (refresh passes and resync answers) are paced (pacing.py); a full send buffer
(EAGAIN) is waited out, not dropped. Small sends (new flows, heartbeats, repairs) are not paced.

Receive side: every datagram goes to `SyncEngine.receive`; the flows it hands back (`Install`)
are translated to local indexes (records.FlowRows, which also says how peers' flows are stamped
and closed) and written in one batch per wake-up.

Resync: `resync()` asks peers for their whole table and returns once every live peer has sent one
complete answer and a heartbeat (engine.py; stalled answers are asked again under new request
ids). A peer resync (a gap no RESEND can fill) is the engine's own decision. Answering either
streams the table like a refresh pass (a peer resync: only the flows carried here), chunk by
chunk, paced, and ends with the LAST chunk; the engine sends a heartbeat first.

Node ids and incarnations: identity.py.

Link down. A send that fails (ENETUNREACH, ENODEV, EADDRNOTAVAIL, ... while the node's link is
down or its address is gone) is counted and logged at a limited rate; the stream number it took
is repaired by RESEND once the link is back, like any loss. The socket is never closed for it.
Measured on this kernel: `ip link set eth0 down; up` keeps an IP_ADD_MEMBERSHIP membership (a
second add says EADDRINUSE) and sends work again as soon as the link is up; an interface that is
deleted and created again (a new ifindex) loses it, and sends fail with ENODEV. So once a second
(and after every link-type send error) the membership is asserted again: the interface's
current index is looked up, IP_MULTICAST_IF and IP_ADD_MEMBERSHIP are set for it, and EADDRINUSE
means nothing was lost.

Nothing a peer (or anyone) sends can stop this module: every bad datagram is dropped, counted
and logged at a limited rate.

    sync = FlowSync(config.sync, dataplane, node_ip, ifname="eth0")
    await nursery.start(sync.run)       # socket bound, ring reader open
    ok = await sync.resync(config.sync.resync_timeout_s)
    sync.set_digest(view_digest)        # after every dataplane.apply()
    status["sync"] = sync.snapshot()
"""
from __future__ import annotations

import errno
import hashlib
import ipaddress
import logging
import math
import os
import socket
import struct
import time
from collections.abc import Callable, Iterable
from typing import Any

import trio
import trio.lowlevel

from bpf.dataplane import DataPlane
from bpf.loglimit import LogLimiter
from cluster.flowwalk import flow_chunks
from cluster.sync import codec
from cluster.sync.config import SyncConfig
from cluster.sync.engine import Action, EngineTiming, Install, LoadIn, ResyncComplete, Send, Serve, SyncEngine, Warn
from cluster.sync.identity import next_incarnation, node_id_of
from cluster.sync.pacing import SEND_BATCH, SEND_RATE, Pacer
from cluster.sync.policy import INCARNATION_RENEW_S, MAX_INCARNATION_AGE_S, ReceivePolicy, RetransmitBuffer
from cluster.sync.records import FlowRows, RecordBuilder, wire_from_events
from cluster.sync.status import sync_status

log = logging.getLogger(__name__)

IP_MULTICAST_ALL = getattr(socket, "IP_MULTICAST_ALL", 49)
SOCKET_BUFFER_BYTES = 16 << 20
RECV_BATCH = 512  # datagrams per wake-up before the flows are written
RESEND_INTERVAL_S = 0.05
RESYNC_RETRY_S = 1.0
MEMBERSHIP_CHECK_S = 1.0
WARN_INTERVAL_S = 10.0  # at most one WARNING per reason this often (the rest at DEBUG)
# errnos of a link that is down or an address that is gone: sends fail until it is back
LINK_ERRNOS = frozenset({errno.ENETUNREACH, errno.ENETDOWN, errno.ENODEV, errno.EADDRNOTAVAIL, errno.EHOSTUNREACH,
                         errno.ENXIO})


class SyncError(Exception):
    """Flow sync cannot start (socket, interface, address family)."""


IO_COUNTERS = ("sent", "send_waits", "sent_flows", "received", "received_flows", "installed", "unknown_service",
               "send_errors", "send_errors_link", "events", "refreshed", "refresh_passes", "install_errors",
               "incarnation_renewals", "membership_rejoins", "membership_errors", "recv_errors")


class FlowSync:
    """Flow replication between the nodes of a cluster (see the module docstring)."""

    def __init__(self, config: SyncConfig, dataplane: DataPlane, node_ip: Any, node_id: int | None = None, *,
                 ifname: str | None = None, keys: codec.Keyring | None = None, incarnation: int | None = None,
                 on_install: Callable[[bytes], None] | None = None, retransmit_capacity: int = 16384,
                 send_rate: float = SEND_RATE) -> None:
        self.config = config
        self.dp = dataplane
        self.node_ip = ipaddress.ip_address(str(node_ip))
        if not isinstance(self.node_ip, ipaddress.IPv4Address):
            raise SyncError(f"flow sync runs over IPv4; node address {self.node_ip} is not")
        self.node_id = node_id_of(self.node_ip) if node_id is None else node_id
        self.ifname = config.interface or ifname
        # The keys read when the config was loaded (what a reload compared), else read now.
        self.keys = keys or config.keys or config.load_keys()
        # Unicast: the configured address of each peer, by the node id it has by default.
        configured = {node_id_of(p): str(p) for p in config.peers if p != self.node_ip}
        timing = EngineTiming(heartbeat_s=config.heartbeat_s, resend_interval_s=RESEND_INTERVAL_S,
                              dead_after_s=3 * config.heartbeat_s, resync_retry_s=RESYNC_RETRY_S,
                              max_incarnation_age_s=MAX_INCARNATION_AGE_S, retransmit_capacity=retransmit_capacity)
        self.engine = SyncEngine(self.keys, self.node_id,
                                 next_incarnation(time.time()) if incarnation is None else incarnation & 0xFFFFFFFF,
                                 timing=timing, configured_addrs=configured,
                                 first_request_id=int.from_bytes(os.urandom(4), "big"))
        self.on_install = on_install  # test/bench hook: concatenated keys of each installed batch
        # Where LOAD datagrams go (cluster/loadshare.py sets it): called on the loop, must not block.
        self.load_sink: Callable[[int, codec.Load], None] | None = None
        self.counters = self.engine.counters  # one dict: the engine's protocol counters and ours
        self.counters.update(dict.fromkeys(IO_COUNTERS, 0))
        self._sock: socket.socket | None = None
        self._ifindex = 0
        self._dests: list[tuple[str, int]] = []
        self._pending: list[bytes] = []
        self._rows = FlowRows(dataplane)  # the receive batch
        self._digest_set = False
        self._prompt_pending = False  # a _prompt_heartbeat task waits
        self._resync_done: trio.Event | None = None
        self._nursery: trio.Nursery | None = None
        self._reader: Any = None
        self._warn_limits: dict[str, LogLimiter] = {}  # reason -> its rate limit
        self._pacer = Pacer(send_rate)
        self._builder: RecordBuilder | None = None
        self._next_membership_check = -math.inf
        # "Seen recently" = within two refresh periods: the data plane rewrites last_seen at most
        # once per its own refresh interval (assumed <= ours), so an active flow always qualifies.
        self._refresh_window_ns = int(2 * config.refresh_s * 1e9)

    def set_keys(self, config: SyncConfig) -> None:
        """Take `config`'s keys (read at load) without a restart: a reload in which only the keys
        (files or their contents) changed, such as a rotation step. From the next datagram on we
        sign with the new current key and accept the new current and next ones."""
        keys = config.keys or config.load_keys()
        old, self.config, self.keys = self.keys, config, keys
        self.engine.set_keys(keys)
        log.info("flow sync %s: keys %s -> %s", self.node_ip, old.ids(), keys.ids())

    # ---- the engine's state, as the node and tests see it ---------------------------------------

    @property
    def incarnation(self) -> int:
        return self.engine.incarnation

    @property
    def policy(self) -> ReceivePolicy:
        return self.engine.policy

    @property
    def retransmit(self) -> RetransmitBuffer:
        return self.engine.retransmit

    @property
    def ready(self) -> bool:
        """Advertised in heartbeats; set once resync() has returned."""
        return self.engine.ready

    @property
    def repairing(self) -> bool:
        """True while what we hold of some peer's flows is known to be incomplete (missing
        numbers, a peer resync wanted or running): a node may hold back advertising on it."""
        return self.engine.repairing()

    # ---- public API ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind the socket, open the ring reader, report ready, and sync until cancelled."""
        sock = self._sock = self._open_socket()
        self.engine.start(trio.current_time(), time.time())
        try:
            reader = self._reader = self.dp.flow_event_reader()
            try:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(self._events_loop, reader)
                    nursery.start_soon(self._recv_loop)
                    nursery.start_soon(self._timer_loop)
                    nursery.start_soon(self._refresh_loop)
                    log.info("flow sync %s (node %#x, incarnation %d) to %s port %d via %s, keys %s", self.node_ip,
                             self.node_id, self.incarnation, ",".join(d[0] for d in self._dests), self.config.port,
                             self.ifname or "-", self.keys.ids())
                    task_status.started()
            finally:
                self._nursery = None
                self._reader = None
                reader.close()
        finally:
            sock.close()

    async def resync(self, timeout_s: float) -> bool:
        """Install the peers' whole flow tables; False (with a warning) if not done within
        `timeout_s`. Done once every live peer has sent one complete answer (retries, each under a
        new request id, are the engine's: a stalled answer is asked again) and a heartbeat, so
        its view digest is known by the time this returns."""
        done = self._resync_done = trio.Event()
        t0 = trio.current_time()
        try:
            self._act(self.engine.begin_resync(int.from_bytes(os.urandom(4), "big"), t0))
            with trio.move_on_after(timeout_s):
                while not done.is_set():
                    with trio.move_on_at(self.engine.next_deadline(trio.current_time())):
                        await done.wait()
                    now = trio.current_time()
                    if not done.is_set() and self.engine.next_deadline(now) <= now:
                        self._act(self.engine.poll(now))
        finally:
            state = self.engine.end_resync()
            self._resync_done = None
        flows, peers = (state.flows, len(state.answers.complete)) if state is not None else (0, 0)
        tries = len(state.answers.ids) if state is not None else 0
        if done.is_set():
            log.info("resync: %d flows from %d peer(s) in %.2fs (%d request id(s))", flows, peers,
                     trio.current_time() - t0, tries)
            return True
        log.warning("resync: incomplete after %.1fs (%d flows, %d complete answer(s), %d request id(s))", timeout_s,
                    flows, peers, tries)
        return False

    def set_digest(self, digest: bytes) -> None:
        """Our service/backend/health view, compared with peers' in heartbeats. Call after every
        `dataplane.apply()`: it also drops cached index translations."""
        if len(digest) != codec.DIGEST_BYTES:
            digest = hashlib.blake2b(digest, digest_size=codec.DIGEST_BYTES).digest()
        running = self._sock is not None
        self.engine.set_digest(digest, trio.current_time() if running else -math.inf)
        self._digest_set = True
        self._rows.clear()
        if running:  # peers hear the new digest now, or once the prompt spacing allows (engine.digest_heartbeat)
            self._act(self.engine.digest_heartbeat(trio.current_time()))
            if self.engine.digest_heartbeat_at() is not None and not self._prompt_pending \
                    and self._nursery is not None:
                self._prompt_pending = True
                self._nursery.start_soon(self._prompt_heartbeat)

    async def _prompt_heartbeat(self) -> None:
        """The heartbeat of a digest changed too soon after the last one (at most one waits)."""
        try:
            at = self.engine.digest_heartbeat_at()
            if at is not None:
                await trio.sleep_until(at)
                self._act(self.engine.digest_heartbeat(trio.current_time()))
        finally:
            self._prompt_pending = False

    def ring_pending_bytes(self) -> int:
        """Flow events waiting in the ring (how far the reader is behind the data plane)."""
        reader = self._reader
        return reader.pending_bytes() if reader is not None else 0

    def send_load(self, load: codec.Load) -> None:
        """A LOAD datagram to every peer (load-aware weighting, cluster/loadshare.py)."""
        if self._sock is not None:
            self._act([self.engine.load(load)])

    def members(self) -> dict[int, bool]:
        """Live peers by node id, and whether each is ready (its heartbeats say so)."""
        return self.engine.members(trio.current_time())

    @property
    def digest_mismatch(self) -> bool:
        return self.policy.digest_mismatch(trio.current_time())

    def snapshot(self) -> dict[str, Any]:
        """The status document's "sync" section (status.sync_status)."""
        return sync_status(self.engine, self.counters, self.ring_pending_bytes(), trio.current_time())

    # ---- actions ------------------------------------------------------------------------------

    def _warn(self, reason: str, msg: str, *args: object) -> None:
        """At most one WARNING per reason per WARN_INTERVAL_S, saying how many were suppressed
        (those go to DEBUG)."""
        limit = self._warn_limits.setdefault(reason, LogLimiter(WARN_INTERVAL_S))
        n = limit.allow(time.monotonic())
        if n is None:
            log.debug(msg, *args)
        else:
            log.warning(msg + (" (%d similar suppressed)" if n else ""), *args, *((n,) if n else ()))

    def _act(self, actions: Iterable[Action]) -> None:
        for a in actions:
            if isinstance(a, Send):
                self._send(a.datagram, None if a.addr is None else [(a.addr, self.config.port)])
            elif isinstance(a, Install):
                self._flows(a.records)
            elif isinstance(a, Serve):
                if self._nursery is None:
                    self.engine.serve_done(a.node_id, False)
                else:
                    self._nursery.start_soon(self._answer_resync, a)
            elif isinstance(a, ResyncComplete):
                if self._resync_done is not None:
                    self._resync_done.set()
            elif isinstance(a, LoadIn):
                if self.load_sink is not None:
                    self.load_sink(a.node_id, a.load)
            elif isinstance(a, Warn):
                self._warn(a.reason, "flow sync: %s", a.message)

    # ---- socket -------------------------------------------------------------------------------

    def _mreqn(self, ifindex: int) -> bytes:
        return struct.pack("=4s4si", self.config.group.packed, self.node_ip.packed, ifindex)

    def _open_socket(self) -> socket.socket:
        cfg = self.config
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            for force, plain in ((getattr(socket, "SO_RCVBUFFORCE", 33), socket.SO_RCVBUF),
                                 (getattr(socket, "SO_SNDBUFFORCE", 32), socket.SO_SNDBUF)):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER_BYTES)
                except PermissionError:
                    sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER_BYTES)
            if cfg.unicast:
                self._dests = [(str(p), cfg.port) for p in cfg.peers if p != self.node_ip]
                sock.bind((str(self.node_ip), cfg.port))
            else:
                ifindex = 0
                if self.ifname:
                    try:
                        ifindex = socket.if_nametoindex(self.ifname)
                    except OSError:
                        raise SyncError(f"sync interface {self.ifname!r} does not exist") from None
                mreqn = self._mreqn(ifindex)
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreqn)
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, mreqn)
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
                sock.setsockopt(socket.IPPROTO_IP, IP_MULTICAST_ALL, 0)
                self._ifindex = ifindex
                self._dests = [(str(cfg.group), cfg.port)]
                sock.bind(("0.0.0.0", cfg.port))  # group traffic and unicast answers (resends, resync)
            sock.setblocking(False)
        except SyncError:
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            raise SyncError(f"flow sync socket on {self.node_ip} port {cfg.port} ({self.ifname}): {exc}") from exc
        return sock

    def _check_membership(self) -> None:
        """Assert the group membership on the interface's current index (see the module
        docstring): EADDRINUSE means it is intact; anything else is retried on the next check."""
        sock = self._sock
        if sock is None or self.config.unicast:
            return
        try:
            ifindex = socket.if_nametoindex(self.ifname) if self.ifname else 0
        except OSError:
            self.counters["membership_errors"] += 1
            self._warn("membership", "flow sync: interface %s is gone; sending fails until it is back",
                               self.ifname)
            return
        mreqn = self._mreqn(ifindex)
        try:
            if ifindex != self._ifindex:
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, mreqn)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreqn)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:  # still a member there
                self._ifindex = ifindex
                return
            self.counters["membership_errors"] += 1
            self._warn("membership", "flow sync: cannot join %s on %s: %s", self.config.group, self.ifname,
                               errno.errorcode.get(exc.errno or 0, exc))
            return
        old, self._ifindex = self._ifindex, ifindex
        self.counters["membership_rejoins"] += 1
        log.info("flow sync %s: joined %s again on %s (ifindex %d -> %d)", self.node_ip, self.config.group,
                 self.ifname or "-", old, ifindex)

    def _send(self, datagram: bytes, dests: list[tuple[str, int]] | None = None) -> None:
        sock = self._sock
        assert sock is not None
        for dest in self._dests if dests is None else dests:
            try:
                sock.sendto(datagram, dest)
                self.counters["sent"] += 1
            except OSError as exc:  # EAGAIN (buffer full), ENETUNREACH, ...: peers recover by RESEND
                self.counters["send_errors"] += 1
                if exc.errno in LINK_ERRNOS:
                    self.counters["send_errors_link"] += 1
                    self._next_membership_check = min(self._next_membership_check, trio.current_time() + 0.1)
                self._warn("send", "flow sync: send to %s failed: %s", dest[0],
                                   errno.errorcode.get(exc.errno or 0, exc))

    def _send_flows(self, records: list[bytes]) -> None:
        self._act((self.engine.flows(records),))
        self.counters["sent_flows"] += len(records)

    # ---- send side ----------------------------------------------------------------------------

    async def _events_loop(self, reader: Any) -> None:
        batch_s = self.config.batch_ms / 1000
        deadline = math.inf
        pending = self._pending
        while True:
            if pending:  # a batch is open: let it fill until its deadline instead of waking per event
                await trio.sleep_until(deadline)
            else:
                await trio.lowlevel.wait_readable(reader.fd)
            raw = reader.read()
            if raw:
                if not pending:
                    deadline = trio.current_time() + batch_s
                self.counters["events"] += len(raw)
                wire_from_events(raw, pending)
                self._flush(full_only=True)
            if pending and trio.current_time() >= deadline:
                self._flush(full_only=False)
            if not pending:
                deadline = math.inf

    def _flush(self, *, full_only: bool) -> None:
        pending, size = self._pending, codec.MAX_FLOWS
        i, n = 0, len(pending)
        while n - i >= size:
            self._send_flows(pending[i:i + size])
            i += size
        if not full_only and i < n:
            self._send_flows(pending[i:])
            i = n
        del pending[:i]

    def _recent_floor_ns(self) -> int:
        return time.clock_gettime_ns(time.CLOCK_MONOTONIC) - self._refresh_window_ns

    async def _send_paced(self, datagrams: Iterable[bytes], dests: list[tuple[str, int]]) -> int:
        """Bulk sends: paced (`Pacer`), and a full socket buffer is waited out, not dropped."""
        sock = self._sock
        assert sock is not None
        n = batch = 0
        for datagram in datagrams:
            for dest in dests:
                while True:
                    try:
                        sock.sendto(datagram, dest)
                        self.counters["sent"] += 1
                        break
                    except BlockingIOError:
                        self.counters["send_waits"] += 1
                        await trio.lowlevel.wait_writable(sock)
                    except OSError as exc:  # the link is down: peers repair it later
                        self.counters["send_errors"] += 1
                        if exc.errno in LINK_ERRNOS:
                            self.counters["send_errors_link"] += 1
                        self._warn("send", "flow sync: send to %s failed: %s", dest[0],
                                           errno.errorcode.get(exc.errno or 0, exc))
                        break
            n += 1
            batch += len(dests)
            if batch >= SEND_BATCH:
                await self._pace(batch)
                batch = 0
        if batch:
            await self._pace(batch)
        return n

    async def _pace(self, n: int) -> None:
        """Wait until the pacer allows `n` more datagrams (a checkpoint if it does now)."""
        now = trio.current_time()
        due = self._pacer.due(n, now)
        if due > now:
            await trio.sleep_until(due)
        else:
            await trio.lowlevel.checkpoint()

    async def _record_builder(self) -> RecordBuilder:
        """The builder for the data plane's current backend addresses: rebuilt (on a worker
        thread: ~2 ms at 4,096 backends) only after an apply published new ones."""
        addresses = self.dp.backend_addresses()
        builder = self._builder
        if builder is None or builder.addresses is not addresses:
            builder = self._builder = await trio.to_thread.run_sync(RecordBuilder, addresses)
        return builder

    async def _refresh_loop(self) -> None:
        while True:
            await trio.sleep(self.config.refresh_s)
            await self._refresh()

    async def _refresh(self) -> None:
        """Re-announce flows seen here within the refresh window, so peers' LRU keeps them: the
        table walked a chunk at a time on a worker thread, each chunk sent (paced) before the next
        is fetched."""
        builder = await self._record_builder()
        floor = self._recent_floor_ns()
        size = codec.MAX_FLOWS * codec.FLOW_RECORD_BYTES
        n = 0
        async for chunk in flow_chunks(self.dp):
            records = builder.records(chunk, floor)
            n += len(records) // codec.FLOW_RECORD_BYTES
            await self._send_paced((self.engine.flows_packed(records[off:off + size]).datagram
                                    for off in range(0, len(records), size)), self._dests)
            self.counters["sent_flows"] += len(records) // codec.FLOW_RECORD_BYTES
        self.counters["refreshed"] += n
        self.counters["refresh_passes"] += 1

    def _flow_count(self, n: int) -> None:
        self.engine.flow_count = n

    async def _answer_resync(self, serve: Serve) -> None:
        """Stream the table to the requester: one walk chunk at a time (from a worker thread),
        its datagrams sent (paced) before the next is fetched, then the LAST chunk."""
        ok = False
        writer = self.engine.answer(serve.node_id, serve.request_id)
        dest = [(serve.addr, self.config.port)]
        t0 = trio.current_time()
        try:
            builder = await self._record_builder()
            # a peer resync: only the flows our stream carries (as a refresh pass selects them)
            floor = self._recent_floor_ns() if serve.own else None
            async for chunk in flow_chunks(self.dp):
                await self._send_paced(writer.add(builder.records(chunk, floor)), dest)
            await self._send_paced([writer.finish()], dest)
            ok = True
        finally:
            self.engine.serve_done(serve.node_id, ok)
        log.info("resync: sent %d %sflows in %d chunks to node %#x (%s) in %.2fs", writer.flows,
                 "own " if serve.own else "", writer.index, serve.node_id, serve.addr, trio.current_time() - t0)

    # ---- receive side -------------------------------------------------------------------------

    async def _recv_loop(self) -> None:
        sock = self._sock
        assert sock is not None
        engine = self.engine
        while True:
            await trio.lowlevel.wait_readable(sock)
            now, wall_s = trio.current_time(), time.time()
            rows = self._rows
            rows.begin(time.clock_gettime_ns(time.CLOCK_MONOTONIC) - self._refresh_window_ns - 2_000_000_000)
            for _ in range(RECV_BATCH):
                try:
                    data, (addr, _port) = sock.recvfrom(2048)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    self.counters["recv_errors"] += 1
                    self._warn("recv", "flow sync: receive failed: %s", exc)
                    break
                self.counters["received"] += 1
                self._act(engine.receive(data, addr, now, wall_s))
            if rows.keys:
                self._install(*rows.take())
            if engine.next_deadline(now) <= now:
                self._act(engine.poll(now))

    def _flows(self, raw: bytes) -> None:
        """Checked records (engine.Install) into the receive batch, translated (records.FlowRows)."""
        n, unknown = self._rows.add(raw)
        self.counters["received_flows"] += n + unknown
        if unknown:
            self.counters["unknown_service"] += unknown
            self._warn("unknown", "flow sync: %d flow(s) for a service or backend unknown here", unknown)

    def _install(self, keys: list[bytes], values: list[bytes]) -> None:
        joined = b"".join(keys)
        try:
            n = self.dp.write_flows_packed(joined, b"".join(values))
        except Exception as exc:  # a map error must not stop sync; it is counted and logged
            self.counters["install_errors"] += 1
            self._warn("install", "flow sync: writing %d flows failed: %s", len(keys), exc)
            return
        self.counters["installed"] += n
        if self.on_install is not None:
            self.on_install(joined)

    # ---- timers -------------------------------------------------------------------------------

    async def _timer_loop(self) -> None:
        engine = self.engine
        now = trio.current_time()
        next_clear = now + 1.0
        self._next_membership_check = now + MEMBERSHIP_CHECK_S
        while True:
            now = trio.current_time()
            if time.time() - engine.incarnation >= INCARNATION_RENEW_S:
                # Peers refuse to adopt incarnations far older than their clocks: stay young.
                # The first datagram of the new incarnation is a heartbeat (peers reset on it).
                old = engine.incarnation
                engine.renew(next_incarnation(time.time()), now)
                self.counters["incarnation_renewals"] += 1
                log.info("flow sync %s: incarnation %d -> %d", self.node_ip, old, engine.incarnation)
            self._flow_count(self.dp.flow_count().entries)  # from counters, not a walk
            if engine.next_deadline(now) <= now:
                self._act(engine.poll(now))
            if now >= self._next_membership_check:
                self._check_membership()
                self._next_membership_check = now + MEMBERSHIP_CHECK_S
            if now >= next_clear:  # forget negative translations: a service may have appeared
                self._rows.forget_unknown()
                next_clear = now + 1.0
            await trio.sleep_until(min(next_clear, self._next_membership_check,
                                       engine.next_deadline(trio.current_time())))
