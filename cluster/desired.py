"""What the node should serve and announce, derived from what it knows. No I/O.

Theory of operation. The node's `View` is its config, which backends pass their health checks
per (VIP, port), the backends' MACs and whether the node is ready (flows resynced, not
draining). `decide(view)` turns it into one `Desired`, recomputed after any change, that the
data plane, BGP, flow sync's digest and `lbnode status` all read:
- `services`: one `ServiceState` per (VIP, port). A backend is *usable* (takes new flows,
  counts towards `need`) while it passes its checks, is not drained, has a weight above 0
  and a known MAC (a healthy backend whose MAC is not learned yet cannot take traffic). The
  service is *up* while at least `need` backends are usable.
- `dataplane_services()`: the XDP program's services; a backend is in the hash only while it
  passes its checks (the hash weighs it by weight, and holds it without a MAC). One missing
  from the config loses its pinned flows; one merely out of the hash keeps them.
- `routes`: a VIP is announced only while the node is ready and *every* service port on that
  VIP is up; `withheld` says why each other VIP is not. All nodes send the same attributes, so
  the router's ECMP (BIRD `merge paths on`) merges their routes.
- `digest()`: a hash of the service/backend/health view that peers compare in their heartbeats.
- load-aware weights (`weights`: the cluster's published weights per service, cluster/loadshare.py)
  replace a backend's configured weight in the hash and the digest; an agent's `drain` or
  `maint` makes it disabled (drained: pinned flows go on), `down` makes it fail like a check.
  Every node hashes with the same publication, so the digest still matches.
"""
from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

from bgp.rib import RouteAttrs
from bpf.dataplane import BackendSpec, ServiceSpec
from cluster.config import BackendEntry, IPAddress, NodeConfig
from cluster.loadshare import BackendWeight, Published
from cluster.sync.codec import LoadState
from healthcheck.config import BackendId

Prefix = ipaddress.IPv4Network | ipaddress.IPv6Network
NOT_READY = "node not ready"


@dataclass(frozen=True, slots=True)
class View:
    config: NodeConfig
    # health name -> BackendIds passing their checks (and not drained)
    healthy: Mapping[str, frozenset[str]] = field(default_factory=dict)
    macs: Mapping[IPAddress, str] = field(default_factory=dict)
    ready: bool = False
    # service name -> the published load-aware weights (services with `weighting:` only)
    weights: Mapping[str, Published] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class BackendState:
    """One backend of one (VIP, port), as the data plane, BGP and status see it."""

    id: BackendId
    address: IPAddress
    weight: int
    mac: str | None
    disabled: bool
    passing: bool  # its health checks pass and it is not drained (the checker's "usable")
    configured_weight: int | None = None  # from the config, when `weight` is a published load-aware one

    @property
    def usable(self) -> bool:
        """Takes new flows and counts towards `need`."""
        return self.passing and self.weight > 0 and self.mac is not None


@dataclass(frozen=True, slots=True)
class ServiceState:
    name: str  # the health checker's: web/192.0.2.10:80
    vip: IPAddress
    port: int
    proto: int
    need: int
    backends: tuple[BackendState, ...]
    usable: int  # backends usable

    @property
    def up(self) -> bool:
        return self.usable >= self.need

    def spec(self) -> ServiceSpec:
        return ServiceSpec(self.vip, self.port, self.proto,
                           tuple(BackendSpec(b.address, b.mac, weight=b.weight, in_hash=b.passing)
                                 for b in self.backends))


@dataclass(frozen=True, slots=True)
class Desired:
    services: tuple[ServiceState, ...] = ()
    routes: Mapping[Prefix, RouteAttrs] = field(default_factory=dict)  # to announce
    withheld: Mapping[Prefix, str] = field(default_factory=dict)  # every other VIP: why not

    def dataplane_services(self) -> list[ServiceSpec]:
        return [s.spec() for s in self.services]

    def digest(self) -> bytes:
        """16 bytes that two nodes with the same services, backends, weights and health share."""
        h = hashlib.blake2b(digest_size=16)
        for s in sorted(self.services, key=lambda s: (s.vip.packed, s.port, s.proto)):
            h.update(f"{s.vip}|{s.port}|{s.proto}".encode())
            for b in sorted(s.backends, key=lambda b: b.address.packed):
                h.update(f"|{b.address},{b.weight},{int(b.passing)}".encode())
            h.update(b";")
        return h.digest()


def backend_key(address: IPAddress, port: int) -> BackendId:
    """The health checker's backend identity (healthcheck.config.BackendConfig.key)."""
    return BackendId(address, port)


def backend_state(b: BackendEntry, port: int, healthy: frozenset[str], macs: Mapping[IPAddress, str],
                  published: BackendWeight | None = None) -> BackendState:
    key = BackendId(b.address, port)
    if published is None:
        return BackendState(key, b.address, b.weight, macs.get(b.address), b.disabled, passing=key in healthy)
    disabled = b.disabled or published.state in (LoadState.DRAIN, LoadState.MAINT)
    passing = key in healthy and published.state not in (LoadState.DRAIN, LoadState.MAINT, LoadState.DOWN)
    return BackendState(key, b.address, published.weight, macs.get(b.address), disabled, passing=passing,
                        configured_weight=b.weight)


def decide(view: View) -> Desired:
    states: list[ServiceState] = []
    routes: dict[Prefix, RouteAttrs] = {}
    withheld: dict[Prefix, str] = {}
    for service in view.config.services:
        for vip in service.vips:
            prefix = ipaddress.ip_network(vip)
            for port in service.ports:
                name = service.health_name(vip, port)
                healthy = view.healthy.get(name, frozenset())
                published = view.weights.get(service.name)
                backends = tuple(backend_state(b, port, healthy, view.macs,
                                               published.backends.get(b.address) if published else None)
                                 for b in service.backends)
                state = ServiceState(name, vip, port, service.proto, service.need, backends,
                                     usable=sum(1 for b in backends if b.usable))
                states.append(state)
                if not state.up and prefix not in withheld:
                    withheld[prefix] = (f"{name}: {state.usable} of need {state.need} "
                                        "backends usable (healthy, weight > 0, MAC known)")
            routes.setdefault(prefix, service.route)
    if not view.ready:
        return Desired(tuple(states), {}, {prefix: NOT_READY for prefix in routes})
    return Desired(tuple(states), {p: a for p, a in routes.items() if p not in withheld}, withheld)


# -- the same, one question at a time ------------------------------------------------------------

def dataplane_services(view: View) -> list[ServiceSpec]:
    return decide(view).dataplane_services()


def announcements(view: View) -> dict[Prefix, RouteAttrs]:
    return dict(decide(view).routes)


def digest(view: View) -> bytes:
    return decide(view).digest()
