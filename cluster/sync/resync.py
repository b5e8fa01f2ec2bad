"""Resync state (pure): the start-up resync, peer resyncs, answers and the guards on answering.

The engine (engine.py) drives these: it sends the requests, counts the chunks into `Answers` and
asks `ResyncState` whether the start-up resync is complete or has stalled. Nothing here sends,
sleeps or reads a clock.

Peer resync. A gap that no RESEND can fill (the sender's heartbeat says it no longer holds the
number, the gap was larger than `max_gap`, or `resend_tries` rounds failed; see policy.py) marks
that peer `resync_wanted`. `SyncEngine.poll` then asks that one peer, by unicast, for its whole table
(RESYNC_REQUEST with target = its node id; other nodes ignore it), forgets the peer's missing
numbers (the answer covers them) and installs the chunks it gets back. The answer holds only
the flows that peer announces itself (pinned or carried there within the refresh window): its
stream never held anything else, and flows it learned from a third node are that node's to
repair. So a partition of one node costs about the flows pinned meanwhile, not N tables. It is bounded: at most one
per peer in flight, re-asked (under a new request id) once its answer has stalled for
`resync_retry_s` (an answer that keeps streaming chunks is not interrupted), up to
`peer_resync_tries` times, abandoned if the peer dies or restarts, and at most one per peer per
`peer_resync_holdoff_s`.

Answers are streamed (`ChunkWriter`): chunks numbered 0, 1, ... as the table walk goes, the last
flagged LAST. An answer is complete when chunks 0..LAST of *that* answer have all arrived
(`Answers`): a walk is not a snapshot, so chunk i of two answers holds different flows, and
indexes of two answers never add up. Every try is a fresh request id; chunks of every try are
installed, and any one complete answer completes that peer.

Start-up resync. `SyncEngine.begin_resync` asks every peer (multicast, target 0) after a heartbeat. It is
complete once every live peer (and every peer still sending chunks) has sent one complete
answer *and* a heartbeat of its current life, and `resync_settle_s` has passed: so by the time
the node may advertise it knows each answering peer's view digest (an answering peer sends a
heartbeat to every peer before its first chunk). `poll` asks again, by unicast and under a new
request id, each live peer whose answer is incomplete and has stalled for `resync_retry_s`
(everyone, by multicast, while nobody has been heard). A whole answer must get through: under
sustained loss the chance of that falls with the table's size, and the resync then ends
incomplete at the caller's timeout, with what every try brought installed.

Answering resyncs is guarded against amplification: the table goes only to the address known
for the requesting node id (its configured unicast address, else the source of its last
accepted stream datagram), never to another source; control numbers make each request count
once (a captured one cannot be replayed); a request from an incarnation older than the one we
know is refused; at most one answer per peer is in flight; each (node, incarnation, request id)
is answered at most once (a requester's every try takes a new id, so an id seen again is a
duplicate or a replay); and answers to one peer are rate-limited by a token bucket
(`resync_answer_burst` at once, then one per `resync_answer_every_s`), whatever it asks.
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cluster.sync import codec
from cluster.sync.policy import ReceivePolicy

if TYPE_CHECKING:
    from cluster.sync.engine import EngineTiming, SyncEngine


@dataclass
class Answer:
    """The chunks one peer sent in answer to one request id."""

    chunks: set[int] = field(default_factory=set)
    last: int | None = None  # index of the chunk flagged LAST

    def complete(self) -> bool:
        return self.last is not None and len(self.chunks) >= self.last + 1


@dataclass
class Answers:
    """The answers to one resync over all of its tries. Every try is a fresh request id; a peer
    counts as answered once one answer is complete on its own chunks. Chunk indexes of two
    answers never add up: the table changes between two walks, so chunk 5 of the first and
    chunk 5 of the second hold different flows. Chunks of every try are installed."""

    ids: set[int] = field(default_factory=set)
    by: dict[tuple[int, int], Answer] = field(default_factory=dict)  # (peer, request id) -> its chunks
    complete: set[int] = field(default_factory=set)  # peers with one complete answer
    last_chunk_s: dict[int, float] = field(default_factory=dict)  # peer -> when its last chunk came
    flows: int = 0

    def add(self, peer: int, request_id: int, index: int, last: bool, flows: int, now: float) -> bool:
        """Count one chunk; True if it made `peer`'s answer complete (for the first time)."""
        self.flows += flows
        self.last_chunk_s[peer] = now
        if peer in self.complete:
            return False
        answer = self.by.setdefault((peer, request_id), Answer())
        answer.chunks.add(index)
        if last:
            answer.last = index
        if not answer.complete():
            return False
        self.complete.add(peer)
        for k in [k for k in self.by if k[0] == peer]:  # its other answers no longer matter
            del self.by[k]
        return True


