"""Load-aware weights agreed over the cluster (cluster/loadshare.py), with 3 simulated nodes.

Each node reads the simulated backends with its own noise (they probe on their own), the LOAD
datagrams go through the real codec (encode, decode) to every other node, and the test checks
after each round that every node hashes with the same weights, what a leader failover does, and
how a dead source, the agent's words and big services are handled.
"""
from __future__ import annotations

import ipaddress
import itertools
import random
from collections.abc import Callable

import pytest

from cluster.config import load_text
from cluster.desired import View, decide
from cluster.loadshare import MAX_NODES, Reading, ServiceShare, ShareConfig, leader, shares_for, vote
from cluster.sync import codec
from cluster.sync.codec import MAX_LOAD_RECORDS, Load, LoadKind, LoadState
from cluster.weighting import WeightingMode
from cluster.weights import ControllerParams

pytestmark = pytest.mark.unit

ip = ipaddress.ip_address
KEYS = codec.Keyring(b"k" * 32)
NODES = (0x0A000001, 0x0A000002, 0x0A000003)  # 10.0.0.1 leads while alive and ready
INTERVAL_S = 0.5


def config_of(mode: WeightingMode, n: int = 3, capacities: tuple[float, ...] = (1.0, 2.0, 4.0)) -> ShareConfig:
    backends = tuple((ip(f"10.1.{i // 200}.{i % 200 + 1}"), 1, capacities[i % len(capacities)]) for i in range(n))
    return ShareConfig("web", mode, backends, INTERVAL_S, ControllerParams(stale_after_s=3 * INTERVAL_S))


class Cluster:
    """Nodes that tick once per round; a round's datagrams reach every other live node before the
    next round (one network delay is milliseconds, an interval hundreds)."""

    def __init__(self, config: ShareConfig, read: Callable[[int, ServiceShare], dict[ipaddress.IPv4Address |
                                                                                        ipaddress.IPv6Address,
                                                                                        Reading]]) -> None:
        self.config = config
        self.read = read
        self.shares = {n: ServiceShare(config, n) for n in NODES}
        self.alive = set(NODES)
        self.ready = set(NODES)  # what each node knows of itself
        self.heard_ready = set(NODES)  # what the others' heartbeats have told them
        self.now = 0.0
        self.control = 0

    def round(self, drop: Callable[[int, int, Load], bool] = lambda sender, receiver, load: False) -> None:
        sent: list[tuple[int, bytes]] = []
        for n in sorted(self.alive):
            share = self.shares[n]
            share.observe(self.read(n, share), self.now)
            members = {m: m in self.heard_ready for m in self.alive if m != n}
            loads, _ = share.tick(members, n in self.ready, self.now)
            for load in loads:
                self.control += 1
                sent.append((n, codec.encode_load(KEYS, n, 1, self.control, load)))
        for sender, datagram in sent:
            message = codec.decode(KEYS, datagram)
            assert isinstance(message.body, Load)
            for receiver in self.alive - {sender}:
                if not drop(sender, receiver, message.body):
                    self.shares[receiver].receive(sender, message.body, self.now + 0.001)
        self.now += INTERVAL_S

    def weights(self, n: int) -> dict[str, int] | None:
        p = self.shares[n].published
        return None if p is None else {str(a): b.weight for a, b in p.backends.items()}

    def agreed(self) -> bool:
        first = self.weights(min(self.alive))
        return first is not None and all(self.weights(n) == first for n in self.alive)


def http_servers(offered: float, noise: float, seed: int = 7) -> Callable[[int, ServiceShare], dict[object, Reading]]:
    """A server's load is its share of `offered` (by the weights the node hashes with) over its
    capacity, read by each node with its own noise."""
    rng = random.Random(seed)

    def read(node: int, share: ServiceShare) -> dict[object, Reading]:
        p = share.published
        weights = {a: (p.backends[a].weight if p else w) for a, w, _ in share.config.backends}
        total = sum(weights.values())
        return {a: Reading(offered * weights[a] / total / c * (1 + rng.uniform(-noise, noise)), LoadState.OK)
                for a, _, c in share.config.backends if c is not None}
    return read  # type: ignore[return-value]


def test_three_nodes_hash_with_identical_weights_after_every_round() -> None:
    """Every round, after delivery, all three nodes hold the same publication: agreement within
    the round the leader published in (a network delay), with noisy, different inputs per node."""
    cluster = Cluster(config_of(WeightingMode.HTTP), http_servers(3.5, noise=0.1))  # type: ignore[arg-type]
    epochs = set()
    for _ in range(40):
        cluster.round()
        assert cluster.agreed()
        epochs.add(cluster.shares[NODES[2]].published.epoch)  # type: ignore[union-attr]
    assert all(s.leader == NODES[0] for s in cluster.shares.values())
    assert len(epochs) > 3  # the weights did move: capacities 1:2:4 want unequal weights
    w = cluster.weights(NODES[0])
    assert w is not None and w["10.1.0.1"] < w["10.1.0.2"] < w["10.1.0.3"]


