"""Speaker configuration: frozen dataclasses, validated once, errors naming the key path."""
from __future__ import annotations

import ipaddress
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

from bgp.attrs import IPV4_UNICAST, IPV6_UNICAST, Prefix
from bgp.errors import ConfigError
from bgp.rib import RouteAttrs
from bpf.validate import Validator

MAX_COMMUNITIES = 32
TOP_KEYS = frozenset({"local_as", "router_id", "peers", "next_hop_v4", "next_hop_v6", "next_hop_v6_link_local",
                      "listen", "listen_address", "listen_port", "graceful_shutdown_wait_s", "announce"})
PEER_KEYS = frozenset({"address", "asn", "hold_time_s", "passive", "port", "md5_password", "connect_retry_s", "attrs",
                       "bfd"})
ATTR_KEYS = frozenset({"med", "local_pref", "communities", "large_communities"})
BFD_KEYS = frozenset({"interval_ms", "multiplier"})
_v = Validator(ConfigError, unknown="unknown key", unknown_sorted=False)


@dataclass(frozen=True, slots=True)
class BfdConfig:
    """BFD (RFC 5880/5881) for one peer: our desired TX and required RX interval, and the multiplier."""

    interval_ms: int = 300
    multiplier: int = 3


@dataclass(frozen=True, slots=True)
class PeerConfig:
    address: IPv4Address | IPv6Address
    asn: int
    hold_time_s: int = 90
    passive: bool = False  # never connect out; wait for the peer (needs the speaker to listen)
    port: int = 179
    md5_password: str | None = None
    connect_retry_s: float = 5.0
    attrs: RouteAttrs = RouteAttrs()  # added to every route sent to this peer
    bfd: BfdConfig | None = None  # a BFD session to the peer; its failure tears the BGP session down


@dataclass(frozen=True, slots=True)
class SpeakerConfig:
    local_as: int
    router_id: IPv4Address
    peers: tuple[PeerConfig, ...]
    next_hop_v4: IPv4Address | None = None  # the node's --ip; NEXT_HOP of IPv4 routes
    next_hop_v6: IPv6Address | None = None
    next_hop_v6_link_local: IPv6Address | None = None  # RFC 2545 §3: also sent on a shared link
    listen: bool = False  # accept connections from the configured peers
    listen_address: str = "0.0.0.0"
    listen_port: int = 179
    graceful_shutdown_wait_s: float = 0.0  # >0: tag routes 65535:0 and wait this long before withdrawing
    announce: tuple[tuple[Prefix, RouteAttrs], ...] = field(default=())  # routes the runner announces

    @property
    def families(self) -> frozenset[tuple[int, int]]:
        return frozenset({IPV4_UNICAST, IPV6_UNICAST})


def _get(d: Mapping[str, Any], key: str, path: str, default: Any = ..., types: tuple[type, ...] = ()) -> Any:
    if key not in d:
        if default is ...:
            raise ConfigError(f"{path}{key}", "required")
        return default
    value = d[key]
    if types and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
        names = "/".join(t.__name__ for t in types)
        raise ConfigError(f"{path}{key}", f"must be {names}, got {value!r}")
    return value


