"""Flow-sync accept/reject policy, gap tracking and peer liveness (pure: takes `now`, no I/O).

Theory of operation (after conntrackd's FTFW mode, made correct for N nodes). Each sender has two
number spaces per incarnation (its start time), see codec.py:

- the *stream*: FLOWS and HEARTBEAT, every datagram sent to every peer. Per peer the receiver
  keeps the highest number seen and the set of numbers it skipped (`accept`):
  - seq > highest: accepted; every number in between becomes *missing* (a gap).
  - seq in missing: accepted (a repair, or a reordered datagram, fills its hole).
  - anything else at or below highest: a *replay*, dropped and counted; so is anything older than
    the tracking window, and a datagram from an older incarnation than the one we know.
  - a newer incarnation resets the peer (it restarted; its numbering starts again).
- the *control* space: RESEND and RESYNC_*, each sent to one peer. No gaps are tracked (a third
  node never sees them, and that is fine); `accept_control` only refuses replays with a sliding
  window (`ReplayWindow`, RFC 4303 §3.4.3) and old incarnations.

Repair. Missing numbers are asked for with RESEND ranges every `resend_interval_s`, at most
`resend_tries` times each; the sender answers with the original datagrams from its bounded
`RetransmitBuffer`, by unicast to the asker. A repair keeps its original number, so no other
node sees anything new. A number that cannot be repaired this way marks the peer
`resync_wanted` (the engine then asks that one peer for its table, bounded and rate-limited):

- given up after `resend_tries` (counted lost);
- older than the sender's retransmit buffer: its heartbeats carry the oldest number it can
  still resend (`Heartbeat.oldest_seq`), so after a partition longer than the buffer covers, the
  first heartbeat turns those numbers into *unrepairable* at once instead of `resend_tries`
  useless rounds;
- a jump of more than `max_gap` numbers (not tracked number by number: an *overflow*), or numbers
  pushed out of the tracking window or past `max_missing`.

When the engine starts a peer resync, `resync_started` forgets that peer's missing numbers (the
table it is about to receive covers them); gaps opening later are tracked as usual.

Heartbeats carry the sender's view digest: a live peer whose digest differs from ours is a
*mismatch*, once both digests have stood for `DIGEST_SETTLE_S`: views change on every node
within milliseconds of each other (a load-aware weight publication, cluster/loadshare.py), and
a peer a few milliseconds behind or ahead has the same view, not another one. A peer unheard
(in its stream) for `dead_after_s` is dead.

Incarnations are wall-clock seconds, so they are only as good as the clocks:

- a lower incarnation than the known one is STALE while the known one is alive; once the known
  one has been silent for `dead_after_s`, the lower one is adopted (the peer restarted with its
  clock behind its previous start, e.g. an NTP step at boot);
- an incarnation is adopted (first word from a peer, a restart, the case above) only if it is at
  most `max_incarnation_age_s` older than our wall clock (`wall_s`, passed in): a captured datagram
  of a long-gone life cannot be replayed to a freshly started receiver. Senders renew their
  incarnation every `INCARNATION_RENEW_S` (15 min), and the age limit is two renewals
  (`MAX_INCARNATION_AGE_S`, 30 min): a live peer's incarnation is at most one renewal old, and
  the second one is the room left for clock skew. So what a fresh receiver can be fooled with
  is at most 30 minutes old;
- an incarnation a peer has left (we knew it, then adopted another) is never adopted again: its
  datagrams can only be replays (`retired`). Without this, once a peer had died, each of its
  earlier lives within the age limit could be replayed in turn (lower ones are adopted after
  `dead_after_s`, see above) and its captured heartbeats would keep it "alive".

Cost. Missing numbers are kept in a dict whose insertion order is ascending sequence order (gaps
only ever open above `highest`), so trimming the oldest is O(1) each; request deadlines sit in a
heap (lazy deletion), so `next_deadline` and `resend_requests` cost O(log n) per due number, not
O(n) per wake-up.
"""
from __future__ import annotations

import enum
import heapq
import math
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

from cluster.sync.codec import Header, Heartbeat, ResendRange

