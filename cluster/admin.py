"""Runtime admin state: backends drained and VIPs disabled by an operator. Pure: no I/O, no clock.

Theory of operation. `lbnode drain/undrain BACKEND [--service NAME]` and `lbnode disable/enable
VIP` (cluster.control) change one `AdminState`, which the node puts in its `View`; decide()
(cluster.desired) reads it:
- A drained backend is what the config's `disabled: true` is: out of the hash for new flows,
  not counted towards `need`, its pinned flows go on. It is drained per (config service, address):
  `drain 10.0.0.11` drains it in every service that lists it, `--service web` in `web` only.
- A disabled VIP goes through two phases. *withdrawn*: its route is withdrawn at once and the
  node still takes new flows for it, for `grace_s`, while the router moves them to the other
  nodes. *stopped*: no backend of the VIP's services takes new flows (a new flow is dropped,
  counted `drop_no_backend`); pinned flows go on, so a connection the router still sends here
  keeps its backend. The node moves a VIP from withdrawn to stopped (`advance(now)`) at the
  deadline `next_deadline()` gives; `now` is the node's monotonic clock.
Each mark records who (`by`) and when (`at`, wall clock, ISO 8601 UTC), both given by the caller.

The state is kept across a SIGHUP reload as is: a mark whose backend or VIP the new config no
longer lists stays, does nothing, and applies again if the config brings it back; `undrain` and
`enable` remove it. Persistence (`to_json` / `from_json`): the node writes it to
/run/lbnode/<netns>-<if>.admin.json on every change, so a node that crashes or is restarted gets
it back, and a reboot (tmpfs /run) forgets it. A VIP read back is *stopped* at once: a starting
node has announced nothing, so there is no traffic to move away first.
"""
from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from bpf.structs import IPAddress
from cluster.config import NodeConfig
from cluster.control import Refused

FILE_VERSION = 1
WITHDRAWN, STOPPED = "withdrawn", "stopped"


class AdminError(Refused):
    """A command that names nothing this node has, or a state file that cannot be read."""


@dataclass(frozen=True, slots=True)
class Mark:
    by: str  # "alice (uid 0, pid 4242)"
    at: str  # "2026-12-01T20:15:02Z"


@dataclass(frozen=True, slots=True)
class VipMark:
    by: str
    at: str
    stop_new_at: float | None  # the node's monotonic clock; None: new flows stopped already

    @property
    def phase(self) -> str:
        return WITHDRAWN if self.stop_new_at is not None else STOPPED


