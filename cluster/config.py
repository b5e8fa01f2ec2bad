"""The node's YAML config: validated once into frozen dataclasses; errors name the key path and
the line (`services[2].backends[0].weight: must be 0..1000, got -1 (node.yaml:31)`).

The vocabulary follows vc5 where it can (services with VIPs, ports, backends, `need`, checks,
a BGP section, a multicast flow-sync section), so vc5 users feel at home. The sections of other
packages are validated by their own `from_dict`/`load`: health checks (healthcheck.config),
BGP (bgp.config: `router_id` and `next_hop_v4`/`next_hop_v6` default to the node's --ip) and
flow sync (cluster.sync.config). See examples/lbnode.yaml for an annotated example.
"""
from __future__ import annotations

import dataclasses
import enum
import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import bgp.config
import bgp.errors
import healthcheck.config as hc
import healthcheck.errors
from bgp.config import SpeakerConfig
from bgp.rib import RouteAttrs
from bpf.loader import Limits, XdpMode
from bpf.structs import PROTOCOLS
from cluster.sync.config import SyncConfig, SyncConfigError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


class ConfigError(Exception):
    """An invalid config: `path` is the key path, `line` the 1-based YAML line (if known)."""

    def __init__(self, path: str, reason: str, source: str | None = None, line: int | None = None) -> None:
        where = f" ({source or '<config>'}:{line})" if line is not None else ""
        super().__init__(f"{path}: {reason}{where}")
        self.path, self.reason, self.source, self.line = path, reason, source, line


@dataclass(frozen=True, slots=True)
class BackendEntry:
    address: IPAddress
    weight: int = 1
    disabled: bool = False  # drained: out of the hash for new flows, pinned flows continue


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    name: str
    vips: tuple[IPAddress, ...]
    ports: tuple[int, ...]
    protocol: str  # "tcp" | "udp"
    backends: tuple[BackendEntry, ...]
    checks: tuple[hc.CheckConfig, ...]
    need: int = 1
    through_vip: bool = True
    route: RouteAttrs = RouteAttrs()  # BGP attributes of this service's VIP routes

    @property
    def proto(self) -> int:
        return PROTOCOLS[self.protocol]

    def health_name(self, vip: IPAddress, port: int) -> str:
        """The health checker's service name for one (VIP, port) of this service."""
        return f"{self.name}/{_hostport(vip, port)}"

    def health_configs(self, initially_up: frozenset[str] = frozenset()) -> list[hc.ServiceHealthConfig]:
        """One health-check service per (VIP, port); `initially_up` backends (BackendIds) start up."""
        out = []
        for vip in self.vips:
            for port in self.ports:
                backends = tuple(
                    hc.BackendConfig(b.address, port, disabled=b.disabled,
                                     initial=hc.InitialState.UP if hc.BackendId(b.address, port) in initially_up
                                     else hc.InitialState.DOWN)
                    for b in self.backends)
                out.append(hc.ServiceHealthConfig(self.health_name(vip, port), vip, port, self.checks, backends,
                                                  need=self.need, through_vip=self.through_vip))
        return out


# New pins per CPU per second before a flood of new flows is forwarded unpinned (0: no cap).
# 100k: Katran bypasses its LRU above 125k new connections per core per second. A pin costs
# ~0.7 us here (bench-xdp, full table), so a core could pin ~1.4M/s; 100k/s on each of two
# cores is 200k events/s, under half of what flow sync replicated here (446k/s, bench-sync),
# and leaves the ring (~13k events) ~65 ms between reads. Lower it on many-core nodes so that
# cores x cap stays below what flow sync carries.
MAX_NEW_PER_S_PER_CPU = 100_000


@dataclass(frozen=True, slots=True)
class FlowConfig:
    table_size: int = 262144
    refresh_s: float = 1.0
    max_new_per_s_per_cpu: int = MAX_NEW_PER_S_PER_CPU


