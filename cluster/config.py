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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bgp.config
import healthcheck.config as hc
from bgp.config import SpeakerConfig
from bgp.rib import RouteAttrs
from bpf.loader import Limits, XdpMode
from bpf.structs import PROTOCOLS, IPAddress
from bpf.validate import ConfigError, load_yaml, node_wording
from cluster.sync.config import SyncConfig
from cluster.weighting import WeightingConfig
from cluster.weighting import capacity as _capacity
from cluster.weighting import from_config as _weighting

__all__ = ["BackendEntry", "ConfigError", "FlowConfig", "IPAddress", "NodeConfig", "ServiceConfig", "load_file",
           "load_text", "normalised"]

_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_v = node_wording()


@dataclass(frozen=True, slots=True)
class BackendEntry:
    address: IPAddress
    weight: int = 1
    disabled: bool = False  # drained: out of the hash for new flows, pinned flows continue
    capacity: float | None = None  # load-aware weighting: utilisation = load / capacity (None: 1)


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
    weighting: WeightingConfig = WeightingConfig()  # where load comes from (cluster.weighting)

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
SERVICE_KEYS = frozenset({"name", "vips", "ports", "protocol", "backends", "checks", "need", "through_vip", "route",
                          "weighting"})
BACKEND_KEYS = frozenset({"address", "weight", "disabled", "capacity"})


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
    data, lines = load_yaml(text, source)
    try:
        config = _node(data if data is not None else {}, node_ip, check_files)
    except ConfigError as err:  # this package's, or healthcheck's, bgp's or sync's (subclasses)
        raise err.at(source, lines) from None
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


def _node(data: Any, node_ip: IPAddress, check_files: bool) -> NodeConfig:
    d = _v.mapping(data, "(top level)")
    _v.no_unknown(d, TOP_KEYS, "")
    services = tuple(_service(s, f"services[{i}]")
                     for i, s in enumerate(_v.sequence(d.get("services", []), "services")))
    _check_unique_services(services)
    xdp_raw = d.get("xdp", "native")
    try:
        xdp = XdpMode(xdp_raw)
    except ValueError:
        raise ConfigError("xdp", f"must be native or generic, got {xdp_raw!r}") from None
    drain_s = _v.number(d, "drain_s", "", 5.0, 0, 3600)
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
    d = _v.mapping(data, path)
    _v.no_unknown(d, SERVICE_KEYS, path)
    name = _v.require(d, "name", path)
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{path}.name", f"must be 1-64 of [A-Za-z0-9_.-], got {name!r}")
    vips = tuple(_address(v, f"{path}.vips[{i}]")
                 for i, v in enumerate(_v.sequence(_v.require(d, "vips", path), f"{path}.vips")))
    if not vips:
        raise ConfigError(f"{path}.vips", "must list at least one VIP")
    families: set[int] = {v.version for v in vips}
    if len(families) > 1:
        raise ConfigError(f"{path}.vips", "must all be IPv4 or all IPv6 (make one service per family)")
    ports = tuple(_v.port(p, f"{path}.ports[{i}]")
                  for i, p in enumerate(_v.sequence(_v.require(d, "ports", path), f"{path}.ports")))
    if not ports or len(set(ports)) != len(ports):
        raise ConfigError(f"{path}.ports", f"must list distinct ports, got {list(ports)}")
    protocol = d.get("protocol", "tcp")
    if protocol not in PROTOCOLS:
        raise ConfigError(f"{path}.protocol", f"must be tcp or udp, got {protocol!r}")
    backends = tuple(_backend(b, f"{path}.backends[{i}]", families)
                     for i, b in enumerate(_v.sequence(_v.require(d, "backends", path), f"{path}.backends")))
    seen: dict[IPAddress, int] = {}
    for i, b in enumerate(backends):
        if b.address in seen:
            raise ConfigError(f"{path}.backends[{i}].address",
                              f"duplicate of backends[{seen[b.address]}], got {b.address}")
        seen[b.address] = i
    checks_raw = d.get("checks") or [{"kind": "tcp"}]
    checks = tuple(hc.CheckConfig.from_dict(c, f"{path}.checks[{i}]")
                   for i, c in enumerate(_v.sequence(checks_raw, f"{path}.checks")))
    need = _v.integer(d, "need", path, 1, 1, max(1, len(backends)))
    route = _route(d.get("route") or {}, f"{path}.route")
    weighting = _weighting(d.get("weighting"), f"{path}.weighting", any(c.http is not None for c in checks))
    return ServiceConfig(name=name, vips=vips, ports=ports, protocol=protocol, backends=backends, checks=checks,
                         need=need, through_vip=_v.boolean(d, "through_vip", path, protocol == "tcp"), route=route,
                         weighting=weighting)


def _backend(data: Any, path: str, families: set[int]) -> BackendEntry:
    d = _v.mapping(data, path)
    _v.no_unknown(d, BACKEND_KEYS, path)
    address = _address(_v.require(d, "address", path), f"{path}.address")
    if address.version not in families:
        raise ConfigError(f"{path}.address", f"must be IPv{min(families)} like the service's VIPs, got {address}")
    return BackendEntry(address=address, weight=_v.integer(d, "weight", path, 1, 0, 1000),
                        disabled=_v.boolean(d, "disabled", path, False), capacity=_capacity(d, path))


def _route(d: Any, path: str) -> RouteAttrs:
    _v.mapping(d, path)
    return bgp.config.parse_attrs(d, f"{path}.")


def _bgp(data: Any, node_ip: IPAddress) -> SpeakerConfig:
    d = dict(_v.mapping(data, "bgp"))
    if node_ip.version == 4:
        d.setdefault("router_id", str(node_ip))
        d.setdefault("next_hop_v4", str(node_ip))
    else:
        d.setdefault("next_hop_v6", str(node_ip))
    if "announce" in d:
        raise ConfigError("bgp.announce", "not used by the node: it announces the services' VIPs while they are up")
    try:
        return bgp.config.load(d)
    except ConfigError as err:  # its paths are relative to the `bgp:` section
        raise ConfigError(f"bgp.{err.path}", err.reason) from None


def _sync(data: Any, check_files: bool) -> SyncConfig:
    config = SyncConfig.from_dict(data, "sync")
    if config.enabled and check_files:
        config = config.with_keys()  # a bad key is a config error; new key contents are a changed config
    return config


def _flows(data: Any) -> FlowConfig:
    d = _v.mapping(data, "flows")
    _v.no_unknown(d, frozenset({"table_size", "refresh_s", "max_new_per_s_per_cpu"}), "flows")
    size = _v.integer(d, "table_size", "flows", 262144, 1024, 1 << 26)
    return FlowConfig(table_size=size, refresh_s=_v.number(d, "refresh_s", "flows", 1.0, 0.1, 60),
                      max_new_per_s_per_cpu=_v.integer(d, "max_new_per_s_per_cpu", "flows", MAX_NEW_PER_S_PER_CPU,
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

def _address(value: Any, path: str) -> IPAddress:
    return _v.address(value, path, text=True)  # from its text only: YAML's `10` is no address
