"""Runtime admin state (cluster.admin) and what decide() makes of it: a drained backend is exactly a
config-disabled one; a disabled VIP is withdrawn at once and takes no new flows after its grace;
the state file round-trips and a bad one is refused with the entry named."""
from __future__ import annotations

import ipaddress
import json
import re
from pathlib import Path

import pytest

from cluster import adminctl
from cluster.admin import STOPPED, WITHDRAWN, AdminError, AdminState, Mark
from cluster.config import load_text
from cluster.desired import NOT_READY, View, decide
from cluster.status_doc import StatusInputs
from cluster.status_doc import services as status_rows

pytestmark = pytest.mark.unit

ip = ipaddress.ip_address
CONFIG_TEXT = """
services:
  - name: web
    vips: [192.0.2.10]
    ports: [80, 443]
    backends: [{address: 10.0.0.11}, {address: 10.0.0.12, weight: 3}, {address: 10.0.0.13}]
  - name: api
    vips: [192.0.2.30]
    ports: [8080]
    backends: [{address: 10.0.0.11}, {address: 10.0.0.31}]
"""
CONFIG = load_text(CONFIG_TEXT, ip("10.0.0.5"))
MACS = {ip(f"10.0.0.{n}"): f"02:00:00:00:00:{n:02x}" for n in (11, 12, 13, 31)}
ALL_UP = {
    "web/192.0.2.10:80": frozenset({"10.0.0.11:80", "10.0.0.12:80", "10.0.0.13:80"}),
    "web/192.0.2.10:443": frozenset({"10.0.0.11:443", "10.0.0.12:443", "10.0.0.13:443"}),
    "api/192.0.2.30:8080": frozenset({"10.0.0.11:8080", "10.0.0.31:8080"}),
}
ALICE = Mark("alice (uid 0, pid 42)", "2026-12-01T20:00:00Z")
BOB = Mark("bob (uid 0, pid 43)", "2026-12-01T20:05:00Z")
B11, VIP, API_VIP = ip("10.0.0.11"), ip("192.0.2.10"), ip("192.0.2.30")


def in_hash(view: View) -> dict[str, list[str]]:
    return {f"{s.vip}:{s.port}": [str(b.address) for b in s.backends if b.in_hash]
            for s in decide(view).dataplane_services()}


# ---- the commands ------------------------------------------------------------------------------------

def test_drain_without_a_service_drains_the_backend_everywhere_it_is_listed() -> None:
    state, changed = AdminState().drain(CONFIG, B11, None, ALICE)
    assert changed == ["web 10.0.0.11", "api 10.0.0.11"]
    assert state.drain_mark("web", B11) == ALICE and state.drain_mark("api", B11) == ALICE
    again, changed = state.drain(CONFIG, B11, "web", BOB)
    assert changed == [] and again.drain_mark("web", B11) == ALICE  # the first who/when stays


def test_drain_in_one_service_and_undrain() -> None:
    state, changed = AdminState().drain(CONFIG, B11, "api", ALICE)
    assert changed == ["api 10.0.0.11"] and state.drain_mark("web", B11) is None
    state, _ = state.drain(CONFIG, B11, "web", BOB)
    state, changed = state.undrain(CONFIG, B11, "web")
    assert changed == ["web 10.0.0.11"] and list(state.drained) == [("api", B11)]
    state, changed = state.undrain(CONFIG, B11, None)
    assert changed == ["api 10.0.0.11"] and not state.drained
    assert state.undrain(CONFIG, B11, None)[1] == []  # known, not drained: nothing to do


@pytest.mark.parametrize(("call", "error"), [
    (lambda s: s.drain(CONFIG, ip("10.0.0.99"), None, ALICE), "10.0.0.99 is not a backend of any service"),
    (lambda s: s.drain(CONFIG, ip("10.0.0.31"), "web", ALICE), "10.0.0.31 is not a backend of 'web'"),
    (lambda s: s.drain(CONFIG, B11, "www", ALICE), "no service 'www' in the config (services: web, api)"),
    (lambda s: s.undrain(CONFIG, ip("10.0.0.99"), None), "10.0.0.99 is not a backend of any service"),
    (lambda s: s.disable(CONFIG, ip("192.0.2.99"), ALICE, 1.0),
     "192.0.2.99 is not a VIP of this node's config (VIPs: 192.0.2.10, 192.0.2.30)"),
    (lambda s: s.enable(CONFIG, ip("192.0.2.99")), "192.0.2.99 is not a VIP of this node's config and not disabled"),
])
def test_commands_that_name_nothing_are_refused(call: object, error: str) -> None:
    with pytest.raises(AdminError, match=f"^{re.escape(error)}$"):
        call(AdminState())  # type: ignore[operator]