@dataclass(frozen=True, slots=True)
class AdminState:
    drained: Mapping[tuple[str, IPAddress], Mark] = field(default_factory=dict)  # (service name, backend)
    disabled: Mapping[IPAddress, VipMark] = field(default_factory=dict)

    # ---- questions decide() asks ------------------------------------------------------------------

    def drain_mark(self, service: str, backend: IPAddress) -> Mark | None:
        return self.drained.get((service, backend))

    def vip_mark(self, vip: IPAddress) -> VipMark | None:
        return self.disabled.get(vip)

    def next_deadline(self) -> float | None:
        """When `advance` has something to do next (the node's monotonic clock), if ever."""
        return min((m.stop_new_at for m in self.disabled.values() if m.stop_new_at is not None), default=None)

    # ---- commands: each returns the new state and what changed (empty: nothing to do) ---------------

    def drain(self, config: NodeConfig, backend: IPAddress, service: str | None,
              mark: Mark) -> tuple[AdminState, list[str]]:
        targets = _services_with(config, backend, service)
        changed = [name for name in targets if (name, backend) not in self.drained]
        drained = dict(self.drained)
        drained.update({(name, backend): mark for name in changed})  # an earlier mark keeps its who/when
        return replace(self, drained=drained), [f"{name} {backend}" for name in changed]

    def undrain(self, config: NodeConfig, backend: IPAddress, service: str | None) -> tuple[AdminState, list[str]]:
        keys = [k for k in self.drained if k[1] == backend and service in (None, k[0])]
        if not keys:
            _services_with(config, backend, service)  # names nothing at all: say so
        drained = {k: m for k, m in self.drained.items() if k not in keys}
        return replace(self, drained=drained), [f"{name} {address}" for name, address in sorted(keys, key=_key_order)]

    def disable(self, config: NodeConfig, vip: IPAddress, mark: Mark,
                stop_new_at: float) -> tuple[AdminState, list[str]]:
        if vip in self.disabled:
            return self, []
        if vip not in config.vips():
            raise AdminError(f"{vip} is not a VIP of this node's config (VIPs: "
                             f"{', '.join(str(v) for v in config.vips()) or 'none'})")
        return replace(self, disabled={**self.disabled, vip: VipMark(mark.by, mark.at, stop_new_at)}), [str(vip)]

    def enable(self, config: NodeConfig, vip: IPAddress) -> tuple[AdminState, list[str]]:
        if vip not in self.disabled:
            if vip not in config.vips():
                raise AdminError(f"{vip} is not a VIP of this node's config and not disabled")
            return self, []
        return replace(self, disabled={v: m for v, m in self.disabled.items() if v != vip}), [str(vip)]

    def advance(self, now: float) -> tuple[AdminState, list[IPAddress]]:
        """Disabled VIPs whose grace has ended stop taking new flows."""
        due = [v for v, m in self.disabled.items() if m.stop_new_at is not None and m.stop_new_at <= now]
        if not due:
            return self, []
        disabled = {v: (replace(m, stop_new_at=None) if v in due else m) for v, m in self.disabled.items()}
        return replace(self, disabled=disabled), due

    # ---- status and persistence -------------------------------------------------------------------

    def document(self) -> dict[str, Any]:
        """For the status document (`node.admin`)."""
        return {
            "drained": [{"service": s, "backend": str(b), "by": m.by, "at": m.at}
                        for (s, b), m in sorted(self.drained.items(), key=lambda i: _key_order(i[0]))],
            "disabled": [{"vip": str(v), "by": m.by, "at": m.at, "phase": m.phase}
                         for v, m in sorted(self.disabled.items(), key=lambda i: (i[0].version, i[0]))],
        }

    def to_json(self) -> dict[str, Any]:
        doc = self.document()
        for entry in doc["disabled"]:
            del entry["phase"]  # a node that reads the file back starts with the VIP stopped
        return {"version": FILE_VERSION, **doc}

    @classmethod
    def from_json(cls, data: object) -> AdminState:
        """The state file's contents; AdminError names the first bad entry."""
        if not isinstance(data, dict) or data.get("version") != FILE_VERSION:
            raise AdminError(f"not an admin state file of version {FILE_VERSION}")
        drained: dict[tuple[str, IPAddress], Mark] = {}
        for i, entry in enumerate(_list(data, "drained")):
            where = f"drained[{i}]"
            drained[(_text(entry, "service", where), _ip(entry, "backend", where))] = _mark(entry, where)
        disabled: dict[IPAddress, VipMark] = {}
        for i, entry in enumerate(_list(data, "disabled")):
            where = f"disabled[{i}]"
            mark = _mark(entry, where)
            disabled[_ip(entry, "vip", where)] = VipMark(mark.by, mark.at, None)
        return cls(drained, disabled)


def _services_with(config: NodeConfig, backend: IPAddress, service: str | None) -> list[str]:
    """The config services (all, or `service`) that list `backend`; AdminError if none does."""
    if service is not None and all(s.name != service for s in config.services):
        raise AdminError(f"no service {service!r} in the config (services: "
                         f"{', '.join(s.name for s in config.services) or 'none'})")
    names = [s.name for s in config.services if service in (None, s.name)
             and any(b.address == backend for b in s.backends)]
    if not names:
        raise AdminError(f"{backend} is not a backend of {repr(service) if service else 'any service'}")
    return names


def _key_order(key: tuple[str, IPAddress]) -> tuple[str, int, IPAddress]:
    return key[0], key[1].version, key[1]


def _list(data: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(e, dict) for e in value):
        raise AdminError(f"{key}: must be a list of objects")
    return value


def _text(entry: Mapping[str, Any], key: str, where: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value:
        raise AdminError(f"{where}.{key}: must be a non-empty string, got {value!r}")
    return value


def _ip(entry: Mapping[str, Any], key: str, where: str) -> IPAddress:
    text = _text(entry, key, where)
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise AdminError(f"{where}.{key}: not an IP address: {text!r}") from None


def _mark(entry: Mapping[str, Any], where: str) -> Mark:
    return Mark(_text(entry, "by", where), _text(entry, "at", where))
