"""Through-VIP steering plan, the ip commands it turns into, and the repair decisions (pure)."""
from __future__ import annotations

from ipaddress import ip_address

import pytest

from healthcheck.vipnet import (
    ROUTE_PROTO,
    SteeringEntry,
    backend_device,
    by_family,
    missing_routes,
    missing_rules,
    plan,
    remove_commands,
    route_commands,
    rule_commands,
    table_commands,
)

pytestmark = pytest.mark.unit

V1, V2 = ip_address("192.0.2.10"), ip_address("192.0.2.20")
B1, B2 = ip_address("10.0.0.11"), ip_address("10.0.0.12")


def test_one_mark_and_table_per_backend_with_all_its_vips() -> None:
    entries = plan([(V1, B2), (V1, B1), (V2, B1), (V1, B1)], mark_base=0x100, table_base=500)
    assert entries == (SteeringEntry(B1, (V1, V2), 0x100, 500), SteeringEntry(B2, (V1,), 0x101, 501))
    assert table_commands(entries) + rule_commands(entries, 9000) == [
        f"route replace unreachable default proto {ROUTE_PROTO} table 500",
        f"route replace unreachable default proto {ROUTE_PROTO} table 501",
        "rule add fwmark 0x100 lookup 500 pref 9000",
        "rule add fwmark 0x101 lookup 501 pref 9000",
    ]
    assert route_commands(entries, {B1: "eth0", B2: "eth1"}) == [
        f"route replace 192.0.2.10/32 via 10.0.0.11 dev eth0 onlink proto {ROUTE_PROTO} table 500",
        f"route replace 192.0.2.20/32 via 10.0.0.11 dev eth0 onlink proto {ROUTE_PROTO} table 500",
        f"route replace 192.0.2.10/32 via 10.0.0.12 dev eth1 onlink proto {ROUTE_PROTO} table 501",
    ]
    assert remove_commands(entries, 9000) == [
        "rule del fwmark 0x100 lookup 500 pref 9000", "route flush table 500",
        "rule del fwmark 0x101 lookup 501 pref 9000", "route flush table 501",
    ]


def test_a_backend_without_a_device_gets_no_route_but_keeps_its_table() -> None:
    entries = plan([(V1, B1), (V1, B2)], mark_base=1, table_base=2)
    assert route_commands(entries, {B2: "eth0"}) == [
        f"route replace 192.0.2.10/32 via 10.0.0.12 dev eth0 onlink proto {ROUTE_PROTO} table 3"]


def test_ipv6_uses_host_routes() -> None:
    v, b = ip_address("2001:db8::10"), ip_address("2001:db8:1::11")
    (entry,) = plan([(v, b)], mark_base=1, table_base=2)
    assert route_commands([entry], {b: "eth0"}) == [
        f"route replace 2001:db8::10/128 via 2001:db8:1::11 dev eth0 onlink proto {ROUTE_PROTO} table 2"]


def test_by_family_groups_v4_then_v6_and_skips_empty_ones() -> None:
    v6, b6 = ip_address("2001:db8::10"), ip_address("2001:db8:1::11")
    entries = plan([(V1, B1), (v6, b6), (V2, B2)])
    assert by_family(entries) == [(4, list(entries[:2])), (6, [entries[2]])]
    assert by_family(entries[:1]) == [(4, [entries[0]])]
    assert by_family(()) == []


@pytest.mark.parametrize(("route", "dev", "why"), [
    ({"dst": "10.0.0.11", "dev": "eth0", "prefsrc": "10.0.0.1"}, "eth0", None),
    (None, None, "no route to backend 10.0.0.11"),
    ({"dst": "10.0.0.11", "gateway": "10.0.0.254", "dev": "eth0"}, None, "is not on a directly connected network"),
    ({"dst": "10.0.0.11", "type": "unreachable"}, None, "is not on a directly connected network"),
])
def test_backend_device_needs_a_direct_route(route: dict[str, str] | None, dev: str | None, why: str | None) -> None:
    got_dev, got_why = backend_device(B1, route)
    assert got_dev == dev
    assert (got_why is None) if why is None else (got_why is not None and why in got_why)


# What `ip -j route show table all proto 76` prints: routes of admin-downed links are gone.
INSTALLED = [
    {"type": "unreachable", "dst": "default", "table": "500", "flags": []},
    {"dst": "192.0.2.10", "gateway": "10.0.0.11", "dev": "eth0", "table": "500", "flags": ["onlink"]},
    {"dst": "192.0.2.20", "gateway": "10.0.0.11", "dev": "eth0", "table": "500", "flags": ["onlink"]},
    {"type": "unreachable", "dst": "default", "table": "501", "flags": []},
]


def test_missing_routes_finds_what_a_link_down_flushed() -> None:
    entries = plan([(V1, B1), (V2, B1), (V1, B2)], mark_base=0x100, table_base=500)
    devs = {B1: "eth0", B2: "eth0"}
    assert missing_routes(entries, devs, INSTALLED) == [entries[1]]  # B2's VIP route is gone
    assert missing_routes(entries, {B1: "eth0"}, INSTALLED) == []  # B2 unroutable: only its default is wanted
    assert missing_routes(entries, {B1: "eth1", B2: "eth0"}, INSTALLED) == list(entries)  # B1 moved device
    assert missing_routes(entries, devs, []) == list(entries)


def test_missing_rules_compares_marks_and_tables() -> None:
    entries = plan([(V1, B1), (V1, B2)], mark_base=0x100, table_base=500)
    installed = [{"priority": 9000, "src": "all", "fwmark": "0x100", "table": "500"}]
    assert missing_rules(entries, installed) == [entries[1]]
    assert missing_rules(entries, installed + [{"priority": 9000, "fwmark": "0x101", "table": "501"}]) == []
