"""Through-VIP steering plan and the ip commands it turns into (pure)."""
from __future__ import annotations

from ipaddress import ip_address

import pytest

from healthcheck.vipnet import SteeringEntry, add_commands, by_family, plan, remove_commands

pytestmark = pytest.mark.unit

V1, V2 = ip_address("192.0.2.10"), ip_address("192.0.2.20")
B1, B2 = ip_address("10.0.0.11"), ip_address("10.0.0.12")


def test_one_mark_and_table_per_backend_with_all_its_vips() -> None:
    entries = plan([(V1, B2), (V1, B1), (V2, B1), (V1, B1)], {B1: "eth0", B2: "eth1"}, mark_base=0x100, table_base=500)
    assert entries == (SteeringEntry(B1, (V1, V2), "eth0", 0x100, 500), SteeringEntry(B2, (V1,), "eth1", 0x101, 501))
    assert add_commands(entries, 9000) == [
        "route replace 192.0.2.10/32 via 10.0.0.11 dev eth0 onlink table 500",
        "route replace 192.0.2.20/32 via 10.0.0.11 dev eth0 onlink table 500",
        "rule add fwmark 0x100 lookup 500 pref 9000",
        "route replace 192.0.2.10/32 via 10.0.0.12 dev eth1 onlink table 501",
        "rule add fwmark 0x101 lookup 501 pref 9000",
    ]
    assert remove_commands(entries, 9000) == [
        "rule del fwmark 0x100 lookup 500 pref 9000", "route flush table 500",
        "rule del fwmark 0x101 lookup 501 pref 9000", "route flush table 501",
    ]


def test_ipv6_uses_host_routes() -> None:
    v, b = ip_address("2001:db8::10"), ip_address("2001:db8:1::11")
    (entry,) = plan([(v, b)], {b: "eth0"}, mark_base=1, table_base=2)
    assert add_commands([entry], 7)[0] == "route replace 2001:db8::10/128 via 2001:db8:1::11 dev eth0 onlink table 2"


def test_by_family_groups_v4_then_v6_and_skips_empty_ones() -> None:
    v6, b6 = ip_address("2001:db8::10"), ip_address("2001:db8:1::11")
    entries = plan([(V1, B1), (v6, b6), (V2, B2)], {B1: "eth0", B2: "eth0", b6: "eth1"})
    assert by_family(entries) == [(4, list(entries[:2])), (6, [entries[2]])]
    assert by_family(entries[:1]) == [(4, [entries[0]])]
    assert by_family(()) == []
