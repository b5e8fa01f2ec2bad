"""The node's pure decisions: what the data plane serves and which VIPs are announced."""
from __future__ import annotations

import ipaddress

import pytest

from cluster.config import load_text
from cluster.desired import View, announcements, backend_key, dataplane_services, decide, digest
from cluster.status_doc import StatusInputs
from cluster.status_doc import services as status_rows

pytestmark = pytest.mark.unit

ip = ipaddress.ip_address
CONFIG = load_text("""
services:
  - name: web
    vips: [192.0.2.10]
    ports: [80, 443]
    need: 2
    route: {med: 10}
    backends: [{address: 10.0.0.11}, {address: 10.0.0.12, weight: 3}, {address: 10.0.0.13}]
  - name: dns
    vips: [192.0.2.20]
    ports: [53]
    protocol: udp
    checks: [{kind: tcp}]
    backends: [{address: 10.0.0.21}]
""", ip("10.0.0.5"))
MACS = {ip(f"10.0.0.{n}"): f"02:00:00:00:00:{n:02x}" for n in (11, 12, 13, 21)}
ALL_UP = {
    "web/192.0.2.10:80": frozenset({"10.0.0.11:80", "10.0.0.12:80", "10.0.0.13:80"}),
    "web/192.0.2.10:443": frozenset({"10.0.0.11:443", "10.0.0.12:443"}),
    "dns/192.0.2.20:53": frozenset({"10.0.0.21:53"}),
}


def test_every_vip_port_is_a_dataplane_service_with_usable_backends_in_the_hash() -> None:
    specs = {(str(s.vip), s.port, s.proto): s for s in dataplane_services(View(CONFIG, ALL_UP, MACS, True))}
    assert set(specs) == {("192.0.2.10", 80, 6), ("192.0.2.10", 443, 6), ("192.0.2.20", 53, 17)}
    https = {str(b.address): (b.in_hash, b.weight, b.mac) for b in specs[("192.0.2.10", 443, 6)].backends}
    assert https == {"10.0.0.11": (True, 1, "02:00:00:00:00:0b"), "10.0.0.12": (True, 3, "02:00:00:00:00:0c"),
                     "10.0.0.13": (False, 1, "02:00:00:00:00:0d")}


def test_backend_without_mac_is_not_usable() -> None:
    macs = {k: v for k, v in MACS.items() if str(k) != "10.0.0.11"}
    spec = dataplane_services(View(CONFIG, ALL_UP, macs, True))[0]
    b11 = next(b for b in spec.backends if str(b.address) == "10.0.0.11")
    assert not b11.usable and b11.hash_weight == 0


def test_vip_announced_only_when_ready_and_every_port_is_up() -> None:
    assert announcements(View(CONFIG, ALL_UP, MACS, ready=False)) == {}
    routes = announcements(View(CONFIG, ALL_UP, MACS, ready=True))
    assert {str(p): a.med for p, a in routes.items()} == {"192.0.2.10/32": 10, "192.0.2.20/32": None}
    # need 2 on web: one port with a single usable backend blocks the whole VIP.
    one_port_short = {**ALL_UP, "web/192.0.2.10:443": frozenset({"10.0.0.11:443"})}
    assert [str(p) for p in announcements(View(CONFIG, one_port_short, MACS, True))] == ["192.0.2.20/32"]


def test_healthy_backends_count_only_once_their_mac_is_known() -> None:
    """A VIP announced before the MACs are learned would draw traffic the node must drop."""
    assert announcements(View(CONFIG, ALL_UP, {}, True)) == {}
    dns_only = {ip("10.0.0.21"): MACS[ip("10.0.0.21")]}
    assert [str(p) for p in announcements(View(CONFIG, ALL_UP, dns_only, True))] == ["192.0.2.20/32"]


def test_digest_changes_with_health_and_weights_not_with_order() -> None:
    base = digest(View(CONFIG, ALL_UP, MACS, True))
    assert base == digest(View(CONFIG, dict(reversed(list(ALL_UP.items()))), MACS, False))
    fewer = {**ALL_UP, "dns/192.0.2.20:53": frozenset()}
    assert digest(View(CONFIG, fewer, MACS, True)) != base


def test_backend_key_matches_the_health_checker() -> None:
    from healthcheck.config import BackendConfig

    for address in (ip("10.0.0.1"), ip("2001:db8::1")):
        assert backend_key(address, 80) == BackendConfig(address, 80).key


def test_a_weight_0_backend_is_not_usable_and_status_agrees_with_bgp() -> None:
    """Healthy with its MAC known but weight 0: no new flows, so it does not count towards need.
    The status rows read the same decision BGP follows: down, 0 usable, VIP withheld."""
    config = load_text("""
services:
  - name: api
    vips: [192.0.2.30]
    ports: [80]
    backends: [{address: 10.0.0.31, weight: 0}]
""", ip("10.0.0.5"))
    desired = decide(View(config, {"api/192.0.2.30:80": frozenset({"10.0.0.31:80"})},
                          {ip("10.0.0.31"): "02:00:00:00:00:1f"},
                          ready=True))
    (state,) = desired.services
    assert (state.usable, state.up, state.backends[0].passing, state.backends[0].usable) == (0, False, True, False)
    assert desired.routes == {} and list(desired.withheld.values()) == [
        "api/192.0.2.30:80: 0 of need 1 backends usable (healthy, weight > 0, MAC known)"]
    (row,) = status_rows(StatusInputs(desired, (), {}, {}, {}, None, None), None)
    assert (row["up"], row["usable"], row["need"]) == (False, 0, 1)
    assert [(b["backend"], b["usable"], b["in_hash"]) for b in row["backends"]] == [("10.0.0.31:80", True, False)]