def test_digest_matches_on_every_node() -> None:
    text = """services:
  - name: web
    vips: [192.0.2.10]
    ports: [80]
    weighting: {mode: leastconn}
    backends: [{address: 10.1.0.1, capacity: 1}, {address: 10.1.0.2, capacity: 2}, {address: 10.1.0.3, capacity: 4}]
"""
    node_config = load_text(text, ip("10.0.0.1"))
    shares = [shares_for(node_config.services, n)["web"] for n in NODES]
    config = shares[0].config
    cluster = Cluster(config, lambda n, share: {a: Reading(float(10 * (i + 1) + n % 3), LoadState.OK)
                                                for i, (a, _, _) in enumerate(share.config.backends)})
    healthy = {"web/192.0.2.10:80": frozenset({"10.1.0.1:80", "10.1.0.2:80", "10.1.0.3:80"})}
    for _ in range(10):
        cluster.round()
        digests = {decide(View(node_config, healthy, {}, True,
                               weights={"web": cluster.shares[n].published})).digest()  # type: ignore[dict-item]
                   for n in NODES}
        assert len(digests) == 1
    static = decide(View(node_config, healthy, {}, True)).digest()
    assert digests != {static}  # the published weights are in the digest


def test_leader_failover_continues_from_the_last_published_weights() -> None:
    cluster = Cluster(config_of(WeightingMode.HTTP), http_servers(3.5, noise=0.0))  # type: ignore[arg-type]
    for _ in range(30):
        cluster.round()
    before = cluster.shares[NODES[1]].published
    assert before is not None and before.leader == NODES[0]
    cluster.alive.discard(NODES[0])  # the leader dies; the others see it dead at the same round here
    cluster.round()
    after = cluster.shares[NODES[1]].published
    assert after is not None and after.leader == NODES[1] and after.epoch > before.epoch
    assert cluster.agreed()
    for a, b in before.backends.items():  # continued, not reset to the configured weights
        assert abs(after.backends[a].weight - b.weight) <= 0.1 * b.weight, (a, b, after.backends[a])


def test_a_restarted_leader_is_followed_at_once_not_dropped_as_stale() -> None:
    """The lowest node restarts (or reloads a change of the service): its new share has no
    publication of its own, and its first epoch must still be above those its peers hold."""
    cluster = Cluster(config_of(WeightingMode.HTTP), http_servers(3.5, noise=0.0))  # type: ignore[arg-type]
    for _ in range(40):
        cluster.round()
    held = cluster.shares[NODES[1]].published
    assert held is not None and held.leader == NODES[0]
    cluster.shares[NODES[0]] = ServiceShare(cluster.config, NODES[0])  # the new process, same node id
    cluster.round()
    for n in NODES[1:]:
        share = cluster.shares[n]
        assert share.counters["stale"] == 0
        assert share.published is not None and share.published.leader == NODES[0]
        assert share.published.epoch > held.epoch
    assert cluster.agreed()


def test_a_follower_that_sees_the_old_leader_a_round_longer_agrees_one_round_later() -> None:
    """Membership views differ for a moment at a failover: node 3 still thinks node 1 leads (it
    ignores node 2's publication), and agrees at the next round."""
    cluster = Cluster(config_of(WeightingMode.HTTP), http_servers(3.5, noise=0.0))  # type: ignore[arg-type]
    for _ in range(10):
        cluster.round()
    cluster.alive.discard(NODES[0])
    share3 = cluster.shares[NODES[2]]
    share3.leader = NODES[0]  # its view at the moment node 2's publication arrives
    original_tick = share3.tick
    share3.tick = lambda members, ready, now: original_tick({**members, NODES[0]: True}, ready, now)  # type: ignore[method-assign]
    cluster.round()
    assert share3.counters["not_leader"] >= 1 and not cluster.agreed()
    share3.tick = original_tick  # type: ignore[method-assign]
    cluster.round()
    assert cluster.agreed()


def test_publications_from_a_node_that_is_not_the_leader_are_ignored() -> None:
    cluster = Cluster(config_of(WeightingMode.HTTP), http_servers(3.5, noise=0.0))  # type: ignore[arg-type]
    cluster.round()
    share = cluster.shares[NODES[0]]
    bogus = Load(LoadKind.WEIGHTS, share.id, 99, 3,
                 tuple(codec.LoadRecord(_addr16(a), 1.0,
                                        LoadState.OK, 1.0, 1) for a, _, _ in share.config.backends))
    assert not cluster.shares[NODES[1]].receive(NODES[2], bogus, cluster.now)
    assert cluster.shares[NODES[1]].counters["not_leader"] == 1