def test_a_disabled_vip_is_withdrawn_then_stopped_at_its_deadline() -> None:
    state, changed = AdminState().disable(CONFIG, VIP, ALICE, stop_new_at=102.0)
    assert changed == ["192.0.2.10"] and state.vip_mark(VIP).phase == WITHDRAWN  # type: ignore[union-attr]
    assert state.next_deadline() == 102.0
    assert state.disable(CONFIG, VIP, BOB, 500.0) == (state, [])  # already disabled: unchanged
    assert state.advance(101.9) == (state, [])
    stopped, due = state.advance(102.0)
    assert due == [VIP] and stopped.vip_mark(VIP).phase == STOPPED and stopped.next_deadline() is None  # type: ignore[union-attr]
    enabled, changed = stopped.enable(CONFIG, VIP)
    assert changed == ["192.0.2.10"] and enabled == AdminState()
    assert enabled.enable(CONFIG, VIP) == (enabled, [])


# ---- what decide() makes of it ---------------------------------------------------------------------------

def test_a_drained_backend_is_exactly_a_config_disabled_one() -> None:
    """Runtime drain reuses the config's `disabled: true`: the checker leaves a disabled backend out
    of its healthy set; a drained one is left out by decide(). The data plane and digest agree."""
    disabled = load_text(CONFIG_TEXT.replace("{address: 10.0.0.11}", "{address: 10.0.0.11, disabled: true}"),
                         ip("10.0.0.5"))
    checker_view = {name: frozenset(k for k in keys if not k.startswith("10.0.0.11:")) for name, keys in ALL_UP.items()}
    by_config = decide(View(disabled, checker_view, MACS, True))
    drained, _ = AdminState().drain(CONFIG, B11, None, ALICE)
    by_command = decide(View(CONFIG, ALL_UP, MACS, True, drained))
    assert by_command.dataplane_services() == by_config.dataplane_services()
    assert by_command.digest() == by_config.digest()
    assert by_command.routes == by_config.routes
    spec = by_command.dataplane_services()[0]
    b11 = next(b for b in spec.backends if b.address == B11)
    assert not b11.in_hash and b11.mac == MACS[B11]  # still in the service: its pinned flows go on
    assert decide(View(CONFIG, ALL_UP, MACS, True)).digest() != by_command.digest()  # peers see the difference


def test_drain_in_one_service_leaves_the_others_alone_and_counts_towards_need() -> None:
    drained, _ = AdminState().drain(CONFIG, B11, "api", ALICE)
    view = View(CONFIG, ALL_UP, MACS, True, drained)
    assert in_hash(view) == {"192.0.2.10:80": ["10.0.0.11", "10.0.0.12", "10.0.0.13"],
                             "192.0.2.10:443": ["10.0.0.11", "10.0.0.12", "10.0.0.13"],
                             "192.0.2.30:8080": ["10.0.0.31"]}
    desired = decide(view)
    api = next(s for s in desired.services if s.name == "api/192.0.2.30:8080")
    assert api.usable == 1
    rows = status_rows(StatusInputs(desired, (), {}, {}, {}, None, None), None)
    b11 = next(b for r in rows if r["name"] == "api/192.0.2.30:8080"
               for b in r["backends"] if b["backend"] == "10.0.0.11:8080")
    assert (b11["admin"], b11["admin_by"], b11["admin_at"], b11["disabled"], b11["usable"], b11["in_hash"]) == (
        "drained", ALICE.by, ALICE.at, True, False, False)
    # Both drained: api has no usable backend and its VIP is withheld, like any service below need.
    both, _ = drained.drain(CONFIG, ip("10.0.0.31"), "api", ALICE)
    assert ipaddress.ip_network("192.0.2.30/32") in decide(View(CONFIG, ALL_UP, MACS, True, both)).withheld