INCARNATION_RENEW_S = 900.0  # senders take a new incarnation this often (flowsync.py)
MAX_INCARNATION_AGE_S = 2 * INCARNATION_RENEW_S  # older incarnations are not adopted: one renewal + skew
MAX_RETIRED = 64  # incarnations remembered per peer as left (more only by restarting 64 times in 30 min)
DIGEST_SETTLE_S = 0.2  # a differing digest counts once both have stood this long (nodes adopt within ~20 ms)


class Verdict(enum.Enum):
    ACCEPT = "accept"
    REPLAY = "replay"  # already seen, or older than the window
    STALE = "stale"  # from an older incarnation of the peer (while it lives), or far older than our clock
    SELF = "self"  # our own datagram (multicast loop, or a forged node id of ours)


@dataclass
class PeerState:
    node_id: int
    incarnation: int
    highest: int
    first_heard: float
    last_heard: float
    # missing seq -> [first missed at, requests sent, next request at]; iteration order is
    # ascending seq (numbers are only ever added above `highest`)
    missing: dict[int, list[float]] = field(default_factory=dict)
    overflowed: int = 0  # gaps too large to track (counted lost)
    resync_wanted: bool = False  # a number that no RESEND can repair: ask this peer for its table
    oldest_seq: int = 0  # the oldest number the peer said it can resend (its last heartbeat)
    digest: bytes | None = None
    digest_since: float = -math.inf  # when its current digest was first heard
    ready: bool = False
    flow_count: int = 0
    received: int = 0


@dataclass(frozen=True, slots=True)
class PeerView:
    node_id: int
    incarnation: int
    alive: bool
    last_heard_s_ago: float
    highest_seq: int
    missing: int
    resync_wanted: bool
    digest_match: bool | None  # None: no digest to compare yet
    ready: bool
    flow_count: int


@dataclass
class Counters:
    accepted: int = 0
    replayed: int = 0
    stale: int = 0
    self_looped: int = 0
    gaps: int = 0  # sequence numbers found missing
    recovered: int = 0  # missing numbers that arrived later
    lost: int = 0  # missing numbers given up on
    resend_requested: int = 0  # sequence numbers asked for (counting retries)
    overflows: int = 0  # gaps larger than max_gap (all their numbers counted lost, resync-worthy)
    reincarnated: int = 0  # lower incarnations adopted after the known one went silent
    too_old: int = 0  # incarnations refused for being far older than our clock (also counted stale)
    unrepairable: int = 0  # missing numbers older than the sender's retransmit buffer (also lost)
    covered: int = 0  # missing numbers forgotten because a resync of their peer started
    resyncs_wanted: int = 0  # times a peer was marked resync_wanted
    control_accepted: int = 0
    control_replayed: int = 0  # control datagrams refused by the replay window
    control_stale: int = 0  # control datagrams from an old incarnation (also counted stale)
    retired: int = 0  # datagrams of an incarnation the peer has left (also counted stale)


class ReplayWindow:
    """Anti-replay for one sender's control numbers (RFC 4303 §3.4.3): accepts each number once,
    a number above the highest seen or within `size` below it; older ones are refused."""

    __slots__ = ("size", "highest", "_bits")

    def __init__(self, size: int = 1024) -> None:
        self.size = size
        self.highest = -1
        self._bits = 0  # bit i: highest - i was seen

    def check(self, seq: int) -> bool:
        """True (and remembered) if `seq` is new."""
        if seq > self.highest:
            shift = seq - self.highest
            self._bits = ((self._bits << shift) | 1) & ((1 << self.size) - 1) if shift < self.size else 1
            self.highest = seq
            return True
        offset = self.highest - seq
        if offset >= self.size or self._bits >> offset & 1:
            return False
        self._bits |= 1 << offset
        return True


