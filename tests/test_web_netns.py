"""The HTTP listener of real lbnode processes in the ECMP lab (three nodes, BIRD with BGP and BFD,
flow sync): `promtool check metrics` accepts /metrics, /api/v1/status matches the schema (and
what `lbnode status --json` reads), and headless Chromium, run inside a node's namespace, shows
the backends in the console and a stopped backend turning down within its check interval.

Screenshots go to tests/artifacts/ (ignored by git); the test prints where."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from examples.lab.ecmp import HTTP_PORT, VIP, EcmpLab, Load
from examples.lab.netns import Lab, wait_until
from tests.cdp import Browser, wait_for
from tests.ecmp_lab import NODE_URL, running_ecmp_lab
from tests.ecmp_lab import http_get as fetch
from tests.ecmp_lab import metric_values as values
from tests.web_fixtures import schema_errors

pytestmark = pytest.mark.netns

REPO = Path(__file__).parents[1]
ARTIFACTS = Path(__file__).parent / "artifacts"
SCHEMA = json.loads((Path(__file__).parent / "data" / "status.schema.json").read_text())
URL = NODE_URL
NODES = ("10.0.0.1", "10.0.0.2", "10.0.0.3")
# The lab's checks (EcmpLab.node_config): tcp, every 500 ms, timeout 300 ms, fall 2.
CHECK_INTERVAL_S, CHECK_TIMEOUT_S, FALL = 0.5, 0.3, 2
POLL_S = 1.0  # the console's


class ThreeNodes(EcmpLab):
    def __init__(self, lab: Lab, workdir: Path) -> None:
        super().__init__(lab, workdir, nodes=3)


@pytest.fixture
def ecmp(tmp_path: Path) -> Iterator[ThreeNodes]:
    with running_ecmp_lab(tmp_path, "lbw", ThreeNodes) as e:
        yield e


def alive_sync_peers(e: EcmpLab, node: str) -> int:
    status = e.node_status(node)
    return sum(1 for p in status["sync"]["peers"] if p["alive"]) if status and "sync" in status else -1


def test_metrics_pass_promtool_the_api_matches_the_schema_and_the_console_follows_health(
        ecmp: ThreeNodes, tmp_path: Path) -> None:
    for node in ecmp.nodes:
        ecmp.start_node(node)
    ecmp.wait_next_hops(set(NODES), timeout_s=60)
    wait_until(lambda: all(alive_sync_peers(ecmp, n) == 2 for n in ecmp.nodes), timeout_s=20,
               what="every node hears its two flow-sync peers")
    load = Load(ecmp, long=30, short_rate=10)
    try:
        wait_until(lambda: (s := ecmp.node_status("node1")) is not None and s["flows"]["entries"] >= 30,
                   timeout_s=20, what="flows pinned or synced on node1")
        check_metrics(ecmp, tmp_path)
        check_api(ecmp)
        check_console(ecmp, tmp_path)
    finally:
        load.stop()
    # For the report: node1 served the console (a poll a second) and the scrapes; the others did not.
    for node in ecmp.nodes:
        loop = (ecmp.node_status(node) or {}).get("loop", {})
        print(f"{node} loop: max stall {loop.get('max_stall_ms')} ms (task step {loop.get('max_step_ms')} ms in "
              f"{loop.get('max_step_task')!r}, heartbeat late {loop.get('max_heartbeat_late_ms')} ms)")


def check_metrics(e: EcmpLab, tmp_path: Path) -> None:
    router = (("peer", "10.0.0.254"),)

    def peered() -> bytes | None:
        # BFD comes Up after BGP is Established, and on these 2 shared cores a 300 ms session can
        # flap: wait for a scrape with both up rather than read one instant.
        body = fetch(e, "node1", "/metrics")
        text = body.decode()
        up = (values(text, "lbnode_bgp_session_established").get(router) == 1
              and values(text, "lbnode_bfd_session_up").get(router) == 1)
        return body if up else None
    body = wait_until(peered, timeout_s=30, interval_s=0.5, what="node1's metrics with BGP Established and BFD Up")
    (tmp_path / "metrics.txt").write_bytes(body)
    lint = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, timeout=30)
    assert lint.returncode == 0, (lint.stdout + lint.stderr).decode()
    text = body.decode()
    assert 0 < values(text, "lbnode_bfd_detection_time_seconds")[router] <= 1
    assert values(text, "lbnode_sync_peers")[()] == 2
    assert {dict(k)["peer"] for k in values(text, "lbnode_sync_peer_lag_datagrams")} == {"10.0.0.2", "10.0.0.3"}
    healthy = values(text, "lbnode_backend_healthy")
    assert len(healthy) == 6 and set(healthy.values()) == {1.0}  # 3 backends x 2 ports
    assert values(text, "lbnode_vip_announced")[(("vip", str(VIP)),)] == 1
    assert sum(values(text, "lbnode_backend_packets_total").values()) > 0
    assert sum(values(text, "lbnode_healthcheck_duration_seconds_count").values()) > 0
    assert values(text, "lbnode_xdp_packets_total")[(("verdict", "tx"),)] > 0
    assert values(text, "lbnode_flow_table_capacity")[()] == 262144
    print(f"\n/metrics of node1: {len(body)} bytes, {len(text.splitlines())} lines, promtool: ok "
          f"({tmp_path / 'metrics.txt'})")


def check_api(e: EcmpLab) -> None:
    api = json.loads(fetch(e, "node1", "/api/v1/status"))
    assert schema_errors(api, SCHEMA) == []
    cli = subprocess.run([str(REPO / ".venv/bin/python"), "-m", "cluster.cli", "status", "--json", "--socket",
                          str(e.status_socket("node1"))], capture_output=True, text=True, timeout=30, cwd=REPO,
                         check=True)
    from_cli = json.loads(cli.stdout)
    assert schema_errors(from_cli, SCHEMA) == []
    # The same document (taken at another instant: counters move, the structure does not).
    assert api["version"] == from_cli["version"] == 1
    assert shape(api) == shape(from_cli)
    assert api["node"]["http"] == [URL]


def shape(value: Any) -> Any:
    """The keys of a document, recursively (lists by their first element), without the values."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items() if k not in ("withheld",)}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return type(value).__name__ if value is not None else None


