"""Prometheus metrics, derived from the status document on a worker thread. No trio, no sockets.

The node already builds its status document off the event loop (cluster.status_doc); the
metrics are that document, plus the health checker's probe-duration histograms, turned into
metric families by a `prometheus_client` collector (`SnapshotCollector`), and written out by
`prometheus_client.generate_latest`: the exposition format and its escaping are not ours to
write. `render()` does all of it and runs in `trio.to_thread` (cluster.web).

Naming follows Prometheus's conventions: the `lbnode_` prefix, `_total` on counters, base units
(`_bytes`, `_seconds`), and the same label names everywhere: `service` (the config's name),
`vip`, `port`, `proto`, `backend` (its address); `peer` for BGP, BFD and flow-sync peers.
The operator's runtime controls are gauges: `lbnode_backend_drained` (0/1 per backend row) and,
per VIP, `lbnode_vip_disabled` (0/1) with `lbnode_vip_admin_state{state}` (enabled, withdrawn,
stopped) as a state set, like `lbnode_node_state`.
Counters come from counters in the document (the data plane's, BGP's, flow sync's): they only
reset when the node restarts, which Prometheus's `rate()` handles.

Every data plane stat is exported, also one added later: verdicts as
`lbnode_xdp_packets_total{verdict}` (each packet lands in exactly one), the others by their own
name in `XDP_EVENTS`, anything unknown as `lbnode_xdp_stat_total{stat}`. Flow sync's counters
likewise: the ones with a name of their own below, every other as
`lbnode_sync_events_total{event}`, so a counter added to flow sync is never silently missing.
"""
from __future__ import annotations

import importlib.metadata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from bgp.bfd.codec import State as BfdState
from bgp.fsm import State as BgpState
from cluster.admin import STOPPED, WITHDRAWN
from healthcheck.state import ServiceStatus

# Data plane stats that are verdicts: every packet the program sees is counted in exactly one.
XDP_VERDICTS = ("pass", "pass_unparsed", "pass_not_ours", "tx", "drop_no_backend", "drop_fragment", "drop_unresolved")
# The other stats (events, not verdicts): stat name -> (metric name without lbnode_, help).
XDP_EVENTS: dict[str, tuple[str, str]] = {
    "new_flow": ("xdp_flows_pinned_total", "Flows pinned by the XDP program on this node."),
    "syn_unpinned": ("xdp_syn_unpinned_total", "SYNs of unknown flows forwarded by the hash table, not pinned."),
    "icmp_too_big": ("xdp_icmp_too_big_total", "ICMP frag-needed / ICMPv6 too-big sent to a flow's backend."),
    "flow_repinned": ("xdp_flows_repinned_total", "Pinned flows whose backend was removed, chosen again."),
    "event_lost": ("xdp_flow_events_lost_total", "Flow events lost because the ring buffer was full "
                                                 "(a peer misses that flow)."),
    "flood_unpinned": ("xdp_flood_unpinned_total", "New flows over the per-CPU pin cap, forwarded unpinned."),
}
NODE_STATES = ("starting", "resyncing", "serving", "out of route", "draining")
VIP_ADMIN_STATES = ("enabled", WITHDRAWN, STOPPED)  # a VIP's runtime state (cluster.admin)
BGP_STATES = tuple(s.value for s in BgpState)
BFD_STATES = tuple(s.name for s in BfdState)

