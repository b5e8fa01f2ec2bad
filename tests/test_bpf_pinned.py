"""Pinned data planes (bpf/pinned.py, bpf/compile_child.py): a second DataPlane on the same pins
adopts the flows, tables and indexes of the first, and its new program forwards with them; a
changed layout starts empty (or keeps the flows when only counters changed), and says why
(bpf tier: BPF_PROG_TEST_RUN on the pinned program, no interfaces)."""
from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from scapy.all import IP, TCP, Ether, Raw  # type: ignore[attr-defined]

from bpf import syscall
from bpf.dataplane import BackendSpec, DataPlane, ServiceSpec
from bpf.flowtable import synthetic_flows
from bpf.loader import CompileError, Limits
from bpf.pinned import (
    LAYOUT_PIN,
    LAYOUT_VALUE_SIZE,
    Leave,
    PinDir,
    PinError,
    bpffs_root,
    build_in_child,
    is_bpffs,
    limits_dict,
)
from bpf.structs import IPPROTO_TCP, addr16, mac_str
from bpf.testrun import XdpAction, run_xdp

pytestmark = pytest.mark.bpf
REPO = Path(__file__).resolve().parents[1]

ip = ipaddress.ip_address
OUR_MAC = "02:00:00:00:00:01"
VIP_A, VIP_B = ip("10.0.0.100"), ip("10.0.0.101")
LIMITS = Limits(max_services=4, max_backends=16, ch_table_bits=6, flow_table_size=4096, event_ring_pages=4)


def backend(n: int) -> BackendSpec:
    return BackendSpec(ip(f"10.1.0.{n}"), f"02:00:00:00:00:{n:02x}")


def service(vip: ipaddress.IPv4Address | ipaddress.IPv6Address, ns: range) -> ServiceSpec:
    return ServiceSpec(vip, 80, IPPROTO_TCP, tuple(backend(n) for n in ns))


def ack(vip: object, client: str) -> bytes:
    return bytes(Ether(dst=OUR_MAC) / IP(src=client, dst=str(vip)) / TCP(sport=40000, dport=80, flags="A") / Raw(b"x"))


@pytest.fixture
def pins() -> Iterator[PinDir]:
    path = bpffs_root() / "lbnode-test" / uuid.uuid4().hex[:8]
    try:
        yield PinDir(path, "eth-test")
    finally:
        shutil.rmtree(path, ignore_errors=True)
        with contextlib.suppress(OSError):
            path.parent.rmdir()  # the last test's


def open_dp(pins: PinDir, limits: Limits = LIMITS) -> DataPlane:
    dp = DataPlane(limits, pins=pins)
    dp.set_config(OUR_MAC)
    return dp


def pin_flows(dp: DataPlane, spec: ServiceSpec, backend_n: int, n: int) -> None:
    """n flows from 10.0.0.0.. (port 40000) of `spec`, pinned to its backend `backend_n`."""
    s, b = dp.service_index(*spec.key), dp.backend_index(*spec.key, backend(backend_n).address)
    assert s is not None and b is not None
    chunk = synthetic_flows(0, n, addr16(spec.vip), spec.port, spec.proto, b, s)
    dp.write_flows_packed(chunk.keys, chunk.values)


def edit_layout(pins: PinDir, change: dict[str, object]) -> None:
    """Rewrite fields of the pinned layout record, as another build would have left it."""
    fd = syscall.obj_get(pins.pin(LAYOUT_PIN))
    try:
        key, value = ctypes.create_string_buffer(4), ctypes.create_string_buffer(LAYOUT_VALUE_SIZE)
        assert syscall.lookup(fd, key, value)
        doc = json.loads(value.raw.rstrip(b"\0"))
        for k, v in change.items():
            if isinstance(v, dict):
                doc[k].update(v)
            else:
                doc[k] = v
        raw = json.dumps(doc).encode().ljust(LAYOUT_VALUE_SIZE, b"\0")
        syscall.update(fd, key, ctypes.create_string_buffer(raw, len(raw)))
    finally:
        os.close(fd)