BACKEND_ROWS = "document.querySelectorAll('tr[data-backend]')"


def states(browser: Browser) -> dict[str, str]:
    return browser.evaluate(  # type: ignore[no-any-return]
        f"Object.fromEntries([...{BACKEND_ROWS}].map(r => [r.dataset.service + ' ' + r.dataset.backend, "
        "r.dataset.state]))")


def check_console(e: EcmpLab, tmp_path: Path) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    profile = tmp_path / "chromium"
    profile.mkdir()
    with Browser(e.lab, e.nodes["node1"].ns, URL + "/", profile) as browser:
        wait_for(browser, f"{BACKEND_ROWS}.length === 6 && [...{BACKEND_ROWS}].every(r => r.dataset.state === 'up')",
                 timeout_s=20, what="six healthy backend rows")
        assert browser.evaluate("document.querySelectorAll('#bgp-table tr[data-peer]').length") == 1
        assert browser.evaluate("document.querySelector('#bgp-table .badge').textContent") == "Established"
        assert browser.evaluate("document.querySelectorAll('#sync-table tr[data-sync-peer]').length") == 2
        assert browser.evaluate(f"document.querySelector('li[data-vip=\"{VIP}/32\"]').dataset.announced") == "true"
        wait_for(browser, "Number(document.body.dataset.polls) >= 20", timeout_s=40, what="20 polls (sparklines)")
        healthy = browser.screenshot(ARTIFACTS / "console-healthy.png")

        # b2's server stops: its checks fail, and the console shows it down within fall x interval
        # (+ one timeout), plus one poll of the console, plus slack for a loaded machine.
        b2 = f"{e.backends[1].ip4}:{HTTP_PORT}"
        row = f"document.querySelector('tr[data-service=\"web/{VIP}:{HTTP_PORT}\"][data-backend=\"{b2}\"]')"
        assert browser.evaluate(f"{row}.dataset.state") == "up"
        started = time.monotonic()
        e.lab.stop(e.backend_procs["b2"])
        limit_s = FALL * CHECK_INTERVAL_S + CHECK_TIMEOUT_S + POLL_S + 3.0
        wait_for(browser, f"{row}.dataset.state === 'down'", timeout_s=limit_s, interval_s=0.05,
                 what=f"{b2} shown down")
        took_s = time.monotonic() - started
        others = {k: v for k, v in states(browser).items() if e.backends[1].ip4 not in k}
        assert set(others.values()) == {"up"}, others
        wait_for(browser, f"{row}.textContent.includes('refused') || {row}.textContent.includes('timeout')",
                 timeout_s=5, what="the check's error shown")
        down = browser.screenshot(ARTIFACTS / "console-b2-down.png")
    print(f"console: {b2} shown down {took_s:.2f}s after its server stopped (checks: fall {FALL} x "
          f"{CHECK_INTERVAL_S}s, timeout {CHECK_TIMEOUT_S}s; console polls every {POLL_S}s; limit {limit_s:.1f}s); "
          f"screenshots: {healthy} {down}")
    shutil.copy(tmp_path / "metrics.txt", ARTIFACTS / "metrics.txt")


