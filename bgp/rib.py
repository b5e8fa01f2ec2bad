"""Desired-state routes and the per-peer Adj-RIB-Out that turns changes into UPDATEs. No I/O.

Theory of operation
-------------------
The node says what it wants advertised: `DesiredRib.announce(prefix, attrs)` / `withdraw(prefix)`.
For each Established peer an `AdjRibOut` remembers what was last sent; `AdjRibOut.sync(desired,
policy)` exports every desired route through the peer's `ExportPolicy` (RFC 4271 §5: ORIGIN IGP,
AS_PATH empty for iBGP / our AS for eBGP, NEXT_HOP self, LOCAL_PREF only on iBGP, MED,
communities) and returns only the UPDATEs for what differs. A new session starts with an empty
AdjRibOut, so everything is re-sent, followed by End-of-RIB (RFC 4724 §2). IPv6 goes in
MP_REACH/MP_UNREACH (RFC 4760). While draining (RFC 8326) every route also carries
GRACEFUL_SHUTDOWN (65535:0).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import TypeVar

from bgp.attrs import (
    AFI_IPV6,
    AS_SEQUENCE,
    GRACEFUL_SHUTDOWN,
    IPV4_UNICAST,
    IPV6_UNICAST,
    ORIGIN_IGP,
    SAFI_UNICAST,
    AsPathSegment,
    MpReach,
    MpUnreach,
    PathAttributes,
    Prefix,
)
from bgp.codec import Update

DEFAULT_LOCAL_PREF = 100
# Prefixes per UPDATE, small enough that any message stays below 4096 bytes.
MAX_PREFIXES_PER_UPDATE = 120


@dataclass(frozen=True, slots=True)
class RouteAttrs:
    """Optional attributes of a route: per VIP, or per peer (the VIP's win where both are set)."""

    med: int | None = None
    local_pref: int | None = None
    communities: tuple[int, ...] = ()
    large_communities: tuple[tuple[int, int, int], ...] = ()


@dataclass(frozen=True, slots=True)
class ExportPolicy:
    """How routes look to one peer."""

    local_as: int
    ibgp: bool
    next_hop_v4: IPv4Address | None
    next_hop_v6: IPv6Address | None
    families: frozenset[tuple[int, int]]
    peer_attrs: RouteAttrs = RouteAttrs()
    graceful_shutdown: bool = False
    next_hop_v6_link_local: IPv6Address | None = None


def family_of(prefix: Prefix) -> tuple[int, int]:
    return IPV4_UNICAST if isinstance(prefix, IPv4Network) else IPV6_UNICAST


def export(prefix: Prefix, attrs: RouteAttrs, policy: ExportPolicy) -> PathAttributes | None:
    """The path attributes of `prefix` for this peer; None if it cannot be sent there."""
    fam = family_of(prefix)
    if fam not in policy.families:
        return None
    if (policy.next_hop_v4 if fam == IPV4_UNICAST else policy.next_hop_v6) is None:
        return None
    peer = policy.peer_attrs
    communities = set(peer.communities) | set(attrs.communities)
    if policy.graceful_shutdown:
        communities.add(GRACEFUL_SHUTDOWN)
    local_pref = None
    if policy.ibgp:
        local_pref = next((v for v in (attrs.local_pref, peer.local_pref) if v is not None), DEFAULT_LOCAL_PREF)
    return PathAttributes(
        origin=ORIGIN_IGP,
        as_path=() if policy.ibgp else (AsPathSegment(AS_SEQUENCE, (policy.local_as,)),),
        next_hop=policy.next_hop_v4 if fam == IPV4_UNICAST else None,
        med=attrs.med if attrs.med is not None else peer.med,
        local_pref=local_pref,
        communities=tuple(sorted(communities)),
        large_communities=tuple(sorted(set(peer.large_communities) | set(attrs.large_communities))),
    )


@dataclass
class DesiredRib:
    """What the node wants advertised. Mutated by the node; read by every peer's AdjRibOut."""

    routes: dict[Prefix, RouteAttrs] = field(default_factory=dict)

    def announce(self, prefix: Prefix, attrs: RouteAttrs = RouteAttrs()) -> None:
        self.routes[prefix] = attrs

    def withdraw(self, prefix: Prefix) -> None:
        self.routes.pop(prefix, None)


_P = TypeVar("_P", IPv4Network, IPv6Network)


def _chunks(items: list[_P]) -> Iterable[tuple[_P, ...]]:
    for i in range(0, len(items), MAX_PREFIXES_PER_UPDATE):
        yield tuple(items[i: i + MAX_PREFIXES_PER_UPDATE])


@dataclass
class AdjRibOut:
    """What one peer was last sent, during one session."""

    sent: dict[Prefix, PathAttributes] = field(default_factory=dict)

    def sync(self, desired: Mapping[Prefix, RouteAttrs], policy: ExportPolicy) -> list[Update]:
        """UPDATEs that bring the peer from `sent` to `desired`; records them as sent."""
        want: dict[Prefix, PathAttributes] = {}
        for prefix, attrs in desired.items():
            pa = export(prefix, attrs, policy)
            if pa is not None:
                want[prefix] = pa
        gone = sorted((p for p in self.sent if p not in want), key=_sort_key)
        changed: dict[PathAttributes, list[Prefix]] = {}
        for prefix in sorted(want, key=_sort_key):
            if self.sent.get(prefix) != want[prefix]:
                changed.setdefault(want[prefix], []).append(prefix)
        self.sent = want
        return withdraw_updates(gone) + [u for pa, ps in changed.items() for u in announce_updates(ps, pa, policy)]

    def resend(self, family: tuple[int, int], policy: ExportPolicy) -> list[Update]:
        """ROUTE-REFRESH answer: everything of `family` again, then End-of-RIB."""
        groups: dict[PathAttributes, list[Prefix]] = {}
        for prefix in sorted(self.sent, key=_sort_key):
            if family_of(prefix) == family:
                groups.setdefault(self.sent[prefix], []).append(prefix)
        return [u for pa, ps in groups.items() for u in announce_updates(ps, pa, policy)] + end_of_rib([family])


def _sort_key(p: Prefix) -> tuple[int, int, int]:
    return (p.version, int(p.network_address), p.prefixlen)


def announce_updates(prefixes: list[Prefix], pa: PathAttributes, policy: ExportPolicy) -> list[Update]:
    out = []
    v4 = [p for p in prefixes if isinstance(p, IPv4Network)]
    v6 = [p for p in prefixes if isinstance(p, IPv6Network)]
    for chunk4 in _chunks(v4):
        out.append(Update(attributes=pa, nlri=chunk4))
    for chunk6 in _chunks(v6):
        assert policy.next_hop_v6 is not None
        hops = (policy.next_hop_v6,) + ((policy.next_hop_v6_link_local,) if policy.next_hop_v6_link_local else ())
        mp = MpReach(AFI_IPV6, SAFI_UNICAST, hops, chunk6)
        out.append(Update(attributes=PathAttributes(
            origin=pa.origin, as_path=pa.as_path, med=pa.med, local_pref=pa.local_pref, communities=pa.communities,
            large_communities=pa.large_communities, mp_reach=mp)))
    return out


def withdraw_updates(prefixes: list[Prefix]) -> list[Update]:
    out = []
    v4 = [p for p in prefixes if isinstance(p, IPv4Network)]
    v6 = [p for p in prefixes if isinstance(p, IPv6Network)]
    for chunk4 in _chunks(v4):
        out.append(Update(withdrawn=chunk4))
    for chunk6 in _chunks(v6):
        out.append(Update(attributes=PathAttributes(mp_unreach=MpUnreach(AFI_IPV6, SAFI_UNICAST, chunk6))))
    return out


def end_of_rib(families: Iterable[tuple[int, int]]) -> list[Update]:
    """RFC 4724 §2: an empty UPDATE for IPv4 unicast, an empty MP_UNREACH for the others."""
    out = []
    for afi, safi in sorted(families):
        if (afi, safi) == IPV4_UNICAST:
            out.append(Update())
        else:
            out.append(Update(attributes=PathAttributes(mp_unreach=MpUnreach(afi, safi, ()))))
    return out
