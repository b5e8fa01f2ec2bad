"""The `lbnode status` document, built from copies on a worker thread. No trio, no sockets.

A node with thousands of backends makes this tens of milliseconds of work (per-backend rows,
counters, JSON), and a monitoring script may ask twice a second, while BFD allows the event
loop 300 ms in all. So the node copies what it owns on the loop (`StatusInputs`, shallow and
cheap) and `document()` does the rest on a worker thread: it reads the data plane only through
calls that are safe from other threads (`counters`, `stats`, `service_index`, `backend_index`).
"""
from __future__ import annotations

import json
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
                "backend": b.id, "usable": b.passing, "in_hash": b.usable,
                "disabled": b.disabled, "weight": weight_doc(b, published), "mac": b.mac,
                "packets": bstats.packets if bstats else 0, "new_flows": bstats.new_flows if bstats else 0,
                "last_error": errors[0] if errors else None,
            })
        rows.append({
            "name": svc.name, "up": svc.up, "usable": svc.usable, "need": svc.need,
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
        "node": dict(inputs.node),
        "services": services(inputs, dp),
        "flows": dict(inputs.flows),
        "loop": dict(inputs.loop),
        "counters": {k.name.lower(): v for k, v in dp.stats().items()} if dp else {},
    }
    if inputs.bgp is not None:
        out["bgp"] = dict(inputs.bgp)
    if inputs.sync is not None:
        out["sync"] = dict(inputs.sync)
    if inputs.load:
        out["load"] = dict(inputs.load)
    return out


def encode(doc: Mapping[str, Any]) -> bytes:
    """One JSON line, as the status socket sends it."""
    return json.dumps(doc, default=str).encode() + b"\n"
