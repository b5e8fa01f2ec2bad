"""Health-check services from plain data, for the healthcheck tests (the node builds them from its
own config instead, so this stays out of the package): the ``from_dict`` the package shipped, with
the same checks and messages.

    services:
      - name: web
        vip: 192.0.2.10
        port: 80
        need: 1                 # service is up while >= need backends are healthy
        through_vip: true       # probe the backend's MAC with the VIP as destination (DSR path)
        checks: [{kind: http, path: /healthz}]
        backends:
          - {address: 10.0.0.11, port: 80}
          - {address: 10.0.0.12, port: 80, disabled: true, initial: up}
"""
from __future__ import annotations

import re
from typing import Any

from bpf.validate import Validator
from healthcheck.config import (
    BackendConfig,
    CheckConfig,
    InitialState,
    ServiceHealthConfig,
)
from healthcheck.errors import ConfigError

_v = Validator(ConfigError, string_keys=True)
BACKEND_KEYS = frozenset({"address", "port", "disabled", "initial"})
SERVICE_KEYS = frozenset({"name", "vip", "port", "checks", "backends", "need", "through_vip"})


def backend_from_dict(data: Any, path: str) -> BackendConfig:
    d = _v.mapping(data, path)
    _v.no_unknown(d, BACKEND_KEYS, path)
    address = _v.address(_v.require(d, "address", path), f"{path}.address")
    port = _v.integer(d, "port", path, None, 1, 65535)
    disabled = _v.boolean(d, "disabled", path, False)
    initial_raw = d.get("initial", "down")
    try:
        initial = InitialState(initial_raw)
    except ValueError:
        raise ConfigError(f"{path}.initial", f"must be 'up' or 'down', got {initial_raw!r}") from None
    return BackendConfig(address=address, port=port, disabled=disabled, initial=initial)


def service_from_dict(data: Any, path: str) -> ServiceHealthConfig:
    d = _v.mapping(data, path)
    _v.no_unknown(d, SERVICE_KEYS, path)
    name = _v.require(d, "name", path)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
        raise ConfigError(f"{path}.name", f"must be 1-64 of [A-Za-z0-9_.-], got {name!r}")
    vip = _v.address(_v.require(d, "vip", path), f"{path}.vip")
    port = _v.integer(d, "port", path, None, 1, 65535)
    checks = tuple(CheckConfig.from_dict(c, f"{path}.checks[{i}]")
                   for i, c in enumerate(_v.sequence(_v.require(d, "checks", path), f"{path}.checks")))
    if not checks:
        raise ConfigError(f"{path}.checks", "must list at least one check, got []")
    backends = tuple(backend_from_dict(b, f"{path}.backends[{i}]")
                     for i, b in enumerate(_v.sequence(_v.require(d, "backends", path), f"{path}.backends")))
    seen: dict[str, int] = {}
    for i, b in enumerate(backends):
        if b.key in seen:
            raise ConfigError(f"{path}.backends[{i}]", f"duplicate of backends[{seen[b.key]}], got {b.key}")
        seen[b.key] = i
        if b.address.version != vip.version:
            raise ConfigError(f"{path}.backends[{i}].address",
                              f"must be IPv{vip.version} like the vip, got {b.address}")
    need = _v.integer(d, "need", path, 1, 1, max(1, len(backends)))
    through_vip = _v.boolean(d, "through_vip", path, True)
    return ServiceHealthConfig(name=name, vip=vip, port=port, checks=checks, backends=backends, need=need,
                               through_vip=through_vip)


def services_from_list(data: Any, path: str = "services") -> tuple[ServiceHealthConfig, ...]:
    services = tuple(service_from_dict(s, f"{path}[{i}]") for i, s in enumerate(_v.sequence(data, path)))
    names: dict[str, int] = {}
    for i, s in enumerate(services):
        if s.name in names:
            raise ConfigError(f"{path}[{i}].name", f"duplicate of {path}[{names[s.name]}], got {s.name!r}")
        names[s.name] = i
    return services
