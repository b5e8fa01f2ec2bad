"""Load-aware weights that every node agrees on. Pure: readings, datagrams, members and `now` in;
LOAD messages and published weights out. No I/O, no clock.

Theory of operation. Each node probes every backend on its own (agent, HTTP load, its own
active-connection counts), so the raw inputs differ from node to node. But every node must hash
new flows with the same weights, or a flow that the router moves between nodes before it is
pinned (its SYN reached node A, its next packet node B) picks another backend. So:

1. Every interval each node sends what it read, per backend of the service, to every peer
   (a LOAD OBSERVE datagram over flow sync's authenticated channel, cluster/sync/codec.py).
2. One node per cluster is the *leader*: the lowest node id (an IPv4 node's address) among the
   live, ready sync members, itself included (among all live ones while none is ready, a cold
   start). It combines the fresh observations (heard within 3 intervals) the same way every
   time: an agent's percentage and an HTTP load are averaged over the nodes that read one, the
   agent's state is the nodes' majority (ties to the more severe: maint > down > drain > ok),
   active connections are summed (every node counts only the connections it forwards itself,
   bpf/counters.py ActiveTally). It
   runs the damped controller (cluster/weights.py) for http and leastconn, or follows the
   agent's percentage within floor..ceiling and max_step, and publishes quantised integer
   weights under an epoch (LOAD WEIGHTS, every interval, so a lost datagram or a late joiner
   is repaired by the next one).
3. Every node, the leader included, hashes with the last complete publication of the node it
   considers the leader, and with the configured weights before the first one. A publication
   from a node with a higher id is ignored (counted): two nodes that both think they lead
   during a membership change cannot make a third flip between them. One from a lower id is
   taken, and its sender counts as ready for two intervals: a node that has just become ready
   (its start-up resync done) leads at once, and the others learn it from its first
   publication instead of its next heartbeat (up to a heartbeat later), so a hand-over at
   start-up is as quick as any publication.

Agreement. A publication reaches all nodes within one network delay, so the tables agree a few
milliseconds after each change (the view digest includes the weights; a node sends a heartbeat
as soon as its digest changes, cluster/sync/engine.py). A leader change (the leader dies: 3
missed heartbeats) takes one more interval: the next leader `resume`s the controller from the
last published multipliers and continues the epoch, so the weights do not jump back to static.

Dead sources. A backend no node read for 3 intervals is hashed with its configured weight (the
controller's staleness rule); agent mode does the same (multiplier 1).
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from bpf.structs import IPAddress, addr16
from cluster.config import ServiceConfig
from cluster.sync.codec import MAX_LOAD_RECORDS, Load, LoadKind, LoadRecord, LoadState
from cluster.weighting import WeightingMode
from cluster.weights import BackendInput, ControllerParams, LoadSample, WeightController, scale_for

MAX_NODES = 64  # observations kept from this many nodes; more is not a cluster this was built for
STALE_INTERVALS = 3  # an observation older than this many intervals is no longer fresh
# Ties in the agent state vote go to the more severe.
_SEVERITY = {LoadState.MAINT: 4, LoadState.DOWN: 3, LoadState.DRAIN: 2, LoadState.OK: 1, LoadState.NONE: 0}


def service_id(name: str) -> bytes:
    """A service's 8-byte id on the wire: BLAKE2b-64 of its name (names are unique per config)."""
    return hashlib.blake2b(name.encode(), digest_size=8).digest()


@dataclass(frozen=True, slots=True)
class Reading:
    """One node's reading of one backend: the load (an agent's percentage / 100, an HTTP load,
    active connections) and what the source said besides (LoadState.NONE: no report)."""

    value: float = 0.0
    state: LoadState = LoadState.NONE


@dataclass(frozen=True, slots=True)
class BackendWeight:
    """One backend of a publication."""

    weight: int  # the integer weight to hash with
    observed: float | None  # the combined reading (None: no node read one)
    multiplier: float  # on the configured weight
    state: LoadState  # agent words (drain, down, maint) take the backend out of the hash


@dataclass(frozen=True, slots=True)
class Published:
    leader: int
    epoch: int
    backends: Mapping[IPAddress, BackendWeight]