# Flow sync counters with a metric of their own: counter -> (metric name without lbnode_, help).
SYNC_COUNTERS: dict[str, tuple[str, str]] = {
    "sent": ("sync_datagrams_sent_total", "Flow-sync datagrams sent."),
    "received": ("sync_datagrams_received_total", "Flow-sync datagrams received (before checks)."),
    "sent_flows": ("sync_flows_sent_total", "Flow records sent to the peers."),
    "received_flows": ("sync_flows_received_total", "Flow records received from the peers."),
    "installed": ("sync_flows_installed_total", "Flow records from the peers installed in the flow table."),
    "gaps": ("sync_gaps_total", "Sequence numbers found missing from the peers' streams."),
    "recovered": ("sync_gaps_recovered_total", "Missing sequence numbers that arrived later (resent)."),
    "lost": ("sync_lost_total", "Missing sequence numbers given up on (their flows were lost)."),
    "resends": ("sync_resends_total", "Datagrams resent to peers that asked."),
    "resend_requests": ("sync_resend_requests_total", "Resend requests sent to the peers."),
    "send_errors": ("sync_send_errors_total", "Flow-sync datagrams the socket refused to send."),
    "peer_resyncs": ("sync_resyncs_total", "Full flow-table resyncs requested from peers."),
}
# Counters of datagrams refused on arrival, as one metric with a reason label.
SYNC_DROPS = ("forged", "malformed", "unknown_key", "replayed", "stale", "self_looped", "control_replayed",
              "incarnation_too_old")
# Counters in the document that are copies (or gauges) of ones exported elsewhere.
SYNC_SKIP = frozenset({"gaps_open", "resends_received"})

SERVICE_LABELS = ("service", "vip", "port", "proto")
BACKEND_LABELS = (*SERVICE_LABELS, "backend")


def _version() -> str:
    try:
        return importlib.metadata.version("lbnode")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


VERSION = _version()


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What one scrape reads: the status document and the checker's snapshot it was built from."""

    document: Mapping[str, Any]
    health: Sequence[ServiceStatus] = ()


class SnapshotCollector(Collector):
    """A collector over one snapshot (a registry per scrape: nothing is shared between threads)."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        doc = self.snapshot.document
        yield from _node(doc)
        yield from _services(doc.get("services", []))
        yield from _xdp(doc.get("counters", {}))
        yield from _flows(doc.get("flows", {}), doc.get("loop", {}))
        yield from _health(doc.get("services", []), self.snapshot.health)
        if doc.get("bgp") is not None:
            yield from _bgp(doc["bgp"])
        if doc.get("sync") is not None:
            yield from _sync(doc["sync"])


def render(snapshot: Snapshot) -> bytes:
    """The exposition text of one scrape (blocking: run it on a worker thread)."""
    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)  # CPU, memory, open fds of the node's process
    registry.register(SnapshotCollector(snapshot))
    return generate_latest(registry)


# ---- families ---------------------------------------------------------------------------------------------

def _gauge(name: str, help_: str, labels: Sequence[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"lbnode_{name}", help_, labels=list(labels))


def _counter(name: str, help_: str, labels: Sequence[str] = ()) -> CounterMetricFamily:
    # prometheus_client appends _total itself; our names carry it so that they read as exported.
    return CounterMetricFamily(f"lbnode_{name.removesuffix('_total')}", help_, labels=list(labels))


def _service_labels(row: Mapping[str, Any]) -> list[str]:
    return [str(row.get("service", row["name"])), str(row.get("vip", "")), str(row.get("port", "")),
            str(row.get("protocol", ""))]


def _node(doc: Mapping[str, Any]) -> Iterator[Metric]:
    node = doc.get("node", {})
    info = InfoMetricFamily("lbnode_node", "The node: its address, interface, XDP mode and software version.",
                            labels=["ip", "interface", "xdp", "version", "status_version"])
    info.add_metric([str(node.get("ip", "")), str(node.get("interface", "")), str(node.get("xdp", "")), VERSION,
                     str(doc.get("version", ""))], {})
    yield info
    state = _gauge("node_state", "1 for the node's current state, 0 for the others.", ["state"])
    current = node.get("state")
    for s in sorted({*NODE_STATES, *([current] if isinstance(current, str) else [])}):
        state.add_metric([s], 1.0 if s == current else 0.0)
    yield state
    announced = _gauge("vip_announced", "1 while the node announces the VIP over BGP, 0 while it withholds it.",
                       ["vip"])
    for prefix in node.get("announced", []):
        announced.add_metric([_prefix_address(prefix)], 1.0)
    for prefix in node.get("withheld", {}):
        announced.add_metric([_prefix_address(prefix)], 0.0)
    yield announced
    reloads = _counter("config_reloads_total", "Config reloads (SIGHUP) by result.", ["result"])
    for result, n in sorted(node.get("reloads", {}).items()):
        reloads.add_metric([result], n)
    yield reloads
    reattached = _counter("xdp_reattached_total", "Times the XDP program was found detached and attached again.")
    reattached.add_metric([], node.get("xdp_reattached", 0))
    yield reattached
    forwarding = _gauge("node_can_forward", "1 unless the data plane cannot forward (then the node withdraws).")
    forwarding.add_metric([], 0.0 if node.get("forwarding_problem") else 1.0)
    yield forwarding


def _prefix_address(prefix: str) -> str:
    """A host route's address ("192.0.2.10/32" -> "192.0.2.10"), as the `vip` label of services."""
    address, _, length = prefix.partition("/")
    return address if length in ("32", "128", "") else prefix