class ReceivePolicy:
    """What to accept from peers, what to ask them to resend, and who is alive."""

    def __init__(self, node_id: int, *, window: int = 65536, resend_interval_s: float = 0.05,
                 resend_tries: int = 5, dead_after_s: float = 3.0, max_missing: int = 65536,
                 max_gap: int = 16384, max_incarnation_age_s: float = MAX_INCARNATION_AGE_S) -> None:
        self.node_id = node_id
        self.window = window
        self.resend_interval_s = resend_interval_s
        self.resend_tries = resend_tries
        self.dead_after_s = dead_after_s
        self.max_missing = max_missing
        self.max_gap = max_gap
        self.max_incarnation_age_s = max_incarnation_age_s
        self.peers: dict[int, PeerState] = {}
        self.control: dict[int, tuple[int, ReplayWindow]] = {}  # node id -> (incarnation, window)
        self.retired: dict[int, set[int]] = {}  # node id -> incarnations it has left (never adopted again)
        self.listening_since: float | None = None  # see `start`
        self.started_wall_s: float | None = None
        self.counters = Counters()
        self.our_digest: bytes | None = None
        self.our_digest_since = -math.inf  # see `set_our_digest`
        # (next request at, node id, incarnation, seq); an entry is live only while it matches
        # the peer's current incarnation and missing[seq][2] (lazy deletion)
        self._due: list[tuple[float, int, int, int]] = []

    def start(self, now: float, wall_s: float | None = None) -> None:
        """We listen from `now` on (wall clock `wall_s`): a peer first heard later than
        `dead_after_s` after this, or whose incarnation is not older than our start, started
        after us, so its numbers are tracked from 1. Without a start, a first datagram is taken
        as the peer's first word."""
        self.listening_since, self.started_wall_s = now, wall_s

    # ---- datagrams --------------------------------------------------------------------------

    def accept(self, header: Header, now: float, wall_s: float | None = None) -> Verdict:
        """Decide on an authenticated stream datagram's header (FLOWS, HEARTBEAT); updates sequence
        state on ACCEPT. `wall_s` (the receiver's wall clock, seconds) enables the incarnation age
        check. Control datagrams go to `accept_control`."""
        if header.node_id == self.node_id:
            self.counters.self_looped += 1
            return Verdict.SELF
        peer = self.peers.get(header.node_id)
        if peer is None or header.incarnation != peer.incarnation:
            if peer is not None and header.incarnation < peer.incarnation \
                    and now - peer.last_heard < self.dead_after_s:
                self.counters.stale += 1  # an old life of a peer that is alive: a replay
                return Verdict.STALE
            if header.incarnation in self.retired.get(header.node_id, ()):
                self.counters.stale += 1  # a life it has left, alive or not: a replay
                self.counters.retired += 1
                return Verdict.STALE
            if wall_s is not None and header.incarnation < wall_s - self.max_incarnation_age_s:
                self.counters.stale += 1
                self.counters.too_old += 1
                return Verdict.STALE
            if peer is not None:
                self._retire(peer.node_id, peer.incarnation, wall_s)
                if header.incarnation < peer.incarnation:
                    self.counters.reincarnated += 1
            # A new life of a known peer, or a peer that started after us: we should have heard
            # its every number (numbers start at 1 per incarnation), so earlier ones are gaps.
            # Else (we are the newcomer) start at this number: the start-up resync covers the rest.
            from_start = peer is not None \
                or (self.listening_since is not None and now - self.listening_since >= self.dead_after_s) \
                or (self.started_wall_s is not None and header.incarnation >= self.started_wall_s - self.dead_after_s)
            first = 1 if from_start else header.seq
            peer = self.peers[header.node_id] = PeerState(header.node_id, header.incarnation,
                                                          min(first, header.seq) - 1, now, now)
        seq = header.seq
        if seq > peer.highest:
            first_missing = max(peer.highest + 1, seq - self.window)
            if first_missing > peer.highest + 1:
                self.counters.lost += first_missing - (peer.highest + 1)
                self._want_resync(peer)
            if seq - first_missing > self.max_gap:
                # Too big to track number by number (a partition, or a peer that jumped): lost,
                # and worth a resync of this peer rather than a storm of RESENDs.
                self.counters.lost += seq - first_missing
                self.counters.overflows += 1
                peer.overflowed += 1
                self._want_resync(peer)
            else:
                missing, due = peer.missing, self._due
                for s in range(first_missing, seq):
                    missing[s] = [now, 0.0, now]
                    heapq.heappush(due, (now, peer.node_id, peer.incarnation, s))
                self.counters.gaps += seq - first_missing
            peer.highest = seq
            self._trim(peer)
        elif peer.missing.pop(seq, None) is not None:
            self.counters.recovered += 1
        else:
            self.counters.replayed += 1
            return Verdict.REPLAY
        peer.last_heard = now
        peer.received += 1
        self.counters.accepted += 1
        return Verdict.ACCEPT

    def _retire(self, node_id: int, incarnation: int, wall_s: float | None) -> None:
        """Remember that a peer left `incarnation`; forget those the age limit refuses anyway."""
        retired = self.retired.setdefault(node_id, set())
        retired.add(incarnation)
        if wall_s is not None:
            retired.difference_update([i for i in retired if i < wall_s - self.max_incarnation_age_s])
        while len(retired) > MAX_RETIRED:
            retired.discard(min(retired))

    def _trim(self, peer: PeerState) -> None:
        """Drop the oldest missing numbers: those below the window, and any above `max_missing`."""
        floor = peer.highest - self.window
        missing = peer.missing
        while missing:
            oldest = next(iter(missing))  # insertion order is ascending seq
            if oldest >= floor and len(missing) <= self.max_missing:
                break
            del missing[oldest]
            self.counters.lost += 1
            self._want_resync(peer)

    def _want_resync(self, peer: PeerState) -> None:
        if not peer.resync_wanted:
            peer.resync_wanted = True
            self.counters.resyncs_wanted += 1

    def accept_control(self, header: Header, now: float, wall_s: float | None = None) -> Verdict:
        """Decide on an authenticated control datagram (RESEND, RESYNC_*): once per number per
        incarnation, never from an older incarnation than the peer's known one while it lives."""
        node = header.node_id
        if node == self.node_id:
            self.counters.self_looped += 1
            return Verdict.SELF
        inc = header.incarnation
        peer = self.peers.get(node)
        known = self.control.get(node)
        if (peer is not None and inc < peer.incarnation and now - peer.last_heard < self.dead_after_s) or \
                (inc in self.retired.get(node, ()) and (peer is None or peer.incarnation != inc)) or \
                (wall_s is not None and inc < wall_s - self.max_incarnation_age_s) or \
                (known is not None and inc < known[0] and (peer is None or peer.incarnation != inc)):
            self.counters.stale += 1
            self.counters.control_stale += 1
            return Verdict.STALE
        if known is None or known[0] != inc:
            known = self.control[node] = (inc, ReplayWindow())
        if not known[1].check(header.seq):
            self.counters.control_replayed += 1
            return Verdict.REPLAY
        self.counters.control_accepted += 1
        return Verdict.ACCEPT

    def set_our_digest(self, digest: bytes, now: float = -math.inf) -> None:
        if digest != self.our_digest:
            self.our_digest, self.our_digest_since = digest, now

    def heartbeat(self, node_id: int, hb: Heartbeat, now: float = -math.inf) -> None:
        """Record an accepted heartbeat's view of the peer; numbers older than the oldest it can
        resend are unrepairable by RESEND (the peer wants a resync)."""
        peer = self.peers.get(node_id)
        if peer is not None:
            # An all-zero digest means "no view yet" (a node that is still starting).
            digest = hb.digest if any(hb.digest) else None
            if digest != peer.digest:
                peer.digest_since = now
            peer.digest = digest
            peer.ready, peer.flow_count = hb.ready, hb.flow_count
            peer.oldest_seq = max(peer.oldest_seq, hb.oldest_seq)
            missing = peer.missing
            while missing:
                oldest = next(iter(missing))
                if oldest >= peer.oldest_seq:
                    break
                del missing[oldest]
                self.counters.lost += 1
                self.counters.unrepairable += 1
                self._want_resync(peer)

    def resync_started(self, node_id: int) -> None:
        """A resync of this peer's table is under way: its missing numbers are covered by it."""
        peer = self.peers.get(node_id)
        if peer is not None:
            self.counters.covered += len(peer.missing)
            peer.missing.clear()
            peer.resync_wanted = False

    def want_resync(self, node_id: int) -> None:
        """Mark a peer for a resync again (its last one failed)."""
        peer = self.peers.get(node_id)
        if peer is not None:
            self._want_resync(peer)

    def gaps_open(self) -> int:
        return sum(len(p.missing) for p in self.peers.values())

    # ---- timers -----------------------------------------------------------------------------

    def _live_state(self, entry: tuple[float, int, int, int]) -> list[float] | None:
        at, node_id, incarnation, seq = entry
        peer = self.peers.get(node_id)
        if peer is None or peer.incarnation != incarnation:
            return None
        state = peer.missing.get(seq)
        return state if state is not None and state[2] == at else None

    def resend_requests(self, now: float) -> list[ResendRange]:
        """Ranges of missing numbers due for a (re)request; gives up after `resend_tries`."""
        due_by_peer: dict[int, list[int]] = {}
        due = self._due
        later: list[tuple[float, int, int, int]] = []
        while due and due[0][0] <= now:
            entry = heapq.heappop(due)
            state = self._live_state(entry)
            if state is None:
                continue
            _, node_id, incarnation, seq = entry
            peer = self.peers[node_id]
            if state[1] >= self.resend_tries:
                del peer.missing[seq]
                self.counters.lost += 1
                self._want_resync(peer)
                continue
            state[1] += 1
            state[2] = now + self.resend_interval_s
            later.append((state[2], node_id, incarnation, seq))
            due_by_peer.setdefault(node_id, []).append(seq)
        for entry in later:
            heapq.heappush(due, entry)
        out: list[ResendRange] = []
        for peer in self.peers.values():  # peers in their usual order, numbers ascending
            seqs = due_by_peer.get(peer.node_id)
            if seqs:
                self.counters.resend_requested += len(seqs)
                out.extend(ResendRange(peer.node_id, peer.incarnation, a, b) for a, b in _ranges(sorted(seqs)))
        return out

    def next_deadline(self) -> float | None:
        """When `resend_requests` next has work (None: nothing missing)."""
        due = self._due
        while due and self._live_state(due[0]) is None:
            heapq.heappop(due)
        return due[0][0] if due else None

    # ---- views ------------------------------------------------------------------------------

    def alive(self, node_id: int, now: float) -> bool:
        peer = self.peers.get(node_id)
        return peer is not None and now - peer.last_heard <= self.dead_after_s

    def digest_mismatch(self, now: float) -> bool:
        """True while a live peer's last heartbeat digest differs from ours."""
        if self.our_digest is None:
            return False
        return any(self._differs(p, now) and self.alive(p.node_id, now) for p in self.peers.values())

    def _differs(self, p: PeerState, now: float) -> bool:
        """The peer's digest differs from ours and both have stood for DIGEST_SETTLE_S."""
        return p.digest is not None and p.digest != self.our_digest \
            and now - max(p.digest_since, self.our_digest_since) >= DIGEST_SETTLE_S

    def views(self, now: float) -> list[PeerView]:
        return [PeerView(p.node_id, p.incarnation, self.alive(p.node_id, now), now - p.last_heard, p.highest,
                         len(p.missing), p.resync_wanted,
                         None if p.digest is None or self.our_digest is None else not self._differs(p, now),
                         p.ready, p.flow_count)
                for p in sorted(self.peers.values(), key=lambda p: p.node_id)]


