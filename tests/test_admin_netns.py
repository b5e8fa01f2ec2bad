"""Runtime controls on real nodes (`lbnode drain/undrain/disable/enable` over the control socket), on
the ECMP lab with three nodes, BIRD and checked long-lived connections: a drained backend gets no
new flows while its pinned connections keep echoing byte by byte; a disabled VIP's route leaves
the router, then the node forwards no new flow for it while a flow pinned there goes on; the state
survives a SIGHUP and a crash-restart. And only root may change anything."""
from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from cluster import control, status
from examples.lab.ecmp import ECHO_PORT, HTTP_PORT, VIP, EcmpLab
from examples.lab.faults import Run
from examples.lab.hosts import REPO
from examples.lab.netns import Lab, read_line, wait_until
from tests.ecmp_lab import http_get, metric_values

pytestmark = pytest.mark.netns

PREFIX = f"{VIP}/32"
PROBE_PORTS = "40000-40099"  # the router's own connections from these ports go through node1


def lbnode(ecmp: EcmpLab, node: str, *args: str) -> str:
    """The CLI, from the root namespace: a unix socket is a path, whatever the network namespace."""
    done = subprocess.run([sys.executable, "-m", "cluster.cli", *args, "--socket", str(ecmp.status_socket(node))],
                          cwd=REPO, capture_output=True, text=True, timeout=20)
    assert done.returncode == 0, done
    return done.stdout


def backends(ecmp: EcmpLab, node: str) -> list[dict[str, Any]]:
    snap = ecmp.node_status(node)
    return [b for s in snap["services"] for b in s["backends"]] if snap else []


def rows(ecmp: EcmpLab, node: str) -> list[dict[str, Any]]:
    snap = ecmp.node_status(node)
    return snap["services"] if snap else []


def drained_gauges(ecmp: EcmpLab, node: str, address: str) -> dict[str, float]:
    """The node's /metrics: lbnode_backend_drained of `address`'s rows (one per port), by port."""
    text = http_get(ecmp, node, "/metrics").decode()
    return {dict(k)["port"]: v for k, v in metric_values(text, "lbnode_backend_drained").items()
            if dict(k)["backend"] == address}


def vip_admin_state(ecmp: EcmpLab, node: str) -> str:
    """The node's /metrics: the VIP's lbnode_vip_admin_state at 1 (enabled, withdrawn, stopped),
    checked against lbnode_vip_disabled."""
    text = http_get(ecmp, node, "/metrics").decode()
    vip = (("vip", str(VIP)),)
    states = [dict(k)["state"] for k, v in metric_values(text, "lbnode_vip_admin_state").items()
              if k[1:] == vip and v == 1]
    disabled = metric_values(text, "lbnode_vip_disabled").get(vip)
    assert len(states) == 1 and disabled == float(states[0] != "enabled"), (states, disabled)
    return states[0]


def in_hash_everywhere(ecmp: EcmpLab, address: str, wanted: bool) -> bool:
    """On every node, each port's row for `address` is (not) in the hash, and says (not) drained."""
    found = [(b["in_hash"], b["admin"]) for n in ecmp.nodes for b in backends(ecmp, n)
             if b["backend"].startswith(f"{address}:")]
    return len(found) == 2 * len(ecmp.nodes) and all(f == (wanted, None if wanted else "drained") for f in found)


class Probe:
    """examples/lab/pinned_probe.py in the router's namespace."""

    def __init__(self, lab: Lab, ns: str) -> None:
        self.proc = lab.spawn(ns, sys.executable, "-m", "examples.lab.pinned_probe", str(VIP), str(ECHO_PORT),
                              cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert json.loads(read_line(self.proc, timeout_s=20))["ready"]

    def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()
        reply: dict[str, Any] = json.loads(read_line(self.proc, timeout_s=20))
        return reply

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()  # its connections close, it exits
        self.proc.wait(timeout=10)


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Run]:
    with Lab(prefix="lba") as lab:
        ecmp = EcmpLab(lab, tmp_path, nodes=3, backends=3)
        try:
            yield Run(ecmp, sync=True, long=60)
        except BaseException:
            for node in ecmp.nodes:
                print(f"---- {node}.log ----", *ecmp.node_log(node).splitlines()[-40:], sep="\n", file=sys.stderr)
            raise
        finally:
            ecmp.close()


