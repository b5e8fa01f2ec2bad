"""The `lbnode status` document, built from copies on a worker thread. No trio, no sockets.

A node with thousands of backends makes this tens of milliseconds of work (per-backend rows,
counters, JSON), and a monitoring script may ask twice a second, while BFD allows the event
loop 300 ms in all. So the node copies what it owns on the loop (`StatusInputs`, shallow and
cheap) and `document()` does the rest on a worker thread: it reads the data plane only through
calls that are safe from other threads (`counters`, `stats`, `service_index`, `backend_index`).
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from bpf.counters import Counters
from bpf.structs import Stat
from cluster.config import IPAddress
from cluster.desired import BackendState, Desired
from cluster.loadshare import Published
from cluster.sync.codec import LoadState
from healthcheck.state import ServiceStatus

# The document's format: bumped when a field is removed or changes meaning (adding one does not).
# tests/data/status.schema.json pins it; /api/v1/status and `lbnode status --json` carry it.
VERSION = 1
PROTOCOL_NAMES = {6: "tcp", 17: "udp"}


class StatusSource(Protocol):
    """The data plane's calls the document makes; each is safe from another thread."""

    def counters(self) -> Counters: ...
    def stats(self) -> dict[Stat, int]: ...
    def service_index(self, vip: IPAddress, port: int, proto: int) -> int | None: ...
    def backend_index(self, vip: IPAddress, port: int, proto: int, address: IPAddress) -> int | None: ...


@dataclass(frozen=True, slots=True)
class StatusInputs:
    """What the document needs from the node, copied on the event loop."""

    desired: Desired  # the node's latest decision: its service rows, "usable" and "up" are that
    health: tuple[ServiceStatus, ...]
    node: Mapping[str, Any]
    flows: Mapping[str, Any]
    loop: Mapping[str, Any]
    bgp: Mapping[str, Any] | None
    sync: Mapping[str, Any] | None
    weights: Mapping[str, Published] = field(default_factory=dict)  # load-aware, per service name
    load: Mapping[str, Any] | None = None  # the load-aware weighting component's leaders and counters


def services(inputs: StatusInputs, dp: StatusSource | None) -> list[dict[str, Any]]:
    """One row per (VIP, port) with its backends: health, hash membership, weight, MAC, counters.
    A row's `usable` and `up` are the ones BGP follows (cluster.desired); a backend's `usable`
    is its health verdict (checks pass, not drained) and `in_hash` whether it takes new flows."""
    health = {s.service: s for s in inputs.health}
    counters = dp.counters() if dp is not None else None
    rows = []
    for svc in inputs.desired.services:
        status = health.get(svc.name)
        by_key = {b.backend: b for b in status.backends} if status else {}
        index = dp.service_index(svc.vip, svc.port, svc.proto) if dp else None
        stats = counters.service(index) if counters is not None and index is not None else None
        # A row's name is the health checker's "web/192.0.2.10:80"; service names have no "/".
        published = inputs.weights.get(svc.name.split("/", 1)[0])
        backends = []
        for b in svc.backends:
            bstatus = by_key.get(b.id)
            bindex = dp.backend_index(svc.vip, svc.port, svc.proto, b.address) if dp else None
            bstats = counters.backend(bindex) if counters is not None and bindex is not None else None
            errors = [c.last_error for c in bstatus.checks if c.last_error and not c.last_ok] if bstatus else []
            backends.append({
                "backend": b.id, "address": str(b.address), "usable": b.passing,
                "in_hash": b.usable and svc.takes_new_flows,
                "disabled": b.disabled, "weight": weight_doc(b, published), "mac": b.mac,
                # drained at run time (`lbnode drain`; `disabled` is true then too), by whom, when
                "admin": "drained" if b.admin else None,
                "admin_by": b.admin.by if b.admin else None, "admin_at": b.admin.at if b.admin else None,
                "packets": bstats.packets if bstats else 0, "bytes": bstats.bytes if bstats else 0,
                "new_flows": bstats.new_flows if bstats else 0,
                # live connections this node forwards to it (bpf/counters.py ActiveTally); < 0 for
                # a moment when flows counted by a peer closed here: shown as 0
                "active_connections": max(0, counters.active(bindex)) if counters is not None and bindex is not None
                else 0,
                "last_error": errors[0] if errors else None,
            })
        rows.append({
            # The health name is "<config name>/<vip:port>"; config names have no "/".
            "name": svc.name, "service": svc.name.partition("/")[0], "vip": str(svc.vip), "port": svc.port,
            "protocol": PROTOCOL_NAMES.get(svc.proto, str(svc.proto)),
            "up": svc.up, "usable": svc.usable, "need": svc.need,
            # its VIP disabled at run time (`lbnode disable`): route withdrawn; new flows taken until
            # the grace ends (phase "withdrawn"), then not (phase "stopped"); pinned flows go on
            "disabled": svc.admin is not None, "admin": "disabled" if svc.admin else None,
            "admin_phase": svc.admin.phase if svc.admin else None,
            "admin_by": svc.admin.by if svc.admin else None, "admin_at": svc.admin.at if svc.admin else None,
            "takes_new_flows": svc.takes_new_flows,
            "packets": stats.packets if stats else 0, "bytes": stats.bytes if stats else 0,
            "new_flows": stats.new_flows if stats else 0, "drops": stats.drops if stats else 0,
            "backends": backends,
        })
    return rows


def weight_doc(b: BackendState, published: Published | None) -> dict[str, Any]:
    """A backend's weights: configured, observed (the cluster's combined load reading, None without
    one or under static weighting) and effective (what the hash uses). An agent's drain, down or
    maint shows as `agent`."""
    entry = published.backends.get(b.address) if published is not None else None
    doc: dict[str, Any] = {"configured": b.configured_weight if b.configured_weight is not None else b.weight,
                           "observed": None if entry is None or entry.observed is None else round(entry.observed, 4),
                           "effective": b.weight}
    if entry is not None:
        doc["multiplier"] = round(entry.multiplier, 4)
        doc["agent"] = entry.state.name.lower() if entry.state not in (LoadState.OK, LoadState.NONE) else None
    return doc


def document(inputs: StatusInputs, dp: StatusSource | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "version": VERSION,
        "node": dict(inputs.node),
        "services": services(inputs, dp),
        "flows": dict(inputs.flows),
        "loop": dict(inputs.loop),
        "counters": {k.name.lower(): v for k, v in dp.stats().items()} if dp else {},
        "process": {"rss_bytes": rss_bytes()},
    }
    if inputs.bgp is not None:
        out["bgp"] = dict(inputs.bgp)
    if inputs.sync is not None:
        out["sync"] = dict(inputs.sync)
    if inputs.load:
        out["load"] = dict(inputs.load)
    return out


def rss_bytes() -> int:
    """This process's resident set (the node must stay small: it never loads bcc's LLVM)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def encode(doc: Mapping[str, Any]) -> bytes:
    """One JSON line, as the status socket sends it."""
    return json.dumps(doc, default=str).encode() + b"\n"
