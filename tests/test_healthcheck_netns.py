"""Through-VIP checks in real namespaces: only a backend with the VIP on loopback passes.

    chk (checker, 10.77.0.1) --+
    b1  (10.77.0.11, VIP on lo, arp_ignore=1/arp_announce=2) --+-- bridge in sw
    b2  (10.77.0.12, no VIP) --+

Both backends serve HTTP on 0.0.0.0:80 inside their namespaces. The test process stays in the
root namespace; the checker creates its sockets in `chk` and installs its policy routing there.
"""
from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest
import trio

from examples.lab.netns import Lab, wait_until
from healthcheck.errors import SteeringError
from healthcheck.runner import HealthChecker
from healthcheck.state import BackendChanged, ServiceStatus
from healthcheck.vipnet import RULE_PREF, VipSteering
from tests.healthcheck_yaml import service_from_dict

pytestmark = pytest.mark.netns

VIP = "10.77.100.1"
CHECKER, B1, B2 = "10.77.0.1", "10.77.0.11", "10.77.0.12"


@dataclass
class Topology:
    lab: Lab
    chk: str
    b1: str
    b2: str


@pytest.fixture(scope="module")
def topo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    www = tmp_path_factory.mktemp("www")
    (www / "index.html").write_text("ok\n")
    with Lab(prefix="lbhc") as lab:
        sw, chk, b1, b2 = lab.netns("sw"), lab.netns("chk"), lab.netns("b1"), lab.netns("b2")
        for ns, port, addr in ((chk, "p-chk", CHECKER), (b1, "p-b1", B1), (b2, "p-b2", B2)):
            lab.veth(sw, port, ns, "eth0")
            lab.addr(ns, "eth0", f"{addr}/24")
        lab.bridge(sw, "br0", ["p-chk", "p-b1", "p-b2"])
        # b1 is a proper DSR backend: VIP on loopback, never answering ARP for it.
        lab.addr(b1, "lo", f"{VIP}/32")
        for key, value in (("arp_ignore", "1"), ("arp_announce", "2")):
            for dev in ("all", "eth0"):
                lab.ns_run(b1, "sysctl", "-q", "-w", f"net.ipv4.conf.{dev}.{key}={value}")
        for ns in (b1, b2):
            lab.spawn(ns, sys.executable, "-m", "http.server", "80", "--bind", "0.0.0.0", "--directory", str(www))
        for ns in (b1, b2):
            wait_until(lambda ns=ns: _listening(lab, ns), timeout_s=10, what=f"http server in {ns}")
        yield Topology(lab, chk, b1, b2)


def _listening(lab: Lab, ns: str) -> bool:
    return "LISTEN" in lab.ns_run(ns, "ss", "-Hltn", "sport = :80").stdout


def _service(name: str, through_vip: bool, kind: str = "http") -> dict[str, Any]:
    return {"name": name, "vip": VIP, "port": 80, "through_vip": through_vip,
            "checks": [{"kind": kind, "interval_ms": 300, "timeout_ms": 250, "rise": 1, "fall": 1}],
            "backends": [{"address": B1, "port": 80}, {"address": B2, "port": 80}]}


async def _settled(checker: HealthChecker, runs: int) -> tuple[ServiceStatus, ...]:
    """Wait until every check ran `runs` times; return the snapshot."""
    while True:
        snap = checker.snapshot()
        if all(c.runs >= runs for s in snap for b in s.backends for c in b.checks):
            return snap
        await trio.sleep(0.05)


