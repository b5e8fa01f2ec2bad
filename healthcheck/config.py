"""Health-check configuration: frozen dataclasses, validated once, errors naming the key path.

The node builds `ServiceHealthConfig` and `BackendConfig` from its own config (cluster.config);
what it reads from YAML here is a check, with ``CheckConfig.from_dict(data, path)``: `data` is
what ``yaml.safe_load`` produced for that node and `path` is where it sits in the document
(``"services[0].checks[1]"``), so the node's YAML loader can add line numbers to `ConfigError`.
Unknown keys are errors.

    checks:
      - kind: http          # tcp | http | https
        interval_ms: 1000
        timeout_ms: 500     # 0 < timeout_ms < interval_ms
        rise: 2             # consecutive passes to go up
        fall: 3             # consecutive failures to go down
        path: /healthz
        host: www.example.com
        expect_status: [200, "300-399"]
        body_contains: ok
"""
from __future__ import annotations

import enum
import ipaddress
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bpf.structs import IPAddress
from bpf.validate import Validator
from healthcheck.errors import ConfigError

_v = Validator(ConfigError, string_keys=True)

# All used with fullmatch: `$` would also match before a trailing "\n", which would then end up
# in the request line or Host header.
# RFC 9110 §5.6.2 token, used for the HTTP method.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# A request target we are willing to put on the wire: origin-form, visible ASCII only.
_PATH = re.compile(r"/[\x21-\x7e]*")
_HOST = re.compile(r"[A-Za-z0-9.\-:\[\]_]+")
_STATUS = re.compile(r"[1-5][0-9][0-9]")  # ASCII digits: str.isdigit() is also true for "²"
_STATUS_RANGE = re.compile(r"([1-5][0-9][0-9])-([1-5][0-9][0-9])")


class BackendId(str):
    """A backend's identity, (address, port), and its one text form: ``10.0.0.1:80`` or
    ``[2001:db8::1]:80``. Health events, snapshots, the node's view and `lbnode status` use it.

    It is that text (a `str` subclass), so status JSON and log lines print it as is, and sets
    and dicts keyed by it can be looked up with the text too. Build it only from its parts.
    """

    __slots__ = ()

    def __new__(cls, address: IPAddress, port: int) -> BackendId:
        host = str(address) if address.version == 4 else f"[{address}]"
        return super().__new__(cls, f"{host}:{port}")

    def __reduce__(self) -> tuple[type[BackendId], tuple[IPAddress, int]]:  # copy, deepcopy, pickle
        return (BackendId, (self.address, self.port))

    @property
    def address(self) -> IPAddress:
        address: IPAddress = ipaddress.ip_address(self.rpartition(":")[0].strip("[]"))
        return address

    @property
    def port(self) -> int:
        return int(self.rpartition(":")[2])


class CheckKind(enum.Enum):
    TCP = "tcp"
    HTTP = "http"
    HTTPS = "https"


class InitialState(enum.Enum):
    DOWN = "down"
    UP = "up"


@dataclass(frozen=True, slots=True)
class StatusRange:
    """Inclusive range of acceptable HTTP status codes."""

    lo: int
    hi: int

    def __contains__(self, status: object) -> bool:
        return isinstance(status, int) and self.lo <= status <= self.hi

    def __str__(self) -> str:
        return str(self.lo) if self.lo == self.hi else f"{self.lo}-{self.hi}"


@dataclass(frozen=True, slots=True)
class HttpOptions:
    method: str = "GET"
    path: str = "/"
    host: str | None = None
    expect_status: tuple[StatusRange, ...] = (StatusRange(200, 299),)
    body_contains: str | None = None
    # HTTPS only.
    verify: bool = True
    sni: str | None = None
    ca_file: str | None = None

    def status_ok(self, status: int) -> bool:
        return any(status in r for r in self.expect_status)

    def expected_text(self) -> str:
        return ",".join(str(r) for r in self.expect_status)


