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

A reload calls `reconfigure` (synchronous: the node's reload must not yield between switching
the config and waiting for it to be applied): a service whose config is unchanged keeps its
task, readings and controller; a changed one starts afresh (keeping the published weights if
its load settings and backends are the same); a removed one is reported as None.
"""
from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import trio

from bpf.loglimit import LogLimiter
from bpf.structs import IPAddress
from cluster.config import ServiceConfig
from cluster.events import Inbox, WeightsPublished
from cluster.loadshare import Reading, ServiceShare, service_id, shares_for
from cluster.status_doc import StatusSource
from cluster.sync.codec import Load, LoadState
from cluster.weighting import WeightingMode
from healthcheck.errors import SteeringError
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


class Marks(Protocol):
    """The health checker's through-VIP steering (healthcheck/vipnet.py VipSteering)."""

    def mark_for(self, backend: IPAddress) -> int: ...


@runtime_checkable
class ActiveIdle(Protocol):
    """A data plane that counts active connections within a per-service idle window (DataPlane)."""

    def set_active_idle(self, vip: IPAddress, port: int, proto: int, idle_s: float) -> None: ...


class LoadFeed:
    def __init__(self, services: Sequence[ServiceConfig], node_id: int, inbox: Inbox,
                 transport: Callable[[], LoadTransport | None], dataplane: Callable[[], StatusSource | None],
                 steering: Callable[[], Marks | None] = lambda: None) -> None:
        self.services = {s.name: s for s in services if s.weighting.dynamic}
        self.node_id = node_id
        self.shares: dict[str, ServiceShare] = shares_for(self.services.values(), node_id)
        self._by_id = {service_id(name): share for name, share in self.shares.items()}
        self._nursery: trio.Nursery | None = None
        self._scopes: dict[str, trio.CancelScope] = {}  # each service's task
        self._inbox = inbox
        self._transport = transport
        self._dataplane = dataplane
        self._steering = steering  # the health checker's: http loads go through the VIP as its checks do
        self._error_log = LogLimiter(10.0)
        self._agents: dict[tuple[str, IPAddress], AgentMemory] = {}
        self._dirty: set[str] = set(self.shares)  # the first relay reports every service's state
        self._wake = trio.Event()
        self._wake.set()
        # name -> (leader, epoch, wall-clock s) of the publication hashed with, and when it came:
        # nodes share a clock in the lab, so status readers measure how far apart nodes adopt one.
        self._adopted: dict[str, tuple[int, int, float]] = {}

    def receive(self, node_id: int, load: Load) -> None:
        """Flow sync's `load_sink`: on the loop, never blocks."""
        share = self._by_id.get(load.service_id)
        if share is None:
            return
        transport = self._transport()
        if transport is not None:
            # The leader as of now, not as of our last tick: at a failover the new leader's first
            # publication is taken as soon as we too see the old one dead, not up to an interval later.
            share.elect(transport.members(), transport.ready, trio.current_time())
        if share.receive(node_id, load, trio.current_time()):
            self._changed(share.config.name)

    def snapshot(self) -> dict[str, Any]:
        """For the status document: leader and counters per service."""
        out = {}
        for name, share in self.shares.items():
            leader, epoch, at = self._adopted.get(name, (0, 0, 0.0))
            out[name] = {"leader": share.leader, "published_by": leader, "epoch": epoch, "adopted_at": at,
                         "counters": dict(share.counters)}
        return out

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._relay)
            for name in self.shares:
                self._start_service(name)
            task_status.started()

    def reconfigure(self, services: Sequence[ServiceConfig]) -> None:
        """The services of a new config (see the module docstring). Synchronous."""
        wanted = {s.name: s for s in services if s.weighting.dynamic}
        fresh = shares_for(wanted.values(), self.node_id, self.shares)
        for name in list(self.shares):
            if name in wanted and wanted[name] == self.services[name]:
                fresh[name] = self.shares[name]  # unchanged: keeps its readings and controller
            else:
                scope = self._scopes.pop(name, None)
                if scope is not None:
                    scope.cancel()
                self._dirty.add(name)  # changed or gone: its weights are reported again (None if gone)
        self.services, self.shares = wanted, fresh
        self._by_id = {service_id(name): share for name, share in fresh.items()}
        for name in fresh:
            if name not in self._scopes:
                self._dirty.add(name)
                if self._nursery is not None:
                    self._start_service(name)
        self._wake.set()

    def _start_service(self, name: str) -> None:
        assert self._nursery is not None
        scope = self._scopes[name] = trio.CancelScope()
        self._nursery.start_soon(self._service_loop, self.services[name], self.shares[name], scope)

    # ---- per service ---------------------------------------------------------------------------

    async def _service_loop(self, service: ServiceConfig, share: ServiceShare, scope: trio.CancelScope) -> None:
        with scope:
            await self._serve_service(service, share)

    async def _serve_service(self, service: ServiceConfig, share: ServiceShare) -> None:
        name = service.name
        interval_s = service.weighting.interval_s
        context = await self._ssl_context(service)
        next_at = trio.current_time()
        while True:
            readings = await self._read(service, context)
            now = trio.current_time()
            transport = self._transport()
            if transport is not None and transport.load_sink != self.receive:
                transport.load_sink = self.receive  # a new sync (a reload) hears from now on
            try:
                share.observe(readings, now)
                loads, changed = share.tick(transport.members() if transport else {},
                                            transport.ready if transport else True, now)
            except (ArithmeticError, ValueError) as exc:
                # Inputs are bounded where they are read and decoded; should arithmetic on them
                # still fail, this service keeps its last weights and the node goes on.
                share.counters["errors"] += 1
                held = self._error_log.allow(now)
                if held is not None:
                    log.error("%s: load-aware weights not updated: %r%s", name, exc,
                              f" ({held} more since the last report)" if held else "")
                loads, changed = [], False
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
                    agent = await agent_reading(memory, str(address), w.agent_port, w.timeout_ms / 1000)
                    out[address] = Reading(agent.value, LoadState[agent.state.upper()]) if agent else Reading()
                else:
                    check = next(c for c in service.checks if c.http is not None)
                    value = await http_load(check, str(address), service.ports[0], w.http_header,
                                            w.http_json_field, w.timeout_ms / 1000, context,
                                            self._via_vip(service, address))
                    out[address] = Reading(value, LoadState.OK) if value is not None else Reading()

        async with trio.open_nursery() as nursery:
            for b in service.backends:
                nursery.start_soon(one, b.address)
        return out

    def _via_vip(self, service: ServiceConfig, address: IPAddress) -> tuple[str, int] | None:
        """(VIP, mark) for a load read through the VIP, like the service's health checks
        (`through_vip`); None (straight to the backend's address) without steering for it."""
        steering = self._steering() if service.through_vip else None
        if steering is None:
            return None
        try:
            return str(service.vips[0]), steering.mark_for(address)
        except SteeringError:  # not applied (yet, or any more: a reload replaces the checker)
            return None

    async def _connections(self, service: ServiceConfig) -> dict[IPAddress, Reading]:
        """This node's share of each backend's active connections, over the service's VIPs and
        ports: the live connections it forwarded within idle_s as the last flow-table walk
        counted them, corrected by its pins and closes since (bpf/counters.py ActiveTally)."""
        dp = self._dataplane()
        if dp is None:
            return {}
        if isinstance(dp, ActiveIdle):
            for vip in service.vips:
                for port in service.ports:
                    dp.set_active_idle(vip, port, service.proto, service.weighting.idle_s)
        counters = await trio.to_thread.run_sync(dp.counters)
        out = {}
        for b in service.backends:
            total = 0
            for vip in service.vips:
                for port in service.ports:
                    index = dp.backend_index(vip, port, service.proto, b.address)
                    if index is not None:
                        total += counters.active(index)
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
        p = self.shares[name].published if name in self.shares else None
        if p is not None and self._adopted.get(name, (0, 0))[:2] != (p.leader, p.epoch):
            self._adopted[name] = (p.leader, p.epoch, time.time())
        self._dirty.add(name)
        self._wake.set()

    async def _relay(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while self._dirty:
                name = self._dirty.pop()
                share = self.shares.get(name)
                await self._inbox.send(WeightsPublished(name, share.published if share is not None else None))