def test_restart_adopts_flows_tables_and_indexes(pins: PinDir) -> None:
    a, b = service(VIP_A, range(1, 4)), service(VIP_B, range(4, 6))
    first = open_dp(pins)
    assert first.build is not None and first.build.note == "no pinned state" and first.adopted == 0
    first.apply([a, b])
    pin_flows(first, a, backend_n=2, n=300)
    indexes = {(s.key, m.address): first.backend_index(*s.key, m.address) for s in (a, b) for m in s.backends}
    tables = {s.key: first.table(*s.key) for s in (a, b)}
    old_prog = syscall.prog_id(first.fd)
    first.close(Leave.PINS)
    assert pins.exists()

    second = open_dp(pins)
    try:
        assert second.build is not None and second.build.adopted_flows and second.build.note == ""
        assert second.adopted == 300 and not second.sweep_pending
        assert syscall.prog_id(second.fd) != old_prog  # a new program on the old maps
        # Before any apply, lookups name what the previous run had, and the program forwards a
        # pinned flow to its backend.
        assert all(second.backend_index(*key, addr) == i for (key, addr), i in indexes.items())
        assert {k: second.table(*k) for k in tables} == tables
        out = run_xdp(second.fd, ack(VIP_A, "10.0.0.7"))
        assert out.action is XdpAction.TX and mac_str(out.packet[:6]) == backend(2).mac
        # A backend added on restart takes a new index; the old ones and the pinned flows stay.
        grown = service(VIP_A, range(1, 5))
        second.apply([grown, b])
        assert all(second.backend_index(*key, addr) == i for (key, addr), i in indexes.items())
        new = second.backend_index(*grown.key, backend(4).address)
        assert new is not None and new not in indexes.values()
        out = run_xdp(second.fd, ack(VIP_A, "10.0.0.7"))
        assert mac_str(out.packet[:6]) == backend(2).mac
        # A service removed now is retired in the pinned index state: the next run's first
        # pass (at adoption) deletes its stale flows.
        pin_flows(second, b, backend_n=5, n=20)
        second.apply([grown])
    finally:
        second.close(Leave.PINS)
    third = open_dp(pins)
    try:
        assert third.service_index(*b.key) is None and not third.sweep_pending
        assert third.adopted == 300 and len(third.flows()) == 300
    finally:
        third.close()  # Leave.NOTHING: the pins go
    assert not pins.path.exists()


def test_resized_flow_table_is_migrated(pins: PinDir) -> None:
    first = open_dp(pins)
    spec = service(VIP_A, range(1, 3))
    first.apply([spec])
    pin_flows(first, spec, backend_n=1, n=50)
    first.close(Leave.PINS)
    bigger = Limits(max_services=4, max_backends=16, ch_table_bits=6, flow_table_size=8192, event_ring_pages=4)
    second = open_dp(pins, bigger)
    try:
        assert second.build is not None and second.build.adopted_flows and second.build.migrated_flows == 50
        assert "50 flows migrated into 8192" in second.build.note and "flows" in second.build.fresh
        assert second.adopted == 50 and "services" in second.build.reused
        out = run_xdp(second.fd, ack(VIP_A, "10.0.0.7"))
        assert out.action is XdpAction.TX and mac_str(out.packet[:6]) == backend(1).mac
    finally:
        second.close(Leave.PINS)


def pin_by_program(dp: DataPlane, n: int) -> int:
    """n flows pinned by the program (clients 10.0.9.x to VIP_A); the backend index of the first."""
    for i in range(n):
        run_xdp(dp.fd, ack(VIP_A, f"10.0.9.{i + 1}"))
    flows = dp.flows()
    return flows[0][1].backend


def test_changed_flow_types_start_empty_and_keep_counters(pins: PinDir) -> None:
    """As when struct flow changes: nothing of the forwarding state is adopted, and it says why.
    The kept counters still say new_flows - closed = 5 for connections that are gone with the old
    table: none is counted active (the count starts from this run's own reading)."""
    first = open_dp(pins)
    first.apply([service(VIP_A, range(1, 2))])
    index = pin_by_program(first, 5)
    assert first.counters().active(index) == 5
    first.close(Leave.PINS)
    edit_layout(pins, {"maps": {"flows": "0" * 32, "flows@types": "0" * 32}})
    second = open_dp(pins)
    try:
        assert second.build is not None and not second.build.adopted_flows and second.adopted == 0
        assert "flows" in second.build.note and "start empty" in second.build.note
        assert "flows" in second.build.fresh and "stats" in second.build.reused
        assert second.flows() == [] and second.service_index(VIP_A, 80, IPPROTO_TCP) is None
        status = second.pin_status()
        assert status is not None and status["note"] == second.build.note
        assert second.counters().backend(index).active == 5 and second.counters().active(index) == 0
    finally:
        second.close()


def test_counter_layout_change_keeps_the_flows(pins: PinDir) -> None:
    """As when a header change adds counter fields: those counters restart, the flows stay, and
    so do their connections' active count (the adoption's pass counts them from the table)."""
    first = open_dp(pins)
    first.apply([service(VIP_A, range(1, 2))])
    pin_flows(first, service(VIP_A, range(1, 2)), backend_n=1, n=50)  # stamped 0: long idle
    index = pin_by_program(first, 5)
    first.close(Leave.PINS)
    edit_layout(pins, {"maps": {"backend_stats": "0" * 32}})
    second = open_dp(pins)
    try:
        assert second.build is not None and second.build.adopted_flows and second.adopted == 55
        assert "backend_stats" in second.build.fresh and "service_stats" in second.build.reused
        assert second.counters().backend(index).new_flows == 0 and second.counters().active(index) == 5
    finally:
        second.close()


