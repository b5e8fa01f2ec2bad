"""Flow-sync accept/reject policy, gap tracking and peer liveness (pure: takes `now`, no I/O).

Theory of operation (after conntrackd's FTFW mode). Each sender numbers every datagram in one
sequence space per incarnation (its start time); resent datagrams are the original bytes. Per
peer the receiver keeps the highest sequence number seen and the set of numbers it skipped:

- seq > highest: accepted; every number in between becomes *missing* (a gap).
- seq in missing: accepted (a resend or a reordered datagram fills its hole).
- anything else at or below highest: a *replay*, dropped and counted; so is anything older than
  the tracking window, and a datagram from an older incarnation than the one we know.
- a newer incarnation resets the peer (it restarted; its numbering starts again).

Missing numbers are asked for with RESEND ranges every `resend_interval_s`, at most
`resend_tries` times each, then given up and counted as lost (bulk resync repairs that). The
sender keeps its last `capacity` datagrams in a `RetransmitBuffer` to answer. Heartbeats carry
the sender's view digest: a live peer whose digest differs from ours is a *mismatch*. A peer
unheard for `dead_after_s` is dead.
"""
from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

from cluster.gossip import Header, Heartbeat, ResendRange


class Verdict(enum.Enum):
    ACCEPT = "accept"
    REPLAY = "replay"  # already seen, or older than the window
    STALE = "stale"  # from an older incarnation of the peer
    SELF = "self"  # our own datagram (multicast loop, or a forged node id of ours)


@dataclass
class PeerState:
    node_id: int
    incarnation: int
    highest: int
    first_heard: float
    last_heard: float
    # missing seq -> [first missed at, requests sent, next request at]
    missing: dict[int, list[float]] = field(default_factory=dict)
    digest: bytes | None = None
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


class ReceivePolicy:
    """What to accept from peers, what to ask them to resend, and who is alive."""

    def __init__(self, node_id: int, *, window: int = 65536, resend_interval_s: float = 0.05,
                 resend_tries: int = 5, dead_after_s: float = 3.0, max_missing: int = 65536) -> None:
        self.node_id = node_id
        self.window = window
        self.resend_interval_s = resend_interval_s
        self.resend_tries = resend_tries
        self.dead_after_s = dead_after_s
        self.max_missing = max_missing
        self.peers: dict[int, PeerState] = {}
        self.counters = Counters()
        self.our_digest: bytes | None = None

    # ---- datagrams --------------------------------------------------------------------------

    def accept(self, header: Header, now: float) -> Verdict:
        """Decide on an authenticated datagram's header; updates sequence state on ACCEPT."""
        if header.node_id == self.node_id:
            self.counters.self_looped += 1
            return Verdict.SELF
        peer = self.peers.get(header.node_id)
        if peer is None or header.incarnation > peer.incarnation:
            # First word from this peer (or it restarted): start tracking at this number.
            self.peers[header.node_id] = PeerState(header.node_id, header.incarnation, header.seq, now, now)
            self.peers[header.node_id].received = 1
            self.counters.accepted += 1
            return Verdict.ACCEPT
        if header.incarnation < peer.incarnation:
            self.counters.stale += 1
            return Verdict.STALE
        seq = header.seq
        if seq > peer.highest:
            first_missing = max(peer.highest + 1, seq - self.window)
            self.counters.lost += first_missing - (peer.highest + 1)
            for s in range(first_missing, seq):
                peer.missing[s] = [now, 0.0, now]
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

    def _trim(self, peer: PeerState) -> None:
        floor = peer.highest - self.window
        excess = len(peer.missing) - self.max_missing
        if excess > 0 or (peer.missing and min(peer.missing) < floor):
            for s in sorted(peer.missing):
                if s >= floor and excess <= 0:
                    break
                del peer.missing[s]
                self.counters.lost += 1
                excess -= 1

    def heartbeat(self, node_id: int, hb: Heartbeat) -> None:
        """Record an accepted heartbeat's view of the peer."""
        peer = self.peers.get(node_id)
        if peer is not None:
            # An all-zero digest means "no view yet" (a node that is still starting).
            peer.digest = hb.digest if any(hb.digest) else None
            peer.ready, peer.flow_count = hb.ready, hb.flow_count

    # ---- timers -----------------------------------------------------------------------------

    def resend_requests(self, now: float) -> list[ResendRange]:
        """Ranges of missing numbers due for a (re)request; gives up after `resend_tries`."""
        out: list[ResendRange] = []
        for peer in self.peers.values():
            due: list[int] = []
            for seq, state in list(peer.missing.items()):
                if state[2] > now:
                    continue
                if state[1] >= self.resend_tries:
                    del peer.missing[seq]
                    self.counters.lost += 1
                    continue
                state[1] += 1
                state[2] = now + self.resend_interval_s
                due.append(seq)
            self.counters.resend_requested += len(due)
            out.extend(ResendRange(peer.node_id, peer.incarnation, a, b) for a, b in _ranges(sorted(due)))
        return out

    def next_deadline(self) -> float | None:
        """When `resend_requests` next has work (None: nothing missing)."""
        times = [s[2] for p in self.peers.values() for s in p.missing.values()]
        return min(times) if times else None

    # ---- views ------------------------------------------------------------------------------

    def alive(self, node_id: int, now: float) -> bool:
        peer = self.peers.get(node_id)
        return peer is not None and now - peer.last_heard <= self.dead_after_s

    def digest_mismatch(self, now: float) -> bool:
        """True while a live peer's last heartbeat digest differs from ours."""
        if self.our_digest is None:
            return False
        return any(p.digest is not None and p.digest != self.our_digest and self.alive(p.node_id, now)
                   for p in self.peers.values())

    def views(self, now: float) -> list[PeerView]:
        return [PeerView(p.node_id, p.incarnation, self.alive(p.node_id, now), now - p.last_heard, p.highest,
                         len(p.missing),
                         None if p.digest is None or self.our_digest is None else p.digest == self.our_digest,
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

    def lookup(self, ranges: Iterable[ResendRange], node_id: int, incarnation: int, *, limit: int = 4096) -> list[bytes]:
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