async def test_only_the_backend_with_the_vip_passes_through_the_vip(topo: Topology) -> None:
    services = [service_from_dict(_service(n, tv, kind), f"services[{i}]")
                for i, (n, tv, kind) in enumerate([("via-vip-http", True, "http"), ("via-vip-tcp", True, "tcp"),
                                                   ("direct", False, "http")])]
    checker = HealthChecker(services, netns=topo.chk)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(checker.run)
            rules = topo.lab.ns_run(topo.chk, "ip", "rule", "show", "pref", str(RULE_PREF)).stdout
            assert rules.count("fwmark") == 2, rules
            snap = {s.service: s for s in await _settled(checker, 3)}
            nursery.cancel_scope.cancel()
    for name in ("via-vip-http", "via-vip-tcp"):
        good, bad = snap[name].backends
        assert good.usable and good.checks[0].last_ok, (name, good)
        assert not bad.usable and bad.checks[0].last_ok is False, (name, bad)
        assert bad.checks[0].last_error in ("host unreachable", "timeout after 250 ms while connecting"), bad
        assert snap[name].up
    # Connecting to the backends' own addresses cannot tell them apart: both pass.
    assert all(b.usable for b in snap["direct"].backends)
    # The policy routing is gone once the checker stops.
    assert "fwmark" not in topo.lab.ns_run(topo.chk, "ip", "rule", "show", "pref", str(RULE_PREF)).stdout
    assert topo.lab.ns_run(topo.chk, "ip", "route", "show", "table", "all", VIP).stdout.strip() == ""


async def test_vip_added_later_brings_the_backend_up(topo: Topology) -> None:
    svc = service_from_dict(_service("late", True, "tcp"), "services[0]")
    checker = HealthChecker([svc], netns=topo.chk)
    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                await nursery.start(checker.run)
                ev = await checker.events.receive()
                assert isinstance(ev, BackendChanged) and ev.backend == f"{B1}:80" and ev.usable
                await checker.events.receive()  # service up
                topo.lab.ns_run(topo.b2, "ip", "addr", "add", f"{VIP}/32", "dev", "lo")
                for key, value in (("arp_ignore", "1"), ("arp_announce", "2")):
                    topo.lab.ns_run(topo.b2, "sysctl", "-q", "-w", f"net.ipv4.conf.all.{key}={value}")
                ev = await checker.events.receive()
                assert isinstance(ev, BackendChanged) and ev.backend == f"{B2}:80" and ev.usable
                nursery.cancel_scope.cancel()
    finally:
        topo.lab.ns_run(topo.b2, "ip", "addr", "del", f"{VIP}/32", "dev", "lo", check=False)


async def test_a_local_vip_is_refused(topo: Topology) -> None:
    chk = topo.chk
    topo.lab.ns_run(chk, "ip", "addr", "add", f"{VIP}/32", "dev", "lo")
    try:
        svc = service_from_dict(_service("local-vip", True, "tcp"), "services[0]")
        with trio.fail_after(10), pytest.raises(SteeringError, match=f"VIP {VIP} is a local address"):
            await HealthChecker([svc], netns=chk).run()
    finally:
        topo.lab.ns_run(chk, "ip", "addr", "del", f"{VIP}/32", "dev", "lo", check=False)
    assert "fwmark" not in topo.lab.ns_run(chk, "ip", "rule", "show", "pref", str(RULE_PREF)).stdout


@pytest.mark.parametrize(("backend", "message"), [
    ("10.99.0.5", "backend 10.99.0.5 is not on a directly connected network"),
    ("10.200.0.1", "no route to backend 10.200.0.1"),
])
async def test_a_backend_that_cannot_be_steered_fails_its_checks_saying_why(topo: Topology, backend: str,
                                                                            message: str) -> None:
    """Not an error at start (the network may be down): the check fails, and says why."""
    chk = topo.chk
    topo.lab.ns_run(chk, "ip", "route", "replace", "10.99.0.0/24", "via", B1)
    try:
        svc = service_from_dict({**_service("bad", True, "tcp"), "backends": [{"address": backend, "port": 80}]},
                                            "services[0]")
        checker = HealthChecker([svc], netns=chk)
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(checker.run)
                (status,) = await _settled(checker, 2)
                nursery.cancel_scope.cancel()
    finally:
        topo.lab.ns_run(chk, "ip", "route", "del", "10.99.0.0/24", check=False)
    (check,) = status.backends[0].checks
    assert not status.backends[0].usable and check.last_error is not None and message in check.last_error, check
    assert "fwmark" not in topo.lab.ns_run(chk, "ip", "rule", "show", "pref", str(RULE_PREF)).stdout