@dataclass(frozen=True, slots=True)
class ShareConfig:
    name: str
    mode: WeightingMode
    backends: tuple[tuple[IPAddress, int, float | None], ...]  # address, configured weight, capacity
    interval_s: float
    params: ControllerParams

    @classmethod
    def from_service(cls, service: ServiceConfig) -> ShareConfig:
        w = service.weighting
        stale = STALE_INTERVALS * w.interval_s
        return cls(service.name, w.mode, tuple((b.address, b.weight, b.capacity) for b in service.backends),
                   w.interval_s, ControllerParams(max_step=w.max_step, floor=w.floor, ceiling=w.ceiling,
                                                  stale_after_s=stale))

    @property
    def stale_s(self) -> float:
        return self.params.stale_after_s


COUNTERS = ("observations", "publications", "published", "not_leader", "mismatched", "stale", "errors")


@dataclass(slots=True)
class _Assembly:
    leader: int
    epoch: int
    parts: int
    got: dict[int, tuple[LoadRecord, ...]] = field(default_factory=dict)


class ServiceShare:
    """The agreed weights of one service on one node (see the module docstring)."""

    def __init__(self, config: ShareConfig, node_id: int, published: Published | None = None) -> None:
        self.config = config
        self.node_id = node_id
        self.id = service_id(config.name)
        self.published = published if published is not None and self._covers(published) else None
        self.leader = node_id
        self.counters = dict.fromkeys(COUNTERS, 0)
        self._by_addr16 = {addr16(a): a for a, _, _ in config.backends}
        self._observed: dict[int, tuple[float, dict[IPAddress, Reading]]] = {}  # node -> (heard at, readings)
        self._assembly: _Assembly | None = None
        self._publishers: dict[int, float] = {}  # peer -> when its last publication came (it is ready)
        self._controller: WeightController | None = None  # while leading
        self._agent_m: dict[IPAddress, float] = {}  # agent mode, while leading

    # ---- input ------------------------------------------------------------------------------------

    def observe(self, readings: Mapping[IPAddress, Reading], now: float) -> None:
        """This node's readings of this interval (backends missing from `readings`: no report)."""
        self._observed[self.node_id] = (now, {a: readings.get(a, Reading()) for a, _, _ in self.config.backends})

    def receive(self, node_id: int, load: Load, now: float) -> bool:
        """A peer's LOAD for this service; True if it changed `published` (see `same_weights`)."""
        if node_id == self.node_id:
            return False
        if load.total != len(self.config.backends):
            self.counters["mismatched"] += 1  # another config of this service: its digest differs too
            return False
        if load.kind is LoadKind.OBSERVE:
            return self._observation(node_id, load, now)
        return self._publication(node_id, load, now)

    def _observation(self, node_id: int, load: Load, now: float) -> bool:
        entry = self._observed.get(node_id)
        if entry is None:
            if len(self._observed) >= MAX_NODES:
                self.counters["mismatched"] += 1
                return False
            entry = (now, {})
        readings = entry[1] if now - entry[0] <= self.config.interval_s / 2 else {}  # parts of one round
        for r in load.records:
            address = self._by_addr16.get(r.backend_addr)
            if address is not None:
                readings[address] = Reading(r.value, r.state)
        self._observed[node_id] = (now, readings)
        self.counters["observations"] += 1
        return False

    def _publication(self, node_id: int, load: Load, now: float) -> bool:
        if node_id not in self._publishers and len(self._publishers) >= MAX_NODES:
            self.counters["mismatched"] += 1
            return False
        self._publishers[node_id] = now
        if node_id < self.leader:
            self.leader = node_id  # a lower node that leads: it is ready, whatever its last heartbeat said
        if node_id != self.leader:
            self.counters["not_leader"] += 1
            return False
        current = self.published
        if current is not None and current.leader == node_id and load.epoch < current.epoch:
            self.counters["stale"] += 1  # an older one that arrived late
            return False
        a = self._assembly
        if a is None or (a.leader, a.epoch) != (node_id, load.epoch) or a.parts != load.parts:
            if a is not None and a.leader == node_id and load.epoch < a.epoch:
                self.counters["stale"] += 1
                return False
            a = self._assembly = _Assembly(node_id, load.epoch, load.parts)
        a.got[load.part] = load.records
        if len(a.got) < a.parts:
            return False
        self._assembly = None
        backends: dict[IPAddress, BackendWeight] = {}
        for records in a.got.values():
            for r in records:
                address = self._by_addr16.get(r.backend_addr)
                if address is not None:
                    backends[address] = BackendWeight(r.weight, r.value if r.state is not LoadState.NONE else None,
                                                      r.multiplier, r.state)
        published = Published(node_id, load.epoch, backends)
        if not self._covers(published):
            self.counters["mismatched"] += 1
            return False
        if published == current:
            return False
        self.published = published  # a new epoch, or the same one with this interval's readings
        self.counters["published"] += 1
        return True

    def _covers(self, published: Published) -> bool:
        return set(published.backends) == {a for a, _, _ in self.config.backends}

    # ---- every interval -----------------------------------------------------------------------------

    def tick(self, members: Mapping[int, bool], self_ready: bool, now: float) -> tuple[list[Load], bool]:
        """This interval's datagrams (our observation; the weights if we lead) and whether
        `published` changed. `members`: live peers and whether each is ready."""
        for node in [n for n, (at, _) in self._observed.items() if now - at > self.config.stale_s]:
            del self._observed[node]
        self.elect(members, self_ready, now)
        out = self._observation_loads()
        if self.leader != self.node_id:
            self._controller = None
            self._agent_m = {}
            return out, False
        changed = self._lead(now)
        out.extend(self._weight_loads())
        return out, changed

    def elect(self, members: Mapping[int, bool], self_ready: bool, now: float) -> int:
        """The leader now (`leader`), counting a live node that published within two intervals as ready."""
        recent = 2 * self.config.interval_s
        for node in [n for n, at in self._publishers.items() if now - at > recent]:
            del self._publishers[node]
        self.leader = leader(self.node_id, self_ready,
                             {n: ready or n in self._publishers for n, ready in members.items()})
        return self.leader

    def _lead(self, now: float) -> bool:
        if self._controller is None:  # we just became the leader: continue from the last publication
            self._controller = WeightController(self.config.params)
            if self.published is not None:
                self._controller.resume({str(a): b.multiplier for a, b in self.published.backends.items()},
                                        {str(a): b.weight for a, b in self.published.backends.items()})
                self._agent_m = {a: b.multiplier for a, b in self.published.backends.items()}
        backends = self._combine(now)
        current = self.published
        if current is not None and current.leader == self.node_id and same_weights(current.backends, backends):
            # The same weights under the same epoch; only the readings are this interval's.
            self.published = Published(self.node_id, current.epoch, backends)
            return current.backends != backends
        if current is not None and current.leader == self.node_id:
            epoch = current.epoch + 1
        else:
            # The first publication of a leadership (start-up, a reload that changed the service,
            # a failover): above every epoch this node id may have published before, in this
            # process or an earlier one, or its peers would drop its publications as stale until
            # it caught up. Epochs grow by one an interval (>= 0.1 s); `now` (the monotonic
            # clock, system-wide: it goes on across a process restart) by 1,000 a second.
            epoch = max(current.epoch + 1 if current is not None else 1, int(now * 1000))
        self.published = Published(self.node_id, epoch, backends)
        self.counters["publications"] += 1
        return True

    def _combine(self, now: float) -> dict[IPAddress, BackendWeight]:
        cfg = self.config
        fresh = [readings for _, (at, readings) in sorted(self._observed.items())
                 if now - at <= cfg.stale_s]
        reported: dict[IPAddress, list[Reading]] = {a: [] for a, _, _ in cfg.backends}
        for readings in fresh:
            for address, r in readings.items():
                if r.state is not LoadState.NONE and address in reported:
                    reported[address].append(r)
        if cfg.mode is WeightingMode.AGENT:
            return self._follow_agent(reported)
        assert self._controller is not None
        inputs: dict[str, BackendInput] = {}
        observed: dict[IPAddress, float | None] = {}
        for address, weight, capacity in cfg.backends:
            values = [r.value for r in reported[address]]
            # Connections: the sum of every node's (each counts those it forwards); loads: the mean.
            total = math.fsum(values) / (1 if cfg.mode is WeightingMode.LEASTCONN else max(1, len(values)))
            value = max(0.0, total) if values else None
            observed[address] = value
            inputs[str(address)] = BackendInput(weight, LoadSample(value, now) if value is not None else None, capacity)
        weights = self._controller.update(inputs, now)
        multipliers = self._controller.multipliers()
        return {a: BackendWeight(weights[str(a)], observed[a], multipliers.get(str(a), 1.0),
                                 LoadState.OK if observed[a] is not None else LoadState.NONE)
                for a, _, _ in cfg.backends}

    def _follow_agent(self, reported: Mapping[IPAddress, list[Reading]]) -> dict[IPAddress, BackendWeight]:
        """HAProxy's meaning: the percentage scales the configured weight; here within
        floor..ceiling, by at most max_step per interval (an agent flapping 10% / 800% moves the
        table gradually). No report: the configured weight."""
        p = self.config.params
        scale = scale_for((w for _, w, _ in self.config.backends), p.ceiling)
        out = {}
        for address, weight, _ in self.config.backends:
            readings = reported[address]
            if not readings:
                self._agent_m.pop(address, None)
                out[address] = BackendWeight(weight * scale, None, 1.0, LoadState.NONE)
                continue
            state = vote(r.state for r in readings)
            ok = [r.value for r in readings if r.state is LoadState.OK]
            previous = self._agent_m.get(address, 1.0)
            m = previous
            if ok:
                target = min(p.ceiling, max(p.floor, math.fsum(ok) / len(ok)))
                m = previous * min(p.max_step, max(1 / p.max_step, target / previous))
            self._agent_m[address] = m
            out[address] = BackendWeight(quantise(weight, scale, m), math.fsum(ok) / len(ok) if ok else None, m, state)
        return out

    # ---- output -------------------------------------------------------------------------------------

    def _observation_loads(self) -> list[Load]:
        own = self._observed.get(self.node_id)
        if own is None:
            return []
        records = [LoadRecord(addr16(a), own[1][a].value, own[1][a].state) for a, _, _ in self.config.backends]
        return self._split(LoadKind.OBSERVE, 0, records)

    def _weight_loads(self) -> list[Load]:
        p = self.published
        assert p is not None
        records = [LoadRecord(addr16(a), b.observed or 0.0, b.state, b.multiplier, b.weight)
                   for a, b in sorted(p.backends.items(), key=lambda kv: kv[0].packed)]
        return self._split(LoadKind.WEIGHTS, p.epoch, records)

    def _split(self, kind: LoadKind, epoch: int, records: Sequence[LoadRecord]) -> list[Load]:
        parts = max(1, math.ceil(len(records) / MAX_LOAD_RECORDS))
        return [Load(kind, self.id, epoch, len(self.config.backends),
                     tuple(records[i * MAX_LOAD_RECORDS:(i + 1) * MAX_LOAD_RECORDS]), i, parts)
                for i in range(parts)]


