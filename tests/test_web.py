"""The HTTP listener in the unit tier: the metrics collector over a document built by the real
code from fake inputs, the latency histogram, the ASGI routes through a real hypercorn listener
on a loopback port, the status schema, and a node (with fake components) serving all of it."""
from __future__ import annotations

import dataclasses
import http.client
import ipaddress
import json
import shutil
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from bpf.structs import Stat
from cluster import control, metrics, status
from cluster.config import HttpConfig, load_text
from cluster.loadshare import BackendWeight, Published
from cluster.node import Node, NodeArgs
from cluster.status_doc import document
from cluster.sync.codec import LoadState
from cluster.web import Listener, WebError
from healthcheck.latency import BUCKETS_S, LatencyHistogram
from tests.web_fixtures import (
    NODE_IP,
    FakeSource,
    admin_state,
    schema_errors,
    unit_document,
    unit_inputs,
    unit_snapshot,
)

pytestmark = pytest.mark.unit

SCHEMA = json.loads((Path(__file__).parent / "data" / "status.schema.json").read_text())
LOOPBACK_ANY = HttpConfig(port=0)


def families(text: bytes) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text.decode())}


def samples(text: bytes, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value
            for f in text_string_to_metric_families(text.decode()) for s in f.samples if s.name == name}


# ---- the collector -----------------------------------------------------------------------------------------

def test_metrics_cover_services_backends_verdicts_health_bgp_bfd_sync_and_the_loop() -> None:
    text = metrics.render(unit_snapshot())
    fams = families(text)
    for name in ("lbnode_service_packets", "lbnode_service_bytes", "lbnode_service_new_flows", "lbnode_service_drops",
                 "lbnode_backend_packets", "lbnode_backend_bytes", "lbnode_backend_new_flows", "lbnode_xdp_packets",
                 "lbnode_config_reloads", "lbnode_bgp_updates_received", "lbnode_bfd_packets_sent",
                 "lbnode_sync_gaps", "lbnode_sync_resends", "lbnode_sync_lost", "lbnode_sync_datagrams_dropped",
                 "lbnode_xdp_flow_events_lost", "lbnode_healthcheck_runs"):
        assert fams[name].type == "counter", name
    for name in ("lbnode_backend_healthy", "lbnode_backend_in_hash", "lbnode_backend_weight",
                 "lbnode_flow_table_entries", "lbnode_flow_table_capacity", "lbnode_loop_max_stall_seconds",
                 "lbnode_bgp_session_state",
                 "lbnode_bfd_session_state", "lbnode_bfd_detection_time_seconds", "lbnode_sync_peer_lag_datagrams",
                 "lbnode_sync_peers", "lbnode_vip_announced"):
        assert fams[name].type == "gauge", name
    assert fams["lbnode_healthcheck_duration_seconds"].type == "histogram"
    assert "process_cpu_seconds" in fams  # the process collector rides along
    web11 = (("backend", "10.0.0.11"), ("port", "80"), ("proto", "tcp"), ("service", "web"), ("vip", "192.0.2.10"))
    assert samples(text, "lbnode_backend_bytes_total")[web11] == 1800
    assert samples(text, "lbnode_backend_weight")[(*web11[:1], ("kind", "configured"), *web11[1:])] == 2
    assert samples(text, "lbnode_backend_healthy")[web11] == 1
    drained = tuple(("backend", "10.0.0.13") if k == "backend" else (k, v) for k, v in web11)
    assert samples(text, "lbnode_backend_disabled")[drained] == 1
    assert samples(text, "lbnode_bfd_detection_time_seconds")[(("peer", "10.0.0.254"),)] == 0.3
    assert samples(text, "lbnode_bgp_session_state")[(("peer", "10.0.0.254"), ("state", "Established"))] == 1
    assert samples(text, "lbnode_sync_datagrams_dropped_total")[(("reason", "forged"),)] == 2
    assert samples(text, "lbnode_loop_max_stall_seconds")[()] == 0.0125
    assert samples(text, "lbnode_flow_table_capacity")[()] == 262144
    assert samples(text, "lbnode_vip_announced")[(("vip", "2001:db8::53"),)] == 1


