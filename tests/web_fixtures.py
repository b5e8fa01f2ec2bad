"""A status document built by the real code from fake inputs (unit tier): the node's config,
decide(), the health checker's state with probe results, a data plane fake with counters, a
BGP peer with BFD and a flow-sync engine with a peer. Also a small JSON Schema checker."""
from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Mapping
from typing import Any

import numpy as np

from bgp.bfd.session import BfdStatus
from bgp.peer import PeerStatus
from bpf.counters import Counters
from bpf.structs import BackendStats, ServiceStats, Stat
from cluster.admin import AdminState, Mark, VipMark
from cluster.config import IPAddress, load_text
from cluster.desired import View, decide
from cluster.metrics import Snapshot
from cluster.status_doc import StatusInputs, document
from cluster.sync import codec
from cluster.sync.engine import SyncEngine
from cluster.sync.status import sync_status
from healthcheck.state import ServiceHealth

NODE_IP = ipaddress.ip_address("10.0.0.5")
CONFIG = """
services:
  - name: web
    vips: [192.0.2.10]
    ports: [80]
    need: 1
    backends: [{address: 10.0.0.11, weight: 2}, {address: 10.0.0.12}, {address: 10.0.0.13, disabled: true}]
  - name: dns
    vips: ["2001:db8::53"]
    ports: [53]
    protocol: udp
    checks: [{kind: tcp, port: 53}]
    backends: [{address: "2001:db8::b"}]
"""


class FakeSource:
    """The data plane's thread-safe calls, with counters that grow by `step` per call."""

    def __init__(self) -> None:
        self.index: dict[tuple[Any, ...], int] = {}
        self.step = 0

    def counters(self) -> Counters:
        self.step += 1
        n = 64  # more than the indexes handed out
        services = np.array([[10 * self.step * (i + 1), 1500 * self.step * (i + 1), self.step, i]
                             for i in range(n)], dtype=np.uint64)
        backends = np.array([[7 * self.step * (i + 1), 900 * self.step * (i + 1), self.step, 0] for i in range(n)],
                            dtype=np.uint64)
        assert services.shape[1] == len(ServiceStats._fields_) and backends.shape[1] == len(BackendStats._fields_)
        return Counters(services, backends)

    def stats(self) -> dict[Stat, int]:
        return {s: 100 + int(s) for s in Stat}

    def service_index(self, vip: IPAddress, port: int, proto: int) -> int | None:
        return self.index.setdefault(("s", vip, port, proto), len(self.index))

    def backend_index(self, vip: IPAddress, port: int, proto: int, address: IPAddress) -> int | None:
        return self.index.setdefault(("b", vip, port, proto, address), len(self.index))


def admin_state() -> AdminState:
    """What `lbnode drain 10.0.0.12 --service web` and `lbnode disable 2001:db8::53` leave (the
    VIP still in its grace: withdrawn)."""
    return AdminState(
        drained={("web", ipaddress.ip_address("10.0.0.12")): Mark("alice (uid 0, pid 4242)", "2026-12-01T20:15:02Z")},
        disabled={ipaddress.ip_address("2001:db8::53"): VipMark("bob (uid 0, pid 4343)", "2026-12-01T20:16:40Z",
                                                                stop_new_at=1e9)})