def _ranges(seqs: Iterable[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s in seqs:
        if out and out[-1][1] == s - 1:
            out[-1] = (out[-1][0], s)
        else:
            out.append((s, s))
    return out


class RetransmitBuffer:
    """The sender's last `capacity` datagrams by sequence number, to answer RESEND requests."""

    def __init__(self, capacity: int = 8192) -> None:
        self.capacity = capacity
        self._sent: OrderedDict[int, bytes] = OrderedDict()
        self.served = 0
        self.missed = 0  # asked for but already evicted (or never ours)

    def add(self, seq: int, datagram: bytes) -> None:
        self._sent[seq] = datagram
        if len(self._sent) > self.capacity:
            self._sent.popitem(last=False)

    def oldest(self) -> int:
        """The oldest sequence number held (0: none)."""
        return next(iter(self._sent), 0)

    def clear(self) -> None:
        self._sent.clear()

    def lookup(self, ranges: Iterable[ResendRange], node_id: int, incarnation: int, *,
               limit: int = 4096) -> list[bytes]:
        """The datagrams of the ranges addressed to us (at most `limit`, oldest first)."""
        out: list[bytes] = []
        for r in ranges:
            if r.node_id != node_id or r.incarnation != incarnation:
                continue
            for seq in range(r.first, min(r.last, r.first + limit) + 1):
                datagram = self._sent.get(seq)
                if datagram is None:
                    self.missed += 1
                else:
                    out.append(datagram)
                if len(out) >= limit:
                    self.served += len(out)
                    return out
        self.served += len(out)
        return out

    def __len__(self) -> int:
        return len(self._sent)