def test_runtime_admin_state_is_exported_drained_backends_and_disabled_vips_with_their_phase() -> None:
    for admin, drained_12, dns_state in ((None, 0, "enabled"), (admin_state(), 1, "withdrawn")):
        text = metrics.render(unit_snapshot(admin))
        assert families(text)["lbnode_backend_drained"].type == "gauge"
        drained = {dict(k)["backend"]: v for k, v in samples(text, "lbnode_backend_drained").items()
                   if dict(k)["service"] == "web"}
        # 10.0.0.13 is disabled in the config: not drained, but disabled (as is a drained one)
        assert drained == {"10.0.0.11": 0, "10.0.0.12": drained_12, "10.0.0.13": 0}
        disabled = {dict(k)["backend"]: v for k, v in samples(text, "lbnode_backend_disabled").items()
                    if dict(k)["service"] == "web"}
        assert disabled == {"10.0.0.11": 0, "10.0.0.12": drained_12, "10.0.0.13": 1}
        assert samples(text, "lbnode_vip_disabled") == {(("vip", "192.0.2.10"),): 0,
                                                        (("vip", "2001:db8::53"),): float(dns_state != "enabled")}
        states = samples(text, "lbnode_vip_admin_state")
        assert {dict(k)["state"]: v for k, v in states.items() if dict(k)["vip"] == "2001:db8::53"} == {
            s: float(s == dns_state) for s in ("enabled", "withdrawn", "stopped")}
        assert states[(("state", "enabled"), ("vip", "192.0.2.10"))] == 1


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_promtool_accepts_the_metrics_with_runtime_admin_state() -> None:
    """The netns test lints a real node's page, which has nothing drained; this one has both."""
    lint = subprocess.run(["promtool", "check", "metrics"], input=metrics.render(unit_snapshot(admin_state())),
                          capture_output=True, timeout=30)
    assert lint.returncode == 0, (lint.stdout + lint.stderr).decode()


def test_a_stopped_vip_is_in_the_stopped_state() -> None:
    admin = admin_state()
    admin = dataclasses.replace(admin, disabled={v: dataclasses.replace(m, stop_new_at=None)
                                                 for v, m in admin.disabled.items()})
    states = samples(metrics.render(unit_snapshot(admin)), "lbnode_vip_admin_state")
    assert states[(("state", "stopped"), ("vip", "2001:db8::53"))] == 1
    assert states[(("state", "withdrawn"), ("vip", "2001:db8::53"))] == 0


def test_every_data_plane_stat_has_a_metric_of_its_own() -> None:
    """A stat added to lbnode.h must be placed: a verdict, or an event with a name (the
    catch-all lbnode_xdp_stat_total is for a running node newer than this table)."""
    placed = set(metrics.XDP_VERDICTS) | set(metrics.XDP_EVENTS)
    assert {s.name.lower() for s in Stat} == placed
    text = metrics.render(unit_snapshot())
    assert "lbnode_xdp_stat_total" not in text.decode()
    assert sum(samples(text, "lbnode_xdp_packets_total").values()) == sum(
        100 + int(s) for s in Stat if s.name.lower() in metrics.XDP_VERDICTS)


def test_health_check_durations_are_a_cumulative_histogram_in_seconds() -> None:
    text = metrics.render(unit_snapshot())
    slow = (("backend", "10.0.0.12"), ("check", "0"), ("kind", "tcp"))
    buckets = {dict(k)["le"]: v for k, v in samples(text, "lbnode_healthcheck_duration_seconds_bucket").items()
               if k[:3] == slow}
    # 0.8 ms, 1.8 ms and a 450 ms failure
    assert (buckets["0.001"], buckets["0.0025"], buckets["0.25"], buckets["0.5"], buckets["+Inf"]) == (1, 2, 2, 3, 3)
    total = [v for k, v in samples(text, "lbnode_healthcheck_duration_seconds_sum").items() if k[:3] == slow]
    assert total == [pytest.approx(0.4526)]


