"""Flow sync: the one trio module that moves flows between nodes (codec: gossip.py, policy:
gossip_policy.py).

Send side: new and closing flows come off the data plane's ring buffer (bpf/ringbuf.py, read in
batches), wait at most `batch_ms` for companions, and go out as FLOWS datagrams to the multicast
group (or to each unicast peer). Every `refresh_s` the flows seen recently here are sent again
(REFRESH) so peers' LRU tables keep them. Every datagram is numbered and kept in a bounded
retransmit buffer to answer RESEND requests.

Receive side: a datagram is authenticated and decoded (gossip.decode_header), judged by the
policy (replays, old incarnations and our own looped datagrams are dropped; gaps are asked for
again), and its flows are translated to local indexes ((VIP, port, proto, backend address) ->
(service, backend)) and written in one batch per wake-up. Peers' flows are stamped as idle
(`last_seen` older than the refresh window) so this node re-announces only flows it carries
itself. A CLOSE is written with FLOW_F_CLOSING, not deleted: packets in flight still reach the
backend, and a SYN that reuses the tuple starts afresh.

Bulk resync: `resync()` asks peers for their whole table (RESYNC_REQUEST, sent right after a
heartbeat so peers know our address) and returns once the answering peers' RESYNC_CHUNKs are
complete; a chunk is accepted only for our outstanding request id, so an old chunk replayed later
is ignored. A request is unsequenced (it bypasses the replay check), so answering one is guarded
against amplification: the table goes only to the address known for the requesting node id (the
configured unicast peer, else the source of its last policy-accepted datagram), never to the
request's source when that differs; a request from an incarnation older than the one we know for
that node (or far older than our clock) is refused; at most one answer per peer is in flight and
one per (node, incarnation, request id) per half retry interval. Residual: someone who captured a
request and can spoof the genuine peer's own address can still make us send the table to that
peer (which ignores chunks for a request id it no longer has outstanding), once at a time.

Incarnations are start times in wall-clock seconds, renewed every `INCARNATION_RENEW_S` (peers
treat a higher incarnation as a restart and resume tracking at its first number), because
receivers refuse to adopt an incarnation far older than their own clock (gossip_policy.py). Heartbeats carry the view digest
(`set_digest`); a live peer with another digest raises `digest_mismatch`.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from bpf.dataplane import DataPlane
from bpf.structs import EVENT_FLOW_CLOSE, FLOW_F_CLOSING, FLOW_F_SYNCED, addr16, from_addr16
from cluster.sync import codec as gossip
from cluster.sync.codec import DecodeError, FlowOp, MsgType
from cluster.sync.policy import ReceivePolicy, RetransmitBuffer, Verdict
from cluster.sync.config import SyncConfig

log = logging.getLogger(__name__)

IP_MULTICAST_ALL = getattr(socket, "IP_MULTICAST_ALL", 49)
SOCKET_BUFFER_BYTES = 16 << 20
RECV_BATCH = 512  # datagrams per wake-up before the flows are written
RESEND_INTERVAL_S = 0.05
RESYNC_RETRY_S = 1.0
INCARNATION_RENEW_S = 3600.0  # well within MAX_INCARNATION_AGE_S, with room for clock skew
MAX_INCARNATION_AGE_S = 6 * 3600.0
EVENT_TIME_OFFSET = 56 + 16  # struct flow_event: key 40, backend_addr 16, backend 4, service 4, time_ns 8, kind
EVENT_KIND_OFFSET = 72
_OP_NEW = bytes((FlowOp.NEW, 0, 0))
_OP_CLOSE = bytes((FlowOp.CLOSE, 0, 0))
_OP_REFRESH = bytes((FlowOp.REFRESH, 0, 0))
_KEY_PAD = b"\0\0\0"
_FLOW_PREFIX = struct.Struct("<IHH")  # struct flow: backend, service, flags (then last_seen_ns u64)
_U64 = struct.Struct("<Q")
_MISSING = object()


class SyncError(Exception):
    """Flow sync cannot start (socket, interface, address family)."""


def node_id_of(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> int:
    """IPv4: the address as a number (readable in captures); IPv6: 32 bits of its hash."""
    if isinstance(address, ipaddress.IPv4Address):
        return int(address)
    return int.from_bytes(hashlib.blake2b(address.packed, digest_size=4).digest(), "big")


_last_incarnation = 0


def _next_incarnation() -> int:
    """Start time in seconds, but always above the previous one of this process: a sync restarted
    within the same second (config reload) must not look like a replay of its predecessor."""
    global _last_incarnation
    _last_incarnation = max(int(time.time()) & 0xFFFFFFFF, _last_incarnation + 1)
    return _last_incarnation


class _RateLimitedLog:
    """At most one WARNING per reason per `interval_s`, saying how many were suppressed."""

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warn(self, reason: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last.get(reason, -math.inf) >= self.interval_s:
            n = self._suppressed.pop(reason, 0)
            log.warning(msg + (" (%d similar suppressed)" if n else ""), *args, *((n,) if n else ()))
            self._last[reason] = now
        else:
            self._suppressed[reason] = self._suppressed.get(reason, 0) + 1
            log.debug(msg, *args)


@dataclass
class _Resync:
    request_id: int
    done: trio.Event = field(default_factory=trio.Event)
    chunks: dict[int, set[int]] = field(default_factory=dict)  # peer -> chunk indexes seen
    last: dict[int, int] = field(default_factory=dict)  # peer -> index of its LAST chunk
    flows: int = 0

    def complete_peers(self) -> set[int]:
        return {p for p, last in self.last.items() if len(self.chunks.get(p, ())) >= last + 1}


class FlowSync:
    """Flow replication between the nodes of a cluster (see the module docstring)."""

    def __init__(self, config: SyncConfig, dataplane: DataPlane, node_ip: Any, node_id: int | None = None, *,
                 ifname: str | None = None, key: bytes | None = None, incarnation: int | None = None,
                 on_install: Callable[[bytes], None] | None = None, retransmit_capacity: int = 16384) -> None:
        self.config = config
        self.dp = dataplane
        self.node_ip = ipaddress.ip_address(str(node_ip))
        if not isinstance(self.node_ip, ipaddress.IPv4Address):
            raise SyncError(f"flow sync runs over IPv4; node address {self.node_ip} is not")
        self.node_id = node_id_of(self.node_ip) if node_id is None else node_id
        self.ifname = config.interface or ifname
        self.key = config.load_key() if key is None else key
        self.incarnation = _next_incarnation() if incarnation is None else incarnation & 0xFFFFFFFF
        self.policy = ReceivePolicy(self.node_id, resend_interval_s=RESEND_INTERVAL_S,
                                    dead_after_s=3 * config.heartbeat_s, max_incarnation_age_s=MAX_INCARNATION_AGE_S)
        self.retransmit = RetransmitBuffer(retransmit_capacity)
        self.on_install = on_install  # test/bench hook: concatenated keys of each installed batch
        self.ready = False  # advertised in heartbeats; set once resync() has returned
        self.counters: dict[str, int] = dict.fromkeys((
            "sent", "sent_flows", "received", "received_flows", "installed", "forged", "malformed", "resends", "resend_requests", "unknown_service", "send_errors", "events",
            "refreshed", "refresh_passes", "resync_served", "resync_chunks", "resync_ignored", "install_errors",
            "resync_misdirected", "resync_stale", "resync_busy", "incarnation_renewals"), 0)
        self._seq = 0
        self._sock: socket.socket | None = None
        self._dests: list[tuple[str, int]] = []
        self._pending: list[bytes] = []
        self._xlate: dict[bytes, tuple[bytes, bytes] | None] = {}
        self._digest = bytes(gossip.DIGEST_BYTES)
        self._digest_set = False
        self._resync: _Resync | None = None
        self._answered: dict[tuple[int, int, int], float] = {}
        self._answering: set[int] = set()  # peers with a resync answer in flight
        self._peer_addr: dict[int, str] = {}
        # Unicast: the configured address of each peer, by the node id it has by default.
        self._configured_addr = {node_id_of(p): str(p) for p in config.peers if p != self.node_ip}
        self._flow_count = 0
        self._nursery: trio.Nursery | None = None
        self._reader: Any = None
        self._ratelog = _RateLimitedLog()
        # "Seen recently" = within two refresh periods: the data plane rewrites last_seen at most
        # once per its own refresh interval (assumed <= ours), so an active flow always qualifies.
        self._refresh_window_ns = int(2 * config.refresh_s * 1e9)

    # ---- public API ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind the socket, open the ring reader, report ready, and sync until cancelled."""
        sock = self._sock = self._open_socket()
        try:
            reader = self._reader = self.dp.flow_event_reader()
            try:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(self._events_loop, reader)
                    nursery.start_soon(self._recv_loop)
                    nursery.start_soon(self._timer_loop)
                    log.info("flow sync %s (node %#x, incarnation %d) to %s port %d via %s", self.node_ip,
                             self.node_id, self.incarnation, ",".join(d[0] for d in self._dests), self.config.port,
                             self.ifname or "-")
                    task_status.started()
            finally:
                self._nursery = None
                self._reader = None
                reader.close()
        finally:
            sock.close()

    async def resync(self, timeout_s: float) -> bool:
        """Install the peers' whole flow tables; False (with a warning) if not done within `timeout_s`."""
        state = _Resync(request_id=int.from_bytes(os.urandom(4), "big") or 1)
        self._resync = state
        t0 = trio.current_time()
        try:
            with trio.move_on_after(timeout_s):
                while not state.done.is_set():
                    self._send_heartbeat()  # peers answer only to an address they know for us
                    self._send(gossip.encode_resync_request(self.key, self.node_id, self.incarnation, 0,
                                                            state.request_id))
                    with trio.move_on_after(RESYNC_RETRY_S):
                        await state.done.wait()
        finally:
            self._resync = None
            self.ready = True
        if state.done.is_set():
            log.info("resync: %d flows from %d peer(s) in %.2fs", state.flows, len(state.last),
                     trio.current_time() - t0)
            return True
        log.warning("resync: incomplete after %.1fs (%d flows from %d answering peer(s))", timeout_s, state.flows,
                    len(state.chunks))
        return False

    def set_digest(self, digest: bytes) -> None:
        """Our service/backend/health view, compared with peers' in heartbeats. Call after every
        `dataplane.apply()`: it also drops cached index translations."""
        if len(digest) != gossip.DIGEST_BYTES:
            digest = hashlib.blake2b(digest, digest_size=gossip.DIGEST_BYTES).digest()
        self._digest, self._digest_set = digest, True
        self.policy.our_digest = digest
        self._xlate.clear()

    def ring_pending_bytes(self) -> int:
        """Flow events waiting in the ring (how far the reader is behind the data plane)."""
        reader = self._reader
        return reader.pending_bytes() if reader is not None else 0

    @property
    def digest_mismatch(self) -> bool:
        return self.policy.digest_mismatch(trio.current_time())

    def snapshot(self) -> dict[str, Any]:
        now = trio.current_time()
        c = self.policy.counters
        return {
            "node_id": self.node_id,
            "incarnation": self.incarnation,
            "sequence": self._seq,
            "ready": self.ready,
            "digest_mismatch": self.policy.digest_mismatch(now),
            "ring_pending_bytes": self.ring_pending_bytes(),
            "peers": [{
                "node_id": v.node_id, "address": self._peer_addr.get(v.node_id), "alive": v.alive,
                "last_seen_s": round(v.last_heard_s_ago, 3), "highest_seq": v.highest_seq, "lag": v.missing,
                "digest_match": v.digest_match, "ready": v.ready, "flows": v.flow_count,
            } for v in self.policy.views(now)],
            "counters": {**self.counters, "replayed": c.replayed, "stale": c.stale, "gaps": c.gaps,
                         "recovered": c.recovered, "lost": c.lost, "resend_requested": c.resend_requested,
                         "self_looped": c.self_looped, "retransmit_missed": self.retransmit.missed,
                         "gap_overflows": c.overflows, "reincarnated": c.reincarnated,
                         "incarnation_too_old": c.too_old},
        }

    # ---- socket -------------------------------------------------------------------------------

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
                mreqn = struct.pack("=4s4si", cfg.group.packed, self.node_ip.packed, ifindex)
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreqn)
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, mreqn)
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
                sock.setsockopt(socket.IPPROTO_IP, IP_MULTICAST_ALL, 0)
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

    def _send(self, datagram: bytes, dests: list[tuple[str, int]] | None = None) -> None:
        assert self._sock is not None
        for dest in self._dests if dests is None else dests:
            try:
                self._sock.sendto(datagram, dest)
                self.counters["sent"] += 1
            except OSError as exc:  # EAGAIN (buffer full), ENETUNREACH, ...: peers recover by RESEND
                self.counters["send_errors"] += 1
                self._ratelog.warn("send", "flow sync: send to %s failed: %s", dest[0], errno.errorcode.get(exc.errno or 0, exc))

    def _send_sequenced(self, make: Callable[[int], bytes]) -> None:
        self._seq += 1
        datagram = make(self._seq)
        self.retransmit.add(self._seq, datagram)
        self._send(datagram)

    def _send_heartbeat(self) -> None:
        hb = gossip.Heartbeat(self._digest, self._flow_count, self.ready)
        key, node, inc = self.key, self.node_id, self.incarnation
        self._send_sequenced(lambda seq: gossip.encode_heartbeat(key, node, inc, seq, hb))

    def _known_addr(self, node_id: int) -> str | None:
        """Where a peer is: its configured unicast address, else the source of its last accepted datagram."""
        return self._configured_addr.get(node_id) or self._peer_addr.get(node_id)

    def _send_flows(self, records: list[bytes]) -> None:
        key, node, inc = self.key, self.node_id, self.incarnation
        self._send_sequenced(lambda seq: gossip.encode_flows(key, node, inc, seq, records))
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
                for ev in raw:
                    pending.append(ev[:37] + (_OP_CLOSE if ev[EVENT_KIND_OFFSET] == EVENT_FLOW_CLOSE else _OP_NEW)
                                   + ev[40:56])
                self._flush(full_only=True)
            if pending and trio.current_time() >= deadline:
                self._flush(full_only=False)
            if not pending:
                deadline = math.inf

    def _flush(self, *, full_only: bool) -> None:
        pending, size = self._pending, gossip.MAX_FLOWS
        i, n = 0, len(pending)
        while n - i >= size:
            self._send_flows(pending[i:i + size])
            i += size
        if not full_only and i < n:
            self._send_flows(pending[i:])
            i = n
        del pending[:i]

    async def _refresh(self) -> None:
        """Re-announce flows seen here within the refresh window, so peers' LRU keeps them."""
        flows = await trio.to_thread.run_sync(self.dp.flows)
        self._flow_count = len(flows)
        floor = time.clock_gettime_ns(time.CLOCK_MONOTONIC) - self._refresh_window_ns
        records = self._records([(k, f) for k, f in flows if f.last_seen_ns >= floor])
        for i in range(0, len(records), gossip.MAX_FLOWS):
            self._send_flows(records[i:i + gossip.MAX_FLOWS])
            if i % (64 * gossip.MAX_FLOWS) == 0:
                await trio.sleep(0)
        self.counters["refreshed"] += len(records)
        self.counters["refresh_passes"] += 1

    def _records(self, flows: list[Any]) -> list[bytes]:
        addresses = {i: addr16(a) for i, a in self.dp.backend_addresses().items()}
        out = []
        for k, f in flows:
            address = addresses.get(f.backend)
            if address is not None:
                out.append(bytes(k)[:37] + (_OP_CLOSE if f.flags & FLOW_F_CLOSING else _OP_REFRESH) + address)
        return out

    async def _answer_resync(self, node_id: int, request_id: int, addr: str) -> None:
        try:
            flows = await trio.to_thread.run_sync(self.dp.flows)
            records = self._records(flows)
            size = gossip.MAX_CHUNK_FLOWS
            chunks = max(1, math.ceil(len(records) / size))
            for index in range(chunks):
                datagram = gossip.encode_resync_chunk(self.key, self.node_id, self.incarnation, 0, node_id, request_id,
                                                      index, index == chunks - 1, records[index * size:(index + 1) * size])
                self._send(datagram, [(addr, self.config.port)])
                if index % 32 == 31:
                    await trio.sleep(0)
        finally:
            self._answering.discard(node_id)
        self.counters["resync_served"] += 1
        log.info("resync: sent %d flows in %d chunks to node %#x (%s)", len(records), chunks, node_id, addr)

    # ---- receive side -------------------------------------------------------------------------

    async def _recv_loop(self) -> None:
        sock = self._sock
        assert sock is not None
        while True:
            await trio.lowlevel.wait_readable(sock)
            now, wall_s = trio.current_time(), time.time()
            keys: list[bytes] = []
            values: list[bytes] = []
            stamp = _U64.pack(max(0, time.clock_gettime_ns(time.CLOCK_MONOTONIC) - self._refresh_window_ns
                                  - 2_000_000_000))
            for _ in range(RECV_BATCH):
                try:
                    data, (addr, _port) = sock.recvfrom(2048)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    self._ratelog.warn("recv", "flow sync: receive failed: %s", exc)
                    break
                self.counters["received"] += 1
                self._handle(data, addr, now, keys, values, stamp, wall_s)
            if keys:
                self._install(keys, values)
            if (self.policy.next_deadline() or math.inf) <= now:
                self._request_resends(now)

    def _handle(self, data: bytes, addr: str, now: float, keys: list[bytes], values: list[bytes], stamp: bytes,
                wall_s: float | None = None) -> None:
        try:
            header, body = gossip.decode_header(self.key, data)
        except DecodeError as exc:
            kind = "forged" if exc.reason == "forged" else "malformed"
            self.counters[kind] += 1
            self._ratelog.warn(kind, "flow sync: dropped %s datagram from %s: %s", kind, addr, exc)
            return
        t = header.type
        try:
            if t is MsgType.RESYNC_REQUEST or t is MsgType.RESYNC_CHUNK:
                if header.node_id != self.node_id:
                    self._handle_resync(header, body, addr, now, keys, values, stamp, wall_s)
                return
            verdict = self.policy.accept(header, now, wall_s)
            if verdict is not Verdict.ACCEPT:
                if verdict is not Verdict.SELF:
                    log.debug("flow sync: %s datagram %d from %s", verdict.value, header.seq, addr)
                return
            self._peer_addr[header.node_id] = addr
            if t is MsgType.FLOWS:
                self._flows(body, keys, values, stamp)
            elif t is MsgType.HEARTBEAT:
                hb = gossip.decode(self.key, data).body
                assert isinstance(hb, gossip.Heartbeat)
                was = self.policy.peers[header.node_id].digest
                self.policy.heartbeat(header.node_id, hb)
                if self._digest_set and any(hb.digest) and hb.digest != self._digest and was != hb.digest:
                    self._ratelog.warn("digest", "flow sync: node %#x (%s) has another service/backend view", header.node_id, addr)
            elif t is MsgType.RESEND:
                msg = gossip.decode(self.key, data).body
                assert isinstance(msg, gossip.Resend)
                datagrams = self.retransmit.lookup(msg.ranges, self.node_id, self.incarnation)
                dest = self._known_addr(header.node_id) or addr
                for d in datagrams:
                    self._send(d, [(dest, self.config.port)])
                self.counters["resends"] += len(datagrams)
        except DecodeError as exc:
            self.counters["malformed"] += 1
            self._ratelog.warn("malformed", "flow sync: dropped malformed datagram from %s: %s", addr, exc)

    def _flows(self, body: memoryview, keys: list[bytes], values: list[bytes], stamp: bytes) -> None:
        raw = bytes(body)
        xlate, size = self._xlate, gossip.FLOW_RECORD_BYTES
        for off in range(37, len(raw), size):  # validate before installing any record of the datagram
            if not 1 <= raw[off] <= 3 or raw[off + 1] or raw[off + 2]:
                raise DecodeError("record", f"flow record {off // size}: op {raw[off]}")
        n = unknown = 0
        for off in range(0, len(raw), size):
            t = raw[off + 16:off + 32] + raw[off + 34:off + 37] + raw[off + 40:off + 56]
            prefixes = xlate.get(t, _MISSING)
            if prefixes is _MISSING:
                prefixes = xlate[t] = self._translate(t)
            if prefixes is None:
                unknown += 1
                continue
            keys.append(raw[off:off + 37] + _KEY_PAD)
            values.append(prefixes[raw[off + 37] == FlowOp.CLOSE] + stamp)  # type: ignore[index]
            n += 1
        self.counters["received_flows"] += n + unknown
        if unknown:
            self.counters["unknown_service"] += unknown
            self._ratelog.warn("unknown", "flow sync: %d flow(s) for a service or backend unknown here", unknown)

    def _translate(self, t: bytes) -> tuple[bytes, bytes] | None:
        vip, port, proto, backend = from_addr16(t[:16]), int.from_bytes(t[16:18], "big"), t[18], from_addr16(t[19:35])
        service = self.dp.service_index(vip, port, proto)
        index = self.dp.backend_index(vip, port, proto, backend)
        if service is None or index is None:
            return None
        return (_FLOW_PREFIX.pack(index, service, FLOW_F_SYNCED),
                _FLOW_PREFIX.pack(index, service, FLOW_F_SYNCED | FLOW_F_CLOSING))

    def _install(self, keys: list[bytes], values: list[bytes]) -> None:
        joined = b"".join(keys)
        try:
            n = self.dp.write_flows_packed(joined, b"".join(values))
        except Exception as exc:  # a map error must not stop sync; it is counted and logged
            self.counters["install_errors"] += 1
            self._ratelog.warn("install", "flow sync: writing %d flows failed: %s", len(keys), exc)
            return
        self.counters["installed"] += n
        if self.on_install is not None:
            self.on_install(joined)

    def _handle_resync(self, header: gossip.Header, body: memoryview, addr: str, now: float,
                       keys: list[bytes], values: list[bytes], stamp: bytes, wall_s: float | None = None) -> None:
        if header.type is MsgType.RESYNC_REQUEST:
            (request_id, _) = gossip.RESYNC_REQUEST.unpack(body)
            node, inc = header.node_id, header.incarnation
            known = self.policy.peers.get(node)
            if (known is not None and inc < known.incarnation) or \
                    (wall_s is not None and inc < wall_s - MAX_INCARNATION_AGE_S):
                self.counters["resync_stale"] += 1
                self._ratelog.warn("resync_stale", "flow sync: resync request from an old incarnation %d of node %#x (%s)",
                                   inc, node, addr)
                return
            dest = self._known_addr(node)
            if dest != addr:  # never send a table to an address we do not know for that node
                self.counters["resync_misdirected"] += 1
                self._ratelog.warn("resync_addr", "flow sync: resync request for node %#x from %s, which we know at %s",
                                   node, addr, dest)
                return
            if node in self._answering:
                self.counters["resync_busy"] += 1
                return
            last = self._answered.get((node, inc, request_id), -math.inf)
            if now - last < RESYNC_RETRY_S / 2 or self._nursery is None:
                self.counters["resync_ignored"] += 1
                return
            self._answered = {k: v for k, v in self._answered.items() if now - v < 60} | {(node, inc, request_id): now}
            self._answering.add(node)
            self._nursery.start_soon(self._answer_resync, node, request_id, dest)
            return
        target, request_id, index, last_chunk = gossip.chunk_preamble(body)
        state = self._resync
        if target != self.node_id or state is None or request_id != state.request_id:
            self.counters["resync_ignored"] += 1
            return
        before = len(keys)
        self._flows(body[gossip.CHUNK_PREAMBLE.size:], keys, values, stamp)
        self.counters["resync_chunks"] += 1
        state.flows += len(keys) - before
        state.chunks.setdefault(header.node_id, set()).add(index)
        if last_chunk:
            state.last[header.node_id] = index
        complete = state.complete_peers()
        waiting = set(state.chunks) | {p for p in self.policy.peers if self.policy.alive(p, now)}
        if complete and waiting <= complete:
            state.done.set()

    # ---- timers -------------------------------------------------------------------------------

    def _request_resends(self, now: float) -> None:
        ranges = self.policy.resend_requests(now)
        by_peer: dict[int, list[gossip.ResendRange]] = {}
        for r in ranges:
            by_peer.setdefault(r.node_id, []).append(r)
        key, node, inc = self.key, self.node_id, self.incarnation
        for peer, peer_ranges in by_peer.items():
            addr = self._peer_addr.get(peer)
            for i in range(0, len(peer_ranges), gossip.MAX_RESENDS):
                part = peer_ranges[i:i + gossip.MAX_RESENDS]
                self._seq += 1
                datagram = gossip.encode_resend(key, node, inc, self._seq, part)
                self.retransmit.add(self._seq, datagram)
                self._send(datagram, [(addr, self.config.port)] if addr else None)
                self.counters["resend_requests"] += 1

    async def _timer_loop(self) -> None:
        heartbeat_s, refresh_s = self.config.heartbeat_s, self.config.refresh_s
        now = trio.current_time()
        next_heartbeat, next_refresh, next_clear = now, now + refresh_s, now + 1.0
        while True:
            now = trio.current_time()
            if time.time() - self.incarnation >= INCARNATION_RENEW_S:
                # Peers refuse to adopt incarnations far older than their clocks: stay young.
                # The first datagram of the new incarnation is a heartbeat (peers reset on it).
                old, self.incarnation = self.incarnation, _next_incarnation()
                self.counters["incarnation_renewals"] += 1
                log.info("flow sync %s: incarnation %d -> %d", self.node_ip, old, self.incarnation)
                next_heartbeat = now
            if now >= next_heartbeat:
                self._send_heartbeat()
                next_heartbeat = now + heartbeat_s
            if (self.policy.next_deadline() or math.inf) <= now:
                self._request_resends(now)
            if now >= next_clear:  # forget negative translations: a service may have appeared
                self._xlate = {k: v for k, v in self._xlate.items() if v is not None}
                next_clear = now + 1.0
            if now >= next_refresh:
                await self._refresh()
                next_refresh = trio.current_time() + refresh_s
            await trio.sleep_until(min(next_heartbeat, next_refresh, next_clear,
                                       self.policy.next_deadline() or math.inf))