def test_a_disabled_vip_is_withheld_at_once_and_stops_new_flows_after_its_grace() -> None:
    withdrawn, _ = AdminState().disable(CONFIG, VIP, ALICE, stop_new_at=2.0)
    prefix = ipaddress.ip_network("192.0.2.10/32")
    everyone = {"192.0.2.10:80": ["10.0.0.11", "10.0.0.12", "10.0.0.13"],
                "192.0.2.10:443": ["10.0.0.11", "10.0.0.12", "10.0.0.13"],
                "192.0.2.30:8080": ["10.0.0.11", "10.0.0.31"]}
    view = View(CONFIG, ALL_UP, MACS, True, withdrawn)
    desired = decide(view)
    assert list(map(str, desired.routes)) == ["192.0.2.30/32"]
    assert desired.withheld[prefix] == ("192.0.2.10 disabled by alice (uid 0, pid 42) at 2026-12-01T20:00:00Z "
                                        "(`lbnode enable 192.0.2.10` to announce it again)")
    assert in_hash(view) == everyone  # grace: new flows still taken while the router moves them
    stopped, _ = withdrawn.advance(2.0)
    view = View(CONFIG, ALL_UP, MACS, True, stopped)
    assert in_hash(view) == {**everyone, "192.0.2.10:80": [], "192.0.2.10:443": []}
    specs = decide(view).dataplane_services()
    assert [len(s.backends) for s in specs] == [3, 3, 2]  # backends kept: pinned flows go on
    rows = status_rows(StatusInputs(decide(view), (), {}, {}, {}, None, None), None)
    web = rows[0]
    assert (web["disabled"], web["admin"], web["admin_phase"], web["takes_new_flows"], web["up"]) == (
        True, "disabled", "stopped", False, True)
    assert not any(b["in_hash"] for b in web["backends"])
    # The digest peers compare is about services, backends and health, not this node's routes.
    assert decide(view).digest() == decide(View(CONFIG, ALL_UP, MACS, True)).digest()
    # Not ready: still says it is disabled, not "not ready".
    assert decide(View(CONFIG, ALL_UP, MACS, False, stopped)).withheld == {
        prefix: desired.withheld[prefix], ipaddress.ip_network("192.0.2.30/32"): NOT_READY}


def test_marks_outlive_a_config_without_their_backend_or_vip() -> None:
    state, _ = AdminState().drain(CONFIG, ip("10.0.0.31"), "api", ALICE)
    state, _ = state.disable(CONFIG, API_VIP, ALICE, 0.0)
    smaller = load_text(CONFIG_TEXT.split("  - name: api")[0], ip("10.0.0.5"))
    desired = decide(View(smaller, ALL_UP, MACS, True, state))  # no error, nothing of api left
    assert [s.name for s in desired.services] == ["web/192.0.2.10:80", "web/192.0.2.10:443"]
    assert decide(View(CONFIG, ALL_UP, MACS, True, state)).withheld  # back in the config: applies again
    assert state.undrain(smaller, ip("10.0.0.31"), None)[1] == ["api 10.0.0.31"]  # and can be undone
    assert state.enable(smaller, API_VIP)[1] == ["192.0.2.30"]


# ---- persistence ----------------------------------------------------------------------------------------

def test_the_state_file_round_trips_and_a_vip_read_back_is_stopped(tmp_path: Path) -> None:
    state, _ = AdminState().drain(CONFIG, B11, None, ALICE)
    state, _ = state.disable(CONFIG, VIP, BOB, stop_new_at=1e9)
    path = tmp_path / "eth0.admin.json"
    adminctl.save(str(path), state)
    assert path.stat().st_mode & 0o777 == 0o600
    assert json.loads(path.read_text()) == {
        "version": 1,
        "drained": [{"service": "api", "backend": "10.0.0.11", "by": ALICE.by, "at": ALICE.at},
                    {"service": "web", "backend": "10.0.0.11", "by": ALICE.by, "at": ALICE.at}],
        "disabled": [{"vip": "192.0.2.10", "by": BOB.by, "at": BOB.at}]}
    back = adminctl.load(str(path))
    assert back.drained == state.drained
    assert back.vip_mark(VIP).phase == STOPPED and back.next_deadline() is None  # type: ignore[union-attr]
    assert adminctl.load(str(tmp_path / "missing.json")) == AdminState()


@pytest.mark.parametrize(("content", "error"), [
    ({"version": 2}, "not an admin state file of version 1"),
    ([], "not an admin state file of version 1"),
    ({"version": 1, "drained": {}}, "drained: must be a list of objects"),
    ({"version": 1, "drained": [{"service": "web", "backend": "b1", "by": "a", "at": "t"}]},
     "drained[0].backend: not an IP address: 'b1'"),
    ({"version": 1, "disabled": [{"vip": "192.0.2.10", "by": "a"}]}, "disabled[0].at: must be a non-empty string"),
])
def test_a_bad_state_file_is_refused_naming_the_entry(content: object, error: str) -> None:
    with pytest.raises(AdminError, match=f"^{re.escape(error)}"):
        AdminState.from_json(content)


def test_a_node_with_a_bad_state_file_starts_with_nothing_and_keeps_the_file_aside(tmp_path: Path) -> None:
    path = tmp_path / "eth0.admin.json"
    path.write_text("{not json")
    assert adminctl.load(str(path)) == AdminState()
    assert not path.exists() and (tmp_path / "eth0.admin.json.bad").read_text() == "{not json"