def test_latency_histogram_is_bounded_and_a_bound_belongs_to_its_bucket() -> None:
    h = LatencyHistogram()
    for d in (0.0, 0.001, 0.0010001, 5.0, 60.0, -1.0):
        h.observe(d)
    snap = h.snapshot()
    assert len(snap.counts) == len(BUCKETS_S) + 1 and snap.count == 6
    le_1ms = BUCKETS_S.index(0.001)
    assert snap.counts[0] == 2 and snap.counts[le_1ms] == 1  # 0 and the clamped -1; 0.001 is "le 0.001"
    assert snap.counts[le_1ms + 1] == 1  # 0.0010001
    assert snap.counts[-2] == 1 and snap.counts[-1] == 1  # 5.0 in le 5, 60 in +Inf
    assert snap.cumulative()[-1] == (float("inf"), 6)


@pytest.mark.parametrize(("weight", "expected", "observed"), [
    (3, {"configured": 3.0}, {}),
    ({"configured": 2, "observed": 0.4, "effective": 1.5, "note": "x"}, {"configured": 2.0, "effective": 1.5},
     {"lbnode_backend_load_observed": 0.4}),
    ({"configured": 2, "observed": None, "effective": 2}, {"configured": 2.0, "effective": 2.0}, {}),
])
def test_a_weight_is_exported_by_kind_in_both_document_forms(weight: object, expected: dict[str, float],
                                                             observed: dict[str, float]) -> None:
    """Weights by kind; the observed load (not a weight) has a gauge of its own, only with a reading."""
    doc = unit_document()
    doc["services"][0]["backends"][0]["weight"] = weight
    text = metrics.render(metrics.Snapshot(doc))
    got = {dict(k)["kind"]: v for k, v in samples(text, "lbnode_backend_weight").items()
           if dict(k)["backend"] == "10.0.0.11"}
    assert got == expected
    assert {name: v for name in ("lbnode_backend_load_observed", "lbnode_backend_weight_multiplier")
            for k, v in samples(text, name).items() if dict(k)["backend"] == "10.0.0.11"} == observed


def load_aware_snapshot() -> metrics.Snapshot:
    """The unit document with published load-aware weights for service web (as leastconn's leader
    publishes them: observed = the cluster's connections)."""
    inputs = unit_inputs()
    published = Published(0x0A000001, 7, {
        ipaddress.ip_address("10.0.0.11"): BackendWeight(150, 12.0, 1.5, LoadState.OK),
        ipaddress.ip_address("10.0.0.12"): BackendWeight(50, 40.0, 0.5, LoadState.OK),
        ipaddress.ip_address("10.0.0.13"): BackendWeight(100, None, 1.0, LoadState.NONE)})
    inputs = dataclasses.replace(inputs, weights={"web": published})
    return metrics.Snapshot(document(inputs, FakeSource()), inputs.health)


def test_load_aware_backends_export_observed_load_multiplier_effective_weight_and_active_connections() -> None:
    snapshot = load_aware_snapshot()
    text = metrics.render(snapshot)
    fams = families(text)
    for name in ("lbnode_backend_load_observed", "lbnode_backend_weight_multiplier",
                 "lbnode_backend_active_connections"):
        assert fams[name].type == "gauge", name
    web = {row["vip"]: row for row in snapshot.document["services"]}["192.0.2.10"]
    labels = {b["address"]: (("backend", b["address"]), ("port", "80"), ("proto", "tcp"), ("service", "web"),
                             ("vip", "192.0.2.10")) for b in web["backends"]}
    observed = samples(text, "lbnode_backend_load_observed")
    multiplier = samples(text, "lbnode_backend_weight_multiplier")
    assert observed[labels["10.0.0.11"]] == 12.0 and observed[labels["10.0.0.12"]] == 40.0
    assert labels["10.0.0.13"] not in observed  # no node read one: no sample rather than a made-up 0
    assert multiplier[labels["10.0.0.11"]] == 1.5 and multiplier[labels["10.0.0.13"]] == 1.0
    weights = samples(text, "lbnode_backend_weight")
    for b in web["backends"]:
        effective = (labels[b["address"]][0], ("kind", "effective"), *labels[b["address"]][1:])
        assert weights[effective] == b["weight"]["effective"]
    active = samples(text, "lbnode_backend_active_connections")
    assert {a: active[k] for a, k in labels.items()} == {b["address"]: b["active_connections"] for b in web["backends"]}
    assert all(b["active_connections"] > 0 for b in web["backends"])  # the fake's new_flows - closed
    assert len(active) == sum(len(r["backends"]) for r in snapshot.document["services"])  # every backend has one


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_promtool_accepts_the_metrics_of_load_aware_services() -> None:
    lint = subprocess.run(["promtool", "check", "metrics"], input=metrics.render(load_aware_snapshot()),
                          capture_output=True, timeout=30)
    assert lint.returncode == 0, (lint.stdout + lint.stderr).decode()


