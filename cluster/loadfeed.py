"""The load-aware weighting component: reads loads, exchanges them over flow sync, and reports
the cluster's published weights on the node's inbox. The I/O around cluster/loadshare.py.

One task per service with `weighting:` other than static. Every `interval_ms` it reads every
backend (agent replies, HTTP load reports: all backends at once, each bounded by `timeout_ms`;
leastconn: the data plane's per-backend counters, one batch read on a worker thread), hands
the readings to the service's `ServiceShare`, sends the LOAD datagrams that returns through flow
sync, and, when the published weights changed, queues a `WeightsPublished` for the inbox.
Datagrams from peers arrive through flow sync's `load_sink` (on the loop, never blocking) and
go the same way. Without flow sync (one node) the node is its own leader.

The inbox gets the newest publication per service, never a backlog: a relay task sends what
changed since it last ran, so a slow inbox costs at most one event per service.
"""
from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import trio

from bpf.structs import IPAddress
from cluster.config import ServiceConfig
from cluster.events import Inbox, WeightsPublished
from cluster.loadshare import Reading, ServiceShare, service_id, shares_for
from cluster.status_doc import StatusSource
from cluster.sync.codec import Load, LoadState
from cluster.weighting import WeightingMode
from healthcheck.loadprobe import AgentMemory, agent_reading, http_load
from healthcheck.probe import make_ssl_context

log = logging.getLogger(__name__)

MAX_PROBES = 64  # agent/HTTP reads in flight at once, per service


@runtime_checkable
class LoadTransport(Protocol):
    """What the component needs of flow sync (cluster/sync/flowsync.py FlowSync)."""

    load_sink: Callable[[int, Load], None] | None

    @property
    def ready(self) -> bool: ...
    def send_load(self, load: Load) -> None: ...
    def members(self) -> dict[int, bool]: ...


class LoadFeed:
    def __init__(self, services: Sequence[ServiceConfig], node_id: int, inbox: Inbox,
                 transport: Callable[[], LoadTransport | None], dataplane: Callable[[], StatusSource | None],
                 previous: LoadFeed | None = None) -> None:
        self.services = {s.name: s for s in services if s.weighting.dynamic}
        self.node_id = node_id
        self.shares: dict[str, ServiceShare] = shares_for(self.services.values(), node_id,
                                                          previous.shares if previous else None)
        self._by_id = {service_id(name): share for name, share in self.shares.items()}
        self._inbox = inbox
        self._transport = transport
        self._dataplane = dataplane
        self._agents: dict[tuple[str, IPAddress], AgentMemory] = {}
        self._dirty: set[str] = set(self.shares)  # the first relay reports every service's state
        self._wake = trio.Event()
        self._wake.set()

    def receive(self, node_id: int, load: Load) -> None:
        """Flow sync's `load_sink`: on the loop, never blocks."""
        share = self._by_id.get(load.service_id)
        if share is not None and share.receive(node_id, load, trio.current_time()):
            self._changed(share.config.name)

    def snapshot(self) -> dict[str, Any]:
        """For the status document: leader and counters per service."""
        return {name: {"leader": share.leader, "epoch": share.published.epoch if share.published else 0,
                       "counters": dict(share.counters)}
                for name, share in self.shares.items()}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._relay)
            for name in self.shares:
                nursery.start_soon(self._service_loop, name)
            task_status.started()

    # ---- per service ---------------------------------------------------------------------------

    async def _service_loop(self, name: str) -> None:
        service, share = self.services[name], self.shares[name]
        interval_s = service.weighting.interval_s
        context = await self._ssl_context(service)
        next_at = trio.current_time()
        while True:
            readings = await self._read(service, context)
            now = trio.current_time()
            share.observe(readings, now)
            transport = self._transport()
            if transport is not None and transport.load_sink != self.receive:
                transport.load_sink = self.receive  # a new sync (a reload) hears from now on
            loads, changed = share.tick(transport.members() if transport else {},
                                        transport.ready if transport else True, now)
            if transport is not None:
                for load in loads:
                    transport.send_load(load)
            if changed:
                self._changed(name)
            next_at = max(next_at + interval_s, now)  # a slow read delays the next, never bunches them
            await trio.sleep_until(next_at)

    async def _read(self, service: ServiceConfig, context: ssl.SSLContext | None) -> dict[IPAddress, Reading]:
        w = service.weighting
        if w.mode is WeightingMode.LEASTCONN:
            return await self._connections(service)
        out: dict[IPAddress, Reading] = {}
        limiter = trio.CapacityLimiter(MAX_PROBES)

        async def one(address: IPAddress) -> None:
            async with limiter:
                if w.mode is WeightingMode.AGENT:
                    assert w.agent_port is not None
                    memory = self._agents.setdefault((service.name, address), AgentMemory())
                    agent = await agent_reading(memory, str(address), w.agent_port, w.timeout_s)
                    out[address] = Reading(agent.value, LoadState[agent.state.upper()]) if agent else Reading()
                else:
                    check = next(c for c in service.checks if c.http is not None)
                    value = await http_load(check, str(address), service.ports[0], w.http_header,
                                            w.http_json_field, w.timeout_s, context)
                    out[address] = Reading(value, LoadState.OK) if value is not None else Reading()

        async with trio.open_nursery() as nursery:
            for b in service.backends:
                nursery.start_soon(one, b.address)
        return out

    async def _connections(self, service: ServiceConfig) -> dict[IPAddress, Reading]:
        """This node's share of each backend's active connections: flows pinned here minus flows
        seen closing here (bpf/lbnode.h backend_stats), over the service's VIPs and ports."""
        dp = self._dataplane()
        if dp is None:
            return {}
        counters = await trio.to_thread.run_sync(dp.counters)
        out = {}
        for b in service.backends:
            total = 0
            for vip in service.vips:
                for port in service.ports:
                    index = dp.backend_index(vip, port, service.proto, b.address)
                    if index is not None:
                        total += counters.backend(index).active
            out[b.address] = Reading(float(total), LoadState.OK)
        return out

    @staticmethod
    async def _ssl_context(service: ServiceConfig) -> ssl.SSLContext | None:
        """One client context per service (it loads the trust store: on a worker thread)."""
        check = next((c for c in service.checks if c.http is not None), None)
        if service.weighting.mode is not WeightingMode.HTTP or check is None or check.http is None \
                or check.kind.value != "https":
            return None
        opts = check.http
        return await trio.to_thread.run_sync(make_ssl_context, opts.verify, opts.ca_file)

    # ---- to the inbox --------------------------------------------------------------------------

    def _changed(self, name: str) -> None:
        self._dirty.add(name)
        self._wake.set()

    async def _relay(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while self._dirty:
                name = self._dirty.pop()
                await self._inbox.send(WeightsPublished(name, self.shares[name].published))