def _services(rows: Sequence[Mapping[str, Any]]) -> Iterator[Metric]:
    up = _gauge("service_up", "1 while the service has `need` usable backends.", SERVICE_LABELS)
    usable = _gauge("service_usable_backends", "Backends usable (healthy, weight > 0, MAC known).", SERVICE_LABELS)
    need = _gauge("service_need_backends", "Usable backends the service needs to be announced.", SERVICE_LABELS)
    s_counts = {key: _counter(f"service_{key}_total", f"{text} of the service, counted by the XDP program.",
                              SERVICE_LABELS)
                for key, text in (("packets", "Packets"), ("bytes", "Bytes"), ("new_flows", "New flows"),
                                  ("drops", "Packets dropped"))}
    healthy = _gauge("backend_healthy", "1 while the backend passes its health checks and is not drained.",
                     BACKEND_LABELS)
    in_hash = _gauge("backend_in_hash", "1 while the backend takes new flows (healthy, weight > 0, MAC known).",
                     BACKEND_LABELS)
    disabled = _gauge("backend_disabled", "1 while the backend is disabled in the config or drained at run time.",
                      BACKEND_LABELS)
    drained = _gauge("backend_drained", "1 while the backend is drained at run time (`lbnode drain`), until undrained.",
                     BACKEND_LABELS)
    weight = _gauge("backend_weight", "The backend's weight: configured, and effective (what the hash uses) where "
                    "the node computes weights from load.", [*BACKEND_LABELS, "kind"])
    observed = _gauge("backend_load_observed", "Load-aware weighting: the cluster's combined reading of the backend's "
                      "load (agent: fraction of its weight; http: the reported load; leastconn: active connections "
                      "summed over the nodes).", BACKEND_LABELS)
    multiplier = _gauge("backend_weight_multiplier", "Load-aware weighting: the factor on the configured weight the "
                        "controller (or the agent) sets.", BACKEND_LABELS)
    active = _gauge("backend_active_connections", "Live connections this node forwards to the backend: not closing, "
                    "a packet within weighting.idle_s, recounted from the flow table every maintenance pass (what "
                    "leastconn sums over the nodes).", BACKEND_LABELS)
    b_counts = {key: _counter(f"backend_{key}_total", f"{text} sent to the backend by the XDP program.",
                              BACKEND_LABELS)
                for key, text in (("packets", "Packets"), ("bytes", "Bytes"), ("new_flows", "New flows"))}
    for row in rows:
        labels = _service_labels(row)
        up.add_metric(labels, 1.0 if row.get("up") else 0.0)
        usable.add_metric(labels, row.get("usable", 0))
        need.add_metric(labels, row.get("need", 0))
        for key, family in s_counts.items():
            family.add_metric(labels, row.get(key, 0))
        for b in row.get("backends", []):
            blabels = [*labels, str(b.get("address", b["backend"]))]
            healthy.add_metric(blabels, 1.0 if b.get("usable") else 0.0)
            in_hash.add_metric(blabels, 1.0 if b.get("in_hash") else 0.0)
            disabled.add_metric(blabels, 1.0 if b.get("disabled") or b.get("admin") else 0.0)
            drained.add_metric(blabels, 1.0 if b.get("admin") == "drained" else 0.0)
            for kind, value in _weights(b.get("weight")):
                if kind == "observed":
                    observed.add_metric(blabels, value)
                elif kind == "multiplier":
                    multiplier.add_metric(blabels, value)
                else:
                    weight.add_metric([*blabels, kind], value)
            active.add_metric(blabels, b.get("active_connections", 0))
            for key, family in b_counts.items():
                family.add_metric(blabels, b.get(key, 0))
    yield from (up, usable, need, *s_counts.values(), healthy, in_hash, disabled, drained, weight, observed,
                multiplier, active, *b_counts.values())
    yield from _vip_admin(rows)