def _addr16(a: object) -> bytes:
    from bpf.structs import addr16

    return addr16(str(a))


def test_dead_load_source_falls_back_to_the_configured_weight() -> None:
    dead: set[str] = set()

    def read(node: int, share: ServiceShare) -> dict[object, Reading]:
        return {a: Reading() if str(a) in dead else Reading(0.5 * (i + 1), LoadState.OK)
                for i, (a, _, _) in enumerate(share.config.backends)}

    cluster = Cluster(config_of(WeightingMode.HTTP), read)  # type: ignore[arg-type]
    for _ in range(20):
        cluster.round()
    moved = cluster.weights(NODES[0])
    assert moved is not None and moved["10.1.0.1"] != moved["10.1.0.3"]
    dead.add("10.1.0.1")
    for _ in range(2):
        cluster.round()
    w = cluster.weights(NODES[1])
    assert w is not None and w["10.1.0.1"] == 125  # configured 1 x K (1000 // ceil(1 x 8)), on every node
    assert cluster.agreed()
    assert cluster.shares[NODES[1]].published.backends[ip("10.1.0.1")].state is LoadState.NONE  # type: ignore[union-attr]


def test_agent_percentages_scale_the_weight_within_bounds_and_steps() -> None:
    pct = {"10.1.0.1": 1.0, "10.1.0.2": 1.0, "10.1.0.3": 1.0}
    state = {"10.1.0.3": LoadState.OK}

    def read(node: int, share: ServiceShare) -> dict[object, Reading]:
        return {a: Reading(pct[str(a)], state.get(str(a), LoadState.OK)) for a, _, _ in share.config.backends}

    cluster = Cluster(config_of(WeightingMode.AGENT), read)  # type: ignore[arg-type]
    cluster.round()
    assert cluster.weights(NODES[0]) == {"10.1.0.1": 125, "10.1.0.2": 125, "10.1.0.3": 125}
    pct["10.1.0.1"] = 0.5
    pct["10.1.0.2"] = 20.0  # above the ceiling (8)
    weights = []
    for _ in range(8):
        cluster.round()
        assert cluster.agreed()
        weights.append(cluster.weights(NODES[2]))
    # At most one max_step (1.5) per interval (the other nodes' readings of the change come a round later).
    assert weights[0]["10.1.0.2"] == 188 and 83 <= weights[0]["10.1.0.1"] < 125
    assert all(b["10.1.0.2"] <= 1.5 * a["10.1.0.2"] + 1 for a, b in itertools.pairwise(weights))
    assert weights[-1] == {"10.1.0.1": 63, "10.1.0.2": 1000, "10.1.0.3": 125}  # 0.5 x 125; 8 x 125
    state["10.1.0.3"] = LoadState.DRAIN
    cluster.round()  # the leader's own reading is new; the others' of this round come in after it ticked
    cluster.round()
    p = cluster.shares[NODES[1]].published
    assert p is not None and p.backends[ip("10.1.0.3")].state is LoadState.DRAIN


def test_agent_state_is_the_nodes_majority_with_ties_to_the_more_severe() -> None:
    assert vote([LoadState.OK, LoadState.DRAIN, LoadState.OK]) is LoadState.OK
    assert vote([LoadState.OK, LoadState.DOWN]) is LoadState.DOWN
    assert vote([LoadState.MAINT, LoadState.DOWN, LoadState.DRAIN]) is LoadState.MAINT
    assert vote([]) is LoadState.NONE


def test_leader_is_the_lowest_ready_live_node() -> None:
    assert leader(5, True, {3: True, 9: True}) == 3
    assert leader(5, True, {3: False, 9: True}) == 5  # 3 is still resyncing
    assert leader(5, False, {3: False, 9: True}) == 9  # we are not ready either
    assert leader(5, False, {3: False, 9: False}) == 3  # a cold start: the lowest live one
    assert leader(5, False, {}) == 5


def test_leastconn_sums_every_nodes_counts_and_equalises_per_capacity() -> None:
    """Node counts may be negative (a flow pinned on one node closed on another); the sum is what
    counts. Connections follow the weights: the controller moves them towards conns / capacity equal."""
    def read(node: int, share: ServiceShare) -> dict[object, Reading]:
        p = share.published
        weights = {a: (p.backends[a].weight if p else w) for a, w, _ in share.config.backends}
        total = sum(weights.values())
        conns = {a: 700.0 * weights[a] / total for a in weights}
        # Node 1 pinned them all; node 2 saw a tenth of them close, node 3 nothing.
        return {a: Reading({NODES[0]: 1.1 * c, NODES[1]: -0.1 * c, NODES[2]: 0.0}[node], LoadState.OK)
                for a, c in conns.items()}

    cluster = Cluster(config_of(WeightingMode.LEASTCONN), read)  # type: ignore[arg-type]
    for _ in range(40):
        cluster.round()
        assert cluster.agreed()
    p = cluster.shares[NODES[0]].published
    assert p is not None
    observed = {str(a): b.observed for a, b in p.backends.items()}
    assert sum(observed.values()) == pytest.approx(700, rel=0.01)  # type: ignore[arg-type]
    per_capacity = [observed["10.1.0.1"] / 1, observed["10.1.0.2"] / 2, observed["10.1.0.3"] / 4]  # type: ignore[operator]
    assert max(per_capacity) / min(per_capacity) < 1.3