def _asn(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 0xFFFFFFFF:
        raise ConfigError(where, f"must be an AS number 1..4294967295, got {value!r}")
    if value == 23456:
        raise ConfigError(where, "23456 is AS_TRANS, not a real AS")
    return value


def _community(value: Any, where: str) -> int:
    try:
        hi, lo = (int(x) for x in str(value).split(":"))
        if 0 <= hi <= 0xFFFF and 0 <= lo <= 0xFFFF:
            return hi << 16 | lo
    except ValueError:
        pass
    raise ConfigError(where, f"must be 'ASN:VALUE' with both 0..65535, got {value!r}")


def _large_community(value: Any, where: str) -> tuple[int, int, int]:
    try:
        parts = tuple(int(x) for x in str(value).split(":"))
        if len(parts) == 3 and all(0 <= p <= 0xFFFFFFFF for p in parts):
            return parts
    except ValueError:
        pass
    raise ConfigError(where, f"must be 'GLOBAL:LOCAL1:LOCAL2' of 32-bit numbers, got {value!r}")


def _no_unknown(d: Mapping[str, Any], known: Collection[str], path: str) -> None:
    """A typo (`hold_time: 3`) must not silently run with the default."""
    _v.no_unknown(d, known, path.rstrip("."))


def parse_attrs(d: Mapping[str, Any], path: str, *, other_keys: Collection[str] = ()) -> RouteAttrs:
    """`med`, `local_pref`, `communities` ("65000:1"), `large_communities` ("65000:1:2").

    `path` ends with a dot ("peers[0].attrs."); keys other than these (and `other_keys`) are errors.
    """
    _v.mapping(d, path.rstrip("."))
    _no_unknown(d, ATTR_KEYS | frozenset(other_keys), path)
    for key in ("med", "local_pref"):
        v = _get(d, key, path, None, (int,))
        if v is not None and not 0 <= v <= 0xFFFFFFFF:
            raise ConfigError(f"{path}{key}", f"must be 0..4294967295, got {v}")
    comms = _get(d, "communities", path, [], (list,))
    large = _get(d, "large_communities", path, [], (list,))
    if len(comms) > MAX_COMMUNITIES or len(large) > MAX_COMMUNITIES:
        raise ConfigError(f"{path}communities", f"at most {MAX_COMMUNITIES} of each kind")
    return RouteAttrs(
        med=d.get("med"), local_pref=d.get("local_pref"),
        communities=tuple(_community(c, f"{path}communities[{i}]") for i, c in enumerate(comms)),
        large_communities=tuple(_large_community(c, f"{path}large_communities[{i}]") for i, c in enumerate(large)))


def _ip(value: Any, where: str, version: int | None = None) -> IPv4Address | IPv6Address:
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        raise ConfigError(where, f"not an IP address: {value!r}") from None
    if version and ip.version != version:
        raise ConfigError(where, f"must be an IPv{version} address, got {value!r}")
    return ip


def _hold(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not (value == 0 or 3 <= value <= 65535):
        raise ConfigError(where, f"must be 0 or 3..65535 (RFC 4271 §4.2), got {value!r}")
    return value


def _bfd(value: Any, path: str) -> BfdConfig | None:
    """`bfd: {interval_ms: 100, multiplier: 3}`; null or absent: no BFD."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ConfigError(path, f"must be a mapping like {{interval_ms: 300, multiplier: 3}}, got {value!r}")
    _no_unknown(value, BFD_KEYS, f"{path}.")
    interval = _get(value, "interval_ms", f"{path}.", 300, (int,))
    if not 10 <= interval <= 60000:
        raise ConfigError(f"{path}.interval_ms", f"must be 10..60000, got {interval}")
    mult = _get(value, "multiplier", f"{path}.", 3, (int,))
    if not 1 <= mult <= 255:
        raise ConfigError(f"{path}.multiplier", f"must be 1..255, got {mult}")
    return BfdConfig(interval_ms=interval, multiplier=mult)


def load(d: Mapping[str, Any]) -> SpeakerConfig:
    """Validate a mapping (as loaded from YAML/JSON) into a SpeakerConfig."""
    _v.mapping(d, "top level")
    _no_unknown(d, TOP_KEYS, "")
    local_as = _asn(_get(d, "local_as", ""), "local_as")
    router_id = _ip(_get(d, "router_id", "", types=(str,)), "router_id", 4)
    nh4 = d.get("next_hop_v4")
    nh6 = d.get("next_hop_v6")
    ll6 = d.get("next_hop_v6_link_local")
    if ll6 is not None:
        if nh6 is None:
            raise ConfigError("next_hop_v6_link_local", "needs next_hop_v6 as well")
        if not _ip(ll6, "next_hop_v6_link_local", 6).is_link_local:
            raise ConfigError("next_hop_v6_link_local", f"must be in fe80::/10, got {ll6!r}")
    peers_raw = _get(d, "peers", "", types=(list,))
    if not peers_raw:
        raise ConfigError("peers", "at least one peer is required")
    peers = []
    seen = set()
    for i, p in enumerate(peers_raw):
        path = f"peers[{i}]."
        if not isinstance(p, Mapping):
            raise ConfigError(f"peers[{i}]", "must be a mapping")
        _no_unknown(p, PEER_KEYS, path)
        address = _ip(_get(p, "address", path, types=(str,)), f"{path}address")
        if address in seen:
            raise ConfigError(f"{path}address", f"duplicate peer {address}")
        seen.add(address)
        pw = _get(p, "md5_password", path, None, (str,))
        if pw is not None and not 1 <= len(pw.encode()) <= 80:
            raise ConfigError(f"{path}md5_password", "must be 1..80 bytes (TCP_MD5SIG_MAXKEYLEN)")
        port = _get(p, "port", path, 179, (int,))
        if not 1 <= port <= 65535:
            raise ConfigError(f"{path}port", f"must be 1..65535, got {port}")
        retry = _get(p, "connect_retry_s", path, 5.0, (int, float))
        if not 0.1 <= retry <= 3600:
            raise ConfigError(f"{path}connect_retry_s", f"must be 0.1..3600, got {retry}")
        peers.append(PeerConfig(
            address=address, asn=_asn(_get(p, "asn", path), f"{path}asn"),
            hold_time_s=_hold(_get(p, "hold_time_s", path, 90), f"{path}hold_time_s"),
            passive=_get(p, "passive", path, False, (bool,)), port=port, md5_password=pw,
            connect_retry_s=float(retry),
            attrs=parse_attrs({} if p.get("attrs") is None else p["attrs"], f"{path}attrs."),
            bfd=_bfd(p.get("bfd"), f"{path}bfd")))
    listen = _get(d, "listen", "", False, (bool,))
    for i, p in enumerate(peers):
        if p.passive and not listen:
            raise ConfigError(f"peers[{i}].passive", "a passive peer needs listen: true")
    announce = []
    for i, a in enumerate(_get(d, "announce", "", [], (list,))):
        path = f"announce[{i}]."
        if not isinstance(a, Mapping):
            raise ConfigError(f"announce[{i}]", "must be a mapping")
        try:
            prefix: IPv4Network | IPv6Network = ipaddress.ip_network(_get(a, "prefix", path, types=(str,)))
        except ValueError as exc:
            raise ConfigError(f"{path}prefix", str(exc)) from None
        announce.append((prefix, parse_attrs(a, path, other_keys=("prefix",))))
    listen_port = _get(d, "listen_port", "", 179, (int,))
    if not 0 <= listen_port <= 65535:
        raise ConfigError("listen_port", f"must be 0..65535 (0: any free port), got {listen_port}")
    gs = _get(d, "graceful_shutdown_wait_s", "", 0.0, (int, float))
    if not 0 <= gs <= 3600:
        raise ConfigError("graceful_shutdown_wait_s", f"must be 0..3600, got {gs}")
    cfg = SpeakerConfig(
        local_as=local_as, router_id=router_id,  # type: ignore[arg-type]
        peers=tuple(peers),
        next_hop_v4=_ip(nh4, "next_hop_v4", 4) if nh4 is not None else None,  # type: ignore[arg-type]
        next_hop_v6=_ip(nh6, "next_hop_v6", 6) if nh6 is not None else None,  # type: ignore[arg-type]
        next_hop_v6_link_local=IPv6Address(ll6) if ll6 is not None else None,
        listen=listen, listen_address=str(_ip(_get(d, "listen_address", "", "0.0.0.0", (str,)), "listen_address")),
        listen_port=listen_port, graceful_shutdown_wait_s=float(gs),
        announce=tuple(announce))
    if cfg.next_hop_v4 is None and cfg.next_hop_v6 is None:
        raise ConfigError("next_hop_v4", "at least one of next_hop_v4/next_hop_v6 is required")
    for i, (prefix, _) in enumerate(cfg.announce):
        if (cfg.next_hop_v4 if prefix.version == 4 else cfg.next_hop_v6) is None:
            raise ConfigError(f"announce[{i}].prefix", f"IPv{prefix.version} route but no next_hop_v{prefix.version}")
    return cfg


def peer_addresses(cfg: SpeakerConfig) -> Sequence[str]:
    return [str(p.address) for p in cfg.peers]