@dataclass
class ResyncState:
    """The start-up resync: every peer that is alive (or answered) must send one complete answer
    and a heartbeat (so its view digest is known before this node may advertise)."""

    request_id: int  # of the latest try
    asked_s: float  # when every peer was last asked (multicast / each unicast peer)
    started_s: float = -math.inf
    answers: Answers = field(default_factory=Answers)
    asked_peer_s: dict[int, float] = field(default_factory=dict)  # peer -> when it was last asked alone
    done: bool = False

    @property
    def flows(self) -> int:
        return self.answers.flows

    @property
    def chunks(self) -> set[int]:
        """The peers that answered (completely or not)."""
        return {p for p, _ in self.answers.by} | self.answers.complete

    def activity(self, peer: int) -> float:
        """When `peer` last showed progress: asked (with everyone or alone), or a chunk came."""
        return max(self.asked_s, self.asked_peer_s.get(peer, -math.inf), self.answers.last_chunk_s.get(peer, -math.inf))

    def stalled(self, alive: Sequence[int], retry_s: float, now: float) -> tuple[list[int], float]:
        """The live peers (`alive`) whose answer is incomplete and stalled at `now`, and the next
        time one may stall; with no live peer, everyone is asked again `retry_s` after the last ask."""
        if not alive:
            return [], self.asked_s + retry_s
        due, deadline = [], math.inf
        for p in alive:
            if p in self.answers.complete:
                continue
            at = self.activity(p) + retry_s
            if at <= now:
                due.append(p)
            else:
                deadline = min(deadline, at)
        return due, deadline

    def answered_all(self, policy: ReceivePolicy, heard: Mapping[int, int], timing: EngineTiming,
                     now: float) -> bool:
        """Every live peer has sent one complete answer and a heartbeat of its current life (`heard`:
        peer -> incarnation of its last accepted heartbeat), and `resync_settle_s` has passed."""
        if now < self.started_s + timing.resync_settle_s:
            return False  # (every peer answers at once: a peer slower than the first is still heard)
        answered = {p for p in self.answers.complete
                    if p in policy.peers and heard.get(p) == policy.peers[p].incarnation}
        # every live peer, and every peer still sending chunks (its heartbeats may have been lost)
        alive = {p for p in policy.peers if policy.alive(p, now)} | \
            {p for p, at in self.answers.last_chunk_s.items() if now - at <= timing.dead_after_s}
        return bool(answered) and alive <= answered


@dataclass
class PeerResync:
    node_id: int
    incarnation: int
    request_id: int
    started_s: float
    next_try_s: float
    tries: int = 1
    answers: Answers = field(default_factory=Answers)

    def __post_init__(self) -> None:
        self.answers.ids.add(self.request_id)

    @property
    def flows(self) -> int:
        return self.answers.flows


class AnsweredIds:
    """The resync request ids answered for one incarnation of a requester: each is answered at
    most once. Bounded (the oldest are forgotten); they are only reachable again through fresh
    control numbers, which only a key holder can make."""

    __slots__ = ("incarnation", "_ids")

    def __init__(self, incarnation: int, capacity: int = 1024) -> None:
        self.incarnation = incarnation
        self._ids: deque[int] = deque(maxlen=capacity)

    def __contains__(self, request_id: int) -> bool:
        return request_id in self._ids

    def add(self, request_id: int) -> None:
        self._ids.append(request_id)


