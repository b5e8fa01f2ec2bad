"""Desired-state RIB: export policy, diffing (only changes are sent), re-send, End-of-RIB."""
from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest

from bgp.attrs import GRACEFUL_SHUTDOWN, AsPathSegment, MpUnreach, PathAttributes
from bgp.codec import Update, encode
from bgp.rib import AdjRibOut, DesiredRib, ExportPolicy, RouteAttrs, end_of_rib, export

pytestmark = pytest.mark.unit

V4, V4B = IPv4Network("192.0.2.10/32"), IPv4Network("192.0.2.11/32")
V6 = IPv6Network("2001:db8:f::10/128")
BOTH = frozenset({(1, 1), (2, 1)})
EBGP = ExportPolicy(local_as=4200000001, ibgp=False, next_hop_v4=IPv4Address("10.0.0.1"),
                    next_hop_v6=IPv6Address("2001:db8::1"), families=BOTH)
IBGP = ExportPolicy(local_as=65000, ibgp=True, next_hop_v4=IPv4Address("10.0.0.1"), next_hop_v6=None,
                    families=BOTH, peer_attrs=RouteAttrs(med=5, communities=(65000 << 16 | 1,)))


def test_export_ebgp_and_ibgp() -> None:
    e = export(V4, RouteAttrs(med=7), EBGP)
    assert e == PathAttributes(origin=0, as_path=(AsPathSegment(2, (4200000001,)),), next_hop=IPv4Address("10.0.0.1"),
                               med=7)
    i = export(V4, RouteAttrs(local_pref=200, communities=(1,)), IBGP)
    assert i is not None and i.as_path == () and i.local_pref == 200 and i.med == 5
    assert i.communities == (1, 65000 << 16 | 1)
    assert export(V6, RouteAttrs(), IBGP) is None  # no IPv6 next hop for this peer
    assert export(V6, RouteAttrs(), replace(EBGP, families=frozenset({(1, 1)}))) is None


def test_only_changes_are_sent() -> None:
    rib, out = DesiredRib(), AdjRibOut()
    rib.announce(V4)
    rib.announce(V4B)
    rib.announce(V6)
    first = out.sync(rib.routes, EBGP)
    assert [u.nlri for u in first if u.nlri] == [(V4, V4B)]  # same attributes: one UPDATE
    assert [u.attributes.mp_reach.nlri for u in first if u.attributes.mp_reach] == [(V6,)]
    assert out.sync(rib.routes, EBGP) == []  # nothing changed, nothing sent
    rib.announce(V4B, RouteAttrs(med=1))
    changed = out.sync(rib.routes, EBGP)
    assert len(changed) == 1 and changed[0].nlri == (V4B,) and changed[0].attributes.med == 1
    rib.withdraw(V4)
    rib.withdraw(V6)
    gone = out.sync(rib.routes, EBGP)
    assert gone == [Update(withdrawn=(V4,)),
                    Update(attributes=PathAttributes(mp_unreach=MpUnreach(2, 1, (V6,))))]
    drained = out.sync(rib.routes, replace(EBGP, graceful_shutdown=True))
    assert len(drained) == 1 and GRACEFUL_SHUTDOWN in drained[0].attributes.communities


def test_new_session_resends_everything_and_end_of_rib() -> None:
    rib = DesiredRib()
    for i in range(300):
        rib.announce(IPv4Network(f"198.51.{i // 256}.{i % 256}/32"))
    updates = AdjRibOut().sync(rib.routes, EBGP)
    assert sum(len(u.nlri) for u in updates) == 300
    assert all(len(encode(u)) <= 4096 for u in updates)
    assert end_of_rib(BOTH) == [Update(), Update(attributes=PathAttributes(mp_unreach=MpUnreach(2, 1, ())))]


def test_route_refresh_resend() -> None:
    rib, out = DesiredRib(), AdjRibOut()
    rib.announce(V4)
    rib.announce(V6)
    out.sync(rib.routes, EBGP)
    again = out.resend((1, 1), EBGP)
    assert [u.nlri for u in again] == [(V4,), ()] and again[-1].is_end_of_rib


def test_ipv6_next_hop_with_link_local() -> None:
    rib, out = DesiredRib(), AdjRibOut()
    rib.announce(V6)
    ll = IPv6Address("fe80::1")
    (u,) = out.sync(rib.routes, replace(EBGP, families=frozenset({(2, 1)}), next_hop_v6_link_local=ll))
    assert u.attributes.mp_reach is not None and u.attributes.mp_reach.next_hops == (EBGP.next_hop_v6, ll)
    assert encode(u)[-17 - 1 - 32:-17 - 1][-16:] == ll.packed  # 32-byte next hop: global, then link-local
