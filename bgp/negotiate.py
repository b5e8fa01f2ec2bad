"""What we say in our OPEN and what both OPENs agree on (RFC 4271 §4.2, §6.2; RFC 6793). No I/O.

`FsmConfig` is a session's configuration and builds our OPEN: multiprotocol (RFC 4760), route
refresh (RFC 2918) and 4-octet AS (RFC 6793, AS_TRANS in My AS above 65535). `negotiate` checks
the peer's OPEN against it, raising `DecodeError` with the NOTIFICATION to send, and returns what
the session runs with: the smaller hold time (keepalive a third of it), the common families.
"""
from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address

from bgp.attrs import AS_TRANS, IPV4_UNICAST, IPV6_UNICAST
from bgp.codec import Capability, FourOctetAsCap, MultiprotocolCap, Open, RouteRefreshCap
from bgp.errors import DecodeError


@dataclass(frozen=True, slots=True)
class FsmConfig:
    local_as: int
    peer_as: int
    router_id: IPv4Address
    hold_time_s: int = 90
    passive: bool = False  # wait for the peer to connect; never connect out
    connect_retry_s: float = 5.0  # first ConnectRetry/IdleHold interval; doubles on each failure
    connect_retry_max_s: float = 120.0
    families: frozenset[tuple[int, int]] = frozenset({IPV4_UNICAST, IPV6_UNICAST})

    def open_message(self) -> Open:
        caps: list[Capability] = [MultiprotocolCap(afi, safi) for afi, safi in sorted(self.families)]
        caps += [RouteRefreshCap(), FourOctetAsCap(self.local_as)]
        my_as = self.local_as if self.local_as <= 0xFFFF else AS_TRANS
        return Open(my_as, self.hold_time_s, self.router_id, tuple(caps))


@dataclass(frozen=True, slots=True)
class Negotiated:
    """What both OPENs agreed on."""

    hold_time_s: int
    keepalive_s: float
    four_octet_as: bool
    route_refresh: bool
    families: frozenset[tuple[int, int]]
    peer_id: IPv4Address
    ibgp: bool


def negotiate(cfg: FsmConfig, peer: Open) -> Negotiated:
    """Check the peer's OPEN against the configuration (RFC 4271 §6.2, RFC 6793 §4.1)."""
    if peer.asn != cfg.peer_as:
        raise DecodeError(2, 2, b"", f"peer AS {peer.asn}, expected {cfg.peer_as}")
    if peer.four_octet_as and peer.my_as != peer.asn and not (peer.asn > 0xFFFF and peer.my_as == AS_TRANS):
        raise DecodeError(2, 2, b"", f"My AS {peer.my_as} contradicts 4-octet AS {peer.asn}")
    ibgp = cfg.peer_as == cfg.local_as
    if ibgp and peer.bgp_id == cfg.router_id:
        raise DecodeError(2, 3, b"", f"peer uses our BGP identifier {peer.bgp_id}")
    hold = min(cfg.hold_time_s, peer.hold_time_s)
    return Negotiated(
        hold_time_s=hold, keepalive_s=hold / 3, four_octet_as=peer.four_octet_as,
        route_refresh=peer.route_refresh, families=cfg.families & peer.families,
        peer_id=peer.bgp_id, ibgp=ibgp)