def test_drain_and_undrain_on_every_node_with_live_connections(run: Run) -> None:
    ecmp = run.ecmp
    run.start_load()
    b1, b2 = ecmp.backends[0].ip4, ecmp.backends[1].ip4
    for node in ecmp.nodes:
        assert lbnode(ecmp, node, "drain", b1) == f"drain: web {b1}\n"
    wait_until(lambda: in_hash_everywhere(ecmp, b1, False), timeout_s=10, what="b1 drained on every node")
    # and in a node's metrics, per port (a scrape may be served from the last 0.2 s: a short wait)
    wait_until(lambda: drained_gauges(ecmp, "node3", b1) == {str(HTTP_PORT): 1.0, str(ECHO_PORT): 1.0}, timeout_s=5,
               what="lbnode_backend_drained 1 for b1 on node3")
    assert drained_gauges(ecmp, "node3", b2) == {str(HTTP_PORT): 0.0, str(ECHO_PORT): 0.0}
    before = run.load.report("mark")["long"]["by_backend"]
    assert before.get("b1", 0) > 0, before
    after = run.load.report("open 30")["long"]["by_backend"]
    assert sum(after.values()) == sum(before.values()) + 30
    assert after.get("b1", 0) == before["b1"], (before, after)  # no new flow to the drained backend
    # Its pinned connections go on: every live connection, those on b1 too, echoes after the drain.
    wait_until(lambda: run.load.report()["long"]["min_echoed_since_mark"] >= 5, timeout_s=30,
               what="every connection echoing after the drain")

    for node in ecmp.nodes:
        assert lbnode(ecmp, node, "undrain", b1) == f"undrain: web {b1}\n"
    wait_until(lambda: in_hash_everywhere(ecmp, b1, True), timeout_s=10, what="b1 back on every node")
    wait_until(lambda: drained_gauges(ecmp, "node3", b1) == {str(HTTP_PORT): 0.0, str(ECHO_PORT): 0.0}, timeout_s=5,
               what="lbnode_backend_drained 0 for b1 on node3")
    later = run.load.report("open 30")["long"]["by_backend"]
    assert later.get("b1", 0) > after["b1"], (after, later)  # 30 new flows over 3 backends: P(none) ~ 5e-6

    # Kept across a SIGHUP reload.
    for node in ecmp.nodes:
        lbnode(ecmp, node, "drain", b2)
    wait_until(lambda: in_hash_everywhere(ecmp, b2, False), timeout_s=10, what="b2 drained on every node")
    ecmp.kill_node("node1", signal.SIGHUP)
    wait_until(lambda: (s := ecmp.node_status("node1")) and s["node"]["reloads"]["ok"] == 1, timeout_s=15,
               what="node1 reloaded")
    assert in_hash_everywhere(ecmp, b2, False)
    before_b2 = run.load.report("open 30")["long"]["by_backend"]
    assert before_b2.get("b2", 0) == later.get("b2", 0), (later, before_b2)

    final = run.load.stop()
    assert final["long"]["lost"] == {}, final
    assert final["short"]["failed"] == 0, final