async def _until_usable(checker: HealthChecker, backend: str, usable: bool) -> None:
    async for ev in checker.events:
        if isinstance(ev, BackendChanged) and ev.backend == backend and ev.usable is usable:
            return


@pytest.mark.parametrize("start_down", [False, True], ids=["flap", "start-with-link-down"])
async def test_checks_come_back_with_the_link(topo: Topology, start_down: bool) -> None:
    """`ip link set down` flushes the steering routes with the link's; they are put back when it
    returns, and a checker started while the link is down starts anyway."""
    chk = topo.chk
    svc = service_from_dict(_service(f"flap-{start_down}", True, "tcp"), "services[0]")
    checker = HealthChecker([svc], netns=chk)
    b1 = f"{B1}:80"
    try:
        if start_down:
            topo.lab.ns_run(chk, "ip", "link", "set", "eth0", "down")
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                await nursery.start(checker.run)
                if not start_down:
                    await _until_usable(checker, b1, True)
                    topo.lab.ns_run(chk, "ip", "link", "set", "eth0", "down")
                    await _until_usable(checker, b1, False)
                    assert topo.lab.ns_run(chk, "ip", "route", "show", "table", "all", VIP).stdout.strip() == ""
                else:
                    (status,) = await _settled(checker, 2)
                    error = status.backends[0].checks[0].last_error
                    assert error is not None and "no route to backend" in error, error
                topo.lab.ns_run(chk, "ip", "link", "set", "eth0", "up")
                await _until_usable(checker, b1, True)
                nursery.cancel_scope.cancel()
    finally:
        topo.lab.ns_run(chk, "ip", "link", "set", "eth0", "up")
    assert "fwmark" not in topo.lab.ns_run(chk, "ip", "rule", "show", "pref", str(RULE_PREF)).stdout


async def test_rules_left_by_a_killed_checker_are_replaced(topo: Topology) -> None:
    stale = VipSteering(topo.chk, mark_base=0x1234, table_base=777)
    with trio.fail_after(10):
        await stale.apply([(ip_address(VIP), ip_address(B2))])  # never removed, as if the process died
    assert "0x1234" in topo.lab.ns_run(topo.chk, "ip", "rule", "show", "pref", str(RULE_PREF)).stdout
    svc = service_from_dict(_service("after-crash", True, "tcp"), "services[0]")
    checker = HealthChecker([svc], netns=topo.chk)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(checker.run)
            rules = topo.lab.ns_run(topo.chk, "ip", "rule", "show", "pref", str(RULE_PREF)).stdout
            assert "0x1234" not in rules and rules.count("fwmark") == 2
            assert topo.lab.ns_run(topo.chk, "ip", "route", "show", "table", "777").stdout.strip() == ""
            nursery.cancel_scope.cancel()
    assert "fwmark" not in topo.lab.ns_run(topo.chk, "ip", "rule", "show", "pref", str(RULE_PREF)).stdout


def _rp_filter(lab: Lab, ns: str) -> tuple[str, str]:
    out = lab.ns_run(ns, "sysctl", "-n", "net.ipv4.conf.all.rp_filter", "net.ipv4.conf.eth0.rp_filter").stdout
    all_, eth0 = out.split()
    return all_, eth0


async def test_remove_restores_the_rp_filter_values_apply_changed(topo: Topology) -> None:
    chk = topo.chk
    topo.lab.ns_run(chk, "sysctl", "-q", "-w", "net.ipv4.conf.all.rp_filter=2", "net.ipv4.conf.eth0.rp_filter=1")
    steering = VipSteering(chk)
    with trio.fail_after(10):
        await steering.apply([(ip_address(VIP), ip_address(B1))])
        assert _rp_filter(topo.lab, chk) == ("0", "0")
        await steering.remove()
    assert _rp_filter(topo.lab, chk) == ("2", "1")
    assert "fwmark" not in topo.lab.ns_run(chk, "ip", "rule", "show", "pref", str(RULE_PREF)).stdout