def test_the_unit_built_document_matches_the_schema_and_carries_its_version() -> None:
    doc = json.loads(json.dumps(unit_document(), default=str))
    assert schema_errors(doc, SCHEMA) == []
    assert doc["version"] == 1
    del doc["services"][0]["backends"][0]["in_hash"]
    doc["node"]["state"] = "dancing"
    assert schema_errors(doc, SCHEMA) == ["$.node.state: must be one of ['starting', 'resyncing', 'serving', "
                                          "'out of route', 'draining'], got 'dancing'",
                                          "$.services[0].backends[0]: missing 'in_hash'"]


def test_a_document_with_runtime_admin_state_matches_the_schema() -> None:
    doc = json.loads(json.dumps(unit_document(admin_state()), default=str))
    assert schema_errors(doc, SCHEMA) == []
    web, dns = doc["services"]
    assert web["backends"][1] | {"admin": "drained", "admin_by": "alice (uid 0, pid 4242)", "disabled": True} \
        == web["backends"][1]
    assert (dns["admin"], dns["admin_phase"], dns["takes_new_flows"]) == ("disabled", "withdrawn", True)
    assert [d["vip"] for d in doc["node"]["admin"]["disabled"]] == ["2001:db8::53"]
    dns["admin_phase"] = "paused"
    del doc["node"]["admin"]["drained"][0]["by"]
    assert schema_errors(doc, SCHEMA) == ["$.node.admin.drained[0]: missing 'by'",
                                          "$.services[1].admin_phase: must be one of ['withdrawn', 'stopped', None], "
                                          "got 'paused'"]


# ---- the listener and its routes ---------------------------------------------------------------------------

def get(url: str, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=10)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


