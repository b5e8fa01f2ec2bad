"""What a node is made of, as the node sees it: one protocol per component, and `Components`,
the factories that build them, by default the real ones.

The node never constructs a component itself, so its reconcile, reload, out-of-route and
supervision logic runs in the unit tier with fakes of these (tests/test_node_unit.py), never
with fakes of the kernel. The real factories import their modules when called.
"""
from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import trio

from bgp.rib import RouteAttrs
from bpf.counters import FlowCount
from bpf.dataplane import ServiceSpec
from bpf.loader import Limits, XdpMode
from bpf.pinned import Leave
from cluster.config import IPAddress
from cluster.desired import Prefix
from cluster.events import MacsLearned
from cluster.status_doc import StatusSource
from healthcheck.config import ServiceHealthConfig
from healthcheck.state import Event as HealthEvent
from healthcheck.state import ServiceStatus

if TYPE_CHECKING:
    from bgp.config import SpeakerConfig
    from cluster.sync.config import SyncConfig


class DataPlaneLike(StatusSource, Protocol):
    reattached: int  # times `keep_attached` attached the program again

    @property
    def sweep_pending(self) -> bool: ...
    def set_config(self, mac: str, refresh_s: float, max_new_per_s_per_cpu: int) -> None: ...
    def attach(self, ifname: str, mode: XdpMode) -> object: ...
    def keep_attached(self) -> str | None: ...  # why it cannot forward, or None
    def tick(self) -> None: ...
    def apply(self, services: Iterable[ServiceSpec]) -> None: ...  # on a worker thread
    def maintain(self) -> bool: ...  # on a worker thread; True: a pass finished
    def flow_count(self) -> FlowCount: ...
    def pin_status(self) -> Mapping[str, Any] | None: ...  # where the maps are pinned, what was adopted
    def close(self, leave: Leave = Leave.NOTHING) -> None: ...  # detach (bpf/pinned.py): synchronous


class HealthLike(Protocol):
    @property
    def events(self) -> trio.MemoryReceiveChannel[HealthEvent]: ...
    async def run(self, *, task_status: trio.TaskStatus[None] = ...) -> None: ...
    def snapshot(self) -> tuple[ServiceStatus, ...]: ...


class SpeakerLike(Protocol):
    @property
    def config(self) -> SpeakerConfig: ...
    async def run(self, *, task_status: trio.TaskStatus[None] = ...) -> None: ...
    async def shutdown(self) -> None: ...  # graceful (if configured): withdraw, Cease
    def announce(self, prefix: Prefix, attrs: RouteAttrs) -> None: ...
    def withdraw(self, prefix: Prefix) -> None: ...
    def established_peers(self) -> int: ...
    def snapshot(self) -> Sequence[Any]: ...  # dataclasses, one per peer


class SyncLike(Protocol):
    @property
    def digest_mismatch(self) -> bool: ...
    async def run(self, *, task_status: trio.TaskStatus[None] = ...) -> None: ...
    async def resync(self, timeout_s: float) -> bool: ...  # False: incomplete after timeout_s
    def set_digest(self, digest: bytes) -> None: ...
    def set_keys(self, config: SyncConfig) -> None: ...  # the key files' contents changed (SIGHUP)
    def snapshot(self) -> dict[str, Any]: ...


class NeighboursLike(Protocol):
    async def run(self, *, task_status: trio.TaskStatus[None] = ...) -> None: ...
    def set_addresses(self, addresses: Iterable[IPAddress]) -> None: ...


def real_dataplane(limits: Limits, ifname: str) -> DataPlaneLike:
    """Compiled in a child and pinned per interface and namespace (this process never imports
    bcc); adopts the maps a previous run on `ifname` left, if their layout is unchanged."""
    from bpf.dataplane import DataPlane

    return DataPlane.for_interface(limits, ifname)


def real_health(services: Sequence[ServiceHealthConfig]) -> HealthLike:
    from healthcheck.runner import HealthChecker

    return HealthChecker(services)


def real_speaker(config: SpeakerConfig, on_sessions_changed: Callable[[], None]) -> SpeakerLike:
    from bgp.speaker import Speaker

    return Speaker(config, on_sessions_changed=on_sessions_changed)


def real_sync(config: SyncConfig, dp: DataPlaneLike, node_ip: IPAddress, ifname: str) -> SyncLike:
    from bpf.dataplane import DataPlane
    from cluster.sync.flowsync import FlowSync

    assert isinstance(dp, DataPlane), "flow sync reads and writes the real data plane's maps"
    return FlowSync(config, dp, node_ip, ifname=ifname)


def real_neighbours(ifname: str, addresses: Iterable[IPAddress],
                    events: trio.abc.SendChannel[MacsLearned]) -> NeighboursLike:
    from cluster.neighbours import Neighbours

    return Neighbours(ifname, addresses, events)


def interface_mac(ifname: str) -> str | None:
    """The MAC of `ifname` in this namespace, None if there is no such interface."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        indexes = ipr.link_lookup(ifname=ifname)
        if not indexes:
            return None
        return str(ipr.get_links(indexes[0])[0].get_attr("IFLA_ADDRESS"))


def local_addresses() -> set[IPAddress]:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return {ipaddress.ip_address(a.get_attr("IFA_ADDRESS")) for a in ipr.get_addr()}


@dataclass(frozen=True, slots=True)
class Components:
    """How the node builds each component (the data plane's factory runs on a worker thread:
    it waits for the compile child)."""

    dataplane: Callable[[Limits, str], DataPlaneLike] = real_dataplane  # (limits, ifname)
    health: Callable[[Sequence[ServiceHealthConfig]], HealthLike] = real_health
    speaker: Callable[[SpeakerConfig, Callable[[], None]], SpeakerLike] = real_speaker
    sync: Callable[[SyncConfig, DataPlaneLike, IPAddress, str], SyncLike] = real_sync
    neighbours: Callable[[str, Iterable[IPAddress], trio.abc.SendChannel[MacsLearned]], NeighboursLike] = (
        real_neighbours)
    interface_mac: Callable[[str], str | None] = interface_mac