@dataclass(frozen=True, slots=True)
class NodeConfig:
    services: tuple[ServiceConfig, ...]
    bgp: SpeakerConfig | None = None
    sync: SyncConfig | None = None
    flows: FlowConfig = FlowConfig()
    xdp: XdpMode = XdpMode.NATIVE
    drain_s: float = 5.0  # after withdrawing routes on SIGTERM, keep forwarding this long
    source: str | None = field(default=None, compare=False)

    def vips(self) -> list[IPAddress]:
        seen: dict[IPAddress, None] = {}
        for s in self.services:
            for v in s.vips:
                seen[v] = None
        return list(seen)


def _hostport(address: IPAddress, port: int) -> str:
    return f"{address}:{port}" if address.version == 4 else f"[{address}]:{port}"


# -- loading ---------------------------------------------------------------------------------------

TOP_KEYS = frozenset({"services", "bgp", "sync", "flows", "xdp", "drain_s"})
SERVICE_KEYS = frozenset({"name", "vips", "ports", "protocol", "backends", "checks", "need", "through_vip", "route"})
BACKEND_KEYS = frozenset({"address", "weight", "disabled"})


def load_file(path: str | Path, node_ip: IPAddress, *, check_files: bool = True) -> NodeConfig:
    """Read and validate a config file; every error is a ConfigError with path and line.

    `check_files`: also read the files the config names (the sync key), as the node will."""
    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError("(file)", f"cannot read: {exc.strerror or exc}", source) from None
    return load_text(text, node_ip, source, check_files=check_files)


def load_text(text: str, node_ip: IPAddress, source: str | None = None, *, check_files: bool = True) -> NodeConfig:
    try:
        data = yaml.safe_load(text)
        lines = _line_index(yaml.compose(text)) if text.strip() else {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise ConfigError("(yaml)", str(getattr(exc, "problem", None) or exc), source,
                          mark.line + 1 if mark is not None else None) from None
    try:
        config = _node(data if data is not None else {}, node_ip, check_files)
    except ConfigError as err:
        raise ConfigError(err.path, err.reason, source, _line_of(err.path, lines)) from None
    return _replace_source(config, source)


def _replace_source(config: NodeConfig, source: str | None) -> NodeConfig:
    return dataclasses.replace(config, source=source)


def normalised(config: NodeConfig) -> dict[str, Any]:
    """The config with every default filled in, as plain data (what `lbnode check-config` prints)."""
    data = _plain(dataclasses.asdict(config))
    data.pop("source", None)
    return data  # type: ignore[no-any-return]


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if not k.startswith("_")}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address, ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return str(value)
    return value


