"""Check configuration: defaults, normalisation, and errors that name the key path."""
from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest

from healthcheck.config import BackendConfig, CheckConfig, CheckKind, InitialState, StatusRange
from healthcheck.errors import ConfigError
from tests.healthcheck_yaml import backend_from_dict, service_from_dict, services_from_list

pytestmark = pytest.mark.unit


def _service(**over: Any) -> dict[str, Any]:
    svc: dict[str, Any] = {
        "name": "web", "vip": "192.0.2.10", "port": 80,
        "checks": [{"kind": "http", "path": "/healthz", "expect_status": [200, "300-302"], "body_contains": "ok"}],
        "backends": [{"address": "10.0.0.11", "port": 80}, {"address": "10.0.0.12", "port": 80, "disabled": True,
                                                             "initial": "up"}],
    }
    svc.update(over)
    return svc


def test_good_service_is_normalised_with_defaults() -> None:
    s = service_from_dict(_service(), "services[0]")
    assert s.vip == ipaddress.ip_address("192.0.2.10")
    assert s.need == 1 and s.through_vip is True
    c = s.checks[0]
    assert (c.kind, c.interval_ms, c.timeout_ms, c.rise, c.fall, c.port) == (CheckKind.HTTP, 1000, 500, 2, 3, None)
    assert c.http is not None
    assert c.http.expect_status == (StatusRange(200, 200), StatusRange(300, 302))
    assert c.http.status_ok(301) and not c.http.status_ok(204)
    assert c.http.expected_text() == "200,300-302"
    assert s.backends[1] == BackendConfig(ipaddress.ip_address("10.0.0.12"), 80, True, InitialState.UP)
    assert s.backends[0].key == "10.0.0.11:80"


def test_tcp_and_https_checks() -> None:
    tcp = CheckConfig.from_dict({"kind": "tcp", "interval_ms": 200, "port": 8080}, "c")
    assert tcp.http is None and tcp.timeout_ms == 100 and tcp.port == 8080
    tls = CheckConfig.from_dict({"kind": "https", "verify": False, "sni": "www.example.com"}, "c")
    assert tls.http is not None and tls.http.verify is False and tls.http.sni == "www.example.com"


def test_ipv6_backend_key() -> None:
    b = backend_from_dict({"address": "2001:db8::1", "port": 443}, "b")
    assert b.key == "[2001:db8::1]:443"