def check_admin_shown(browser: Browser) -> None:
    """tests/web_fixtures.py admin_state: 10.0.0.12 drained in web, the dns VIP disabled (withdrawn)."""
    badge = "document.querySelector('tr[data-backend=\"10.0.0.12:80\"] .badge')"
    assert browser.evaluate(f"{badge}.textContent") == "drained"
    assert browser.evaluate(f"{badge}.title").startswith("drained by alice (uid 0, pid 4242) at 2026-12-01T20:15:02Z")
    service = "document.querySelector('div.service[data-service=\"dns/[2001:db8::53]:53\"]')"
    assert browser.evaluate(f"[{service}.dataset.admin, {service}.dataset.adminPhase]") == ["disabled", "withdrawn"]
    head = f"{service}.querySelector('.service-head .badge.disabled')"
    assert browser.evaluate(f"{head}.textContent") == "disabled · withdrawn"
    assert browser.evaluate(f"{head}.title").startswith("VIP disabled by bob (uid 0, pid 4343) at 2026-12-01T20:16:40Z")
    vip = "document.querySelector('li[data-vip=\"2001:db8::53/128\"]')"
    assert browser.evaluate(f"[{vip}.dataset.admin, {vip}.dataset.adminPhase, {vip}.dataset.announced]") == [
        "disabled", "withdrawn", "false"]
    assert "lbnode enable 2001:db8::53" in browser.evaluate(f"{vip}.textContent")  # the reason says how to undo
    assert browser.evaluate("document.querySelector('li[data-vip=\"192.0.2.10/32\"]').dataset.announced") == "true"


def test_the_console_draws_loads_and_weights_and_shows_drained_backends_and_disabled_vips(tmp_path: Path) -> None:
    """The console's spot for load-aware weights, fed a document that has them (and a backend
    drained and a VIP disabled by the runtime controls), served by the real listener in a
    namespace of its own."""
    ARTIFACTS.mkdir(exist_ok=True)
    with Lab(prefix="lbw") as lab:
        ns = lab.netns("ui")
        server = lab.spawn(ns, sys.executable, "-m", "tests.console_server", "9473", cwd=REPO,
                           stdout=subprocess.PIPE)
        assert server.stdout is not None and server.stdout.readline().strip() == b"ready"
        profile = tmp_path / "chromium"
        profile.mkdir()
        with Browser(lab, ns, URL + "/", profile) as browser:
            wait_for(browser, "!document.getElementById('weights-chart').hidden", timeout_s=20,
                     what="the loads-and-weights chart shown")
            bars = browser.evaluate("document.querySelectorAll('#weights-chart .bar-group').length")
            assert bars == 3  # the web service's backends; the dns one has no computed weights
            widths = browser.evaluate("[...document.querySelectorAll('#weights-chart rect')].map(r => "
                                      "r.getAttribute('width'))")
            assert widths[:3] == ["25.0%", "50.0%", "66.7%"]  # 10.0.0.11: observed, configured, effective shares
            row = "document.querySelector('tr[data-backend=\"10.0.0.13:80\"]')"
            assert browser.evaluate(f"{row}.dataset.state") == "disabled"  # in the config
            assert browser.evaluate(f"{row}.querySelector('td:nth-child(4)').textContent") == "1"  # effective
            check_admin_shown(browser)
            wait_for(browser, "Number(document.body.dataset.polls) >= 5", timeout_s=20, what="five polls")
            shot = browser.screenshot(ARTIFACTS / "console-weights.png")
        lab.stop(server)
    print(f"\nscreenshot: {shot}")


def test_a_real_node_whose_listener_cannot_bind_exits_2_with_one_line_and_detaches(tmp_path: Path) -> None:
    """`lbnode` itself (bcc, XDP on the lab's veth) with the listener's port already taken in its
    namespace: the address is known bad only at start-up, after the attach; the node detaches and
    the command exits with the bad-config code and the one-line reason, not a traceback."""
    with Lab(prefix="lbw") as lab:
        e = EcmpLab(lab, tmp_path, nodes=2)
        try:
            ns = e.nodes["node1"].ns
            holder = lab.spawn(ns, sys.executable, "-c",
                               "import signal, socket\ns = socket.socket()\ns.bind(('127.0.0.1', 9473))\n"
                               "s.listen()\nprint('ready', flush=True)\nsignal.pause()", stdout=subprocess.PIPE)
            assert holder.stdout is not None and holder.stdout.readline().strip() == b"ready"
            code = e.start_node("node1").wait(timeout=120)
            log = e.node_log("node1")
            assert code == 2, log
            in_use = "lbnode: http.listen: cannot listen on 127.0.0.1:9473: Address already in use"
            assert log.splitlines()[-1] == in_use, log
            assert "Traceback" not in log, log
            assert "prog/xdp" not in lab.ns_run(ns, "ip", "-d", "link", "show", "eth0").stdout  # detached
            assert not e.status_socket("node1").exists()
            lab.stop(holder)
            print(f"\nnode1's output:\n{log}")
        finally:
            e.close()