def _line_index(node: Any, path: str = "", out: dict[str, int] | None = None) -> dict[str, int]:
    """Key path -> 1-based line, from PyYAML's composed node tree."""
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            child = f"{path}.{key.value}" if path else str(key.value)
            out[child] = key.start_mark.line + 1
            _line_index(value, child, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            child = f"{path}[{i}]"
            out[child] = item.start_mark.line + 1
            _line_index(item, child, out)
    return out


def _line_of(path: str, lines: Mapping[str, int]) -> int | None:
    """The line of `path`, or of its nearest ancestor that is in the file."""
    while path:
        if path in lines:
            return lines[path]
        cut = max(path.rfind("."), path.rfind("["))
        path = path[:cut] if cut > 0 else ""
    return None


def _node(data: Any, node_ip: IPAddress, check_files: bool) -> NodeConfig:
    d = _mapping(data, "(top level)")
    _no_unknown(d, TOP_KEYS, "")
    services = tuple(_service(s, f"services[{i}]") for i, s in enumerate(_sequence(d.get("services", []), "services")))
    _check_unique_services(services)
    xdp_raw = d.get("xdp", "native")
    try:
        xdp = XdpMode(xdp_raw)
    except ValueError:
        raise ConfigError("xdp", f"must be native or generic, got {xdp_raw!r}") from None
    drain_s = _number(d, "drain_s", "", 5.0, 0, 3600)
    flows = _flows(d.get("flows") or {})
    _check_limits(services, flows)
    return NodeConfig(
        services=services,
        bgp=_bgp(d["bgp"], node_ip) if d.get("bgp") is not None else None,
        sync=_sync(d["sync"], check_files) if d.get("sync") is not None else None,
        flows=flows,
        xdp=xdp,
        drain_s=drain_s,
    )


def _service(data: Any, path: str) -> ServiceConfig:
    d = _mapping(data, path)
    _no_unknown(d, SERVICE_KEYS, path)
    name = _require(d, "name", path)
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{path}.name", f"must be 1-64 of [A-Za-z0-9_.-], got {name!r}")
    vips = tuple(_address(v, f"{path}.vips[{i}]") for i, v in enumerate(_sequence(_require(d, "vips", path), f"{path}.vips")))
    if not vips:
        raise ConfigError(f"{path}.vips", "must list at least one VIP")
    families: set[int] = {v.version for v in vips}
    if len(families) > 1:
        raise ConfigError(f"{path}.vips", "must all be IPv4 or all IPv6 (make one service per family)")
    ports = tuple(_port(p, f"{path}.ports[{i}]") for i, p in enumerate(_sequence(_require(d, "ports", path), f"{path}.ports")))
    if not ports or len(set(ports)) != len(ports):
        raise ConfigError(f"{path}.ports", f"must list distinct ports, got {list(ports)}")
    protocol = d.get("protocol", "tcp")
    if protocol not in PROTOCOLS:
        raise ConfigError(f"{path}.protocol", f"must be tcp or udp, got {protocol!r}")
    backends = tuple(_backend(b, f"{path}.backends[{i}]", families)
                     for i, b in enumerate(_sequence(_require(d, "backends", path), f"{path}.backends")))
    seen: dict[IPAddress, int] = {}
    for i, b in enumerate(backends):
        if b.address in seen:
            raise ConfigError(f"{path}.backends[{i}].address", f"duplicate of backends[{seen[b.address]}], got {b.address}")
        seen[b.address] = i
    checks_raw = d.get("checks") or [{"kind": "tcp"}]
    try:
        checks = tuple(hc.CheckConfig.from_dict(c, f"{path}.checks[{i}]")
                       for i, c in enumerate(_sequence(checks_raw, f"{path}.checks")))
    except healthcheck.errors.ConfigError as err:
        raise ConfigError(err.path, err.reason) from None
    need = _int(d, "need", path, 1, 1, max(1, len(backends)))
    route = _route(d.get("route") or {}, f"{path}.route")
    return ServiceConfig(name=name, vips=vips, ports=ports, protocol=protocol, backends=backends, checks=checks,
                         need=need, through_vip=_bool(d, "through_vip", path, protocol == "tcp"), route=route)


def _backend(data: Any, path: str, families: set[int]) -> BackendEntry:
    d = _mapping(data, path)
    _no_unknown(d, BACKEND_KEYS, path)
    address = _address(_require(d, "address", path), f"{path}.address")
    if address.version not in families:
        raise ConfigError(f"{path}.address", f"must be IPv{min(families)} like the service's VIPs, got {address}")
    return BackendEntry(address=address, weight=_int(d, "weight", path, 1, 0, 1000),
                        disabled=_bool(d, "disabled", path, False))


def _route(d: Any, path: str) -> RouteAttrs:
    if not isinstance(d, Mapping):
        raise ConfigError(path, f"must be a mapping, got {type(d).__name__}")
    try:
        return bgp.config.parse_attrs(d, f"{path}.")
    except bgp.errors.ConfigError as err:
        raise _split(err) from None


def _bgp(data: Any, node_ip: IPAddress) -> SpeakerConfig:
    d = dict(_mapping(data, "bgp"))
    if node_ip.version == 4:
        d.setdefault("router_id", str(node_ip))
        d.setdefault("next_hop_v4", str(node_ip))
    else:
        d.setdefault("next_hop_v6", str(node_ip))
    if "announce" in d:
        raise ConfigError("bgp.announce", "not used by the node: it announces the services' VIPs while they are up")
    try:
        return bgp.config.load(d)
    except bgp.errors.ConfigError as err:
        raise _split(err, "bgp.") from None


def _sync(data: Any, check_files: bool) -> SyncConfig:
    try:
        config = SyncConfig.from_dict(data, "sync")
        if config.enabled and check_files:
            config = config.with_keys()  # a bad key is a config error; new key contents are a changed config
        return config
    except SyncConfigError as err:
        raise ConfigError(err.path, err.reason) from None


def _flows(data: Any) -> FlowConfig:
    d = _mapping(data, "flows")
    _no_unknown(d, frozenset({"table_size", "refresh_s", "max_new_per_s_per_cpu"}), "flows")
    size = _int(d, "table_size", "flows", 262144, 1024, 1 << 26)
    return FlowConfig(table_size=size, refresh_s=_number(d, "refresh_s", "flows", 1.0, 0.1, 60),
                      max_new_per_s_per_cpu=_int(d, "max_new_per_s_per_cpu", "flows", MAX_NEW_PER_S_PER_CPU,
                                                 0, 100_000_000))


def _check_limits(services: Sequence[ServiceConfig], flows: FlowConfig) -> None:
    """Refuse what the data plane cannot hold, instead of failing halfway through applying it."""
    limits = Limits(flow_table_size=flows.table_size)
    pairs = sum(len(s.vips) * len(s.ports) for s in services)
    if pairs > limits.max_services:
        raise ConfigError("services", f"{pairs} (VIP, port) services, the data plane holds {limits.max_services}")
    backends = sum(len(s.vips) * len(s.ports) * len(s.backends) for s in services)
    if backends > limits.max_backends:
        raise ConfigError("services", f"{backends} backends over all (VIP, port) services, "
                                      f"the data plane holds {limits.max_backends}")


def _check_unique_services(services: Sequence[ServiceConfig]) -> None:
    names: dict[str, int] = {}
    owners: dict[tuple[IPAddress, int, str], int] = {}
    for i, s in enumerate(services):
        if s.name in names:
            raise ConfigError(f"services[{i}].name", f"duplicate of services[{names[s.name]}], got {s.name!r}")
        names[s.name] = i
        for vip in s.vips:
            for port in s.ports:
                other = owners.setdefault((vip, port, s.protocol), i)
                if other != i:
                    raise ConfigError(f"services[{i}].ports",
                                      f"{s.protocol} {_hostport(vip, port)} is already served by services[{other}]")


# -- small validators ------------------------------------------------------------------------------

def _split(err: Exception, prefix: str = "") -> ConfigError:
    """bgp's errors are 'path: reason' strings."""
    text = str(err)
    path, _, reason = text.partition(": ")
    return ConfigError(prefix + path.rstrip("."), reason or text)


def _mapping(data: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise ConfigError(path, f"must be a mapping, got {type(data).__name__}")
    return data


def _sequence(data: Any, path: str) -> Sequence[Any]:
    if not isinstance(data, list):
        raise ConfigError(path, f"must be a list, got {type(data).__name__}")
    return data


def _no_unknown(d: Mapping[str, Any], allowed: frozenset[str], path: str) -> None:
    for key in d:
        if key not in allowed:
            raise ConfigError(f"{path}.{key}" if path else str(key), f"unknown key (expected one of {', '.join(sorted(allowed))})")


def _require(d: Mapping[str, Any], key: str, path: str) -> Any:
    if key not in d:
        raise ConfigError(f"{path}.{key}", "required")
    return d[key]


def _int(d: Mapping[str, Any], key: str, path: str, default: int, lo: int, hi: int) -> int:
    value = d.get(key, default)
    where = f"{path}.{key}" if path else key
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(where, f"must be an integer {lo}..{hi}, got {value!r}")
    return value


def _number(d: Mapping[str, Any], key: str, path: str, default: float, lo: float, hi: float) -> float:
    value = d.get(key, default)
    where = f"{path}.{key}" if path else key
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise ConfigError(where, f"must be a number {lo}..{hi}, got {value!r}")
    return float(value)


def _bool(d: Mapping[str, Any], key: str, path: str, default: bool) -> bool:
    value = d.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{path}.{key}" if path else key, f"must be true or false, got {value!r}")
    return value


def _port(value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ConfigError(path, f"must be 1..65535, got {value!r}")
    return value


def _address(value: Any, path: str) -> IPAddress:
    try:
        return ipaddress.ip_address(str(value))
    except ValueError:
        raise ConfigError(path, f"must be an IP address, got {value!r}") from None
