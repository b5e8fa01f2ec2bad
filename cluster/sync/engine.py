"""Flow-sync protocol engine (pure, sans-IO): datagrams and `now` in, actions out.

Theory of operation. One `SyncEngine` per node holds everything the protocol decides: the
sender's two number spaces (codec.py), its retransmit buffer, the receive policy (policy.py),
where each peer is, the start-up resync, peer resyncs and the guards on answering resyncs. It
never reads a clock, never sleeps and never touches a socket or the flow table. The I/O module
(flowsync.py) feeds it

- `receive(datagram, source address, now, wall_s)`: every datagram off the socket;
- `flows(records)`: a batch of new/closing/refreshed flows to announce;
- `poll(now)`: when `next_deadline(now)` has passed (heartbeats, RESEND requests, peer resyncs);
- `begin_resync` / `resync_request` / `end_resync`: the start-up resync;
- `resync_chunks(...)` and `serve_done(...)`: the table it walked to answer a `Serve`;

and carries out the actions it returns: `Send` (to one address, or to every peer when `addr` is
None), `Install` (flow records to translate and write), `Serve` (walk the table for a peer),
`ResyncComplete` and `Warn` (a rate-limited log line).

Why it is correct for N nodes. The stream (FLOWS, HEARTBEAT) only ever holds datagrams that go
to every peer, so all receivers see the same numbers; a loss at receiver R shows up at R only.
R asks the sender with a RESEND (a control datagram, unicast, outside the stream); the sender
answers with the original datagram (its own stream number, unchanged) by unicast to R. Nothing
in a repair is new to any third node, so one loss costs one request and one resend (times the
retries that loss of those two needs), whatever N is; when loss stops, repair traffic stops.

    node A (sender)            node R (lost A#7)                node C (got A#7)
    stream A#7 ------X               .                                  . (has 7)
    stream A#8 ----------------> gap {7}  ------------------------>   8 (no gap)
               <-- RESEND A 7..7 (control R#1, unicast)
    copy of A#7 (still #7) ----> fills 7                      (never sees it)

Resyncs (a peer resync, the start-up resync, answering one: its streaming and its guards against
amplification) are described in resync.py, which holds their state; the engine drives them.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from cluster.sync import codec
from cluster.sync.codec import SEQUENCED, DecodeError, MsgType, ResendRange
from cluster.sync.policy import MAX_INCARNATION_AGE_S, ReceivePolicy, RetransmitBuffer, Verdict
from cluster.sync.resync import AnswerGuards, ChunkWriter, PeerResync, ResyncState


@dataclass(frozen=True, slots=True)
class Send:
    """Put `datagram` on the wire: to `addr`, or to every peer (group / each unicast peer)."""

    datagram: bytes
    addr: str | None


@dataclass(frozen=True, slots=True)
class Install:
    """Flow records (n x 56 bytes, ops checked) from `node_id`, to translate and write."""

    records: bytes
    node_id: int
    resync: bool


@dataclass(frozen=True, slots=True)
class Serve:
    """Walk the flow table and answer `node_id`'s resync through `SyncEngine.resync_chunks`:
    the whole table, or with `own` only the flows this node announces itself (those its stream
    carries: pinned or seen here within the refresh window, as a refresh pass selects them)."""

    node_id: int
    request_id: int
    addr: str
    own: bool = False


@dataclass(frozen=True, slots=True)
class ResyncComplete:
    request_id: int


@dataclass(frozen=True, slots=True)
class LoadIn:
    """A LOAD datagram from `node_id` (cluster/loadshare.py takes it)."""

    node_id: int
    load: codec.Load


@dataclass(frozen=True, slots=True)
class Warn:
    reason: str  # the rate limit's key
    message: str


Action = Send | Install | Serve | ResyncComplete | LoadIn | Warn


@dataclass(frozen=True, slots=True)
class EngineTiming:
    heartbeat_s: float = 1.0
    resend_interval_s: float = 0.05
    resend_tries: int = 8
    dead_after_s: float = 3.0
    resync_retry_s: float = 1.0
    resync_settle_s: float = 0.2  # a start-up resync completes no sooner: every answering peer is heard
    peer_resync_tries: int = 5
    peer_resync_holdoff_s: float = 5.0
    max_incarnation_age_s: float = MAX_INCARNATION_AGE_S
    resync_answer_burst: int = 4  # resync answers one peer gets at once ...
    resync_answer_every_s: float = 5.0  # ... and then one per this long
    retransmit_capacity: int = 16384
    max_gap: int = 16384


COUNTERS = (
    "forged", "unknown_key", "malformed", "resends", "resend_requests", "resend_requests_received", "resync_served",
    "resync_chunks", "resync_ignored", "resync_misdirected", "resync_stale", "resync_busy", "resync_duplicate",
    "resync_limited", "resync_chunks_sent",
    "peer_resyncs", "peer_resyncs_done", "peer_resyncs_failed", "peer_resyncs_abandoned", "heartbeats",
    "loads_sent", "loads_received",
)


PROMPT_HEARTBEAT_S = 0.05  # digest_heartbeat: the closest two heartbeats get


class SyncEngine:
    """The flow-sync protocol of one node (see the module docstring)."""

    def __init__(self, keys: codec.Keyring, node_id: int, incarnation: int, *, timing: EngineTiming = EngineTiming(),
                 configured_addrs: Mapping[int, str] | None = None, first_request_id: int = 1) -> None:
        self.keys = keys  # signs with keys.current; accepts current and next
        self.node_id = node_id
        self.incarnation = incarnation
        self.timing = timing
        self.policy = ReceivePolicy(node_id, resend_interval_s=timing.resend_interval_s,
                                    resend_tries=timing.resend_tries, dead_after_s=timing.dead_after_s,
                                    max_gap=timing.max_gap, max_incarnation_age_s=timing.max_incarnation_age_s)
        self.retransmit = RetransmitBuffer(timing.retransmit_capacity)
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.seq = 0  # last stream number
        self.control_seq = 0  # last control number
        self.digest = bytes(codec.DIGEST_BYTES)
        self.ready = False
        self.flow_count = 0
        self.peer_addr: dict[int, str] = {}
        self.configured_addrs = dict(configured_addrs or {})
        self.resync_state: ResyncState | None = None
        self.peer_resyncs: dict[int, PeerResync] = {}
        self.heard: dict[int, int] = {}  # peer -> incarnation of its last accepted heartbeat
        self._holdoff: dict[int, float] = {}  # peer -> no new peer resync before
        self._guards = AnswerGuards(timing.resync_answer_burst, timing.resync_answer_every_s)
        self._next_request_id = first_request_id & 0xFFFFFFFF or 1
        self._next_heartbeat = -math.inf
        self._last_heartbeat = -math.inf
        self._heartbeat_digest = self.digest  # the digest the last heartbeat carried
        self._digest_warned: dict[int, bytes] = {}  # peer -> the differing digest last warned of

    # ---- sending ------------------------------------------------------------------------------

    def known_addr(self, node_id: int) -> str | None:
        """Where a peer is: its configured unicast address, else the source of its last accepted datagram."""
        return self.configured_addrs.get(node_id) or self.peer_addr.get(node_id)

    def _stream(self, datagram: bytes) -> Send:
        self.retransmit.add(self.seq, datagram)
        return Send(datagram, None)

    def _control(self) -> int:
        self.control_seq += 1
        return self.control_seq

    def flows(self, records: Sequence[bytes]) -> Send:
        """One FLOWS datagram (up to codec.MAX_FLOWS 56-byte records) to every peer."""
        self.seq += 1
        return self._stream(codec.encode_flows(self.keys, self.node_id, self.incarnation, self.seq, records))

    def flows_packed(self, packed: bytes) -> Send:
        """`flows` for records already concatenated (n x 56 bytes, n <= codec.MAX_FLOWS)."""
        self.seq += 1
        return self._stream(codec.encode_flows_packed(self.keys, self.node_id, self.incarnation, self.seq, packed))

    def heartbeat(self, now: float) -> Send:
        """A heartbeat now (the next is due `heartbeat_s` later)."""
        self.seq += 1
        # The buffer holds the last `capacity` stream numbers of this incarnation, this one included.
        oldest = max(1, self.seq - self.retransmit.capacity + 1)
        hb = codec.Heartbeat(self.digest, self.flow_count, self.ready, oldest)
        self._next_heartbeat = now + self.timing.heartbeat_s
        self._last_heartbeat, self._heartbeat_digest = now, self.digest
        self.counters["heartbeats"] += 1
        return self._stream(codec.encode_heartbeat(self.keys, self.node_id, self.incarnation, self.seq, hb))

    def load(self, load: codec.Load) -> Send:
        """A LOAD datagram to every peer: a control number, outside the stream (codec.py)."""
        self.counters["loads_sent"] += 1
        return Send(codec.encode_load(self.keys, self.node_id, self.incarnation, self._control(), load), None)

    def members(self, now: float) -> dict[int, bool]:
        """The live peers (heard in their stream within dead_after_s) and whether each is ready."""
        return {p.node_id: p.ready for p in self.policy.peers.values() if self.policy.alive(p.node_id, now)}

    def set_keys(self, keys: codec.Keyring) -> None:
        """New keys (a rotation step): sign with the new current key from the next datagram on,
        accept the new current and next. Numbering and peer state go on unchanged."""
        self.keys = keys

    def set_digest(self, digest: bytes, now: float = -math.inf) -> None:
        self.digest = digest
        self.policy.set_our_digest(digest, now)

    def digest_heartbeat(self, now: float) -> list[Action]:
        """After our digest changed: a heartbeat now (at most one per PROMPT_HEARTBEAT_S, else at
        that spacing), so peers compare the new digest within milliseconds rather than up to a
        heartbeat later. Load-aware weights change the digest every few intervals on every node
        at once (cluster/loadshare.py); without this a peer's heartbeat sent just before its
        change would read as a mismatch for a whole heartbeat interval."""
        at = self.digest_heartbeat_at()
        if at is None or now < at:
            return []
        return [self.heartbeat(now)]

    def digest_heartbeat_at(self) -> float | None:
        """When `digest_heartbeat` will send (None: the last heartbeat carried our digest)."""
        if self.digest == self._heartbeat_digest:
            return None
        return self._last_heartbeat + PROMPT_HEARTBEAT_S

    def start(self, now: float, wall_s: float | None = None) -> None:
        """We listen from `now` (see policy.ReceivePolicy.start)."""
        self.policy.start(now, wall_s)

    def renew(self, incarnation: int, now: float) -> None:
        """A new incarnation: peers reset on it; numbers start at 1 again; numbers of the old
        one can no longer be resent."""
        self.incarnation = incarnation & 0xFFFFFFFF
        self.retransmit.clear()
        self.seq = self.control_seq = 0
        self._next_heartbeat = now  # the first datagram of the new life is a heartbeat

    # ---- receiving ----------------------------------------------------------------------------

    def receive(self, data: bytes, addr: str, now: float, wall_s: float | None = None) -> list[Action]:
        """Everything one datagram from `addr` causes. Never raises on any input."""
        try:
            header, body = codec.decode_header(self.keys, data)
        except DecodeError as exc:
            if exc.reason == "key":
                self.counters["unknown_key"] += 1
                return [Warn("unknown_key", f"dropped datagram from {addr}: {exc.detail} (a key rotation step "
                                            f"missing on one side?)")]
            kind = "forged" if exc.reason == "forged" else "malformed"
            self.counters[kind] += 1
            return [Warn(kind, f"dropped {kind} datagram from {addr}: {exc}")]
        try:
            if header.type in SEQUENCED:
                return self._stream_in(header, body, addr, now, wall_s)
            return self._control_in(header, body, addr, now, wall_s)
        except DecodeError as exc:
            self.counters["malformed"] += 1
            return [Warn("malformed", f"dropped malformed datagram from {addr}: {exc}")]

    def _stream_in(self, header: codec.Header, body: memoryview, addr: str, now: float,
                   wall_s: float | None) -> list[Action]:
        if self.policy.accept(header, now, wall_s) is not Verdict.ACCEPT:
            return []
        node = header.node_id
        self.peer_addr[node] = addr
        if header.type is MsgType.FLOWS:
            return [Install(codec.check_flow_records(body), node, False)] if header.count else []
        hb = codec.heartbeat(body)
        was = self.policy.peers[node].digest
        self.policy.heartbeat(node, hb, now)
        self.heard[node] = header.incarnation
        out: list[Action] = self._check_resync(now)
        # Warned once per differing digest, and only when two heartbeats in a row carry it: views
        # change on every node within milliseconds (a weight publication, a health verdict), and
        # one heartbeat sent across that instant is a peer a moment behind, not another view.
        if self.policy.our_digest is not None and any(hb.digest) and hb.digest != self.digest \
                and was == hb.digest and self._digest_warned.get(node) != hb.digest:
            self._digest_warned[node] = hb.digest
            out.append(Warn("digest", f"node {node:#x} ({addr}) has another service/backend view"))
        return out

    def _control_in(self, header: codec.Header, body: memoryview, addr: str, now: float,
                    wall_s: float | None) -> list[Action]:
        t, node = header.type, header.node_id
        verdict = self.policy.accept_control(header, now, wall_s)
        known = self.policy.peers.get(node)
        if t is MsgType.RESYNC_REQUEST and (verdict is Verdict.STALE or (
                verdict is Verdict.ACCEPT and known is not None and header.incarnation < known.incarnation)):
            self.counters["resync_stale"] += 1
            return [Warn("resync_stale", f"resync request from an old incarnation {header.incarnation} "
                                         f"of node {node:#x} ({addr})")]
        if verdict is not Verdict.ACCEPT:
            return []
        if t is MsgType.RESEND:
            self.counters["resend_requests_received"] += 1
            ranges = codec.resend_ranges(body)
            dest = self.known_addr(node) or addr
            datagrams = self.retransmit.lookup(ranges, self.node_id, self.incarnation)
            self.counters["resends"] += len(datagrams)
            return [Send(d, dest) for d in datagrams]
        if t is MsgType.LOAD:
            self.counters["loads_received"] += 1
            return [LoadIn(node, codec.load(body))]
        if t is MsgType.RESYNC_REQUEST:
            request_id, target = codec.RESYNC_REQUEST.unpack(body)
            return self._resync_request(node, header.incarnation, request_id, target, addr, now)
        return self._chunk(header, body, now)

    def _resync_request(self, node: int, inc: int, request_id: int, target: int, addr: str,
                        now: float) -> list[Action]:
        if target not in (0, self.node_id):
            self.counters["resync_ignored"] += 1  # a peer resync meant for another node
            return []
        dest = self.known_addr(node)
        if dest != addr:  # never send a table to an address we do not know for that node
            self.counters["resync_misdirected"] += 1
            return [Warn("resync_addr", f"resync request for node {node:#x} from {addr}, which we know at {dest}")]
        refused = self._guards.admit(node, inc, request_id, now)
        if refused == "busy":
            self.counters["resync_busy"] += 1
            return []
        if refused == "duplicate":
            self.counters["resync_duplicate"] += 1
            return [Warn("resync_duplicate", f"resync request {request_id} of node {node:#x} ({addr}) was "
                                             f"answered already: not again")]
        if refused == "limited":
            self.counters["resync_limited"] += 1
            return [Warn("resync_limited", f"resync request of node {node:#x} ({addr}) not answered: more than "
                                           f"{self.timing.resync_answer_burst} answers, then one per "
                                           f"{self.timing.resync_answer_every_s:g}s")]
        # A heartbeat first (to every peer: it is a stream datagram), so the requester knows our
        # view digest before our answer completes its resync (a start-up resync waits for it).
        return [self.heartbeat(now), Serve(node, request_id, dest, own=target != 0)]

    def _chunk(self, header: codec.Header, body: memoryview, now: float) -> list[Action]:
        target, request_id, index, last = codec.chunk_preamble(body)
        node = header.node_id
        state, peer = self.resync_state, self.peer_resyncs.get(node)
        ours = state is not None and request_id in state.answers.ids
        theirs = peer is not None and request_id in peer.answers.ids
        if target != self.node_id or not (ours or theirs):
            self.counters["resync_ignored"] += 1
            return []
        records = codec.check_flow_records(body[codec.CHUNK_PREAMBLE.size:])
        n = len(records) // codec.FLOW_RECORD_BYTES
        self.counters["resync_chunks"] += 1
        out: list[Action] = [Install(records, node, True)] if records else []
        if state is not None and ours:
            state.answers.add(node, request_id, index, last, n, now)
            out.extend(self._check_resync(now))
        if peer is not None and theirs:
            if peer.answers.add(node, request_id, index, last, n, now):
                del self.peer_resyncs[node]
                self.counters["peer_resyncs_done"] += 1
                self._holdoff[node] = now + self.timing.peer_resync_holdoff_s
            else:  # an answer under way: no new try while it streams
                peer.next_try_s = max(peer.next_try_s, now + self.timing.resync_retry_s)
        return out

    # ---- answering a resync -------------------------------------------------------------------

    def answer(self, node_id: int, request_id: int) -> ChunkWriter:
        """The writer of one streamed answer to `node_id`'s request (see ChunkWriter)."""
        return ChunkWriter(self, node_id, request_id)

    def resync_chunks(self, node_id: int, request_id: int, records: Sequence[bytes]) -> Iterator[bytes]:
        """The RESYNC_CHUNK datagrams carrying `records` (56-byte wire records) to `node_id`, all
        at once (tests and small tables; the I/O module streams through `answer`)."""
        writer = self.answer(node_id, request_id)
        yield from writer.add(b"".join(records))
        yield writer.finish()

    @property
    def _answering(self) -> set[int]:
        """The peers an answer is streaming to."""
        return self._guards.answering

    def serve_done(self, node_id: int, ok: bool) -> None:
        self._guards.done(node_id)
        if ok:
            self.counters["resync_served"] += 1

    # ---- start-up resync ----------------------------------------------------------------------

    def begin_resync(self, request_id: int, now: float) -> list[Action]:
        """Ask every peer for its whole table. Done (`ResyncComplete`) once every live peer has
        sent one complete answer and a heartbeat; `poll` asks again, under a new request id,
        each peer whose answer stalls for `resync_retry_s`."""
        self.resync_state = ResyncState(request_id & 0xFFFFFFFF or 1, now, now)
        self.resync_state.answers.ids.add(self.resync_state.request_id)
        return self._ask_all(now)

    def resync_request(self, now: float) -> list[Action]:
        """Ask every peer again, now, under a new request id."""
        state = self.resync_state
        if state is None:
            return []
        state.request_id = self._new_request_id()
        state.answers.ids.add(state.request_id)
        state.asked_s = now
        return self._ask_all(now)

    def _ask_all(self, now: float) -> list[Action]:
        """A heartbeat (so peers know our address), then the request to every peer."""
        state = self.resync_state
        assert state is not None
        return [self.heartbeat(now), Send(codec.encode_resync_request(self.keys, self.node_id, self.incarnation,
                                                                      self._control(), state.request_id), None)]

    def _resync_stalled(self, state: ResyncState, now: float) -> tuple[list[int], float]:
        """The live peers whose start-up resync answer has stalled, and when the next one may (ResyncState.stalled)."""
        return state.stalled([p for p in self.policy.peers if self.policy.alive(p, now)],
                             self.timing.resync_retry_s, now)

    def _resync_retries(self, now: float) -> list[Action]:
        state = self.resync_state
        if state is None or state.done:
            return []
        due, deadline = self._resync_stalled(state, now)
        if not due:
            return self.resync_request(now) if deadline <= now else []
        state.request_id = self._new_request_id()
        state.answers.ids.add(state.request_id)
        out: list[Action] = [self.heartbeat(now)]
        for p in due:  # only the stalled peers: a peer whose answer is complete is not asked again
            state.asked_peer_s[p] = now
            out.append(Send(codec.encode_resync_request(self.keys, self.node_id, self.incarnation, self._control(),
                                                        state.request_id), self.known_addr(p)))
        return out

    def _check_resync(self, now: float) -> list[Action]:
        """ResyncComplete once every live peer has sent one complete answer and a heartbeat of its
        current life (its digest is known before this node may advertise)."""
        state = self.resync_state
        if state is None or state.done or not state.answered_all(self.policy, self.heard, self.timing, now):
            return []
        state.done = True
        return [ResyncComplete(state.request_id)]

    def end_resync(self) -> ResyncState | None:
        state, self.resync_state = self.resync_state, None
        self.ready = True
        return state

    # ---- timers -------------------------------------------------------------------------------

    def poll(self, now: float) -> list[Action]:
        """Whatever is due at `now`: a heartbeat, RESEND requests, peer resyncs."""
        out: list[Action] = []
        if now >= self._next_heartbeat:
            out.append(self.heartbeat(now))
        if (self.policy.next_deadline() or math.inf) <= now:
            out.extend(self._resend_requests(now))
        out.extend(self._peer_resyncs(now))
        out.extend(self._resync_retries(now))
        out.extend(self._check_resync(now))
        return out

    def next_deadline(self, now: float) -> float:
        """When `poll` next has work."""
        deadline = min(self._next_heartbeat, self.policy.next_deadline() or math.inf)
        for p in self.peer_resyncs.values():
            deadline = min(deadline, p.next_try_s)
        for peer in self.policy.peers.values():
            if peer.resync_wanted and peer.node_id not in self.peer_resyncs and self.policy.alive(peer.node_id, now):
                deadline = min(deadline, self._holdoff.get(peer.node_id, now))
        state = self.resync_state
        if state is not None and not state.done:
            due, at = self._resync_stalled(state, now)
            deadline = min(deadline, now if due else at)
            settled = state.started_s + self.timing.resync_settle_s
            if now < settled and state.answers.complete:
                deadline = min(deadline, settled)
        return deadline

    def _resend_requests(self, now: float) -> list[Action]:
        by_peer: dict[int, list[ResendRange]] = {}
        for r in self.policy.resend_requests(now):
            by_peer.setdefault(r.node_id, []).append(r)
        out: list[Action] = []
        for peer, ranges in by_peer.items():
            addr = self.known_addr(peer)
            for i in range(0, len(ranges), codec.MAX_RESENDS):
                datagram = codec.encode_resend(self.keys, self.node_id, self.incarnation, self._control(),
                                               ranges[i:i + codec.MAX_RESENDS])
                out.append(Send(datagram, addr))
                self.counters["resend_requests"] += 1
        return out

    def _new_request_id(self) -> int:
        """A request id not in use by the start-up resync or any peer resync."""
        used = set().union(*(p.answers.ids for p in self.peer_resyncs.values()))
        if self.resync_state is not None:
            used |= self.resync_state.answers.ids
        while True:
            request_id, self._next_request_id = self._next_request_id, (self._next_request_id + 1) & 0xFFFFFFFF or 1
            if request_id not in used:
                return request_id

    def _request(self, p: PeerResync) -> Send:
        return Send(codec.encode_resync_request(self.keys, self.node_id, self.incarnation, self._control(),
                                                p.request_id, p.node_id), self.known_addr(p.node_id))

    def _peer_resyncs(self, now: float) -> list[Action]:
        out: list[Action] = []
        policy, timing = self.policy, self.timing
        for node, p in list(self.peer_resyncs.items()):
            known = policy.peers.get(node)
            if known is None or known.incarnation != p.incarnation or not policy.alive(node, now):
                del self.peer_resyncs[node]  # it died or restarted; a new life needs no repair
                self.counters["peer_resyncs_abandoned"] += 1
            elif now >= p.next_try_s:
                if p.tries >= timing.peer_resync_tries:
                    del self.peer_resyncs[node]
                    self.counters["peer_resyncs_failed"] += 1
                    self._holdoff[node] = now + timing.peer_resync_holdoff_s
                    policy.want_resync(node)
                    out.append(Warn("peer_resync", f"resync of node {node:#x}: incomplete after {p.tries} tries "
                                                   f"({p.flows} flows); again in {timing.peer_resync_holdoff_s:g}s"))
                else:
                    # A new id per try: an answer is complete only with all of its own chunks (the
                    # table changes between answers, so chunk indexes of two answers do not add up).
                    p.request_id = self._new_request_id()
                    p.answers.ids.add(p.request_id)
                    p.tries += 1
                    p.next_try_s = now + timing.resync_retry_s
                    out.append(self._request(p))
        for peer in policy.peers.values():
            node = peer.node_id
            if peer.resync_wanted and node not in self.peer_resyncs and policy.alive(node, now) \
                    and now >= self._holdoff.get(node, -math.inf):
                policy.resync_started(node)
                p = self.peer_resyncs[node] = PeerResync(node, peer.incarnation, self._new_request_id(), now,
                                                         now + timing.resync_retry_s)
                self.counters["peer_resyncs"] += 1
                out.append(self._request(p))
        return out

    # ---- views --------------------------------------------------------------------------------

    def gaps_open(self) -> int:
        return self.policy.gaps_open()

    def repairing(self) -> bool:
        """True while some peer has missing numbers, wants a resync or is being resynced: what
        this node knows of its peers' flows is known to be incomplete."""
        return bool(self.peer_resyncs) or any(p.missing or p.resync_wanted for p in self.policy.peers.values())