def test_a_big_service_is_published_in_parts_and_only_whole_publications_apply() -> None:
    n = MAX_LOAD_RECORDS * 2 + 5
    config = config_of(WeightingMode.HTTP, n=n)
    cluster = Cluster(config, http_servers(n / 2, noise=0.05))  # type: ignore[arg-type]
    cluster.round()
    assert cluster.agreed()
    epoch = cluster.shares[NODES[1]].published.epoch  # type: ignore[union-attr]
    for _ in range(10):  # node 2 loses every second part of node 1's weights
        cluster.round(drop=lambda s, r, load: r == NODES[1] and load.kind is LoadKind.WEIGHTS and load.part == 1)
    assert cluster.shares[NODES[1]].published.epoch == epoch  # type: ignore[union-attr]
    cluster.round()
    assert cluster.agreed()


def test_observations_of_another_config_and_too_many_nodes_are_refused() -> None:
    share = ServiceShare(config_of(WeightingMode.HTTP), NODES[0])
    other = Load(LoadKind.OBSERVE, share.id, 0, 4, ())
    assert not share.receive(NODES[1], other, 0.0) and share.counters["mismatched"] == 1
    for i in range(MAX_NODES + 5):
        share.receive(1000 + i, Load(LoadKind.OBSERVE, share.id, 0, 3, ()), 0.0)
    assert share.counters["observations"] == MAX_NODES


def test_drain_and_down_from_the_agent_reach_the_view() -> None:
    text = """services:
  - name: web
    vips: [192.0.2.10]
    ports: [80]
    weighting: {mode: agent, agent_port: 9777}
    backends: [{address: 10.1.0.1}, {address: 10.1.0.2}, {address: 10.1.0.3}]
"""
    node_config = load_text(text, ip("10.0.0.1"))
    states = {"10.1.0.1": LoadState.DRAIN, "10.1.0.2": LoadState.DOWN, "10.1.0.3": LoadState.OK}
    share = shares_for(node_config.services, NODES[0])["web"]
    share.observe({a: Reading(1.0, states[str(a)]) for a, _, _ in share.config.backends}, 0.0)
    share.tick({}, True, 0.0)
    healthy = {"web/192.0.2.10:80": frozenset({"10.1.0.1:80", "10.1.0.2:80", "10.1.0.3:80"})}
    macs = {ip(a): "02:00:00:00:00:01" for a in states}
    desired = decide(View(node_config, healthy, macs, True, weights={"web": share.published}))  # type: ignore[dict-item]
    [svc] = desired.services
    assert [(str(b.address), b.passing, b.disabled, b.weight, b.configured_weight) for b in svc.backends] == [
        ("10.1.0.1", False, True, 125, 1), ("10.1.0.2", False, False, 125, 1), ("10.1.0.3", True, False, 125, 1)]
    assert svc.usable == 1


def test_a_node_that_becomes_ready_leads_at_once_and_the_others_follow_its_first_publication() -> None:
    """Start-up: node 1 resyncs (not ready), node 2 leads. Once node 1 is ready it leads; the
    others take its first publication though its heartbeat saying so has not come yet, and node 2
    stops publishing: no interval in which two leaders' weights are hashed with."""
    cluster = Cluster(config_of(WeightingMode.HTTP), http_servers(3.5, noise=0.0))  # type: ignore[arg-type]
    cluster.ready.discard(NODES[0])
    cluster.heard_ready.discard(NODES[0])
    for _ in range(10):
        cluster.round()
        assert cluster.agreed() and cluster.shares[NODES[0]].published.leader == NODES[1]  # type: ignore[union-attr]
    epoch = cluster.shares[NODES[2]].published.epoch  # type: ignore[union-attr]
    cluster.ready.add(NODES[0])  # its heartbeat saying so is still to come
    for _ in range(3):
        cluster.round()
        assert cluster.agreed()
        p = cluster.shares[NODES[2]].published
        assert p is not None and p.leader == NODES[0] and p.epoch > epoch
    assert all(cluster.shares[n].leader == NODES[0] for n in NODES)
