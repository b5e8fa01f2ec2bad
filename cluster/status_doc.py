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
from dataclasses import dataclass
from typing import Any, Protocol

from bpf.counters import Counters
from bpf.structs import Stat
from cluster.config import IPAddress
from cluster.desired import Desired
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
        backends = []
        for b in svc.backends:
            bstatus = by_key.get(b.id)
            bindex = dp.backend_index(svc.vip, svc.port, svc.proto, b.address) if dp else None
            bstats = counters.backend(bindex) if counters is not None and bindex is not None else None
            errors = [c.last_error for c in bstatus.checks if c.last_error and not c.last_ok] if bstatus else []
            backends.append({
                "backend": b.id, "usable": b.passing, "in_hash": b.usable,
                "disabled": b.disabled, "weight": b.weight, "mac": b.mac,
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


def document(inputs: StatusInputs, dp: StatusSource | None) -> dict[str, Any]:
    out: dict[str, Any] = {
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