def unit_inputs(admin: AdminState | None = None) -> StatusInputs:
    """`admin`: runtime admin state (default: none)."""
    admin = admin if admin is not None else AdminState()
    config = load_text(CONFIG, NODE_IP)
    healths = [ServiceHealth(h, 0.0) for s in config.services for h in s.health_configs()]
    for health in healths:
        for i, b in enumerate(health.config.backends):
            for t in range(3):  # three probes each: fast passes, and one slow failure for the second backend
                ok = not (i == 1 and t == 2)
                health.observe(b.key, 0, ok, float(t), latency_ms=0.8 + t if ok else 450.0,
                               error=None if ok else "timeout after 500 ms connecting")
    healthy = {h.config.name: frozenset(h.usable_backends()) for h in healths}
    macs = {b.address: f"02:00:00:00:00:{i:02x}" for s in config.services for i, b in enumerate(s.backends)}
    desired = decide(View(config, healthy, macs, ready=True, admin=admin))
    bfd = BfdStatus(peer="10.0.0.254", state="UP", remote_state="UP", local_diag="NONE", remote_diag=0,
                    local_discriminator=1, remote_discriminator=2, tx_interval_ms=100.0, detection_time_ms=300.0,
                    poll_active=False, packets_sent=50, packets_received=49, send_errors=0, up_transitions=1,
                    failures=0, last_change_s=1.0, interface="eth0", interface_changes=0)
    peer = PeerStatus(address="10.0.0.254", state="Established", established_count=1, received_updates=3,
                      treat_as_withdraw=0, bfd_downs=0, inbox_peak=1, reader_waits=0, last_error="", bfd=bfd)
    engine = SyncEngine(codec.Keyring(b"unit-test-key-0123456789abcdef!"), 5, 1000)
    engine.counters["forged"] = 2
    return StatusInputs(
        desired=desired,
        health=tuple(h.snapshot() for h in healths),
        node={"ip": str(NODE_IP), "interface": "eth0", "xdp": "native", "state": "serving", "config": None,
              "reloads": {"ok": 1, "refused": 0}, "last_reload_error": None, "forwarding_problem": None,
              "xdp_reattached": 0, "announced": [str(p) for p in desired.routes],
              "admin": admin.document(),
              "http": ["http://127.0.0.1:9473"], "withheld": {str(p): r for p, r in desired.withheld.items()}},
        flows={"entries": 12, "table_size": 262144},
        loop={"max_stall_ms": 12.5, "window_stall_ms": 3.0, "window_s": 10.0, "max_step_ms": 12.5,
              "max_step_task": "x", "max_heartbeat_late_ms": 1.0, "steps": 1000},
        bgp={"peers": [dataclasses.asdict(peer)], "announced": [str(p) for p in desired.routes]},
        sync=sync_status(engine, {**engine.counters, "sent": 4, "sent_flows": 40, "received": 3}, 0, 10.0),
    )


def unit_document(admin: AdminState | None = None) -> dict[str, Any]:
    return document(unit_inputs(admin), FakeSource())


def unit_snapshot(admin: AdminState | None = None) -> Snapshot:
    inputs = unit_inputs(admin)
    return Snapshot(document(inputs, FakeSource()), inputs.health)


# ---- a JSON Schema checker for the keywords tests/data/status.schema.json uses -------------------------
# (the jsonschema package is not installed here; this covers exactly these keywords, and refuses any
# other, so the schema file cannot silently use one it does not check)

KEYWORDS = frozenset({"$schema", "$id", "$defs", "$ref", "title", "description", "type", "properties", "required",
                      "additionalProperties", "items", "enum", "minimum", "const"})
TYPES: dict[str, tuple[type, ...]] = {"object": (dict,), "array": (list,), "string": (str,), "integer": (int,),
                                      "number": (int, float), "boolean": (bool,), "null": (type(None),)}


def schema_errors(value: Any, schema: Mapping[str, Any], root: Mapping[str, Any] | None = None,
                  path: str = "$") -> list[str]:
    root = root if root is not None else schema
    unknown = set(schema) - KEYWORDS
    if unknown:
        raise ValueError(f"{path}: schema keywords this checker does not know: {sorted(unknown)}")
    if "$ref" in schema:
        ref = schema["$ref"]
        assert ref.startswith("#/$defs/"), ref
        return schema_errors(value, root["$defs"][ref.removeprefix("#/$defs/")], root, path)
    errors: list[str] = []
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        ok = any(isinstance(value, TYPES[t]) and not (t in ("integer", "number") and isinstance(value, bool))
                 for t in types)
        if not ok:
            return [f"{path}: expected {'/'.join(types)}, got {type(value).__name__} {value!r:.60}"]
    if "const" in schema and value != schema["const"]:
        errors.append(f"{path}: must be {schema['const']!r}, got {value!r}")
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: must be one of {schema['enum']}, got {value!r}")
    if "minimum" in schema and isinstance(value, (int, float)) and value < schema["minimum"]:
        errors.append(f"{path}: must be >= {schema['minimum']}, got {value!r}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        errors += [f"{path}: missing {k!r}" for k in schema.get("required", []) if k not in value]
        extra = schema.get("additionalProperties", True)
        for k, v in value.items():
            if k in props:
                errors += schema_errors(v, props[k], root, f"{path}.{k}")
            elif extra is False:
                errors.append(f"{path}: unexpected key {k!r} (add it to the schema)")
            elif isinstance(extra, Mapping):
                errors += schema_errors(v, extra, root, f"{path}.{k}")
    if isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            errors += schema_errors(v, schema["items"], root, f"{path}[{i}]")
    return errors