BAD = [
    ({"checks": [{"kind": "http", "timeout_ms": 0}]},
     "services[0].checks[0].timeout_ms: must be > 0 and < interval_ms, got 0"),
    ({"checks": [{"kind": "tcp", "interval_ms": 1000, "timeout_ms": 1000}]},
     "services[0].checks[0].timeout_ms: must be > 0 and < interval_ms, got 1000"),
    ({"checks": [{"kind": "icmp"}]}, "services[0].checks[0].kind: must be one of tcp, http, https, got 'icmp'"),
    ({"checks": [{"kind": "tcp", "rise": 0}]}, "services[0].checks[0].rise: must be 1..1000, got 0"),
    ({"checks": [{"kind": "tcp", "fall": "3"}]}, "services[0].checks[0].fall: must be an integer, got '3'"),
    ({"checks": [{"kind": "tcp", "path": "/"}]}, "services[0].checks[0].path: only valid for http and https checks"),
    ({"checks": [{"kind": "http", "verify": False}]}, "services[0].checks[0].verify: only valid for https checks"),
    ({"checks": [{"kind": "http", "tiemout_ms": 5}]}, "services[0].checks[0].tiemout_ms: unknown key"),
    ({"checks": [{"kind": "http", "path": "healthz"}]}, "services[0].checks[0].path: must start with '/'"),
    ({"checks": [{"kind": "http", "path": "/a b"}]}, "services[0].checks[0].path: must start with '/'"),
    ({"checks": [{"kind": "http", "host": "a\r\nX-Evil: 1"}]}, "services[0].checks[0].host: must be a host name"),
    ({"checks": [{"kind": "http", "method": "get"}]}, "services[0].checks[0].method: must be an upper-case"),
    ({"checks": [{"kind": "http", "expect_status": [200, "299-200"]}]},
     "services[0].checks[0].expect_status[1]: must be a status 100..599 or a range like '200-299', got '299-200'"),
    ({"checks": [{"kind": "http", "expect_status": 700}]}, "services[0].checks[0].expect_status: must be a status"),
    ({"checks": [{"kind": "http", "expect_status": []}]},
     "services[0].checks[0].expect_status: must list at least one"),
    ({"checks": [{"kind": "http", "body_contains": ""}]}, "services[0].checks[0].body_contains: must be a non-empty"),
    ({"checks": []}, "services[0].checks: must list at least one check, got []"),
    ({"checks": {"kind": "tcp"}}, "services[0].checks: must be a list, got dict"),
    ({"backends": [{"address": "10.0.0.300", "port": 80}]},
     "services[0].backends[0].address: must be an IP address, got '10.0.0.300'"),
    ({"backends": [{"address": "10.0.0.1", "port": 0}]}, "services[0].backends[0].port: must be 1..65535, got 0"),
    ({"backends": [{"address": "10.0.0.1"}]}, "services[0].backends[0].port: is required"),
    ({"backends": [{"address": "10.0.0.1", "port": 80, "initial": "maybe"}]},
     "services[0].backends[0].initial: must be 'up' or 'down', got 'maybe'"),
    ({"backends": [{"address": "10.0.0.1", "port": 80, "disabled": "yes"}]},
     "services[0].backends[0].disabled: must be true or false, got 'yes'"),
    ({"backends": [{"address": "10.0.0.1", "port": 80}, {"address": "10.0.0.1", "port": 80}]},
     "services[0].backends[1]: duplicate of backends[0], got 10.0.0.1:80"),
    ({"backends": [{"address": "2001:db8::1", "port": 80}]},
     "services[0].backends[0].address: must be IPv4 like the vip, got 2001:db8::1"),
    ({"need": 3}, "services[0].need: must be 1..2, got 3"),
    ({"through_vip": 1}, "services[0].through_vip: must be true or false, got 1"),
    ({"name": "web site"}, "services[0].name: must be 1-64 of [A-Za-z0-9_.-], got 'web site'"),
    ({"vip": None}, "services[0].vip: must be an IP address, got None"),
    # Regressions: `$` matched before a trailing LF, which then went into the request; and
    # str.isdigit() accepted "²", which int() then refused with a ValueError.
    ({"checks": [{"kind": "http", "path": "/healthz\n"}]}, "services[0].checks[0].path: must start with '/'"),
    ({"checks": [{"kind": "http", "method": "GET\n"}]}, "services[0].checks[0].method: must be an upper-case"),
    ({"checks": [{"kind": "http", "host": "www.example.com\n"}]}, "services[0].checks[0].host: must be a host name"),
    ({"checks": [{"kind": "https", "sni": "www.example.com\n"}]}, "services[0].checks[0].sni: must be a host name"),
    ({"checks": [{"kind": "http", "expect_status": ["\xb2"]}]},
     "services[0].checks[0].expect_status[0]: must be a status 100..599 or a range like '200-299', got '\xb2'"),
    ({"checks": [{"kind": "http", "expect_status": ["200-299\n"]}]},
     "services[0].checks[0].expect_status[0]: must be a status"),
    ({"checks": [{"kind": "https", "ca_file": "/nonexistent/lbnode-ca.pem"}]},
     "services[0].checks[0].ca_file: cannot read '/nonexistent/lbnode-ca.pem': No such file or directory"),
]


@pytest.mark.parametrize(("override", "message"), BAD, ids=[m.split(":")[0] + f"#{i}" for i, (_, m) in enumerate(BAD)])
def test_bad_config_names_the_key_path(override: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        service_from_dict(_service(**override), "services[0]")
    assert str(info.value).startswith(message)
    assert str(info.value) == f"{info.value.path}: {info.value.reason}"


def test_missing_and_duplicate_services() -> None:
    with pytest.raises(ConfigError, match=r"^services\[0\]\.port: is required$"):
        services_from_list([{k: v for k, v in _service().items() if k != "port"}])
    with pytest.raises(ConfigError, match=r"^services\[1\]\.name: duplicate of services\[0\], got 'web'$"):
        services_from_list([_service(), _service()])
    with pytest.raises(ConfigError, match=r"^services\[0\]: must be a mapping, got str$"):
        services_from_list(["web"])


def test_ca_file_is_read_at_load(tmp_path: Path) -> None:
    """A CA bundle that is a directory or holds no certificate is refused at load, not per probe."""
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("not a certificate\n")
    for ca_file, reason in ((str(tmp_path), f"cannot read {str(tmp_path)!r}: Is a directory"),
                            (str(not_pem), f"no CA certificate in {str(not_pem)!r}")):
        with pytest.raises(ConfigError) as info:
            service_from_dict(_service(checks=[{"kind": "https", "ca_file": ca_file}]), "services[0]")
        assert info.value.path == "services[0].checks[0].ca_file"
        assert info.value.reason.startswith(reason), info.value.reason