def _vip_admin(rows: Sequence[Mapping[str, Any]]) -> Iterator[Metric]:
    """`lbnode disable VIP`, per VIP of the config: a 0/1 gauge to alert on, and the phase as a
    state set (enabled; withdrawn: route withdrawn, new flows still taken for the grace; stopped)."""
    phases: dict[str, str] = {}
    for row in rows:  # a VIP's rows (its ports, its services) share one mark
        vip = str(row.get("vip", ""))
        if row.get("admin") == "disabled":
            phases[vip] = str(row.get("admin_phase"))
        else:
            phases.setdefault(vip, "enabled")
    disabled = _gauge("vip_disabled", "1 while the VIP is disabled at run time (`lbnode disable`), until enabled.",
                      ["vip"])
    state = _gauge("vip_admin_state", "1 for the VIP's runtime admin state (enabled, or disabled and withdrawn "
                   "or stopped), 0 for the others.", ["vip", "state"])
    for vip, phase in sorted(phases.items()):
        disabled.add_metric([vip], 0.0 if phase == "enabled" else 1.0)
        for s in sorted({*VIP_ADMIN_STATES, phase}):
            state.add_metric([vip, s], 1.0 if s == phase else 0.0)
    yield from (disabled, state)


def _weights(weight: Any) -> Iterator[tuple[str, float]]:
    """A weight as the document holds it: a number (the configured one), or a mapping of kinds
    (configured, observed, effective, multiplier; observed is None without a reading) once the
    node computes weights from load."""
    if isinstance(weight, bool):
        return
    if isinstance(weight, (int, float)):
        yield "configured", float(weight)
    elif isinstance(weight, Mapping):
        for kind, value in sorted(weight.items()):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                yield str(kind), float(value)


def _xdp(counters: Mapping[str, int]) -> Iterator[Metric]:
    verdicts = _counter("xdp_packets_total", "Packets seen by the XDP program, by verdict (each in exactly one).",
                        ["verdict"])
    events = {stat: _counter(name, help_) for stat, (name, help_) in XDP_EVENTS.items()}
    other = _counter("xdp_stat_total", "Data plane stats without a metric of their own.", ["stat"])
    for stat, value in counters.items():
        if stat in XDP_VERDICTS:
            verdicts.add_metric([stat], value)
        elif stat in events:
            events[stat].add_metric([], value)
        else:
            other.add_metric([stat], value)
    yield verdicts
    yield from (family for family in events.values() if family.samples)
    if other.samples:
        yield other


def _flows(flows: Mapping[str, Any], loop: Mapping[str, Any]) -> Iterator[Metric]:
    entries = _gauge("flow_table_entries", "Flows in the XDP flow table (from counters, not a walk).")
    entries.add_metric([], flows.get("entries", 0))
    capacity = _gauge("flow_table_capacity", "Entries the XDP flow table holds (an LRU: the oldest go first).")
    capacity.add_metric([], flows.get("table_size", 0))
    stall = _gauge("loop_max_stall_seconds", "The longest the node's event loop was blocked since start-up.")
    stall.add_metric([], loop.get("max_stall_ms", 0.0) / 1e3)
    window = _gauge("loop_window_stall_seconds", "The longest the event loop was blocked over the last window.")
    window.add_metric([], loop.get("window_stall_ms", 0.0) / 1e3)
    yield from (entries, capacity, stall, window)