@pytest.mark.parametrize(("change", "why"), [
    ({"version": 0}, "pinned layout version 0"),
    ({"netns_cookie": 1}, "another network namespace"),
])
def test_foreign_or_old_layout_is_not_adopted(pins: PinDir, change: dict[str, object], why: str) -> None:
    first = open_dp(pins)
    first.apply([service(VIP_A, range(1, 3))])
    pin_flows(first, service(VIP_A, range(1, 3)), backend_n=1, n=10)
    first.close(Leave.PINS)
    edit_layout(pins, change)
    second = open_dp(pins)
    try:
        assert second.build is not None and why in second.build.note and second.build.reused == ()
        assert second.flows() == []
    finally:
        second.close()


def test_a_compile_error_reaches_the_caller(pins: PinDir) -> None:
    """What bcc (or the verifier) says comes back in the error, and nothing is pinned."""
    with pytest.raises(CompileError, match=r"compile child exited with 1: .*(error|MAX_BACKENDS)"):
        build_in_child(pins, pins.ifname, LIMITS, ["-DMAX_BACKENDS=not_a_number"])
    assert not pins.exists()


def test_unpinned_child_build_forwards_and_says_so() -> None:
    """Without bpffs (a node that may not pin), the child still compiles and hands the fds over."""
    dp = DataPlane(LIMITS, child=True)
    try:
        dp.set_config(OUR_MAC)
        dp.unpinned_reason = "no bpffs here"
        spec = service(VIP_A, range(1, 3))
        dp.apply([spec])
        pin_flows(dp, spec, backend_n=2, n=10)
        out = run_xdp(dp.fd, ack(VIP_A, "10.0.0.3"))
        assert out.action is XdpAction.TX and mac_str(out.packet[:6]) == backend(2).mac
        status = dp.pin_status()
        assert status is not None and status["dir"] is None and "no bpffs here" in status["note"]
    finally:
        dp.close()


def test_a_pin_that_fails_runs_unpinned_and_says_so(tmp_path: Path) -> None:
    """BPF_OBJ_PIN refused (EPERM: here the directory is no bpffs, as under a bind mount that
    covers one): the build is good, nothing is left half-pinned, the node is told why."""
    pins = PinDir(tmp_path / "pins", "eth-test")
    dp = open_dp(pins)
    try:
        assert dp.pins is None and dp.build is not None and "Operation not permitted" in dp.build.pin_error
        status = dp.pin_status()
        assert status is not None and status["dir"] is None and "not pinned (BPF_OBJ_PIN" in status["note"], status
        spec = service(VIP_A, range(1, 3))
        dp.apply([spec])
        pin_flows(dp, spec, backend_n=2, n=10)
        out = run_xdp(dp.fd, ack(VIP_A, "10.0.0.3"))
        assert out.action is XdpAction.TX and mac_str(out.packet[:6]) == backend(2).mac
    finally:
        dp.close()  # Leave.NOTHING: no pins to remove, none removed
    assert not pins.path.exists()


UNPRIVILEGED = """
import json, sys
from bpf.dataplane import DataPlane
from bpf.loader import Limits
from bpf.pinned import PinDir
dp = DataPlane(Limits(**json.loads(sys.argv[2])), pins=PinDir(__import__("pathlib").Path(sys.argv[1]), "eth-test"))
print(json.dumps({**dp.pin_status(), "build_note": dp.build.note}))
dp.close()
"""


def test_an_unprivileged_node_on_root_owned_pins_runs_unpinned(pins: PinDir) -> None:
    """The systemd unit's user (uid 65534 here, with the unit's capabilities) on a directory a
    root node left: it may neither read those pins nor write its own. It runs unpinned with a
    warning and a status note, and leaves root's pins alone."""
    first = open_dp(pins)
    first.apply([service(VIP_A, range(1, 3))])
    first.close(Leave.PINS)
    for d in (pins.path.parent, pins.path):
        d.chmod(0o755)  # traversable, not writable; the pins themselves are root's, mode 0600
    caps = "-all,+bpf,+net_admin,+perfmon"
    result = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", f"--inh-caps={caps}",
                             f"--ambient-caps={caps}", f"--bounding-set={caps}", "--no-new-privs", sys.executable,
                             "-c", UNPRIVILEGED, str(pins.path), json.dumps(limits_dict(LIMITS))],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    status = json.loads(result.stdout.splitlines()[-1])
    assert status["dir"] is None and status["note"].startswith("not pinned ("), status
    assert status["build_note"].startswith("cannot read the pinned state (BPF_OBJ_GET"), status
    assert "cannot pin the data plane" in result.stderr and "a restart starts with an empty flow table" in result.stderr
    assert pins.exists() and (pins.path / "flows").stat().st_uid == 0  # root's pins, untouched


def test_prepare_refuses_a_directory_outside_bpffs(tmp_path: Path) -> None:
    """What a bind mount over /run/lbnode leaves at /run/lbnode/bpffs: a plain directory, though
    mountinfo still lists the bpffs it covers. The node runs unpinned then, before any compile."""
    assert is_bpffs(bpffs_root()) and not is_bpffs(tmp_path)
    with pytest.raises(PinError, match="not in a bpffs"):
        PinDir(tmp_path / "lbnode" / "1-eth0", "eth0").prepare()