async def test_rp_filter_values_survive_a_killed_run(topo: Topology, tmp_path: Path) -> None:
    """The values from before ours are recorded before they change, so the run after a SIGKILL
    (which never restores) still puts back the operator's values, not our zeros."""
    chk = topo.chk
    before = _rp_filter(topo.lab, chk)
    topo.lab.ns_run(chk, "sysctl", "-q", "-w", "net.ipv4.conf.all.rp_filter=2", "net.ipv4.conf.eth0.rp_filter=1")
    killed = VipSteering(chk, state_dir=str(tmp_path))
    with trio.fail_after(10):
        await killed.apply([(ip_address(VIP), ip_address(B1))])  # and never removed
        assert _rp_filter(topo.lab, chk) == ("0", "0")
        # noqa below: listing the test's own tmp_path; nothing else runs on the loop here.
        assert list(tmp_path.glob("rp_filter-*.json"))  # noqa: ASYNC240
        after = VipSteering(chk, state_dir=str(tmp_path))
        await after.apply([(ip_address(VIP), ip_address(B1))])
        await after.remove()
    assert _rp_filter(topo.lab, chk) == ("2", "1")
    # noqa below: listing the test's own tmp_path; nothing else runs on the loop here.
    assert not list(tmp_path.glob("rp_filter-*.json"))  # noqa: ASYNC240
    topo.lab.ns_run(chk, "sysctl", "-q", "-w", f"net.ipv4.conf.all.rp_filter={before[0]}",
                    f"net.ipv4.conf.eth0.rp_filter={before[1]}")


class _SysctlFails(VipSteering):
    """Fault injection: the rp_filter write fails (`raise`) or never finishes (`hang`)."""

    def __init__(self, netns: str, mode: str) -> None:
        super().__init__(netns)
        self.mode = mode

    async def _sysctl(self, values: Mapping[str, str]) -> None:
        if self.mode == "hang":
            await trio.sleep_forever()
        raise SteeringError("sysctl: injected failure")


@pytest.mark.parametrize("mode", ["raise", "hang"])
async def test_rules_do_not_leak_when_the_rp_filter_step_fails_or_is_cancelled(topo: Topology, mode: str) -> None:
    chk = topo.chk
    svc = service_from_dict(_service(f"sysctl-{mode}", True, "tcp"), "services[0]")
    checker = HealthChecker([svc], netns=chk, steering=_SysctlFails(chk, mode))
    with trio.fail_after(20):
        if mode == "raise":
            with pytest.raises(SteeringError, match="injected failure"):
                await checker.run()
        else:
            with trio.move_on_after(1.0) as scope:
                await checker.run()
            assert scope.cancelled_caught
    assert "fwmark" not in topo.lab.ns_run(chk, "ip", "rule", "show", "pref", str(RULE_PREF)).stdout
    assert topo.lab.ns_run(chk, "ip", "route", "show", "table", "all", VIP).stdout.strip() == ""


def test_failing_to_return_from_the_check_namespace_aborts(tmp_path: Path) -> None:
    """No exception for check_once to swallow: the process must not go on in the wrong namespace."""
    ns = f"lbhc-abort-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        code = f"""
import logging, os, socket
logging.basicConfig(level=logging.INFO)
from healthcheck.vipnet import NetnsSockets
sockets = NetnsSockets({ns!r})
os.dup2(os.open("/dev/null", os.O_RDONLY), sockets._home)  # not a namespace: setns back fails (EINVAL)
try:
    sockets(socket.AF_INET)
except BaseException as exc:
    print("caught", repr(exc), flush=True)
print("carried on", flush=True)
"""
        proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent,
                              capture_output=True, text=True, timeout=30,
                              preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_CORE, (0, 0)))
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    assert proc.returncode == -signal.SIGABRT, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == ""
    assert ("CRITICAL:healthcheck.vipnet:setns back to the home network namespace failed: Invalid argument"
            in proc.stderr)