def _health(rows: Sequence[Mapping[str, Any]], health: Sequence[ServiceStatus]) -> Iterator[Metric]:
    labels = [*BACKEND_LABELS, "check", "kind"]
    duration = HistogramMetricFamily("lbnode_healthcheck_duration_seconds",
                                     "How long health-check probes took (failures and timeouts included).",
                                     labels=labels)
    runs = _counter("healthcheck_runs_total", "Health-check probes run.", labels)
    failures = _counter("healthcheck_failures_total", "Health-check probes that failed.", labels)
    by_name = {row["name"]: row for row in rows}
    for svc in health:
        row = by_name.get(svc.service)
        if row is None:  # a checker snapshot from before a reload: no labels to give it
            continue
        addresses = {b["backend"]: str(b.get("address", b["backend"])) for b in row.get("backends", [])}
        slabels = _service_labels(row)
        for b in svc.backends:
            address = addresses.get(str(b.backend), str(b.backend))
            for c in b.checks:
                clabels = [*slabels, address, str(c.index), c.kind.value]
                runs.add_metric(clabels, c.runs)
                failures.add_metric(clabels, c.failures)
                if c.latency is not None:
                    duration.add_metric(clabels, [(_le(bound), n) for bound, n in c.latency.cumulative()],
                                        c.latency.sum_s)
    yield from (duration, runs, failures)


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def _bgp(bgp: Mapping[str, Any]) -> Iterator[Metric]:
    peer = ["peer"]
    state = _gauge("bgp_session_state", "1 for the BGP session's current state, 0 for the others.", ["peer", "state"])
    established = _gauge("bgp_session_established", "1 while the BGP session is Established.", peer)
    sessions = _counter("bgp_sessions_established_total", "Times the BGP session reached Established.", peer)
    updates = _counter("bgp_updates_received_total", "UPDATE messages received from the peer.", peer)
    withdrawn = _counter("bgp_updates_treat_as_withdraw_total",
                         "Received UPDATEs with attribute errors, treated as withdraw (RFC 7606).", peer)
    bfd_downs = _counter("bgp_bfd_downs_total", "BGP sessions torn down because BFD failed.", peer)
    bfd_state = _gauge("bfd_session_state", "1 for the BFD session's current state, 0 for the others.",
                       ["peer", "state"])
    bfd_up = _gauge("bfd_session_up", "1 while the BFD session is Up.", peer)
    detection = _gauge("bfd_detection_time_seconds", "The BFD session's detection time (RFC 5880 §6.8.4).", peer)
    tx_interval = _gauge("bfd_tx_interval_seconds", "The interval BFD control packets are sent at.", peer)
    bfd_counts = {key: _counter(f"bfd_{name}_total", help_, peer) for key, name, help_ in (
        ("packets_sent", "packets_sent", "BFD control packets sent."),
        ("packets_received", "packets_received", "BFD control packets received."),
        ("send_errors", "send_errors", "BFD control packets the socket refused to send."),
        ("up_transitions", "up_transitions", "Times the BFD session came Up."),
        ("failures", "failures", "Times the BFD session went from Up to Down (other than by AdminDown)."))}
    for p in bgp.get("peers", []):
        address = str(p.get("address", ""))
        for s in sorted({*BGP_STATES, str(p.get("state"))}):
            state.add_metric([address, s], 1.0 if s == p.get("state") else 0.0)
        established.add_metric([address], 1.0 if p.get("state") == BgpState.ESTABLISHED.value else 0.0)
        sessions.add_metric([address], p.get("established_count", 0))
        updates.add_metric([address], p.get("received_updates", 0))
        withdrawn.add_metric([address], p.get("treat_as_withdraw", 0))
        bfd_downs.add_metric([address], p.get("bfd_downs", 0))
        bfd = p.get("bfd")
        if not isinstance(bfd, Mapping):
            continue
        for s in sorted({*BFD_STATES, str(bfd.get("state"))}):
            bfd_state.add_metric([address, s], 1.0 if s == bfd.get("state") else 0.0)
        bfd_up.add_metric([address], 1.0 if bfd.get("state") == BfdState.UP.name else 0.0)
        if bfd.get("detection_time_ms") is not None:
            detection.add_metric([address], bfd["detection_time_ms"] / 1e3)
        if bfd.get("tx_interval_ms") is not None:
            tx_interval.add_metric([address], bfd["tx_interval_ms"] / 1e3)
        for key, family in bfd_counts.items():
            family.add_metric([address], bfd.get(key, 0))
    announced = _gauge("bgp_announced_routes", "Routes the node announces to its BGP peers.")
    announced.add_metric([], len(bgp.get("announced", [])))
    yield from (state, established, sessions, updates, withdrawn, bfd_downs, announced, bfd_state, bfd_up,
                detection, tx_interval, *bfd_counts.values())


