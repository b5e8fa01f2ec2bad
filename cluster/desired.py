"""What the node should serve and announce, derived from what it knows. No I/O.

Theory of operation. The node's `View` is its config, the health of every backend per
(VIP, port), the backends' MACs and whether the node is ready (flows resynced, not draining).
From it follow three things, recomputed after any change:
- `dataplane_services`: the XDP program's services; a backend is in the hash only while usable
  (healthy, not drained) with a known MAC. One missing from the config loses its pinned flows;
  one merely out of the hash keeps them.
- `announcements`: a VIP is announced only while the node is ready and *every* service port on
  that VIP has at least `need` backends the data plane can use: healthy, not drained, weight
  above 0 and with a known MAC (a healthy backend whose MAC is not learned yet cannot take
  traffic). All nodes send the same attributes, so the router's ECMP (BIRD `merge paths on`)
  merges their routes.
- `digest`: a hash of the service/backend/health view that peers compare in their heartbeats.
"""
from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

from bgp.rib import RouteAttrs
from bpf.dataplane import BackendSpec, ServiceSpec
from cluster.config import IPAddress, NodeConfig
from healthcheck.config import BackendId

Prefix = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class View:
    config: NodeConfig
    usable: Mapping[str, frozenset[str]] = field(default_factory=dict)  # health name -> usable backend keys
    macs: Mapping[IPAddress, str] = field(default_factory=dict)
    ready: bool = False


def backend_key(address: IPAddress, port: int) -> BackendId:
    """The health checker's backend identity (healthcheck.config.BackendConfig.key)."""
    return BackendId(address, port)


def dataplane_services(view: View) -> list[ServiceSpec]:
    specs = []
    for service in view.config.services:
        for vip in service.vips:
            for port in service.ports:
                usable = view.usable.get(service.health_name(vip, port), frozenset())
                members = tuple(
                    BackendSpec(b.address, view.macs.get(b.address), weight=b.weight,
                                in_hash=backend_key(b.address, port) in usable)
                    for b in service.backends)
                specs.append(ServiceSpec(vip, port, service.proto, members))
    return specs


def announcements(view: View) -> dict[Prefix, RouteAttrs]:
    return plan_announcements(view)[0]


def plan_announcements(view: View) -> tuple[dict[Prefix, RouteAttrs], dict[Prefix, str]]:
    """The routes to announce, and why each VIP that is not announced is withheld."""
    routes: dict[Prefix, RouteAttrs] = {}
    withheld: dict[Prefix, str] = {}
    specs = {(spec.vip, spec.port, spec.proto): spec for spec in dataplane_services(view)}
    for service in view.config.services:
        for vip in service.vips:
            prefix = ipaddress.ip_network(vip)
            for port in service.ports:
                serving = sum(1 for b in specs[(vip, port, service.proto)].backends if b.hash_weight > 0)
                if serving < service.need and prefix not in withheld:
                    withheld[prefix] = (f"{service.health_name(vip, port)}: {serving} of need {service.need} "
                                        "backends usable (healthy, weight > 0, MAC known)")
            routes.setdefault(prefix, service.route)
    if not view.ready:
        return {}, {prefix: "node not ready" for prefix in routes}
    return {p: a for p, a in routes.items() if p not in withheld}, withheld


def digest(view: View) -> bytes:
    """16 bytes that two nodes with the same services, backends, weights and health share."""
    h = hashlib.blake2b(digest_size=16)
    for spec in sorted(dataplane_services(view), key=lambda s: (s.vip.packed, s.port, s.proto)):
        h.update(f"{spec.vip}|{spec.port}|{spec.proto}".encode())
        for b in sorted(spec.backends, key=lambda b: b.address.packed):
            h.update(f"|{b.address},{b.weight},{int(b.in_hash)}".encode())
        h.update(b";")
    return h.digest()