@dataclass(frozen=True, slots=True)
class CheckConfig:
    kind: CheckKind
    interval_ms: int = 1000
    timeout_ms: int = 500
    rise: int = 2
    fall: int = 3
    port: int | None = None  # None: the backend's port
    http: HttpOptions | None = None  # set for http and https

    _KEYS = frozenset({"kind", "interval_ms", "timeout_ms", "rise", "fall", "port", "method", "path",
                       "host", "expect_status", "body_contains", "verify", "sni", "ca_file"})
    _HTTP_KEYS = frozenset({"method", "path", "host", "expect_status", "body_contains"})
    _HTTPS_KEYS = frozenset({"verify", "sni", "ca_file"})

    @property
    def interval_s(self) -> float:
        return self.interval_ms / 1000

    @property
    def timeout_s(self) -> float:
        return self.timeout_ms / 1000

    @classmethod
    def from_dict(cls, data: Any, path: str) -> CheckConfig:
        d = _v.mapping(data, path)
        _v.no_unknown(d, cls._KEYS, path)
        kind_raw = _v.require(d, "kind", path)
        try:
            kind = CheckKind(kind_raw)
        except ValueError:
            raise ConfigError(f"{path}.kind", f"must be one of tcp, http, https, got {kind_raw!r}") from None
        interval_ms = _v.integer(d, "interval_ms", path, 1000, 10, 3_600_000)
        timeout_ms = _v.integer(d, "timeout_ms", path, min(500, interval_ms // 2))
        if not 0 < timeout_ms < interval_ms:
            raise ConfigError(f"{path}.timeout_ms", f"must be > 0 and < interval_ms, got {timeout_ms}")
        rise = _v.integer(d, "rise", path, 2, 1, 1000)
        fall = _v.integer(d, "fall", path, 3, 1, 1000)
        port = _v.integer(d, "port", path, None, 1, 65535) if "port" in d else None
        if kind is CheckKind.TCP:
            extra = sorted(set(d) & (cls._HTTP_KEYS | cls._HTTPS_KEYS))
            if extra:
                raise ConfigError(f"{path}.{extra[0]}", "only valid for http and https checks")
            http = None
        else:
            if kind is CheckKind.HTTP:
                extra = sorted(set(d) & cls._HTTPS_KEYS)
                if extra:
                    raise ConfigError(f"{path}.{extra[0]}", "only valid for https checks")
            http = _http_options(d, path)
        return cls(kind=kind, interval_ms=interval_ms, timeout_ms=timeout_ms, rise=rise, fall=fall, port=port,
                   http=http)


@dataclass(frozen=True, slots=True)
class BackendConfig:
    address: IPAddress
    port: int
    disabled: bool = False  # drained: still probed, never counted, out of the hash for new flows
    initial: InitialState = InitialState.DOWN

    @property
    def key(self) -> BackendId:
        """Identity used in events and snapshots: ``10.0.0.1:80`` / ``[2001:db8::1]:80``."""
        return BackendId(self.address, self.port)


@dataclass(frozen=True, slots=True)
class ServiceHealthConfig:
    name: str
    vip: IPAddress
    port: int
    checks: tuple[CheckConfig, ...]
    backends: tuple[BackendConfig, ...]
    need: int = 1
    through_vip: bool = True


# -- helpers -------------------------------------------------------------------------------------

def _http_options(d: Mapping[str, Any], path: str) -> HttpOptions:
    method = d.get("method", "GET")
    if not isinstance(method, str) or not _TOKEN.fullmatch(method) or method.upper() != method:
        raise ConfigError(f"{path}.method", f"must be an upper-case HTTP method token, got {method!r}")
    req_path = d.get("path", "/")
    if not isinstance(req_path, str) or not _PATH.fullmatch(req_path):
        raise ConfigError(f"{path}.path", f"must start with '/' and be visible ASCII, got {req_path!r}")
    host = d.get("host")
    if host is not None and (not isinstance(host, str) or not _HOST.fullmatch(host)):
        raise ConfigError(f"{path}.host", f"must be a host name or address, got {host!r}")
    expect = _expect_status(d.get("expect_status", ["200-299"]), f"{path}.expect_status")
    body = d.get("body_contains")
    if body is not None and (not isinstance(body, str) or not body):
        raise ConfigError(f"{path}.body_contains", f"must be a non-empty string, got {body!r}")
    if body is not None and method == "HEAD":
        raise ConfigError(f"{path}.body_contains", "cannot pass with method HEAD: a HEAD response has no body")
    verify = _v.boolean(d, "verify", path, True)
    sni = d.get("sni")
    if sni is not None and (not isinstance(sni, str) or not _HOST.fullmatch(sni)):
        raise ConfigError(f"{path}.sni", f"must be a host name, got {sni!r}")
    ca_file = d.get("ca_file")
    if ca_file is not None:
        if not isinstance(ca_file, str) or not ca_file:
            raise ConfigError(f"{path}.ca_file", f"must be a file path, got {ca_file!r}")
        _check_ca_file(ca_file, f"{path}.ca_file")
    return HttpOptions(method=method, path=req_path, host=host, expect_status=expect, body_contains=body,
                       verify=verify, sni=sni, ca_file=ca_file)


def _check_ca_file(ca_file: str, path: str) -> None:
    """Refuse a CA bundle that cannot be read or holds no certificate, now rather than per probe."""
    try:
        ssl.create_default_context(cafile=ca_file)
    except ssl.SSLError as exc:  # before OSError, its base class
        raise ConfigError(path, f"no CA certificate in {ca_file!r} ({exc.reason or exc})") from None
    except OSError as exc:
        raise ConfigError(path, f"cannot read {ca_file!r}: {exc.strerror or exc}") from None


def _expect_status(raw: Any, path: str) -> tuple[StatusRange, ...]:
    items = raw if isinstance(raw, list) else [raw]
    if not items:
        raise ConfigError(path, "must list at least one status or range, got []")
    out = []
    for i, item in enumerate(items):
        p = f"{path}[{i}]" if isinstance(raw, list) else path
        if isinstance(item, int) and not isinstance(item, bool) and 100 <= item <= 599:
            out.append(StatusRange(item, item))
            continue
        m = _STATUS_RANGE.fullmatch(item) if isinstance(item, str) else None
        if isinstance(item, str) and _STATUS.fullmatch(item):
            out.append(StatusRange(int(item), int(item)))
        elif m and int(m.group(1)) <= int(m.group(2)):
            out.append(StatusRange(int(m.group(1)), int(m.group(2))))
        else:
            raise ConfigError(p, f"must be a status 100..599 or a range like '200-299', got {item!r}")
    return tuple(out)