def test_disable_withdraws_then_stops_new_flows_and_survives_reload_and_crash(run: Run) -> None:
    ecmp, lab = run.ecmp, run.ecmp.lab
    run.start_load()
    # The router's own connections from PROBE_PORTS go through node1, whatever BGP says. Its own
    # only (iif lo): a client connection forwarded from one of those ports must follow BGP, or
    # its SYN would reach node1 while it takes no new flows (and time out the short load).
    node1 = ecmp.node_ip("node1")
    lab.ns_run(ecmp.router, "ip", "route", "add", PREFIX, "via", node1, "dev", "br0", "table", "100")
    lab.ns_run(ecmp.router, "ip", "rule", "add", "iif", "lo", "ipproto", "tcp", "sport", PROBE_PORTS, "lookup",
               "100")
    lab.ns_run(ecmp.router, "ethtool", "-K", "br0", "tx", "off")  # full checksums, as a real client sends
    probe = Probe(lab, ecmp.router)
    assert probe.ask("open 40001")["ok"] and probe.ask("echo 40001")["ok"]  # pinned on node1 (and synced)

    out = lbnode(ecmp, "node1", "disable", str(VIP), "--grace-s", "5")
    assert out == f"disable: {VIP}\n"
    t0 = time.monotonic()
    ecmp.wait_next_hops(run.hops_without("node1"), timeout_s=10)  # the route leaves the router first
    withdrawn_s = time.monotonic() - t0
    snap = ecmp.node_status("node1")
    assert snap is not None and "disabled by root (uid 0" in snap["node"]["withheld"][PREFIX]
    grace_checked = False
    if {r["admin_phase"] for r in snap["services"]} == {"withdrawn"}:  # within the grace: new flows still taken
        opened = probe.ask("open 40002")
        if {r["admin_phase"] for r in rows(ecmp, "node1")} == {"withdrawn"}:
            assert opened["ok"], opened
            grace_checked = True
    wait_until(lambda: {r["admin_phase"] for r in rows(ecmp, "node1")} == {"stopped"}, timeout_s=15,
               what="node1 stops new flows for the VIP")
    stopped_s = time.monotonic() - t0
    assert stopped_s >= 4.5, stopped_s
    wait_until(lambda: vip_admin_state(ecmp, "node1") == "stopped", timeout_s=5, what="the metrics say stopped")
    assert vip_admin_state(ecmp, "node2") == "enabled"  # disabled on node1 only
    assert not any(b["in_hash"] for b in backends(ecmp, "node1"))
    drops = ecmp.node_status("node1")["counters"]["drop_no_backend"]  # type: ignore[index]
    refused = probe.ask("open 40003")
    assert not refused["ok"], refused  # a new flow through node1 is not forwarded ...
    wait_until(lambda: ecmp.node_status("node1")["counters"]["drop_no_backend"] > drops,  # type: ignore[index]
               timeout_s=5, what="node1 counting the dropped SYN")
    assert probe.ask("echo 40001")["ok"]  # ... a flow pinned there goes on

    # Kept across a SIGHUP ...
    ecmp.kill_node("node1", signal.SIGHUP)
    wait_until(lambda: (s := ecmp.node_status("node1")) and s["node"]["reloads"]["ok"] == 1, timeout_s=15,
               what="node1 reloaded")
    assert ecmp.next_hops() == run.hops_without("node1")
    assert {r["admin_phase"] for r in rows(ecmp, "node1")} == {"stopped"}
    # ... and a crash: the restarted node reads its state file and never announces the VIP.
    ecmp.kill_node("node1", signal.SIGKILL)
    ecmp.start_node("node1")
    wait_until(lambda: (s := ecmp.node_status("node1")) and s["node"]["state"] == "serving" and s["bgp"]["peers"]
               and all(p["state"] == "Established" for p in s["bgp"]["peers"]), timeout_s=40,
               what="node1 back, its BGP session Established")
    snap = ecmp.node_status("node1")
    assert snap is not None and [d["vip"] for d in snap["node"]["admin"]["disabled"]] == [str(VIP)]
    assert {r["admin_phase"] for r in snap["services"]} == {"stopped"}
    assert snap["node"]["announced"] == [] and ecmp.next_hops() == run.hops_without("node1")
    assert vip_admin_state(ecmp, "node1") == "stopped"  # a new process: nothing cached

    assert lbnode(ecmp, "node1", "enable", str(VIP)) == f"enable: {VIP}\n"
    ecmp.wait_next_hops(run.all_hops, timeout_s=15)
    assert vip_admin_state(ecmp, "node1") == "enabled"
    assert probe.ask("open 40004")["ok"]
    print(f"\nroute withdrawn {withdrawn_s:.2f}s after `lbnode disable`, new flows stopped after {stopped_s:.2f}s"
          f" (a new flow within the grace {'checked' if grace_checked else 'not checked: the grace was over'})")
    final = run.load.stop()
    assert final["long"]["lost"] == {}, final
    assert final["short"]["failed"] == 0, final
    probe.close()


def test_only_root_may_connect_and_only_uid_0_may_change_state() -> None:
    """The socket is 0600: another user cannot connect at all. Made world-writable on purpose (say, for
    a monitoring group), it lets that user read status and still refuses every change."""
    workdir = tempfile.mkdtemp(prefix="lbadmin-")
    os.chmod(workdir, 0o755)  # only the socket's own mode stands in the way
    path = f"{workdir}/status.sock"
    changes: list[control.Request] = []

    async def document() -> bytes:
        return b'{"node": {"state": "serving"}}\n'

    async def handler(request: control.Request, peer: status.Peer) -> dict[str, Any]:
        changes.append(request)
        return {"changed": []}

    def as_nobody(request: bytes) -> subprocess.CompletedProcess[str]:
        client = ("import socket, sys\ns = socket.socket(socket.AF_UNIX)\ns.connect(sys.argv[1])\n"
                  "s.sendall(sys.argv[2].encode() + b'\\n')\nprint(s.makefile().read(), end='')\n")
        return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                               "/usr/bin/python3", "-c", client, path, request.decode().strip()],
                              capture_output=True, text=True, timeout=20)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(status.serve, path, document, handler)
            assert os.stat(path).st_mode & 0o777 == 0o600 and os.stat(path).st_uid == 0
            denied = await trio.to_thread.run_sync(as_nobody, control.encode_request(control.Status()))
            assert denied.returncode != 0 and "PermissionError" in denied.stderr, denied
            os.chmod(path, 0o666)
            seen = await trio.to_thread.run_sync(as_nobody, control.encode_request(control.Status()))
            assert json.loads(seen.stdout)["status"]["node"]["state"] == "serving", seen
            drain = control.Drain(ipaddress.ip_address("10.0.0.11"))
            refused = await trio.to_thread.run_sync(as_nobody, control.encode_request(drain))
            assert json.loads(refused.stdout) == {
                "v": 1, "ok": False, "error": "not permitted: changing state needs uid 0 (you are uid 65534)"}
            assert changes == []
            assert (await trio.to_thread.run_sync(status.request, path, drain))["ok"]  # root may
            assert changes == [drain]
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        for name in os.listdir(workdir):
            os.unlink(f"{workdir}/{name}")
        os.rmdir(workdir)
