"""A service's `weighting:` section: where per-backend load comes from and how far it may move
the configured weights. Validated once; errors name the key path (cluster.config adds the line).

    weighting: static            # shorthand for {mode: static}; or a mapping:
    weighting:
      mode: agent                # static | agent | http | leastconn
      agent_port: 9777           # agent (required): TCP port of the HAProxy agent on each backend
      interval_ms: 500           # how often loads are read and weights recomputed
      timeout_ms: 300            # agent/http: a read slower than this counts as no report
      http_header: X-Load        # http: a number in this response header of the service's first
      http_json_field: load      #   http(s) check, or in this top-level JSON field (exactly one)
      floor: 0.1                 # bounds of the multiplier on the configured weight
      ceiling: 8.0
      max_step: 1.5              # the multiplier moves by at most this factor per interval
      idle_s: 30                 # leastconn: a connection no packet of which this node forwarded
                                 #   for this long is no longer counted (see below)

The modes (README, "Load-aware weights"):

- static: the configured weights, as before.
- agent: HAProxy's agent-check. `N%` scales the configured weight directly (HAProxy's meaning, an
  agent's own policy, e.g. from idle CPU), bounded by floor/ceiling and max_step; `drain` or `0%`
  drains the backend, `down`/`stopped`/`fail` and `maint` take it out of the hash like a failing
  check; `up`/`ready` lift what the agent set before.
- http: the number is a load; the controller (cluster.weights) moves the weights towards equal
  utilisation, load / capacity.
- leastconn: the load is the backend's active connections, counted by the data plane and summed
  over the cluster; the same controller equalises connections per unit of capacity. A connection
  counts while it is not closing (no FIN/RST from the client) and a node forwarded a packet of it
  within `idle_s` (at least twice `flows.refresh_s`): each maintenance walk of the flow table
  recounts, so one that ended unseen (a server reset, a vanished client) drops out after idle_s
  plus a walk (bpf/counters.py ActiveTally). A connection idle longer than idle_s is not counted.

A backend's `capacity:` (e.g. CPUs) is the denominator of its utilisation; it defaults to 1.
"""
from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bpf.validate import ConfigError, key_path, node_wording

__all__ = ["WeightingConfig", "WeightingMode", "from_config"]

_v = node_wording()
# RFC 9110 §5.6.2 token: what a header name may be.
_HEADER = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,64}")
_JSON_FIELD = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


class WeightingMode(enum.Enum):
    STATIC = "static"
    AGENT = "agent"
    HTTP = "http"
    LEASTCONN = "leastconn"


@dataclass(frozen=True, slots=True)
class WeightingConfig:
    mode: WeightingMode = WeightingMode.STATIC
    agent_port: int | None = None
    interval_ms: int = 500
    timeout_ms: int = 300
    http_header: str | None = None
    http_json_field: str | None = None
    floor: float = 0.1
    ceiling: float = 8.0
    max_step: float = 1.5
    idle_s: float = 30.0

    @property
    def interval_s(self) -> float:
        return self.interval_ms / 1000

    @property
    def dynamic(self) -> bool:
        return self.mode is not WeightingMode.STATIC


KEYS = frozenset({"mode", "agent_port", "interval_ms", "timeout_ms", "http_header", "http_json_field", "floor",
                  "ceiling", "max_step", "idle_s"})
_ONLY = {"agent_port": WeightingMode.AGENT, "http_header": WeightingMode.HTTP,
         "http_json_field": WeightingMode.HTTP, "idle_s": WeightingMode.LEASTCONN}


def from_config(data: Any, path: str, has_http_check: bool) -> WeightingConfig:
    """`weighting:` of one service at `path`; `has_http_check`: the service has an http(s) check
    (mode http reads its load from that check's response)."""
    if data is None:
        return WeightingConfig()
    if isinstance(data, str):
        data = {"mode": data}
    d: Mapping[str, Any] = _v.mapping(data, path)
    _v.no_unknown(d, KEYS, path)
    raw = d.get("mode", "static")
    try:
        mode = WeightingMode(raw)
    except (ValueError, TypeError):
        raise ConfigError(key_path(path, "mode"), f"must be static, agent, http or leastconn, got {raw!r}") from None
    for key, owner in _ONLY.items():
        if key in d and mode is not owner:
            raise ConfigError(key_path(path, key), f"only valid with mode {owner.value}, not {mode.value}")
    agent_port = _v.port(_v.require(d, "agent_port", path), key_path(path, "agent_port")) \
        if mode is WeightingMode.AGENT else None
    interval_ms = _v.integer(d, "interval_ms", path, 500, 100, 60_000)
    timeout_ms = _v.integer(d, "timeout_ms", path, min(300, interval_ms // 2), 1, 60_000)
    if timeout_ms >= interval_ms:
        raise ConfigError(key_path(path, "timeout_ms"), f"must be < interval_ms ({interval_ms}), got {timeout_ms}")
    header = _text(d, "http_header", path, _HEADER, "an HTTP header name")
    field = _text(d, "http_json_field", path, _JSON_FIELD, "a JSON key of 1-64 of [A-Za-z0-9_.-]")
    if mode is WeightingMode.HTTP:
        if (header is None) == (field is None):
            raise ConfigError(path, "mode http needs exactly one of http_header and http_json_field")
        if not has_http_check:
            raise ConfigError(key_path(path, "mode"), "http reads the load from an http or https check's "
                                                      "response, and the service has none")
    floor = _v.number(d, "floor", path, 0.1, 0.001, 1.0)
    ceiling = _v.number(d, "ceiling", path, 8.0, 1.0, 100.0)
    max_step = _v.number(d, "max_step", path, 1.5, 1.01, 10.0)
    idle_s = _v.number(d, "idle_s", path, 30.0, 1.0, 86_400.0)
    return WeightingConfig(mode=mode, agent_port=agent_port, interval_ms=interval_ms, timeout_ms=timeout_ms,
                           http_header=header, http_json_field=field, floor=floor, ceiling=ceiling,
                           max_step=max_step, idle_s=idle_s)


def capacity(d: Mapping[str, Any], path: str) -> float | None:
    """A backend's optional `capacity:` (e.g. CPUs), > 0."""
    return _v.number(d, "capacity", path, 1.0, 0.001, 1_000_000) if "capacity" in d else None


def _text(d: Mapping[str, Any], key: str, path: str, pattern: re.Pattern[str], what: str) -> str | None:
    if key not in d:
        return None
    value = d[key]
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ConfigError(key_path(path, key), f"must be {what}, got {value!r}")
    return value