async def fetch(url: str, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    return await trio.to_thread.run_sync(get, url, path, method)


async def test_routes_serve_status_metrics_and_console_and_survive_a_failing_build() -> None:
    calls = {"status": 0, "metrics": 0}
    document = json.dumps(unit_document(), default=str).encode() + b"\n"

    async def status() -> bytes:
        calls["status"] += 1
        if calls["status"] == 2:
            raise RuntimeError("a bug while building")
        return document

    def metrics_build() -> Callable[[], bytes]:
        calls["metrics"] += 1
        snapshot = unit_snapshot()
        return lambda: metrics.render(snapshot)

    listener = Listener(status, metrics_build)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(listener.run, LOOPBACK_ANY)
            (url,) = listener.urls
            code, headers, body = await fetch(url, "/api/v1/status")
            assert (code, headers["content-type"], body) == (200, "application/json", document)
            assert headers["cache-control"] == "no-store"
            code, _, body = await fetch(url, "/api/v1/status")
            assert code == 503 and b"a bug while building" in body
            assert (await fetch(url, "/api/v1/status"))[0] == 200  # the listener lives on
            code, headers, body = await fetch(url, "/metrics")
            assert code == 200 and headers["content-type"].startswith("text/plain; version=")
            assert b"lbnode_backend_packets_total{" in body
            code, headers, body = await fetch(url, "/")
            assert code == 200 and b'<script src="console.js"' in body
            assert "script-src 'self'" in headers["content-security-policy"]
            for path, ctype in (("/console.js", "text/javascript"), ("/console.css", "text/css")):
                code, headers, body = await fetch(url, path)
                assert code == 200 and headers["content-type"].startswith(ctype) and body
            code, _, body = await fetch(url, "/", "HEAD")
            assert code == 200 and body == b""
            assert (await fetch(url, "/api/v1/status", "POST"))[0] == 405
            assert (await fetch(url, "/nope"))[0] == 404
            assert (await fetch(url, "/healthz"))[2] == b"ok\n"
            nursery.cancel_scope.cancel()
    assert listener.urls == ()


async def test_an_address_in_use_is_an_error_naming_http_listen() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        async def status() -> bytes:
            return b"{}\n"

        listener = Listener(status, lambda: lambda: b"")
        with pytest.raises(WebError, match=rf"http.listen: cannot listen on 127.0.0.1:{port}: .*in use"):
            await listener.run(HttpConfig(port=port))


async def test_disabled_means_no_listener() -> None:
    async def status() -> bytes:
        return b"{}\n"

    listener = Listener(status, lambda: lambda: b"")
    async with trio.open_nursery() as nursery:
        await nursery.start(listener.run, HttpConfig(enabled=False, port=0))
    assert listener.urls == ()


# ---- a node serving it (fake components, real listener on a free port) ------------------------------------

NODE_CONFIG = """
services:
  - name: web
    vips: [192.0.2.10]
    ports: [80]
    backends: [{{address: 10.0.0.11}}, {{address: 10.0.0.12}}]
http: {{listen: "{listen}"}}
"""


async def test_a_node_serves_its_status_document_and_metrics_and_follows_a_reload(tmp_path: Path) -> None:
    from tests.test_node_unit import World  # the node's fakes

    path = tmp_path / "node.yaml"
    path.write_text(NODE_CONFIG.format(listen="127.0.0.1:0"))
    world = World()
    node = Node(NodeArgs(NODE_IP, "fake0", "02:00:00:00:00:05", str(path), str(tmp_path / "status.sock")),
                load_text(path.read_text(), NODE_IP, str(path)), world.components())
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            (url,) = node.snapshot()["node"]["http"]
            code, _, body = await fetch(url, "/api/v1/status")
            doc = json.loads(body)
            assert code == 200 and doc["version"] == 1 and doc["node"]["http"] == [url]
            assert [b["backend"] for b in doc["services"][0]["backends"]] == ["10.0.0.11:80", "10.0.0.12:80"]
            code, _, body = await fetch(url, "/metrics")
            assert code == 200 and samples(body, "lbnode_service_up")
            # A runtime change is in the very next scrape (not one reused from the last 0.2 s).
            drain = control.Drain(ipaddress.ip_address("10.0.0.12"))
            assert (await trio.to_thread.run_sync(status.request, node.args.status_socket, drain))["changed"]
            drained = samples((await fetch(url, "/metrics"))[2], "lbnode_backend_drained")
            assert {dict(k)["backend"]: v for k, v in drained.items()} == {"10.0.0.11": 0, "10.0.0.12": 1}
            # A reload onto an address in use is refused; the listener runs again as before.
            with socket.socket() as taken:
                taken.bind(("127.0.0.1", 0))
                taken.listen()
                path.write_text(NODE_CONFIG.format(listen=f"127.0.0.1:{taken.getsockname()[1]}"))
                await node.reload()
            assert node.reloads["refused"] == 1 and "http.listen: cannot listen on" in str(node.last_reload_error)
            (url,) = node.snapshot()["node"]["http"]  # port 0 again: a new free port
            assert (await fetch(url, "/healthz"))[2] == b"ok\n"
            # A reload that turns the listener off closes it; the rest of the node is untouched.
            path.write_text(NODE_CONFIG.format(listen="127.0.0.1:0").replace('"}', '", enabled: false}'))
            await node.reload()
            assert node.reloads["ok"] == 1 and node.snapshot()["node"]["http"] == []
            with pytest.raises(ConnectionRefusedError):
                await fetch(url, "/healthz")
            nursery.cancel_scope.cancel()


async def test_a_node_whose_listener_cannot_bind_stops_and_detaches(tmp_path: Path) -> None:
    from tests.test_node_unit import World

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        path = tmp_path / "node.yaml"
        path.write_text(NODE_CONFIG.format(listen=f"127.0.0.1:{taken.getsockname()[1]}"))
        world = World()
        node = Node(NodeArgs(NODE_IP, "fake0", "02:00:00:00:00:05", str(path), str(tmp_path / "status.sock")),
                    load_text(path.read_text(), NODE_IP, str(path)), world.components())
        with trio.fail_after(30), pytest.raises(BaseExceptionGroup) as caught:
            await node.run()
    assert caught.group_contains(WebError, match="http.listen: cannot listen on 127.0.0.1:")
    assert world.dp is not None and world.dp.closed and node.state != "serving"