def same_weights(a: Mapping[IPAddress, BackendWeight], b: Mapping[IPAddress, BackendWeight]) -> bool:
    """What the hash and the view digest see: the weights and states, not the readings."""
    return a.keys() == b.keys() and all((a[k].weight, a[k].state) == (b[k].weight, b[k].state) for k in a)


def changes_hash(old: Published | None, new: Published | None) -> bool:
    """Whether going from `old` to `new` changes what the data plane and the digest see."""
    if old is None or new is None:
        return (old is None) != (new is None)
    return not same_weights(old.backends, new.backends)


def leader(node_id: int, self_ready: bool, members: Mapping[int, bool]) -> int:
    """The lowest node id among the live, ready members (us included if we are ready); among all
    live ones if none is ready (a cold start), so even then the nodes pick the same one."""
    ready = [n for n, r in members.items() if r] + ([node_id] if self_ready else [])
    return min(ready) if ready else min([node_id, *members])


def vote(states: Iterable[LoadState]) -> LoadState:
    """The most common state; a tie goes to the more severe."""
    counts: dict[LoadState, int] = {}
    for s in states:
        counts[s] = counts.get(s, 0) + 1
    return max(counts, key=lambda s: (counts[s], _SEVERITY[s])) if counts else LoadState.NONE


def quantise(configured: int, scale: int, multiplier: float) -> int:
    if configured == 0:
        return 0
    return min(1000, max(1, math.floor(configured * scale * multiplier + 0.5)))


def shares_for(services: Iterable[ServiceConfig], node_id: int,
               previous: Mapping[str, ServiceShare] | None = None) -> dict[str, ServiceShare]:
    """One share per load-aware service; a service whose load config did not change keeps its
    published weights across a reload."""
    out = {}
    for service in services:
        if not service.weighting.dynamic:
            continue
        config = ShareConfig.from_service(service)
        old = (previous or {}).get(service.name)
        out[service.name] = ServiceShare(config, node_id,
                                         old.published if old is not None and old.config == config else None)
    return out