class TokenBucket:
    """`burst` takes at once, refilled by one every `every_s` (pure: takes `now`)."""

    __slots__ = ("burst", "every_s", "_tokens", "_at")

    def __init__(self, burst: int, every_s: float, now: float) -> None:
        self.burst, self.every_s = burst, every_s
        self._tokens, self._at = float(burst), now

    def take(self, now: float) -> bool:
        self._tokens = min(float(self.burst), self._tokens + max(0.0, now - self._at) / self.every_s)
        self._at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


class AnswerGuards:
    """The guards on answering resyncs (see the module docstring), per requesting node: one answer
    in flight, each request id of its incarnation answered once, and a token bucket."""

    __slots__ = ("burst", "every_s", "answering", "_answered", "_budget")

    def __init__(self, burst: int, every_s: float) -> None:
        self.burst, self.every_s = burst, every_s
        self.answering: set[int] = set()  # the requesters an answer is streaming to
        self._answered: dict[int, AnsweredIds] = {}  # requester -> the request ids answered in its incarnation
        self._budget: dict[int, TokenBucket] = {}  # requester -> its resync answer rate limit

    def admit(self, node: int, incarnation: int, request_id: int, now: float) -> str | None:
        """None if `node`'s request may be answered now (it is then in flight until `done`); else
        why not: "busy" (an answer is in flight), "duplicate" (answered already), "limited"."""
        if node in self.answering:
            return "busy"
        answered = self._answered.get(node)
        if answered is None or answered.incarnation != incarnation:  # (older ones were refused as stale)
            answered = self._answered[node] = AnsweredIds(incarnation)
        if request_id in answered:
            return "duplicate"
        budget = self._budget.get(node)
        if budget is None:
            budget = self._budget[node] = TokenBucket(self.burst, self.every_s, now)
        if not budget.take(now):
            return "limited"
        answered.add(request_id)
        self.answering.add(node)
        return None

    def done(self, node: int) -> None:
        self.answering.discard(node)


class ChunkWriter:
    """The RESYNC_CHUNK datagrams of one streamed answer: `add(records)` as the table walk goes,
    then `finish()`. The count is never known in advance, so the last up to MAX_CHUNK_FLOWS
    records are held back until more come (then they are a full chunk) or the walk ends (then
    they go with LAST; an empty table is one empty LAST chunk)."""

    def __init__(self, engine: SyncEngine, node_id: int, request_id: int) -> None:
        self._engine = engine
        self.node_id = node_id
        self.request_id = request_id
        self.index = 0  # of the next chunk
        self.flows = 0
        self._held = b""

    def _chunk(self, packed: bytes, last: bool) -> bytes:
        e = self._engine
        e.counters["resync_chunks_sent"] += 1
        self.index += 1
        self.flows += len(packed) // codec.FLOW_RECORD_BYTES
        return codec.encode_resync_chunk_packed(e.keys, e.node_id, e.incarnation, e._control(), self.node_id,
                                                self.request_id, self.index - 1, last, packed)

    def add(self, records: bytes) -> Iterator[bytes]:
        """Datagrams for these packed 56-byte records, lazily encoded (control numbers are taken
        as they are sent): all but the held-back tail."""
        size = codec.MAX_CHUNK_FLOWS * codec.FLOW_RECORD_BYTES
        data = self._held + records
        end = max(0, (len(data) - 1) // size) * size  # keep 1..size bytes' worth back (or nothing)
        self._held = data[end:]
        for off in range(0, end, size):
            yield self._chunk(data[off:off + size], False)

    def finish(self) -> bytes:
        """The LAST chunk, with what was held back."""
        held, self._held = self._held, b""
        return self._chunk(held, True)

