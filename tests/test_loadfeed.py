"""The load-aware weighting component (cluster/loadfeed.py) of 3 nodes over fake flow-sync
transports and fake data planes (leastconn), intervals of 100 ms: every node's inbox gets
the same weights, a dead transport peer is left out, and a reload keeps what was published."""
from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import trio

from cluster.config import load_text
from cluster.events import Inbox, NodeEvent, WeightsPublished
from cluster.loadfeed import LoadFeed
from cluster.sync.codec import Load

pytestmark = pytest.mark.unit

ip = ipaddress.ip_address
NODES = (0x0A000001, 0x0A000002, 0x0A000003)
CONFIG_TEXT = """services:
  - name: web
    vips: [192.0.2.10]
    ports: [80]
    weighting: {mode: leastconn, interval_ms: 100}
    backends: [{address: 10.1.0.1, capacity: 1}, {address: 10.1.0.2, capacity: 4}]
"""
CONFIG = load_text(CONFIG_TEXT, ip("10.0.0.1"))


@dataclass
class FakeDataPlane:
    """Each node pinned 30 connections on each backend."""

    conns: dict[int, int] = field(default_factory=lambda: {0: 30, 1: 30})

    def counters(self) -> FakeDataPlane:
        return self

    def active(self, index: int) -> int:
        return self.conns[index]

    def backend_index(self, vip: object, port: int, proto: int, address: ipaddress.IPv4Address) -> int | None:
        return 0 if str(address) == "10.1.0.1" else 1

    def stats(self) -> dict[object, int]:
        return {}

    def service_index(self, vip: object, port: int, proto: int) -> int | None:
        return 0


@dataclass
class Net:
    feeds: dict[int, LoadFeed] = field(default_factory=dict)
    down: set[int] = field(default_factory=set)


class FakeTransport:
    def __init__(self, net: Net, node: int) -> None:
        self.net, self.node = net, node
        self.load_sink: Callable[[int, Load], None] | None = None
        self.ready = True

    def send_load(self, load: Load) -> None:
        if self.node in self.net.down:
            return
        for other, feed in self.net.feeds.items():
            if other != self.node and other not in self.net.down:
                feed.receive(self.node, load)

    def members(self) -> dict[int, bool]:
        return {n: True for n in self.net.feeds if n != self.node and n not in self.net.down}


async def test_three_feeds_publish_the_same_weights_to_every_inbox() -> None:
    """On the real clock: the counters are read on a worker thread, which the virtual clock
    would jump past."""
    net = Net()
    inboxes = {n: Inbox() for n in NODES}
    seen: dict[int, list[WeightsPublished]] = {n: [] for n in NODES}
    async with trio.open_nursery() as nursery:
        for n in NODES:
            transport = FakeTransport(net, n)
            net.feeds[n] = LoadFeed(CONFIG.services, n, inboxes[n], lambda t=transport: t,  # type: ignore[misc]
                                    lambda: FakeDataPlane())  # type: ignore[arg-type,return-value]

        async def consume(n: int) -> None:
            def apply(event: NodeEvent) -> bool:
                if isinstance(event, WeightsPublished):
                    seen[n].append(event)
                return False
            await inboxes[n].run(apply, lambda: None)

        for n in NODES:
            nursery.start_soon(consume, n)
            await nursery.start(net.feeds[n].run)
        with trio.fail_after(10):
            while not all(seen[n] and seen[n][-1].published is not None  # noqa: ASYNC110  # no event; under fail_after
                          and seen[n][-1].published.backends[ip("10.1.0.1")].observed == 90.0 for n in NODES):
                await trio.sleep(0.05)
        last = {n: seen[n][-1].published for n in NODES}
        assert all(p is not None and p.leader == NODES[0] for p in last.values())
        weights = [{str(a): b.weight for a, b in p.backends.items()} for p in last.values()]  # type: ignore[union-attr]
        assert weights[0] == weights[1] == weights[2]
        assert weights[0]["10.1.0.2"] > weights[0]["10.1.0.1"]  # 90 connections on capacity 4 vs 1: more to b2
        p0 = last[NODES[0]]
        assert p0 is not None and p0.backends[ip("10.1.0.1")].observed == 90.0  # the cluster's sum

        net.down.add(NODES[0])  # the leader dies: the others no longer count it a member, node 2 leads
        with trio.fail_after(10):
            while not all(net.feeds[n].snapshot()["web"]["published_by"] == NODES[1]  # noqa: ASYNC110  # as above
                          for n in NODES[1:]):
                await trio.sleep(0.05)
        assert all(net.feeds[n].snapshot()["web"]["leader"] == NODES[1] for n in NODES[1:])

        # A reload: the same service keeps its share; a changed one its weights if its backends
        # and load settings are the same; a removed one is reported as None.
        feed = net.feeds[NODES[2]]
        share = feed.shares["web"]
        feed.reconfigure(CONFIG.services)
        assert feed.shares["web"] is share
        moved = load_text(CONFIG_TEXT.replace("vips: [192.0.2.10]", "vips: [192.0.2.11]"), ip("10.0.0.1"))
        feed.reconfigure(moved.services)
        assert feed.shares["web"] is not share and feed.shares["web"].published == share.published
        feed.reconfigure(())
        with trio.fail_after(5):
            while not (seen[NODES[2]] and seen[NODES[2]][-1].published is None):  # noqa: ASYNC110  # no event
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