def _sync(sync: Mapping[str, Any]) -> Iterator[Metric]:
    ready = _gauge("sync_ready", "1 once flow sync has resynced from its peers (or had none to ask).")
    ready.add_metric([], 1.0 if sync.get("ready") else 0.0)
    mismatch = _gauge("sync_digest_mismatch", "1 while a live peer's service/backend/health digest differs.")
    mismatch.add_metric([], 1.0 if sync.get("digest_mismatch") else 0.0)
    gaps_open = _gauge("sync_gaps_open", "Missing sequence numbers still waiting for a resend.")
    gaps_open.add_metric([], sync.get("gaps_open", 0))
    pending = _gauge("sync_ring_pending_bytes", "Flow events waiting in the ring buffer for flow sync to read.")
    pending.add_metric([], sync.get("ring_pending_bytes", 0))
    labels = ["peer", "node_id"]
    peers = _gauge("sync_peers", "Flow-sync peers heard from and alive.")
    alive = _gauge("sync_peer_alive", "1 while the flow-sync peer is heard from.", labels)
    lag = _gauge("sync_peer_lag_datagrams", "Sequence numbers missing from the peer's stream (its lag).", labels)
    seen = _gauge("sync_peer_last_seen_seconds", "Seconds since the peer was last heard from.", labels)
    flows = _gauge("sync_peer_flows", "Flows the peer reports in its table.", labels)
    for p in sync.get("peers", []):
        plabels = [str(p.get("address") or ""), str(p.get("node_id", ""))]
        alive.add_metric(plabels, 1.0 if p.get("alive") else 0.0)
        lag.add_metric(plabels, p.get("lag", 0))
        seen.add_metric(plabels, p.get("last_seen_s", 0.0))
        if p.get("flows") is not None:
            flows.add_metric(plabels, p["flows"])
    peers.add_metric([], sum(1 for p in sync.get("peers", []) if p.get("alive")))
    counters = sync.get("counters", {})
    named = {key: _counter(name, help_) for key, (name, help_) in SYNC_COUNTERS.items()}
    dropped = _counter("sync_datagrams_dropped_total", "Flow-sync datagrams refused on arrival, by reason.",
                       ["reason"])
    other = _counter("sync_events_total", "Other flow-sync events, by name (counters without a metric of their own).",
                     ["event"])
    for key, value in sorted(counters.items()):
        if key in named:
            named[key].add_metric([], value)
        elif key in SYNC_DROPS:
            dropped.add_metric([key], value)
        elif key not in SYNC_SKIP:
            other.add_metric([key], value)
    yield from (ready, mismatch, gaps_open, pending, peers, alive, lag, seen, flows)
    yield from (family for family in named.values() if family.samples)
    yield from (dropped, other)
